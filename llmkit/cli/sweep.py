"""`llmkit sweep`: hyper-parameter search on Optuna; a table of the trials at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.errors import LlmkitError

EXAMPLES = """\
llmkit sweep classify --recipe classify-sst2 --param learning_rate=log:1e-5:1e-3 \\
    --param batch_size=choice:16,32 --trials 12 --output sweeps/s1
llmkit sweep classify -r sst2.yaml -p lr=log:1e-5:1e-3 --prune median -o sweeps/s2
llmkit sweep classify -r sst2.yaml -p lr=log:1e-5:1e-3 -o sweeps/s4 \\
    --trials-in-parallel 4  # one trial per GPU
llmkit sweep classify -r sst2.yaml -p lr=log:1e-5:1e-3 -o sweeps/s3 \\
    --storage postgresql://db/sweeps  # several machines, one study
llmkit sweep --show sweeps/s1"""


def sweep_command(
    task: Annotated[str | None, typer.Argument(help="The task to fine-tune (llmkit finetune "
                                               "--help lists them).")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe YAML file or a "
                      "shipped name; its sweep: section may hold params, trials, metric, "
                      "prune.")] = None,
    params: Annotated[list[str] | None, typer.Option("--param", "-p", help="A searched "
                      "setting, NAME=log:LOW:HIGH | float:LOW:HIGH | int:LOW:HIGH | choice:A,B "
                      "(repeatable; NAME as finetune's options or -s paths).")] = None,
    trials: Annotated[int | None, typer.Option(help="Trials in all, across every process on "
                      "the storage (default 20).", min=1)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Folder of the sweep: "
                      "trial-NNN run directories, study.db, best, sweep.png.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint, if not the "
                     "recipe's.")] = None,
    train: Annotated[str | None, typer.Option(help="Training rows, if not the recipe's.")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation rows.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Fixed config "
                         "values for every trial: -s train.epochs=2 (repeatable).")] = None,
    metric: Annotated[str | None, typer.Option(help="Metric to optimize (default: the task's "
                      "metric_for_best).")] = None,
    prune: Annotated[str | None, typer.Option(help="Stop poor trials early (Optuna's pruners): "
                     "median, hyperband or successive-halving; default none.")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage: sqlite:///PATH, "
                       "postgresql://..., mysql://..., or a journal FILE.log (default: "
                       "OUTPUT/study.db).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name in the storage (default: "
                          "the output folder's name).")] = None,
    trials_in_parallel: Annotated[int, typer.Option(min=1, help="Trials at once, a worker "
                                  "process each on a GPU of its own (no GPU: a CPU share).")] = 1,
    show: Annotated[Path | None, typer.Option(help="Print the summary of an earlier sweep's "
                    "OUTPUT again.")] = None,
) -> None:
    """Search hyper-parameters with Optuna; each trial is an ordinary run directory.

    The study is stored (the same command continues it); --prune stops poor trials early."""
    from llmkit.sweep.summary import load, summarize

    if show is not None:
        return shown(summarize(load(show, storage, study_name), show))
    if task is None or output is None:
        raise LlmkitError("give the TASK and --output (or --show OUTPUT)")
    from llmkit.cli.terminal import Terminal
    from llmkit.sweep.study import sweep

    given = {"model": model, "data.train": train, "data.validation": validation}
    fixed = [*(f"{k}={v}" for k, v in given.items() if v is not None), *(overrides or [])]
    study = sweep(task, output, params, trials, recipe, fixed, storage, study_name, metric,
                  prune, watch=Terminal, trials_in_parallel=trials_in_parallel)
    shown(summarize(study, Path(output)))


def shown(summary: dict[str, Any]) -> None:
    """The trials as a table, then the best one, the importances and the pictures."""
    from rich.table import Table

    from llmkit.cli.terminal import console

    names = list(dict.fromkeys(k for row in summary["trials"] for k in row["params"]))
    workers = any(row.get("worker") is not None for row in summary["trials"])
    errors = any(row["error"] for row in summary["trials"])  # the column only where one failed
    table = Table("trial", "state", summary["metric"] or "value",
                  *(n.rsplit(".", 1)[-1] for n in names), "seconds",
                  *(["worker"] if workers else []), *(["error"] if errors else []),
                  title=f"study {summary['study']} ({summary['direction']})", title_justify="left")
    for row in summary["trials"]:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        table.add_row(row["dir"] or str(row["trial"]), row["state"], value,
                      *(f"{row['params'][n]:.4g}" if isinstance(row["params"].get(n), float)
                        else str(row["params"].get(n, "")) for n in names),
                      "" if row["seconds"] is None else f"{row['seconds']:.0f}",
                      *(["" if row.get("worker") is None else str(row["worker"])]
                        if workers else []), *([(row["error"] or "")[:80]] if errors else []))
    console.print(table)
    best = summary["best"]
    if best:
        settings = ", ".join(f"-s {k}={v:.4g}" if isinstance(v, float) else f"-s {k}={v}"
                             for k, v in best["params"].items())
        typer.echo(f"best: {best['dir']} ({summary['metric']} {best['value']:.4f}), {settings}")
    if summary["importances"]:
        typer.echo("importance: " + ", ".join(f"{k} {v:.2f}"
                                              for k, v in summary["importances"].items()))
    if summary["pictures"]:
        typer.echo(f"pictures: {', '.join(summary['pictures'])}")
