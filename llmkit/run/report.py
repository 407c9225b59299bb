"""What a run tells: the `Reporter` the command layer hands down (this base one tells nobody),
the JSON-lines training log, the figures behind both, and the manifest of how it was made."""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


LOG_FILE = "train_log.jsonl"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def parsed(line: str) -> dict[str, Any] | None:
    """One record of the log; None for a line torn by a process that was killed mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def finished(run: Path) -> dict[str, Any]:
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise LlmkitError(f"{run} is not a finished run (no metrics.json): give the output "
                          "folder of a completed llmkit finetune")
    try:
        found = json.loads(metrics.read_text(encoding="utf-8"))
        problem = "" if isinstance(found, dict) and isinstance(found.get("history"), list) and \
            "step" in (found.get("final") or {}) else "no final step and history"
    except json.JSONDecodeError as err:
        problem = f"{err.msg} at line {err.lineno}"
    if problem:
        raise LlmkitError(f"{metrics} is damaged ({problem}): the run did not finish writing "
                          "it; run it again with --resume")
    return found


def training_log(run: Path) -> list[dict[str, Any]]:
    path = run / LOG_FILE
    records = map(parsed, path.read_text(encoding="utf-8").splitlines()) if path.is_file() else []
    return [r for r in records if r and "learning_rate" in r]


class Reporter:
    """What a run says as it goes, to whoever the command layer hands down: this one tells
    nobody (the Python API, a server and a sweep get no terminal output); the CLI's
    `cli.terminal.Terminal` draws a progress bar and tables. Called on the main process only."""

    def start(self, total_steps: int, resumed_step: int, window: int) -> None:
        """The first training step is next (`window`: steps each logged loss is a mean of)."""

    def advance(self, step: int, epoch: float, record: dict[str, Any] | None) -> None:
        """An optimizer step is done; `record` on logging steps (loss, learning rate, speed)."""

    def evaluation(self, record: dict[str, Any]) -> None:
        """An evaluation (and its checkpoint) is done."""

    def say(self, message: str) -> None:
        """A line for the reader (rich markup)."""

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        """Training is over: every evaluation, and the checkpoint kept."""

    def stop(self) -> None:
        """No more steps (also after an error)."""


class Relay(Reporter):
    """A reporter that passes everything on to the one it wraps (`shown`); subclasses add to
    what they override."""

    def __init__(self, shown: Reporter):
        self.shown = shown

    def start(self, total_steps: int, resumed_step: int, window: int) -> None:
        self.shown.start(total_steps, resumed_step, window)

    def advance(self, step: int, epoch: float, record: dict[str, Any] | None) -> None:
        self.shown.advance(step, epoch, record)

    def evaluation(self, record: dict[str, Any]) -> None:
        self.shown.evaluation(record)

    def say(self, message: str) -> None:
        self.shown.say(message)

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        self.shown.summary(history, best)

    def stop(self) -> None:
        self.shown.stop()


class RunLog(Relay):
    """The run's training log (`train_log.jsonl`: a JSON record per logging step and
    evaluation), written on the main process, around the reporter handed down."""

    def __init__(self, out: Path, shown: Reporter, enabled: bool, resumed_step: int):
        super().__init__(shown)
        self.path, self.enabled = out / LOG_FILE, enabled
        if enabled and resumed_step and self.path.exists():
            # records past the checkpoint came from the attempt that was cut off: the resumed
            # run writes them again
            rows = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if (record := parsed(line)) is not None
                    and record.get("step", 0) <= resumed_step]
            self.path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def advance(self, step: int, epoch: float, record: dict[str, Any] | None) -> None:
        if record:
            self.write(record)
        self.shown.advance(step, epoch, record)

    def evaluation(self, record: dict[str, Any]) -> None:
        self.write(record)
        self.shown.evaluation(record)

    def summary(self, history: list[dict[str, Any]], best: str) -> None:
        """The table; a warning where the kept evaluation's predictions collapsed (classify)."""
        self.shown.summary(history, best)
        kept = next((r for r in history if f"checkpoint-{r['step']}" == best), {})
        if self.enabled and kept.get("collapsed"):
            logging.getLogger("llmkit").warning(
                "the kept evaluation (step %d) predicts one label for most rows: %s; the model "
                "has barely learned (train longer, or try another learning rate)", kept["step"],
                kept["collapsed"])


class Meter:
    """Running loss, a task's figures, samples and tokens since the last flush (losses stay
    tensors: no syncs). `rows_per_sample`: model rows per example (a preference pair's 2)."""

    def __init__(self, rows_per_sample: int = 1) -> None:
        self.rows_per_sample = rows_per_sample
        self.loss: float | torch.Tensor = 0.0
        self.figures: dict[str, Any] = {}
        self.batches, self.samples = 0, 0
        self.tokens: int | torch.Tensor = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: dict[str, torch.Tensor], processes: int,
            figures: dict[str, torch.Tensor] | None = None) -> None:
        self.loss = self.loss + loss.detach().float()
        for key, value in (figures or {}).items():
            self.figures[key] = self.figures.get(key, 0.0) + value.float()
        self.batches += 1
        for part in batch.get("micro_batches", [batch]):
            self.samples += part["input_ids"].shape[0] // self.rows_per_sample * processes
            mask = part.get("attention_mask")  # summed on the device: an int() here would sync
            self.tokens = self.tokens + (mask.sum() if mask is not None
                                         else part["input_ids"].numel()) * processes

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        import torch

        sums = torch.stack([torch.as_tensor(v, device=accelerator.device).reshape(())
                            for v in (self.loss, *self.figures.values())])
        means = [v / max(self.batches, 1) for v in accelerator.reduce(sums, "mean").tolist()]
        seconds, tokens = time.perf_counter() - self.start, int(self.tokens)
        result = {"loss": means[0], **dict(zip(self.figures, means[1:], strict=True)),
                  "seconds": seconds,
                  "samples_per_second": self.samples / seconds, "samples": self.samples,
                  "tokens_per_second": tokens / seconds, "tokens": tokens}
        self.__init__(self.rows_per_sample)  # type: ignore[misc]
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
    from llmkit.run.adapters import parameter_counts

    acc, counts = parts.accelerator, parameter_counts(parts.model)
    features = len(parts.train_loader.dataset)
    return [f"llmkit finetune {cfg.task}: {parts.rows[0]:,} training rows"
            + (f" ({features:,} features)" if features != parts.rows[0] else "")
            + f", {parts.rows[1]:,} validation",
            f"steps: {parts.steps_per_epoch:,} per epoch, {total_steps:,} in all; batch "
            f"{cfg.train.batch_size} x {acc.num_processes} process(es) x "
            f"{cfg.train.gradient_accumulation_steps} accumulation"
            + (f", each batch in up to {parts.batches.split} micro-batches sorted by length"
               if parts.batches.split > 1 else ""),
            f"parameters: {counts['total_parameters']:,} ({counts['trainable_parameters']:,} "
            f"trainable); device {acc.device} x {acc.num_processes}; precision "
            f"{acc.mixed_precision}; output {cfg.output}"]


PACKAGES = ("llmkit", "torch", "transformers", "accelerate", "datasets", "peft", "tokenizers")


def versions() -> dict[str, str]:
    from contextlib import suppress
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        with suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def checksums(spec: str | None) -> dict[str, str]:
    """sha256 of each local file a data option names (a glob: every match); a Hub dataset
    is named by its id."""
    import glob
    import hashlib

    paths = sorted(glob.glob(str(Path(spec).expanduser()))) or [spec] if spec else []
    found = {}
    for path in paths:
        if not Path(path).is_file():
            return {str(spec): "Hub dataset (not hashed)"}
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[path] = digest.hexdigest()
    return found


def git_commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def moment(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def command() -> str:
    return shlex.join(["llmkit", *sys.argv[1:]]) if Path(sys.argv[0]).name in (
        "llmkit", "__main__.py") else shlex.join(sys.argv)


def manifest(cfg: Any, run: dict[str, Any], started: float, ended: float) -> dict[str, Any]:
    return {"versions": versions(), "command": command(),
            "reproduce": f"llmkit finetune {cfg.task} --recipe {Path(cfg.output) / 'config.yaml'}",
            "data": {**checksums(cfg.data.train), **checksums(cfg.data.validation)},
            "seed": cfg.train.seed, "processes": run.get("num_processes"),
            "device": run.get("device"), "mixed_precision": run.get("mixed_precision"),
            "git_commit": git_commit(), "started": moment(started), "ended": moment(ended)}
