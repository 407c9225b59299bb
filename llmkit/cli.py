"""The `llmkit` command: a thin Typer shell over the Python API, with one error boundary.

Each `finetune TASK` command is made from the config schema (the shared sections plus the task's
own settings class), so an option, its help and its default are written once, on the field.
Heavy libraries (torch, transformers, datasets) are imported inside commands: `--help` is fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit import evaluate, generate
from llmkit.config import DataConfig, schema, shipped_recipes
from llmkit.errors import LlmkitError
from llmkit.evaluate import ScoreOptions
from llmkit.generate import GenerationSettings
from llmkit.options import (
    OPTIONS,
    PATHS,
    chosen,
    examples,
    finetune_problem,
    options_of,
    parameters,
    shown,
    signed,
    with_settings,
)
from llmkit.tasks import get_task, load_config, task_names
from llmkit.tasks.task import Task

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
                  help="Fine-tune and evaluate pretrained Hugging Face checkpoints.")
finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune a pretrained checkpoint on a "
                           "task and write a run directory: llmkit finetune TASK --help.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and copy shipped recipes.")
app.add_typer(finetune_app, name="finetune")
app.add_typer(recipes_app, name="recipes")
BaseModel = Annotated[str | None, typer.Option(help="The base model of an adapter (--lora) run, "
                                               "if not the one it was trained from.")]


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
        cfg = load_config(task.name, run["recipe"], chosen(given, paths), run["overrides"])
        if not run["dry_run"]:
            return train(cfg, run["resume"], run["resume_from"], run["overwrite"])
        from llmkit.preflight import report

        typer.echo(report(cfg, "measure" if run["measure"] else "plan", run["as_json"]))

    order = ["Run", "run", "Data", "Training", "Adapters", f"{task.name} data"]
    params: list[tuple[str, Any]] = sorted([*made, *(("run", p) for p in parameters(run_options))],
                    key=lambda item: order.index(item[0]))
    return signed(command, [p for _, p in params], None)


def train(cfg: Any, resume: bool, resume_from: str | None, overwrite: bool) -> None:
    from llmkit.train import finetune as run

    try:
        out = run(cfg, resume=resume, resume_from=resume_from, overwrite=overwrite)
    except KeyboardInterrupt:
        print(f"interrupted: the last complete checkpoint is in {cfg.output}/checkpoints; "
              "continue with the same command and --resume", file=sys.stderr)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0":
        typer.echo(str(out))


for _task in map(get_task, task_names()):
    finetune_app.command(_task.name, help=f"Fine-tune on {_task.summary}.",
                         short_help=_task.summary, epilog=examples(_task.examples))(
        finetune_command(_task))


@app.command(epilog=examples("llmkit predict --model runs/sst2 --input new.csv --output p.jsonl\n"
                             "llmkit predict --model runs/squad --question 'Who?' --context "
                             "'Ann did.'"))
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory or checkpoint.")],
    input: Annotated[str | None, typer.Option("--input", "-i", help="Rows to predict (file or "
                     "Hub id).")] = None,
    question: Annotated[str | None, typer.Option(help="qa: one question (with --context).")
                        ] = None,
    context: Annotated[str | None, typer.Option(help="qa: the context to answer from.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="JSON-lines file to write; "
                      "without it, records are printed.")] = None,
    task: Annotated[str | None, typer.Option(help="Task, for a checkpoint that is not a run "
                    "directory.")] = None,
    batch_size: Annotated[int, typer.Option(help=shown("Rows per batch.", 64),
                                            show_default=False, min=1)] = 64,
    text_column: Annotated[str | None, typer.Option(help="Text column, if not the run's.")] = None,
    text_pair_column: Annotated[str | None, typer.Option(help="Second text column.")] = None,
    base_model: BaseModel = None,
) -> None:
    """Predict every row of a file with a fine-tuned model: label and score per row."""
    import json

    from llmkit.predict import predict_rows

    records = predict_rows(model, input, output, task, batch_size, question, context,
                           {"text_column": text_column, "text_pair_column": text_pair_column},
                           base_model)
    if output is None:
        for record in records:
            typer.echo(json.dumps(record, ensure_ascii=False))
    else:
        typer.echo(f"{len(records)} predictions written to {output}")


@app.command("generate", epilog=examples(generate.EXAMPLES))
@with_settings(GenerationSettings, "Decoding")
def generate_text(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory, local checkpoint "
                     "or Hub id (causal or seq2seq).")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One prompt.")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Prompts: .txt (one per "
                     "line) or .jsonl (a 'prompt' field).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSON lines to write "
                      "(batch mode).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Chat: the prompt is a user turn (a "
                    "--input .jsonl may hold 'messages'), in the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="--chat: a system message first.")] = None,
    batch_size: Annotated[int, typer.Option(help=shown("Prompts per batch.", 16),
                                            show_default=False, min=1)] = 16,
    base_model: BaseModel = None,
    settings: GenerationSettings | None = None,
) -> None:
    """Generate text with a causal or seq2seq model: one prompt, or a file of prompts."""
    from llmkit.generate import run

    assert settings is not None
    run(model, prompt, input, output, settings, stream=stream, chat=chat,
        batch_size=batch_size, base_model=base_model, system=system)


@app.command("eval", epilog=examples(evaluate.EXAMPLES))
@with_settings(ScoreOptions, "Scoring")
def eval_files(
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="bleu, chrf, ter, rouge, "
                      "accuracy, f1, exact_match, squad, squad_v2 (repeatable); with --model, "
                      "its task's: perplexity, word_perplexity, bits_per_byte, ...")],
    predictions: Annotated[str | None, typer.Option("--predictions", "-p", help="One "
                           "prediction per line (squad: JSON id -> answer).")] = None,
    references: Annotated[list[str] | None, typer.Option("--references", "-r", help="One "
                          "reference per line, aligned; repeat for several references (squad: "
                          "the data file).")] = None,
    model: Annotated[str | None, typer.Option(help="Score a model instead: a run directory (or "
                     "a checkpoint with --task) on --data.")] = None,
    data: Annotated[str | None, typer.Option(help="Labelled rows for --model: file or Hub id.")
                    ] = None,
    task: Annotated[str | None, typer.Option(help="Task of a --model that is not a run "
                    "directory.")] = None,
    split: Annotated[str, typer.Option(help=shown("Hub split of --data.", "validation"),
                                       show_default=False)] = "validation",
    text_column: Annotated[str | None, typer.Option(help="--model: text column, if not the "
                           "run's.")] = None,
    label_column: Annotated[str | None, typer.Option(help="--model: label column.")] = None,
    width: Annotated[int | None, typer.Option("--width", "-w", help="Decimals printed "
                                              "(default: 1 on a 0-100 scale, as sacrebleu; 4 "
                                              "on a 0-1 scale).", min=0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the JSON "
                      "to this file.")] = None,
    base_model: BaseModel = None,
    settings: ScoreOptions | None = None,
) -> None:
    """Score predictions against references with the reference tools' definitions, offline."""
    from llmkit.evaluate import report

    assert settings is not None
    report(metric, predictions, references, model, data, task, split,
           {"text_column": text_column, "label_column": label_column}, asdict(settings), width,
           as_json, output, base_model)


@app.command(epilog=examples("llmkit merge runs/sst2-lora --output runs/sst2-merged"))
def merge(run: Annotated[str, typer.Argument(help="Run directory of finetune --lora.")],
          output: Annotated[str, typer.Option("--output", "-o", help="Folder to write.")],
          base_model: BaseModel = None) -> None:
    """Merge a LoRA run into its base model: a full model plain transformers loads."""
    from llmkit.predict import merge as merged

    typer.echo(str(merged(run, output, base_model)))


@app.command(epilog=examples("llmkit plot runs/sst2\nllmkit plot runs/a runs/b -o compare.png"))
def plot(runs: Annotated[list[Path], typer.Argument(help="Finished run directories.")],
         output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG to write "
                           "(default: RUN/curves.png, or curves.png for several runs).")] = None
         ) -> None:
    """Draw training loss, learning rate and every evaluation metric of runs, on one figure."""
    from llmkit.card import draw

    default = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    typer.echo(str(draw(runs, output or default)))


@app.command(epilog=examples("llmkit push runs/sst2 --repo-id me/minilm-sst2 --private"))
def push(run: Annotated[str, typer.Argument(help="A finished run directory.")],
         repo_id: Annotated[str, typer.Option(help="Hub repository: USER/NAME.")],
         private: Annotated[bool, typer.Option("--private", help="Create it private.")] = False
         ) -> None:
    """Upload a finished run to the Hugging Face Hub (one commit: all of it or nothing)."""
    from llmkit.card import push as upload

    typer.echo(upload(run, repo_id, private))


@recipes_app.command("list")
def recipes_list() -> None:
    """List shipped recipes and the command that runs each."""
    for name, path in sorted(shipped_recipes().items()):
        first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        typer.echo(f"{name:28} {first}")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name.")]) -> None:
    """Print a shipped recipe."""
    from llmkit.config import find_recipe

    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@recipes_app.command("copy")
def recipes_copy(name: Annotated[str, typer.Argument(help="Recipe name.")],
                 dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.")]
                 ) -> None:
    """Copy a shipped recipe to edit it."""
    from llmkit.config import copy_recipe

    typer.echo(str(copy_recipe(name, dest)))


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

    from llmkit.errors import one_line
    from llmkit.report import setup_logging

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
