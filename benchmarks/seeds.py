"""Quality at llmkit's defaults beside the reference's, over seeds (issue 23).

    python benchmarks/seeds.py qa llmkit:42-46 trainer:42-46 [-- --questions 1200 ...]
    python benchmarks/seeds.py sst2 llmkit:42-46 trainer:42-46
    python benchmarks/seeds.py --table          # median, min, max per task and kind

Each job is kind:seed or kind:first-last. Kinds: `llmkit` (its defaults), `llmkit-ungrouped`
(--no-group-by-length), `trainer` (the reference at the same settings). Settings after `--` go to
the task's benchmark script (qa.py, classify.py), whose defaults are the settings of the table.
Each run is its own process (nothing carried over between seeds) and appends one JSON line to
benchmarks/out/seeds.jsonl with the task, kind, seed, settings, the commit and the score.
Tasks: qa (debian-qa, F1; windows of at most 160 tokens, which no question + context reaches
(138 at most): the same windows as the default 256, less padding for Trainer), sst2 and
banking77 (classify, accuracy), translate and summarize (seq2seq.py, eval loss; BLEU and chrF,
or ROUGE, beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("SEEDS_OUT", ROOT / "benchmarks" / "out" / "seeds.jsonl"))
SHARED = ROOT.parent / "shared" / "data"
# task -> (benchmark module, the script's own settings, the score and where it is read)
TASKS = {
    "qa": ("qa", ["--max-length", "160"], "f1"),  # no debian-qa window reaches 160 tokens
    "sst2": ("classify", ["--rows", "2000"], "accuracy"),
    "banking77": ("classify", ["--data", str(SHARED / "banking77"), "--rows", "2000",
                               "--epochs", "3", "--lr", "3e-4", "--max-length", "64"],
                  "accuracy"),
    # a random 2+2-layer 128-wide Marian from scratch, 4,000 Bible verses (seq2seq.py's logic)
    "translate": ("seq2seq", ["translate", "--train-rows", "4000", "--dev-rows", "200",
                              "--epochs", "3", "--width", "128", "--layers", "2", "--vocab",
                              "4000", "--max-new-tokens", "48"], "eval_loss"),
    # a random 2+2-layer 128-wide BART from scratch, 4,000 Debian descriptions -> synopsis
    "summarize": ("seq2seq", ["summarize", "--train-rows", "4000", "--dev-rows", "200",
                              "--epochs", "3", "--width", "128", "--layers", "2", "--vocab",
                              "4000", "--max-new-tokens", "32"], "eval_loss"),
}


def one(task: str, kind: str, seed: int, extra: list[str]) -> dict:
    """One run in this process: the task's benchmark script with its settings for this seed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    name, defaults, score = TASKS[task]
    module = __import__(name)
    args = module.parser().parse_args([*defaults, *extra, "--seed", str(seed)]
                                      + (["--no-group-by-length"] if kind == "llmkit-ungrouped"
                                         else []))
    result = module.seed_run(args, kind == "trainer")
    return {"task": task, "kind": kind, "seed": seed, score: result.pop(score),
            **result, "settings": [*defaults, *extra]}


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "llmkit"], cwd=ROOT, text=True,
                           capture_output=True).stdout.strip()
    return rev + ("+changes" if dirty else "")


def table() -> None:
    """Median, min and max per (task, kind, settings, commit) of the results file."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for line in RESULTS.read_text().splitlines():
        row = json.loads(line)
        score = TASKS[row["task"]][2]
        key = (row["task"], row["kind"], " ".join(row["settings"]), row["commit"])
        groups.setdefault(key, []).append((row["seed"], row[score]))
    print("| task | kind | settings | commit | seeds | median | min | max | by seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, kind, settings, rev), runs in sorted(groups.items()):
        values = [v for _, v in sorted(runs)]
        print(f"| {task} | {kind} | {settings} | {rev} | {len(values)} | "
              f"{statistics.median(values):.4g} | {min(values):.4g} | {max(values):.4g} | "
              + " ".join(f"{v:.4g}" for v in values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?", choices=sorted(TASKS))
    parser.add_argument("jobs", nargs="*", help="kind:seed or kind:first-last")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # kind:seed, in this process
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.table:
        return table()
    if args.one:
        kind, _, seed = args.one.partition(":")
        print("RESULT " + json.dumps(one(args.task, kind, int(seed), extra)))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rev = commit()
    for job in args.jobs:
        kind, _, seeds = job.partition(":")
        first, _, last = seeds.partition("-")
        for seed in range(int(first), int(last or first) + 1):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, args.task, "--one", f"{kind}:{seed}",
                                   "--", *extra], text=True, capture_output=True)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{args.task} {kind}:{seed} failed")
            row = {**json.loads(lines[-1][7:]), "commit": rev,
                   "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
