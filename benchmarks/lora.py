"""LoRA on all-MiniLM-L6-v2 / SST-2: llmkit full fine-tuning, llmkit --lora, and Trainer + peft at
the same LoRA settings, each in its own process (its own peak RSS), one session.

    python benchmarks/lora.py [--rows 4000] [--epochs 3] [--seeds 42] [--lora-lr 5e-4]
    python benchmarks/lora.py --gpt2 [--steps 8] [--block 512]   # memory and speed, 124M GPT-2
    python benchmarks/lora.py --data banking77 --rows 3000 --seeds 42 1 2 3 4 \
        --tools "llmkit --lora" "Trainer + peft" [--change no-grouping|...]   # many classes

--data banking77: 77 intents, the first N rows of banking77/train.tsv (read as the quoted TSV it
is) against its dev.tsv (1,000 rows). --tools runs some of the three only.
--change makes one thing differ from the default, to find what a gap comes from: no-dropout
(--lora-dropout 0 in both tools), no-grouping (llmkit without length grouping), peft-dropout
(llmkit with peft's own dropout modules, not lean_dropout), no-decay (weight decay 0 in both),
across (llmkit's classify grouped across batches, as before 0.2.0).

--gpt2: a random 124M-parameter GPT-2 (12 layers, 768 wide, 50,257-word vocabulary) on
tinyshakespeare blocks: peak RSS and tokens/s of full fine-tuning, --lora, and --lora with
gradient checkpointing (few steps: throughput and memory, not quality).

Every run trains on the first N rows of ../shared/data/sst2/train.tsv and scores dev.tsv (872
rows); LoRA: r 16, alpha 32, dropout 0.05 on every linear layer but the classifier, which
trains in full (peft's all-linear and SEQ_CLS defaults, in both tools). Prints a table and writes
benchmarks/out/lora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
OUT = BENCH / "out"
TOOLS = ("llmkit full", "llmkit --lora", "Trainer + peft")
GPT2_RUNS = ("full", "--lora", "--lora --gradient-checkpointing")


def gpt2_one(run: str, args: argparse.Namespace) -> None:
    """One GPT-2 run in this process; prints its figures as JSON."""
    from causal_lm import DATA as TEXT
    from causal_lm import save_gpt2

    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    folder = OUT / "lora-gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    text = TEXT.read_text(encoding="utf-8")
    size = args.block * 4 * args.batch * args.steps  # ~4 characters a token
    (folder / "train.txt").write_text(text[:size], encoding="utf-8")
    (folder / "valid.txt").write_text(text[size:size + 4 * args.block * 4], encoding="utf-8")
    model = folder / "model"
    if not (model / "config.json").is_file():
        save_gpt2(model, text)
    cfg = load_config("generate", None, {
        "model": str(model), "output": str(folder / "run"), "data.train": str(folder /
                                                                              "train.txt"),
        "data.validation": str(folder / "valid.txt"), "data.sample_by": "document",
        "data.block_size": args.block, "train.epochs": 1, "train.batch_size": args.batch,
        "train.learning_rate": 5e-4 if "lora" in run else 5e-5, "train.logging_steps": 1,
        "adapter.lora": "lora" in run,
        "train.gradient_checkpointing": "checkpointing" in run})
    out = finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())["run"]
    print("RESULT " + json.dumps({
        "tokens_per_second": metrics["train_tokens_per_second"],
        "steps": metrics["train_samples"] // args.batch,
        "trainable": metrics["trainable_parameters"], "total": metrics["total_parameters"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def gpt2(args: argparse.Namespace) -> None:
    results = {}
    for run in GPT2_RUNS:
        child = subprocess.run([sys.executable, __file__, "--gpt2", f"--tool={run}", "--block",
                                str(args.block), "--batch", str(args.batch), "--steps",
                                str(args.steps)], capture_output=True, text=True)
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
        if child.returncode or not lines:
            raise SystemExit(f"{run} failed:\n{child.stderr[-3000:]}")
        results[run] = json.loads(lines[-1][7:])
        print(run, results[run], flush=True)
    print(f"\n{'':34}{'tokens/s':>10}{'peak RSS MB':>13}{'trainable':>14}")
    for run, r in results.items():
        print(f"{run:34}{r['tokens_per_second']:10.0f}{r['peak_rss_mb']:13.0f}"
              f"{r['trainable']:14,}")
    (OUT / "lora-gpt2.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                   indent=1))


CHANGES = ("no-dropout", "no-grouping", "peft-dropout", "no-decay", "across", "inside")


def banking77(rows: int) -> tuple[Path, Path]:
    """The first `rows` training rows of banking77 and its dev split, as quoted TSV files."""
    import csv

    folder = BENCH.parents[1] / "shared" / "data" / "banking77"
    with (folder / "train.tsv").open(newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f, delimiter="\t"))
    path = OUT / f"banking77-train-{rows}.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows(lines[: rows + 1])
    return path, folder / "dev.tsv"


def run_llmkit(train: Path, dev: Path, args: argparse.Namespace, lora: bool) -> dict:
    from llmkit.run import adapters
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    out = OUT / f"lora-{'adapter' if lora else 'full'}-run"
    if args.change == "peft-dropout":
        adapters.lean_dropout = lambda model: None
    if args.change in ("across", "inside"):  # classify grouped across / inside batches
        from dataclasses import replace

        from llmkit.tasks import classify

        classify.CLASSIFY = replace(classify.CLASSIFY, group_inside=args.change == "inside")
    cfg = load_config("classify", None, {
        "model": args.model, "output": str(out), "data.train": str(train),
        "data.validation": str(dev), "data.max_length": 128, "train.epochs": args.epochs,
        "train.learning_rate": args.lora_lr if lora else args.lr, "train.batch_size": 32,
        "train.weight_decay": 0.0 if args.change == "no-decay" else 0.01,
        "train.seed": args.seed, "adapter.lora": lora,
        "adapter.lora_dropout": 0.0 if args.change == "no-dropout" else 0.05,
        "train.group_by_length": args.change != "no-grouping"})
    finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    saved = out / ("adapter_model.safetensors" if lora else "model.safetensors")
    return {"accuracy": metrics["history"][-1]["accuracy"],
            "by_epoch": [round(h["accuracy"], 4) for h in metrics["history"]],
            "samples_per_second": metrics["run"]["train_samples_per_second"],
            "trainable": metrics["run"]["trainable_parameters"],
            "saved_mb": saved.stat().st_size / 2**20}


def run_trainer_peft(train: Path, dev: Path, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    transformers.set_seed(args.seed)  # the new head and adapters drawn from the seed too
    raw = datasets.load_dataset("csv", data_files={"train": str(train), "dev": str(dev)},
                                delimiter="\t", quoting=0 if args.data == "banking77" else 3)
    names = sorted(set(raw["train"]["label"]))
    ids = {name: i for i, name in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = raw.map(lambda b: {**tokenizer(b["text"], truncation=True, max_length=128),
                              "labels": [ids[x] for x in b["label"]]},
                   batched=True, remove_columns=["text", "label"])
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(names),
                                                               dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0 if
                                             args.change == "no-dropout" else 0.05,
                                             target_modules="all-linear",
                                             task_type=TaskType.SEQ_CLS))
    out = OUT / "lora-trainer-run"
    training = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lora_lr,
        per_device_train_batch_size=32, per_device_eval_batch_size=64,
        weight_decay=0.0 if args.change == "no-decay" else 0.01,
        seed=args.seed, save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=50, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": float(
                          (p.predictions.argmax(-1) == p.label_ids).mean())})
    result = trainer.train()
    accuracy = trainer.evaluate(data["dev"])["eval_accuracy"]
    model.save_pretrained(out)
    return {"accuracy": accuracy,
            "samples_per_second": round(result.metrics["train_samples_per_second"], 2),
            "trainable": model.get_nb_trainable_parameters()[0],
            "saved_mb": (out / "adapter_model.safetensors").stat().st_size / 2**20}


def one(tool: str, args: argparse.Namespace) -> None:
    """Run one tool in this process and print its figures as JSON (the child's side)."""
    from classify import DATA, subset

    OUT.mkdir(parents=True, exist_ok=True)
    train, dev = (banking77(args.rows) if args.data == "banking77"
                  else (subset(args.rows), DATA / "dev.tsv"))
    start = time.perf_counter()
    result = (run_trainer_peft(train, dev, args) if tool == TOOLS[2]
              else run_llmkit(train, dev, args, lora=tool == TOOLS[1]))
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--model", help="all-MiniLM-L6-v2 folder (default: the wheel's)")
    parser.add_argument("--data", choices=("sst2", "banking77"), default="sst2")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--change", choices=CHANGES, help="one thing unlike the default")
    parser.add_argument("--out", default="lora.json", help="JSON file under benchmarks/out")
    parser.add_argument("--gpt2", action="store_true", help="the 124M GPT-2 memory run")
    parser.add_argument("--steps", type=int, default=8, help="--gpt2: optimizer steps")
    parser.add_argument("--block", type=int, default=512, help="--gpt2: tokens per block")
    parser.add_argument("--batch", type=int, default=2, help="--gpt2: blocks per batch")
    parser.add_argument("--tool", choices=TOOLS + GPT2_RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpt2:
        return gpt2_one(args.tool, args) if args.tool else gpt2(args)
    if args.model is None:
        from classify import minilm

        args.model = minilm()
    if args.tool:
        return one(args.tool, args)
    tools = [tool for tool in TOOLS if tool in args.tools]
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for seed in args.seeds:
        for tool in tools:  # alternating, each in a fresh process
            child = subprocess.run(
                [sys.executable, __file__, f"--tool={tool}", "--seed", str(seed), "--rows",
                 str(args.rows), "--epochs", str(args.epochs), "--lr", str(args.lr),
                 "--lora-lr", str(args.lora_lr), "--model", args.model, "--data", args.data,
                 *(["--change", args.change] if args.change else [])],
                capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM":
                                                     "false"})
            lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
            if child.returncode or not lines:
                raise SystemExit(f"{tool} failed:\n{child.stderr[-3000:]}")
            runs[tool].append(json.loads(lines[-1][7:]))
            print(tool, seed, runs[tool][-1], flush=True)
    median = {tool: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
              for tool, rs in runs.items()}
    print(f"\n{'':16}{'acc (median)':>13}{'acc min-max':>14}{'samples/s':>11}{'peak RSS MB':>12}"
          f"{'trainable':>11}{'saved MB':>10}")
    for tool, m in median.items():
        accs = [r["accuracy"] for r in runs[tool]]
        print(f"{tool:16}{m['accuracy']:13.4f}{f'{min(accs):.3f}-{max(accs):.3f}':>14}"
              f"{m['samples_per_second']:11.1f}{m['peak_rss_mb']:12.0f}{m['trainable']:11,.0f}"
              f"{m['saved_mb']:10.2f}")
    ratio = (median[TOOLS[1]]["samples_per_second"] / median[TOOLS[2]]["samples_per_second"]
             if TOOLS[1] in median and TOOLS[2] in median else None)
    print(f"samples/s llmkit --lora / Trainer + peft: {ratio:.2f}" if ratio else "")
    (OUT / args.out).write_text(json.dumps({"args": vars(args), "runs": runs,
                                               "median": median, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
