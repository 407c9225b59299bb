"""An export checked against the PyTorch model it came from: the same rows through both, the
largest logit difference against a tolerance, predictions (labels, answers, greedy
generations) compared one by one, and the task's metrics of each."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.inference.exported import ort_generator
from llmkit.inference.ort import OrtModel
from llmkit.inference.predict import collect
from llmkit.tasks.task import Task, loss_of

log = logging.getLogger("llmkit")


class Twin:
    """The PyTorch model and the export side by side: answers with the export's outputs and
    keeps the largest difference between the two."""

    def __init__(self, net: Any, ort: OrtModel) -> None:
        self.net, self.ort, self.config, self.largest = net, ort, net.config, 0.0

    def __call__(self, **batch: Any) -> SimpleNamespace:
        theirs = self.ort(**batch)
        ours = self.net(**{k: v for k, v in batch.items() if k in self.ort.inputs})
        for name in self.ort.outputs:
            if name.startswith("present."):  # a causal LM's keys and values: its cache's
                continue
            gap = float((getattr(ours, name).float() - getattr(theirs, name).float()).abs().max())
            self.largest = max(self.largest, gap if math.isfinite(gap) else math.inf)  # NaN too
        return theirs


class Seq2SeqTwin:
    """An exported encoder-decoder (ort.OrtSeq2SeqLM) beside the PyTorch model, for a seq2seq
    eval_step: it answers with the export (encoder states, teacher-forced logits, generations)
    and keeps the largest difference of the encoder's states and of the decoder's logits from
    PyTorch's on the same inputs (the decoder's on the encoder graph's states)."""

    def __init__(self, net: Any, path: Path) -> None:
        self.net, self.largest = net, 0.0
        self.ort = ort_generator(path, net.config, net.generation_config)
        self.config, self.generation_config = self.ort.config, self.ort.generation_config
        self.generate = self.ort.generate
        self.prepare_decoder_input_ids_from_labels = \
            self.ort.prepare_decoder_input_ids_from_labels

    def keep(self, ours: Any, theirs: Any) -> None:
        gap = float((ours.float() - theirs.float()).abs().max())
        self.largest = max(self.largest, gap if math.isfinite(gap) else math.inf)  # NaN too

    def encode(self, **inputs: Any) -> Any:
        theirs = self.ort.get_encoder()(**inputs)
        self.keep(self.net.get_encoder()(**inputs).last_hidden_state, theirs.last_hidden_state)
        return theirs

    def get_encoder(self) -> Any:
        return self.encode

    def __call__(self, **batch: Any) -> Any:
        theirs = self.ort(**batch)
        self.keep(self.net(**batch).logits, theirs.logits)
        return theirs


@dataclass
class Check:
    """What an export's check found."""

    rows: int
    largest_difference: float
    tolerance: float
    predictions_differ: int
    metrics: dict[str, float] = field(default_factory=dict)  # PyTorch's
    onnx_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.largest_difference <= self.tolerance and self.predictions_differ == 0

    def line(self) -> str:
        return (f"largest logit difference {self.largest_difference:.3g} (tolerance "
                f"{self.tolerance:g}), {self.predictions_differ} of {self.rows} predictions "
                "differ")


def loader(task: Task, tokenizer: Any, features: Any, batch_size: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(features, batch_size=batch_size, collate_fn=task.collator(tokenizer))


def metrics_of(task: Task, arrays: dict[str, Any], features: Any, data: Any, config: Any,
               tokenizer: Any) -> dict[str, float]:
    """The task's metrics on labelled features, numbers only; {} without labels."""
    if "loss_sum" not in arrays:
        return {}
    found = {**loss_of(arrays), **task.score(arrays, features, data, config, tokenizer)}
    return {k: round(float(v), 6) for k, v in found.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def predictions(task: Task, arrays: dict[str, Any], features: Any, data: Any, config: Any,
                tokenizer: Any) -> list[Any]:
    """What a user reads of each row (a label, an answer), without scores."""
    if task.name == "generate":
        return []  # a language model's predictions are its generations (greedy_check)
    records = task.present(arrays, features, data, config, tokenizer)
    return [{k: v for k, v in r.items() if k != "score"} for r in records]


def compare(task: Task, net: Any, path: Path, tokenizer: Any, features: Any, data: Any,
            tolerance: float, batch_size: int = 32) -> Check:
    """`features` through the PyTorch model and through the export at `path` (an
    encoder-decoder's: any of its graphs)."""
    twin: Twin | Seq2SeqTwin = Seq2SeqTwin(net, path) if net.config.is_encoder_decoder \
        else Twin(net, OrtModel(path, net.config))
    ours = collect(task, net, loader(task, tokenizer, features, batch_size))
    theirs = collect(task, twin, loader(task, tokenizer, features, batch_size))
    args = (features, data, net.config, tokenizer)
    expected, found = predictions(task, ours, *args), predictions(task, theirs, *args)
    differ = sum(a != b for a, b in zip(expected, found, strict=True))
    return Check(rows=len(expected) or len(features), largest_difference=twin.largest,
                 tolerance=tolerance, predictions_differ=differ,
                 metrics=metrics_of(task, ours, *args),
                 onnx_metrics=metrics_of(task, theirs, *args))


def fail(check: Check, what: str) -> None:
    if not check.passed:
        raise LlmkitError(f"the export does not answer as the PyTorch model on {what}: "
                          f"{check.line()}; nothing was written (try another --opset, or "
                          "--tolerance if the difference is acceptable)")
