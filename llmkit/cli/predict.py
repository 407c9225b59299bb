"""`llmkit predict` and `llmkit merge`: a fine-tuned run put to use."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli.options import BaseModel, shown

PREDICT_EXAMPLES = ("llmkit predict --model runs/sst2 --input new.csv --output p.jsonl\n"
                    "llmkit predict --model runs/squad --question 'Who?' --context 'Ann did.'")
MERGE_EXAMPLES = "llmkit merge runs/sst2-lora --output runs/sst2-merged"


def predict_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Run directory, checkpoint or "
                     "llmkit export folder (ONNX).")],
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

    from llmkit.inference.predict import predict_rows

    records = predict_rows(model, input, output, task, batch_size, question, context,
                           {"text_column": text_column, "text_pair_column": text_pair_column},
                           base_model)
    if output is None:
        for record in records:
            typer.echo(json.dumps(record, ensure_ascii=False))
    else:
        typer.echo(f"{len(records)} predictions written to {output}")


def merge_command(run: Annotated[str, typer.Argument(help="Run directory of finetune --lora.")],
          output: Annotated[str, typer.Option("--output", "-o", help="Folder to write.")],
          base_model: BaseModel = None) -> None:
    """Merge a LoRA run into its base model: a full model plain transformers loads.

    The merged folder keeps the run's model card and manifest."""
    from llmkit.run.card import merged

    typer.echo(str(merged(run, output, base_model)))
