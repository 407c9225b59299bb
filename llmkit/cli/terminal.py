"""The terminal: the console, log lines, and the reporter that draws a run's progress."""

from __future__ import annotations

import logging
import os
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

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


def metrics_table(history: list[dict[str, Any]], width: int = 80) -> Table:
    """One row per metric, one column per evaluation: the latest six, or as many as fit in
    `width` columns with the metric names whole."""
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if k != "step" and not isinstance(history[-1].get(k), str)]  # not signatures
    cells = [[str(row["step"]), *(format_value(row[k]) if k in row else "" for k in keys)]
             for row in history[-6:]]
    names = max(len(k) for k in ["step", *keys]) + 3  # a column: padding and a border
    sizes = [max(map(len, column)) + 3 for column in cells]
    fit = next((n for n in range(len(cells), 1, -1) if 1 + names + sum(sizes[-n:]) <= width), 1)
    shown = cells[-fit:]
    table = Table("step", *(column[0] for column in shown))
    for column in table.columns[1:]:
        column.justify = "right"
    for index, key in enumerate(keys, start=1):
        table.add_row(key, *(column[index] for column in shown))
    return table


def clock(seconds: float | None) -> str:
    """0:42, 12:05 or 1:02:03; -:-- when not known yet."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Clock(ProgressColumn):
    """The time so far and, until the end, the time left: '0:18 ETA 0:42', then '0:58'."""

    def render(self, task: Any) -> Text:
        if task.finished:
            return Text(clock(task.finished_time), style="progress.elapsed")
        return Text(f"{clock(task.elapsed)} ETA {clock(task.time_remaining)}",
                    style="progress.remaining")


class Figures(ProgressColumn):
    """The loss, learning rate and speed: what a narrow terminal cuts first (…), whole."""

    def render(self, task: Any) -> Text:
        fields = task.fields
        return Text(f"loss {fields['loss']} lr {fields['lr']} {fields['speed']} samples/s",
                    no_wrap=True, overflow="ellipsis")


# the figures of every training record (report.Meter's and the loop's)
PLAIN = {"step", "epoch", "learning_rate", "loss", "seconds", "samples_per_second", "samples",
         "tokens_per_second", "tokens"}
# what an evaluation's line leaves to the final table (the bar shows the training loss)
QUIET = {"step", "epoch", "train_loss", "eval_samples", "eval_tokens", "eval_seconds",
         "save_seconds", "generated_tokens"}


class Terminal(Reporter):
    """A run on the terminal (stderr): a progress bar with the loss, learning rate, speed and
    ETA; a line per evaluation; the table of every evaluation at the end."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def start(self, total_steps: int, resumed_step: int, window: int) -> None:
        whole = Column(no_wrap=True)  # at 80 columns the figures give way, not the times
        self.progress = Progress(  # the loss: the mean over the last logging window
            TextColumn("ep {task.fields[epoch]}", table_column=whole), BarColumn(bar_width=10),
            MofNCompleteColumn(table_column=whole), Figures(), Clock(table_column=whole),
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
        """One line: the step and the metrics (the final table has the counts and times)."""
        self.say(f"eval step {record['step']}  " + "  ".join(
            f"{k} [bold]{format_value(v)}[/]" for k, v in record.items()
            if k not in QUIET and not isinstance(v, str)))

    def say(self, message: str) -> None:
        """A line as it is (a narrow terminal wraps it; a log file keeps it one line)."""
        (self.progress.console if self.progress else console).print(message, soft_wrap=True)

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        console.print(f"evaluations (kept: {best})", soft_wrap=True)
        console.print(metrics_table(history, console.width))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
