"""`llmkit export`: a run directory as ONNX, checked against PyTorch before it is written."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli.options import shown

EXAMPLES = ("llmkit export runs/sst2 --output exports/sst2\n"
            "llmkit export runs/sst2-lora --output exports/sst2-int8 --quantize int8\n"
            "llmkit export runs/gpt --output exports/gpt --check-data prompts.txt --opset 17")


def export(
    run: Annotated[str, typer.Argument(help="Run directory (full or LoRA adapter run).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder to write.")],
    format: Annotated[str, typer.Option("--format", help=shown("Export format.", "onnx"),
                                        show_default=False)] = "onnx",
    opset: Annotated[int, typer.Option(help=shown("ONNX opset.", 18), show_default=False)
                     ] = 18,
    quantize: Annotated[str | None, typer.Option(help="Also write a quantized graph: int8 "
                        "(ONNX Runtime dynamic quantization), checked for its metrics.")
                        ] = None,
    check_data: Annotated[str | None, typer.Option(help="Rows to check the export on "
                          "(default: the run's validation data).")] = None,
    tolerance: Annotated[float, typer.Option(help=shown("Largest logit difference allowed "
                         "between the export and PyTorch.", "1e-4"), show_default=False)
                         ] = 1e-4,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished export in --output.")
                         ] = False,
) -> None:
    """Export a fine-tuned run to ONNX; the export must answer as the PyTorch model did."""
    from llmkit.export import export as export_run

    report = export_run(run, output, format, opset, quantize, check_data, tolerance, overwrite)
    check = report["check"]
    typer.echo(f"checked on {check['rows']} rows: largest logit difference "
               f"{check['largest_difference']:.3g} (tolerance {check['tolerance']:g}), "
               f"predictions identical")
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in check["onnx_metrics"].items()
                        if k not in ("eval_samples", "eval_tokens"))
    if metrics:
        typer.echo(f"metrics: {metrics}")
    if "generations" in report:
        g = report["generations"]
        typer.echo(f"greedy generations identical on {g['prompts']} prompts "
                   f"({g['onnx_tokens_per_second']} tokens/s, PyTorch "
                   f"{g['torch_tokens_per_second']})")
    if "quantized" in report:
        q = report["quantized"]
        found = ", ".join(f"{k} {v:.4f}" for k, v in q["metrics"].items()
                          if k not in ("eval_samples", "eval_tokens"))
        typer.echo(f"int8: {q['size_mb']} MB ({q['size_ratio']:.2f}x of {q['fp32_size_mb']} "
                   f"MB), {q['predictions_differ']} predictions differ from PyTorch"
                   + (f"; {found}" if found else ""))
    for note in report["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"written to {output}")
