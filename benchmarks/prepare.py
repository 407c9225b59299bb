"""Preparing a causal corpus: peak memory and speed of llmkit's preparation (read, tokenize, pack)
at two corpus sizes, beside the tokenizer's own batch speed on the same text.

    python benchmarks/prepare.py [--sizes 10 80] [--workers 1]

The corpus is the `document` texts of ../shared/data/debian-descriptions (11 MB) repeated to the
size asked, one document per line of a .txt file (`--sample-by line`); the tokenizer is GPT-2's
byte-level BPE shape trained on it (8,000 words). Each size runs in a process of its own (its own
peak RSS), with a fresh datasets cache (no reuse), then once more over the same cache (the rerun).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
DATA = BENCH.parent.parent / "shared" / "data" / "debian-descriptions" / "descriptions.jsonl"
OUT = BENCH / "out" / "prepare"


def corpus(mb: int) -> Path:
    path = OUT / f"corpus-{mb}mb.txt"
    if not path.is_file():
        texts = [" ".join(json.loads(x)["document"].split()) for x in
                 DATA.read_text(encoding="utf-8").splitlines()]
        text = "\n".join(texts) + "\n"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(max(1, round(mb * 2**20 / len(text.encode())))):
                f.write(text)
    return path


def model() -> Path:
    folder = OUT / "model"
    if not (folder / "config.json").is_file():
        from causal_lm import save_gpt2

        save_gpt2(folder, corpus(10).read_text(encoding="utf-8"), vocab_size=8000, n_layer=1,
                  n_embd=64, n_head=1)
    return folder


def one(mb: int, args: argparse.Namespace, tool: str) -> None:
    """In this process: prepare (llmkit) or tokenize (the tokenizer alone); print figures."""
    import os

    os.environ["HF_DATASETS_CACHE"] = str(OUT / f"cache-{mb}")
    path = corpus(mb)
    start = time.perf_counter()
    if tool == "tokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model())
        tokens = 0
        with path.open(encoding="utf-8") as f:
            batch: list[str] = []
            for line in f:
                batch.append(line)
                if len(batch) == 1000:
                    tokens += sum(map(len, tokenizer(batch)["input_ids"]))
                    batch = []
            tokens += sum(map(len, tokenizer(batch)["input_ids"])) if batch else 0
        blocks = tokens // args.block
    else:
        from transformers import AutoConfig, AutoTokenizer

        from llmkit.data.read import load_splits
        from llmkit.tasks import get_task, load_config

        cfg = load_config("generate", None, {
            "model": str(model()), "output": str(OUT / "run"), "data.train": str(path),
            "data.validation": str(path), "data.sample_by": "line",
            "data.block_size": args.block,
            **({"data.preprocessing_workers": args.workers} if args.workers > 1 else {})})
        train, _ = load_splits(cfg.data, 0)
        features = get_task("generate").featurize(train, AutoTokenizer.from_pretrained(
            model()), AutoConfig.from_pretrained(model()), cfg.data)
        blocks = len(features)
        tokens = blocks * args.block
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "mb": mb, "tool": tool, "seconds": round(seconds, 2), "blocks": blocks,
        "tokens_per_second": round(tokens / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 80])
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tool", default="llmkit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one, args, args.tool)
    OUT.mkdir(parents=True, exist_ok=True)
    model()
    import shutil

    rows = []
    for mb in args.sizes:
        corpus(mb)
        shutil.rmtree(OUT / f"cache-{mb}", ignore_errors=True)
        for tool in ("llmkit", "llmkit (rerun, cached)", "tokenizer"):
            child = subprocess.run([sys.executable, __file__, "--one", str(mb), "--tool",
                                    tool.split()[0], "--block", str(args.block), "--workers",
                                    str(args.workers)], capture_output=True, text=True)
            lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                raise SystemExit(child.stderr[-3000:])
            rows.append({**json.loads(lines[-1][7:]), "tool": tool})
            print(rows[-1], flush=True)
    print(f"\n{'corpus':>8} {'tool':24}{'seconds':>9}{'tokens/s':>11}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['mb']:>6}MB {r['tool']:24}{r['seconds']:9.1f}{r['tokens_per_second']:11,}"
              f"{r['peak_rss_mb']:13,.0f}")
    (OUT / "prepare.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
