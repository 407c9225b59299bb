"""`llmkit finetune TASK` (a command per task, made from the config schema: the shared sections
plus the task's own settings class, so an option, its help and its default are written once, on
the field) and `llmkit recipes`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.cli.options import (
    OPTIONS,
    PATHS,
    chosen,
    examples,
    options_of,
    parameters,
    signed,
)
from llmkit.config.recipes import shipped_recipes
from llmkit.config.schema import DataConfig, schema
from llmkit.errors import LlmkitError
from llmkit.tasks import get_task, load_config, task_names
from llmkit.tasks.task import Task

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune a pretrained checkpoint on a "
                           "task into a run directory.\n\nEach task's options: llmkit "
                           "finetune TASK --help.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and copy shipped recipes.")


def run_options(
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe YAML file, or the "
                      "name of a shipped one (llmkit recipes list).", rich_help_panel="Run")
                      ] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override any "
                         "config value: -s train.learning_rate=3e-5 (repeatable).",
                         rich_help_panel="Run")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest "
                      "checkpoint in --output.", rich_help_panel="Run")] = False,
    resume_from: Annotated[str | None, typer.Option(help="Continue from this checkpoint "
                           "folder.", rich_help_panel="Run")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in "
                         "--output.", rich_help_panel="Run")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print rows, token lengths, steps, "
                       "parameters and peak memory; no training, nothing written.",
                       rich_help_panel="Run")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="--dry-run: time a few real steps "
                       "too (also --dry-run=measure).", rich_help_panel="Run")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="--dry-run: one JSON object.")] = False,
) -> None:
    """The options of every finetune command that are not config values."""


def finetune_command(task: Task) -> Callable[..., None]:
    """The `finetune TASK` command: a typed option per config field, and the run options."""
    shared = {f.name for f in fields(DataConfig)}
    found = schema(task.settings)
    panels = [{"": "Run", "train": "Training", "adapter": "Adapters"}.get(
              dotted.rpartition(".")[0])
              or ("Data" if f.name in shared else f"{task.name} data") for dotted, f, _ in found]
    made, paths, names = options_of(found, panels)
    OPTIONS[task.name] = names | {"--recipe", "--set", "--resume", "--resume-from", "--overwrite",
                                  "--dry-run", "--measure", "--json"}
    PATHS[task.name] = {dotted.rpartition(".")[2]: dotted for dotted, _ in paths.values()}

    def command(**given: Any) -> None:
        run = {p.name: given.pop(p.name) for p in parameters(run_options)}
        if (run["measure"] or run["as_json"]) and not run["dry_run"]:
            raise LlmkitError("--measure and --json describe a --dry-run: add --dry-run (nothing "
                              "is trained then)")
        cfg = load_config(task.name, run["recipe"], chosen(given, paths), run["overrides"])
        if not run["dry_run"]:
            return train(cfg, run["resume"], run["resume_from"], run["overwrite"])
        from llmkit.run.preflight import report

        typer.echo(report(cfg, "measure" if run["measure"] else "plan", run["as_json"]))

    order = ["Run", "run", "Data", "Training", "Adapters", f"{task.name} data"]
    params: list[tuple[str, Any]] = sorted([*made, *(("run", p) for p in parameters(run_options))],
                    key=lambda item: order.index(item[0]))
    return signed(command, [p for _, p in params], None)


def train(cfg: Any, resume: bool, resume_from: str | None, overwrite: bool) -> None:
    from llmkit import finetune as run
    from llmkit.cli.terminal import Terminal

    try:
        out = run(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite,
                  reporter=Terminal())
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the last complete checkpoint is in {cfg.output}/checkpoints; "
                   "continue with the same command and --resume", err=True)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0" and not sys.stdout.isatty():
        typer.echo(str(out))  # for scripts that capture it; a terminal has the summary


for _task in map(get_task, task_names()):
    finetune_app.command(_task.name, help=f"Fine-tune on {_task.summary}.",
                         short_help=_task.summary, epilog=examples(_task.examples))(
        finetune_command(_task))


@recipes_app.command("list")
def recipes_list() -> None:
    """List shipped recipes and the command that runs each."""
    for name, path in sorted(shipped_recipes().items()):
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        typer.echo(f"{name:28} {first}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name.")]) -> None:
    """Print a shipped recipe."""
    from llmkit.config.recipes import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipes_app.command("copy")
def recipes_copy(name: Annotated[str, typer.Argument(help="Recipe name.")],
                 dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.")]
                 ) -> None:
    """Copy a shipped recipe to edit it."""
    from llmkit.config.recipes import copy_recipe

    typer.echo(str(copy_recipe(name, dest)))
