"""`llmkit plot` and `llmkit push`: finished runs drawn and shared."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

PLOT_EXAMPLES = "llmkit plot runs/sst2\nllmkit plot runs/a runs/b -o compare.png"
PUSH_EXAMPLES = ("llmkit push runs/sst2 --repo-id me/minilm-sst2 --dry-run\n"
                 "llmkit push runs/sst2 --repo-id me/minilm-sst2 --private")
SHOWN = ("library_name", "pipeline_tag", "base_model", "license", "language", "tags", "datasets")


def plot(runs: Annotated[list[Path], typer.Argument(help="Finished run directories.")],
         output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG to write "
                           "(default: RUN/curves.png, or curves.png for several runs).")] = None
         ) -> None:
    """Draw training loss, learning rate and every evaluation metric of runs, on one figure."""
    from llmkit.run.card import draw

    default = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    typer.echo(str(draw(runs, output or default)))


def push(run: Annotated[str, typer.Argument(help="A finished run directory.")],
         repo_id: Annotated[str, typer.Option(help="Hub repository: USER/NAME.")],
         private: Annotated[bool, typer.Option("--private", help="Create it private.")] = False,
         dry_run: Annotated[bool, typer.Option("--dry-run", help="Upload nothing: list the "
                            "files and sizes and check the card's metadata, offline.")] = False
         ) -> None:
    """Upload a finished run to the Hugging Face Hub (one commit: all of it or nothing)."""
    from llmkit.run.card import plan
    from llmkit.run.card import push as upload

    if not dry_run:
        typer.echo(upload(run, repo_id, private))
        return
    found = plan(run, repo_id)
    files: dict[str, int] = found["files"]
    width = max(map(len, files), default=0)
    typer.echo(f"would push {run} to {repo_id}{' (private)' if private else ''}: one commit "
               f"of {len(files)} files, {size(sum(files.values()))}")
    for name, bytes_ in files.items():
        typer.echo(f"  {name:<{width}}  {size(bytes_):>9}")
    metadata = found["metadata"]
    typer.echo("model card metadata (valid for huggingface_hub's ModelCard): " + "; ".join(
        f"{k} {shown(metadata[k])}" for k in SHOWN if metadata.get(k)))
    for note in found["notes"]:
        typer.echo(f"note: {note}")
    typer.echo("nothing was uploaded (--dry-run)")


def size(count: int) -> str:
    """A byte count in decimal units, as the Hub shows file sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
