"""One entry point for the side-by-side benchmarks: llmkit and the reference tool alternate
(A B A B ...), each run in its own process (so each pays its own start-up and reports its own
peak memory), same model, data, settings and optimizer steps; medians over the rounds.

    python benchmarks/run.py --task classify [--rounds 3]
    python benchmarks/run.py --task causal | translate

(Generation speed is in causal_lm.py, eval speed in the closing notes of issue 6; they move here
next.)

Prints a table and writes it into benchmarks/RESULTS.md between this task's markers, with the
machine (cores, threads, the fp32 matmul peak measured in the same run) and library versions.
MFU = model FLOPs per second / that peak, with model FLOPs per sample = 6·N·tokens +
12·layers·width·tokens² (N = non-embedding parameters; real tokens, padding not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
RESULTS = BENCH / "RESULTS.md"
TOOLS = {"classify": ("llmkit", "Trainer"), "causal": ("llmkit", "Trainer"),
         "translate": ("llmkit", "Seq2SeqTrainer")}


def defaults(module: Any) -> argparse.Namespace:
    """The script's own default settings."""
    return module.parser().parse_args(["translate"] if module.__name__ == "seq2seq" else [])


def worker(task: str, tool: str) -> dict[str, Any]:
    """One run of one tool, in this process; the parent prepared the data and model."""
    if task == "classify":
        import classify as bench

        args = defaults(bench)
        args.model = args.model or bench.minilm()
        train = bench.OUT / f"sst2-train-{args.rows}.tsv"
        result = (bench.run_llmkit if tool == "llmkit" else bench.run_trainer)(train, args)
    elif task == "causal":
        import causal_lm as bench

        args = defaults(bench)
        paths = (bench.OUT / "train.txt", bench.OUT / "valid.txt", bench.OUT / "model")
        result = (bench.run_llmkit if tool == "llmkit" else bench.run_trainer)(*paths, args)
    else:
        import seq2seq as bench

        args = defaults(bench)
        folder = bench.OUT / "seq2seq-translate"
        paths = (folder / "model", folder / "train.jsonl", folder / "dev.jsonl")
        result = (bench.run_llmkit("translate", *paths, args) if tool == "llmkit"
                  else bench.run_trainer(*paths, args))
    return {**result, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024, 1)}


def prepare(task: str) -> dict[str, Any]:
    """Data and model files the workers read, and the FLOPs per sample of the model."""
    if task == "classify":
        import classify as bench

        args = defaults(bench)
        bench.OUT.mkdir(parents=True, exist_ok=True)
        train = bench.subset(args.rows)
        from transformers import AutoConfig, AutoTokenizer

        folder = args.model or bench.minilm()
        texts = [line.split("\t")[0] for line in train.read_text().splitlines()[1:]]
        lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(folder)(
            texts, truncation=True, max_length=args.max_length)["input_ids"]]
        return flops(AutoConfig.from_pretrained(folder), lengths)
    if task == "causal":
        import causal_lm as bench

        args = defaults(bench)
        bench.OUT.mkdir(parents=True, exist_ok=True)
        _, _, model = bench.prepare(args)
        from transformers import AutoConfig

        return flops(AutoConfig.from_pretrained(model), [args.block])
    import seq2seq as bench

    args = defaults(bench)
    folder = bench.OUT / "seq2seq-translate"
    train, _ = bench.split_rows(bench.DATA / "bible-en-es" / "old-testament.jsonl",
                                args.dev_rows, args.train_rows, folder)
    rows = [json.loads(line)["translation"] for line in train.read_text().splitlines()]
    bench.save_model([r["en"] for r in rows] + [r["es"] for r in rows], "marian", args,
                     folder / "model")
    return {}


def flops(config: Any, lengths: list[int]) -> dict[str, Any]:
    """Model FLOPs per training sample (forward and backward) from real token counts."""
    width = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    ffn = getattr(config, "intermediate_size", None) or 4 * width
    params = layers * (4 * width * width + 2 * width * ffn)  # attention + MLP matrices
    per_sample = statistics.fmean(6 * params * n + 12 * layers * width * n * n for n in lengths)
    return {"flops_per_sample": per_sample, "non_embedding_params": params,
            "mean_tokens": statistics.fmean(lengths)}


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """The best fp32 matmul FLOP/s of this machine, measured now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_rounds(task: str, rounds: int) -> dict[str, Any]:
    info = prepare(task)
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in TOOLS[task]}
    for index in range(rounds):
        for tool in TOOLS[task]:
            done = subprocess.run([sys.executable, __file__, "--worker", task, tool],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{task} {tool} failed:\n{done.stderr[-3000:]}")
            runs[tool].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {index + 1} {tool}: {runs[tool][-1]}", flush=True)
    return {"info": info, "runs": runs}


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def report(task: str, result: dict[str, Any], peak: float) -> str:
    a, b = TOOLS[task]
    ma, mb = medians(result["runs"][a]), medians(result["runs"][b])
    speed = next(k for k in ("train_samples_per_second", "train_tokens_per_second") if k in ma)
    rows = [f"| metric (median of {len(result['runs'][a])}) | {a} | {b} | ratio |",
            "|---|---|---|---|"]
    for key in ma:
        if key in mb:
            ratio = f"{ma[key] / mb[key]:.2f}×" if mb[key] else ""
            rows.append(f"| {key} | {ma[key]:.4g} | {mb[key]:.4g} | {ratio} |")
    per_sample = result["info"].get("flops_per_sample")
    if per_sample and speed == "train_samples_per_second":
        rows.append(f"| MFU | {per_sample * ma[speed] / peak:.3f} | "
                    f"{per_sample * mb[speed] / peak:.3f} | |")
    elif per_sample:
        per_token = per_sample / result["info"]["mean_tokens"]
        rows.append(f"| MFU | {per_token * ma[speed] / peak:.3f} | "
                    f"{per_token * mb[speed] / peak:.3f} | |")
    return "\n".join(rows)


def machine(peak: float) -> str:
    import accelerate
    import transformers

    return (f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32 matmul peak "
            f"{peak / 1e9:.1f} GFLOP/s (measured in this run); Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, accelerate {accelerate.__version__}")


def write(task: str, text: str) -> None:
    start, end = f"<!-- run.py:{task} -->", f"<!-- /run.py:{task} -->"
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n### `run.py --task {task}`\n\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(current, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TOOLS), default="classify")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "TOOL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    peak = matmul_peak()
    result = run_rounds(args.task, args.rounds)
    text = (f"{report(args.task, result, peak)}\n\nMachine: {machine(peak)}. "
            f"{time.strftime('%Y-%m-%d')}.\n")
    print(text)
    write(args.task, text)
    (BENCH / "out" / f"run-{args.task}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
