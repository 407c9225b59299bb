"""`llmkit plot` and `llmkit push`: finished runs drawn and shared."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PLOT_EXAMPLES = "llmkit plot runs/sst2\nllmkit plot runs/a runs/b -o compare.png"
PUSH_EXAMPLES = "llmkit push runs/sst2 --repo-id me/minilm-sst2 --private"


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
         private: Annotated[bool, typer.Option("--private", help="Create it private.")] = False
         ) -> None:
    """Upload a finished run to the Hugging Face Hub (one commit: all of it or nothing)."""
    from llmkit.run.card import push as upload

    typer.echo(upload(run, repo_id, private))
