"""`llmkit eval`: score files, or a model on data; a table or one JSON object."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from llmkit.cli.options import BaseModel, shown, with_settings
from llmkit.errors import LlmkitError
from llmkit.scoring.files import ScoreOptions
from llmkit.scoring.metrics import ROLLING, Score

EXAMPLES = """\
llmkit eval --metric bleu --metric chrf --predictions hyp.txt \\
    --references ref.txt
llmkit eval -m bleu -p hyp.txt -r ref1.txt -r ref2.txt --tokenize intl
llmkit eval -m squad_v2 -p predictions.json -r dev-v2.0.json
llmkit eval -m f1 -m precision -m recall --average weighted -p labels.txt -r gold.txt
llmkit eval -m bleu -p new.txt -r ref.txt --baseline old.txt --paired-ar
llmkit eval -m accuracy -m macro_f1 --model runs/sst2 --data dev.tsv
llmkit eval -m perplexity --model runs/gpt --data valid.txt
llmkit eval -m rolling_perplexity -m word_perplexity --model runs/gpt --data test.txt \\
    --sample-by document --stride 512"""


@with_settings(ScoreOptions, "Scoring")
def eval_files(
    metric: Annotated[list[str], typer.Option("--metric", "-m", help="bleu, chrf, ter, rouge, "
                      "accuracy, f1, precision, recall, exact_match, squad, squad_v2 "
                      "(repeatable). With --model, its task's (accuracy, macro_f1, ...); a "
                      "language model's perplexity is training's (text packed into blocks), "
                      "and rolling_perplexity, word_perplexity, byte_perplexity and "
                      "bits_per_byte score each document on its own in rolling windows "
                      "(lm-evaluation-harness).")],
    predictions: Annotated[str | None, typer.Option("--predictions", "-p", help="One "
                           "prediction per line (squad: JSON id -> answer).")] = None,
    references: Annotated[list[str] | None, typer.Option("--references", "-r", help="One "
                          "reference per line, aligned; repeat for several references (squad: "
                          "the data file).")] = None,
    model: Annotated[str | None, typer.Option(help="Score a model instead: a run directory (or "
                     "a checkpoint with --task, or an llmkit export folder) on --data.")] = None,
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
    from llmkit.cli.eval import report

    assert settings is not None
    report(metric, predictions, references, model, data, task, split,
           {"text_column": text_column, "label_column": label_column,
            "sample_by": settings.sample_by}, asdict(settings), width,
           as_json, output, base_model)


def report(names: list[str], predictions: str | None, references: list[str] | None,
           model: str | None, data: str | None, task: str | None, split: str,
           columns: dict[str, Any], options: dict[str, Any], width: int | None, as_json: bool,
           output: Path | None, base_model: str | None = None) -> None:
    """`llmkit eval`: score files (or a model on data), print a table or one JSON object, and
    write the JSON to `output` if asked."""
    from dataclasses import asdict, replace

    from llmkit.data.read import check_output_file
    from llmkit.inference.scores import score_model
    from llmkit.scoring.files import score_files

    if output is not None:
        check_output_file(output)
    from sacrebleu.metrics import BLEU

    tokenizers = list(BLEU.TOKENIZERS)
    if options.get("tokenize") not in (None, *tokenizers):
        raise LlmkitError(f"--tokenize {options['tokenize']}: sacrebleu's tokenizers are "
                          f"{', '.join(tokenizers)}")
    if model is not None:
        if task is None and names and set(names) <= {"perplexity", *ROLLING} and not (
                Path(model) / "config.yaml").is_file():
            task = "generate"  # a checkpoint's language-model metrics: not a classify head's
        # the decimals training's log prints (report.format_value), in the table and the JSON
        scores = [replace(s, decimals=4) if s.decimals else s for s in score_model(
            names, model, data, task, split, columns, base_model, options.get("stride"))]
        payload: dict[str, Any] = {"model": model, "data": data}
    elif predictions is None or not references:
        raise LlmkitError("give --predictions and --references, or --model and --data")
    elif options.get("stride") or options.get("sample_by"):
        flag = "--stride" if options.get("stride") else "--sample-by"
        raise LlmkitError(f"{flag} scores a language model (--model and --data), not files")
    else:
        scores = score_files(names, predictions, references, options)
        payload = {"predictions": predictions, "references": references}
    payload["scores"] = [asdict(s) for s in scores]
    text = json.dumps(payload, ensure_ascii=False, default=float)
    if output:
        output.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=float)
                          + "\n", encoding="utf-8")
    if as_json:
        print(text)
        return
    show(scores, width)


def show(scores: list[Score], width: int | None) -> None:
    """The scores as a table, then any per-line scores (--sentence-level)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "signature")
    table.columns[2].overflow = "fold"
    for score in scores:
        places = score.decimals if width is None else width
        value = f"{score.value:.{places}f}"
        if "p_value" in score.details:
            value += (f" (baseline {score.details['baseline']:.{places}f}, "
                      f"p = {score.details['p_value']:.4f})")
        if "confidence_interval" in score.details:
            value += (f" (μ = {score.details['confidence_mean']:.{places}f} ± "
                      f"{score.details['confidence_interval']:.{places}f})")
        if "low" in score.details:
            value += f" ({score.details['low']:.{places}f}-{score.details['high']:.{places}f})"
        # sacrebleu's name (chrF2++) before its signature, as `sacrebleu -f text` writes them
        table.add_row(score.metric, value, "|".join(filter(None, [score.name, score.signature])))
    Console().print(table)
    for score in scores:
        if "sentence_signature" in score.details:  # sentence BLEU's differs: eff:yes
            print(f"{score.metric} by line: {score.name}|{score.details['sentence_signature']}")
        for line, value in enumerate(score.details.get("sentences", []), 1):
            places = score.decimals if width is None else width
            print(f"{score.metric}\t{line}\t{value:.{places}f}")
