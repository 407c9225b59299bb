"""The terminal: the console, log lines, and the reporter that draws a run's progress."""

from __future__ import annotations

import logging
import os
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from llmkit.run.report import Reporter, format_value

console = Console(stderr=True)


def setup_logging() -> None:
    """Info from llmkit on the main process only; other ranks say nothing but errors."""
    main = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logger = logging.getLogger("llmkit")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if main else logging.ERROR)
    logger.propagate = False
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if main else logging.ERROR)


def metrics_table(history: list[dict[str, Any]], title: str) -> Table:
    """One row per metric, one column per evaluation (the latest six), so many metrics fit."""
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if k != "step" and not isinstance(history[-1].get(k), str)]  # not signatures
    shown = history[-6:]
    table = Table("step", *(str(row["step"]) for row in shown), title=title,
                  title_justify="left")
    for column in table.columns[1:]:
        column.justify = "right"
    for key in keys:
        table.add_row(key, *(format_value(row[key]) if key in row else "" for row in shown))
    return table


# the figures of every training record (report.Meter's and the loop's)
PLAIN = {"step", "epoch", "learning_rate", "loss", "seconds", "samples_per_second", "samples",
         "tokens_per_second", "tokens"}


class Terminal(Reporter):
    """A run on the terminal (stderr): a progress bar with the loss, learning rate, speed and
    ETA; a line per evaluation; the table of every evaluation at the end."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def start(self, total_steps: int, resumed_step: int, window: int) -> None:
        self.progress = Progress(  # the loss: the mean over the last logging window
            TextColumn("ep {task.fields[epoch]}"), BarColumn(bar_width=10), MofNCompleteColumn(),
            TextColumn(f"loss({window} step{'s' if window > 1 else ''}) {{task.fields[loss]}} "
                       "lr {task.fields[lr]} {task.fields[speed]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(compact=True),
            console=console)
        self.bar = self.progress.add_task("train", total=total_steps, completed=resumed_step,
                                          epoch="-", loss="-", lr="-", speed="-")
        self.progress.start()

    def advance(self, step: int, epoch: float, record: dict[str, Any] | None) -> None:
        fields: dict[str, Any] = {"epoch": f"{epoch:.2f}"}
        if record:
            # a task's own first figure beside the loss (DPO's rewards/accuracies)
            extra = next((k for k in record if k not in PLAIN), None)
            fields.update(loss=f"{record['loss']:.4f}" + (
                f" {extra.rsplit('/', 1)[-1]} {record[extra]:.3f}" if extra else ""),
                lr=f"{record['learning_rate']:.2e}", speed=f"{record['samples_per_second']:.0f}")
        if self.progress is not None:
            self.progress.update(self.bar, completed=step, **fields)

    def evaluation(self, record: dict[str, Any]) -> None:
        self.say("evaluation  " + "  ".join(f"{k} [bold]{format_value(v)}[/]"
                                            for k, v in record.items() if not isinstance(v, str)))

    def say(self, message: str) -> None:
        (self.progress.console if self.progress else console).print(message)

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        console.print(metrics_table(history, f"evaluations (kept: {best})"))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
