"""What a run shows and records: a rich progress bar, metric tables, a JSON-lines log."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

console = Console(stderr=True)
LOG_FILE = "train_log.jsonl"


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


def quiet_libraries() -> None:
    """Our progress bar and log lines replace the libraries' own bars and load reports."""
    import sys

    import transformers

    # datasets (0.5 s and ~150 MB with pandas and pyarrow) is imported only by the commands
    # that read data; it reads this variable when it is
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()
    # peft calls transformers APIs that transformers has deprecated: nothing for users to change
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*v6")
    transformers.utils.logging.set_verbosity_error()
    # "Removed shared tensor lm_head.weight while saving" at every checkpoint of a model with
    # tied embeddings: expected, and resuming restores the tie (also when called as a library)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


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


def parsed(line: str) -> dict[str, Any] | None:
    """One record of the log; None for a line torn by a process that was killed mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class Reporter:
    """Progress bar and log file of one run; silent on every process but the main one."""

    def __init__(self, out: Path, enabled: bool, total_steps: int, resumed_step: int,
                 window: int = 1):
        self.enabled = enabled
        self.log_path = out / LOG_FILE
        self.progress = Progress(  # the loss: the mean over the last logging window
            TextColumn("ep {task.fields[epoch]}"), BarColumn(bar_width=10), MofNCompleteColumn(),
            TextColumn(f"loss({window} step{'s' if window > 1 else ''}) {{task.fields[loss]}} "
                       "lr {task.fields[lr]} {task.fields[speed]} samples/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(compact=True),
            console=console, disable=not enabled)
        self.bar = self.progress.add_task("train", total=total_steps, completed=resumed_step,
                                          epoch="-", loss="-", lr="-", speed="-")
        if enabled and resumed_step:
            self._truncate_log(resumed_step)

    def _truncate_log(self, step: int) -> None:
        # Records past the checkpoint came from the attempt that was cut off: the resumed run
        # writes them again.
        if self.log_path.exists():
            rows = [line for line in self.log_path.read_text(encoding="utf-8").splitlines()
                    if (record := parsed(line)) is not None and record.get("step", 0) <= step]
            self.log_path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, step: int, epoch: float, record: dict[str, Any] | None) -> None:
        fields: dict[str, Any] = {"epoch": f"{epoch:.2f}"}
        if record:
            fields.update(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                          speed=f"{record['samples_per_second']:.0f}")
            self.write(record)
        self.progress.update(self.bar, completed=step, **fields)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def evaluation(self, record: dict[str, Any]) -> None:
        self.write(record)
        self.say("evaluation  " + "  ".join(f"{k} [bold]{format_value(v)}[/]"
                                            for k, v in record.items() if not isinstance(v, str)))

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        if self.enabled:
            console.print(metrics_table(history, f"evaluations (kept: {best})"))

    def done(self, history: list[dict[str, Any]], best: str, metric: str, seconds: float
             ) -> None:
        kept = next(r for r in history if f"checkpoint-{r['step']}" == best)
        self.say(f"best {metric} [bold]{format_value(kept[metric])}[/] at step {kept['step']}; "
                 f"{seconds:.0f} s in all; the model is in {self.log_path.parent}")

    def say(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)


class Meter:
    """Running loss, samples and tokens since the last flush (losses stay tensors: no syncs)."""

    def __init__(self) -> None:
        self.loss: float | torch.Tensor = 0.0
        self.batches, self.samples = 0, 0
        self.tokens: int | torch.Tensor = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], processes: int) -> None:
        self.loss = self.loss + loss.detach().float()
        self.batches += 1
        for part in batch.get("micro_batches", [batch]):
            self.samples += part["input_ids"].shape[0] * processes
            mask = part.get("attention_mask")  # summed on the device: an int() here would sync
            self.tokens = self.tokens + (mask.sum() if mask is not None
                                         else part["input_ids"].numel()) * processes

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        import torch

        loss = accelerator.reduce(torch.as_tensor(self.loss).reshape(1), "mean").item()
        seconds, tokens = time.perf_counter() - self.start, int(self.tokens)
        result = {"loss": loss / max(self.batches, 1), "seconds": seconds,
                  "samples_per_second": self.samples / seconds, "samples": self.samples,
                  "tokens_per_second": tokens / seconds, "tokens": tokens}
        self.__init__()  # type: ignore[misc]
        return result


def throughput(total: dict[str, float], evals: list[dict[str, Any]]) -> dict[str, float]:
    """Training speed over this process's part of the run, evaluations and the checkpoints
    saved with them left out."""
    seconds = total["seconds"] - sum(r["eval_seconds"] + r.get("save_seconds", 0.0)
                                     for r in evals)
    return {"train_seconds": round(seconds, 2), "train_samples": total["samples"],
            "train_samples_per_second": round(total["samples"] / seconds, 2),
            "train_tokens_per_second": round(total["tokens"] / seconds, 1)}


def track(accelerator: Accelerator, prefix: str, record: dict[str, Any]) -> None:
    """A log record's numbers to the trackers (--report-to), against the global step."""
    if accelerator.trackers:
        accelerator.log({f"{prefix}/{k}": v for k, v in record.items() if k != "step"
                         and isinstance(v, (int, float)) and not isinstance(v, bool)},
                        step=record["step"])


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory: resident set (the CPU's), and the GPU's allocations."""
    import resource

    import torch

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def header(parts: Any, cfg: Any, total_steps: int) -> list[str]:
    """What the run is about to do, before its first step."""
    from llmkit.adapters import parameter_counts

    acc, counts = parts.accelerator, parameter_counts(parts.model)
    features = len(parts.train_loader.dataset)
    return [f"llmkit finetune {cfg.task}: {parts.rows[0]:,} training rows"
            + (f" ({features:,} features)" if features != parts.rows[0] else "")
            + f", {parts.rows[1]:,} validation",
            f"steps: {parts.steps_per_epoch:,} per epoch, {total_steps:,} in all; batch "
            f"{cfg.train.batch_size} x {acc.num_processes} process(es) x "
            f"{cfg.train.gradient_accumulation_steps} accumulation"
            + (f", each batch in {parts.batches.split} micro-batches sorted by length"
               if parts.batches.split > 1 else ""),
            f"parameters: {counts['total_parameters']:,} ({counts['trainable_parameters']:,} "
            f"trainable); device {acc.device} x {acc.num_processes}; precision "
            f"{acc.mixed_precision}; output {cfg.output}"]
