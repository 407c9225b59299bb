"""The `llmkit` command: a thin Typer shell over the Python API, with one error boundary.

Each command group lives in a module of its own (finetune and recipes, predict and merge,
generate, eval, plot and push); this one assembles the app. Heavy libraries (torch,
transformers, datasets) are imported inside commands: `--help` is fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperOption

from llmkit.cli import chat, generate, launch, predict, runs, serve, sweep
from llmkit.cli import eval as eval_command
from llmkit.cli import export as export_command
from llmkit.cli.finetune import finetune_app, recipes_app
from llmkit.cli.options import examples, finetune_problem
from llmkit.errors import LlmkitError


def _flag_type(option: TyperOption, ctx: Any) -> str | None:
    """A flag takes no value: Typer 0.29 shows `<bool>` beside it as if it did; show nothing."""
    return None if option.is_flag else _value_type(option, ctx)


_value_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign,assignment]

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="Fine-tune and evaluate pretrained Hugging Face checkpoints.")
app.add_typer(finetune_app, name="finetune")
app.add_typer(recipes_app, name="recipes")
app.command("predict", epilog=examples(predict.PREDICT_EXAMPLES))(predict.predict_command)
app.command("generate", epilog=examples(generate.EXAMPLES))(generate.generate_text)
app.command("chat", epilog=examples(chat.EXAMPLES))(chat.chat_command)
app.command("eval", epilog=examples(eval_command.EXAMPLES))(eval_command.eval_files)
app.command("merge", epilog=examples(predict.MERGE_EXAMPLES))(predict.merge_command)
app.command("plot", epilog=examples(runs.PLOT_EXAMPLES))(runs.plot)
app.command("push", epilog=examples(runs.PUSH_EXAMPLES))(runs.push)
app.command("sweep", epilog=examples(sweep.EXAMPLES))(sweep.sweep_command)
app.command("export", epilog=examples(export_command.EXAMPLES))(export_command.export)
app.command("serve", epilog=examples(serve.EXAMPLES))(serve.serve)
app.command("launch", epilog=examples(launch.EXAMPLES),
            options_metavar="[OPTIONS] finetune TASK [ITS OPTIONS]", context_settings={
    "allow_extra_args": True, "ignore_unknown_options": True,
    "allow_interspersed_args": False})(launch.launch)


def show_version(value: bool) -> None:
    if value:
        from llmkit import __version__

        typer.echo(f"llmkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=show_version,
                                               is_eager=True, help="Print the version.")
                            ] = False) -> None:
    """Fine-tune and evaluate pretrained Hugging Face checkpoints."""


def main() -> None:
    """Entry point: any failure is one line on stderr and a non-zero exit (the traceback with
    LLMKIT_DEBUG=1); see errors.one_line."""
    from typer._click.exceptions import NoArgsIsHelpError

    from llmkit.cli.terminal import setup_logging
    from llmkit.errors import one_line

    setup_logging()
    try:
        argv = [{"--dry-run=measure": "--measure", "--dry-run=plan": "--dry-run"}.get(a, a)
                for a in sys.argv[1:]]
        argv += ["--dry-run"] if "--dry-run=measure" in sys.argv else []
        problem = finetune_problem(argv)
        if problem:
            raise LlmkitError(problem)
        code = app(args=argv, prog_name="llmkit", standalone_mode=False)
    except NoArgsIsHelpError:
        code = 2  # the help is printed already
    except Exception as err:
        if os.environ.get("LLMKIT_DEBUG") == "1":
            raise
        line, code = one_line(err, sys.argv[1:])
        rank = f"[rank {os.environ.get('RANK')}] " if os.environ.get("WORLD_SIZE", "1") != "1" \
            else ""
        print(f"error: {rank}{line}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
