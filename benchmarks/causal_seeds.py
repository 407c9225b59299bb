"""Perplexity over many seeds on the causal benchmark: llmkit, Trainer, and a plain PyTorch loop
(same model, fused AdamW, linear schedule with 5% warm-up, clipping at 1.0) fed either llmkit's
batches in llmkit's order or run_clm.py's blocks in a seeded random order. The plain loop tells
whether a perplexity gap between the tools comes from their loops or from the batch order.

    python benchmarks/causal_seeds.py plain-llmkit:42-61 plain-runclm:42-61 llmkit:42-61 \
        trainer:42-61 [--data input.txt] [--budget 540]

Each job is kind:seed or kind:first-last. One JSON line per run, also appended to
benchmarks/out/causal_seeds.jsonl (or $OUT/results.jsonl where OUT is set). fp32; the settings
are causal_lm.py's defaults (6-layer 384-wide GPT-2, block 256, batch 16, lr 1e-3, one epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import causal_lm as bench  # noqa: E402
import run  # noqa: E402

BLOCK, BATCH, LR = 256, 16, 1e-3


def runclm_blocks(tok, path: Path) -> torch.Tensor:
    """run_clm.py: lines (line breaks kept) tokenized, joined and cut per 1000-line map batch."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out: list[list[int]] = []
    for i in range(0, len(lines), 1000):
        ids = [t for line in tok(lines[i:i + 1000])["input_ids"] for t in line]
        out += [ids[j:j + BLOCK] for j in range(0, len(ids) // BLOCK * BLOCK, BLOCK)]
    return torch.tensor(out)


def llmkit_batches(tok, train: Path, seed: int) -> list[torch.Tensor]:
    """llmkit's packed blocks (the text as one document) in its sampler's order for `seed`."""
    from datasets import Dataset

    from llmkit.data.batches import LengthGroupedBatches
    from llmkit.tasks.causal_lm import pack

    ids = tok(train.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(pack(Dataset.from_dict({"ids": [ids]}), BLOCK, tok.eos_token_id,
                               False)["input_ids"])
    return [blocks[b] for b in LengthGroupedBatches([BLOCK] * len(blocks), BATCH, seed, True)]


def plain(model_dir: Path, valid: torch.Tensor, seed: int, batches: list[torch.Tensor],
          device: str) -> dict:
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, get_scheduler

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    sched = get_scheduler("linear", opt, num_warmup_steps=math.ceil(0.05 * len(batches)),
                          num_training_steps=len(batches))
    for x in batches:
        x = x.to(device)
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.inference_mode():
        total = sum(model(input_ids=c.to(device), labels=c.to(device)).loss.item() * len(c)
                    for c in valid.split(BATCH))
    return {"perplexity": math.exp(total / len(valid)), "steps": len(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", help="kind:seed or kind:first-last; kind is "
                        "plain-llmkit, plain-runclm, llmkit or trainer")
    parser.add_argument("--data", type=Path, help="another copy of tinyshakespeare/input.txt")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which no new run starts")
    args = parser.parse_args()
    start = time.time()
    extra = ["--data", str(args.data)] if args.data else []
    run.prepare("causal", extra)
    train, valid_text, model_dir = (bench.OUT / "train.txt", bench.OUT / "valid.txt",
                                    bench.OUT / "model")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    valid, blocks = runclm_blocks(tok, valid_text), runclm_blocks(tok, train)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_file = (Path(os.environ["OUT"]) / "results.jsonl" if os.environ.get("OUT")
                else bench.OUT.parent / "causal_seeds.jsonl")
    for spec in args.jobs:
        kind, _, seeds = spec.partition(":")
        first, _, last = seeds.partition("-")
        for seed in range(int(first), int(last or first) + 1):
            if time.time() - start > args.budget:
                raise SystemExit(f"out of time before {kind}:{seed}")
            if kind == "plain-llmkit":
                result = plain(model_dir, valid, seed, llmkit_batches(tok, train, seed), device)
            elif kind == "plain-runclm":
                order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
                result = plain(model_dir, valid, seed, list(blocks[order].split(BATCH)), device)
            elif kind in ("llmkit", "trainer"):
                fn = bench.run_llmkit if kind == "llmkit" else bench.run_trainer
                result = fn(train, valid_text, model_dir, run.settings("causal", seed, extra))
            else:
                raise SystemExit(f"unknown kind {kind!r}")
            line = json.dumps({"kind": kind, "seed": seed, "device": device, **result})
            print(line, flush=True)
            with out_file.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
