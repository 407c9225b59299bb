"""llmkit export on a real classifier: all-MiniLM-L6-v2 fine-tuned on SST-2, then PyTorch eager
vs ONNX Runtime fp32 and int8 on the CPU, batch 1 and batch 32.

    python benchmarks/export.py [--rows 2000] [--epochs 3] [--run runs/sst2] [--threads 2]
        [--timed-rows 256]
    python benchmarks/export.py --gpt2-run DIR --marian-run DIR [--prompts 32] [--new-tokens 64]

Fine-tunes the model on the first N rows of ../shared/data/sst2/train.tsv with llmkit (unless
--run names a finished classify run), exports it with `--quantize int8` (the export's own check
runs the 872 dev rows), then times each runtime on the first --timed-rows dev rows (tokenized
beforehand, the same threads for all) and scores all dev rows. Prints a table and writes JSON to
benchmarks/out/export.json. Targets (issue 34): fp32 identical predictions and >= 1.5x PyTorch's
rows/s at batch 1; int8 within 1 point of accuracy at >= 2x the rows/s and <= 0.35x the size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
OUT = ROOT / "benchmarks" / "out"


def trained_run(args: argparse.Namespace) -> Path:
    import sys

    sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ is not a package
    from benchmarks.classify import minilm, subset
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    if args.run:
        return Path(args.run)
    cfg = load_config("classify", None, {
        "model": minilm(), "output": str(OUT / "export-run"), "data.train": str(subset(args.rows)),
        "data.validation": str(DATA / "dev.tsv"), "data.max_length": 128,
        "train.epochs": args.epochs, "train.learning_rate": 5e-5, "train.batch_size": 32})
    return finetune(cfg, overwrite=True)


def batches(tokenizer: Any, texts: list[str], size: int) -> list[dict[str, np.ndarray]]:
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=128,
                           return_tensors="np")) for i in range(0, len(texts), size)]


def runner(kind: str, folder: Path, run: Path, threads: int) -> Any:
    """A function of one tokenized batch -> logits (numpy)."""
    if kind == "pytorch":
        from llmkit.inference.predict import prepare

        net = prepare(str(run), None, None)[2].eval()

        def eager(batch: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return net(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

        return eager
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    graph = folder / ("model.onnx" if kind == "onnx fp32" else "model.int8.onnx")
    session = onnxruntime.InferenceSession(str(graph), options,
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda batch: session.run(["logits"], {n: batch[n] for n in names})[0]


def measure(kind: str, folder: Path, run: Path, texts: list[str], labels: list[int],
            args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    call = runner(kind, folder, run, args.threads)
    logits = np.concatenate([call(b) for b in batches(tokenizer, texts, 64)])
    found: dict[str, Any] = {"accuracy": round(float((logits.argmax(-1) == labels).mean()), 4)}
    for size in (1, 32):
        timed = batches(tokenizer, texts[:args.timed_rows], size)
        call(timed[0])  # warm-up
        start = time.perf_counter()
        for batch in timed:
            call(batch)
        found[f"rows_per_second_b{size}"] = round(args.timed_rows / (time.perf_counter() -
                                                                     start), 1)
    found["logits"] = logits
    return found


def generation_prompts(kind: str, count: int) -> list[str]:
    """`count` prompts: user turns from debian-qa's dev questions for the chat GPT-2, the last
    English verses of the Old Testament for the Marian."""
    shared = ROOT.parent / "shared" / "data"
    if kind == "gpt2":
        articles = json.loads((shared / "debian-qa" / "dev.json").read_text())["data"]
        return [q["question"] for a in articles for p in a["paragraphs"] for q in p["qas"]
                ][:count]
    lines = (shared / "bible-en-es" / "old-testament.jsonl").read_text().splitlines()
    return [json.loads(line)["translation"]["en"] for line in lines[-count:]]


def generation(kind: str, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export a generation run (its own check: greedy generations against PyTorch), then
    `llmkit generate`'s code on --prompts prompts, greedy, with the run's weights and with the
    export: new tokens/s at batch 1 and 16, and how many outputs differ."""
    from llmkit.export import export
    from llmkit.inference.generate import GenerationSettings, generate, load_prompts

    folder = OUT / f"export-{kind}"
    report = export(run, folder, overwrite=True)
    given = generation_prompts(kind, args.prompts)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, num_beams=1)
    found: dict[str, Any] = {"export_check": report.get("generations"),
                             "notes": report.get("notes")}
    outputs = {}
    for name, model in (("pytorch", run), ("onnx", folder)):
        net, tokenizer, prompts = load_prompts(str(model), given, chat=kind == "gpt2")
        for size in (1, 16):
            generate(net, tokenizer, prompts[:size], settings, size, templated=kind == "gpt2")
            start = time.perf_counter()
            records = generate(net, tokenizer, prompts, settings, size,
                               templated=kind == "gpt2")
            seconds = time.perf_counter() - start
            found[f"{name} tokens_per_second_b{size}"] = round(
                sum(r["new_tokens"] for r in records) / seconds, 1)
        outputs[name] = [r["output"] for r in records]
    found["prompts"] = len(given)
    found["outputs_differ"] = sum(a != b for a, b in zip(outputs["pytorch"], outputs["onnx"],
                                                         strict=True))
    for size in (1, 16):
        found[f"speedup_b{size}"] = round(found[f"onnx tokens_per_second_b{size}"] /
                                          found[f"pytorch tokens_per_second_b{size}"], 2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--run", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timed-rows", type=int, default=256)
    parser.add_argument("--gpt2-run", default=None, help="a chat generate run (preference.py's "
                        "SFT model: benchmarks/out/preference/sft): its export's speed")
    parser.add_argument("--marian-run", default=None, help="a translate run (seq2seq.py "
                        "translate: benchmarks/out/translate-llmkit): its export's speed")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {"gpt2": args.gpt2_run, "marian": args.marian_run}
    if any(runs.values()):
        found = {k: generation(k, Path(v), args) for k, v in runs.items() if v}
        (OUT / "export-generation.json").write_text(json.dumps(found, indent=1))
        print(json.dumps(found, indent=1))
        return
    from llmkit.export import export

    run = trained_run(args)
    folder = OUT / "export-onnx"
    report = export(run, folder, quantize="int8", overwrite=True, rows=10_000)
    lines = [line.split("\t") for line in (DATA / "dev.tsv").read_text().splitlines()[1:]]
    texts, labels = [t for t, _ in lines], [int(y) for _, y in lines]
    results = {k: measure(k, folder, run, texts, labels, args)
               for k in ("pytorch", "onnx fp32", "onnx int8")}
    eager = results["pytorch"].pop("logits")
    for kind in ("onnx fp32", "onnx int8"):
        logits = results[kind].pop("logits")
        results[kind]["max_logit_difference"] = float(np.abs(logits - eager).max())
        results[kind]["predictions_differ"] = int((logits.argmax(-1) != eager.argmax(-1)).sum())
        for size in (1, 32):
            results[kind][f"speedup_b{size}"] = round(
                results[kind][f"rows_per_second_b{size}"] /
                results["pytorch"][f"rows_per_second_b{size}"], 2)
    results["onnx fp32"]["size_mb"] = report["size_mb"]
    results["onnx int8"]["size_mb"] = report["quantized"]["size_mb"]
    results["onnx int8"]["size_ratio"] = report["quantized"]["size_ratio"]
    summary = {"run": str(run), "threads": args.threads, "timed_rows": args.timed_rows,
               "dev_rows": len(texts), "export_check": report["check"], "results": results}
    (OUT / "export.json").write_text(json.dumps(summary, indent=1))
    print(f"{'runtime':<10} {'acc':>7} {'b1 rows/s':>10} {'b32 rows/s':>11} {'max diff':>9}")
    for kind, r in results.items():
        print(f"{kind:<10} {r['accuracy']:>7.4f} {r['rows_per_second_b1']:>10} "
              f"{r['rows_per_second_b32']:>11} {r.get('max_logit_difference', 0):>9.2g}")


if __name__ == "__main__":
    main()
