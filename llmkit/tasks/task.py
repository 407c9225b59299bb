"""The task record: what one task needs from the shared machinery, the loss conventions
every task's evaluation follows (per-example loss sums and counts), and the training step's
loss and gradients of a batch."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from llmkit.config.schema import DataConfig

IGNORE = -100  # label of tokens the loss skips (padding, prompts)
# Logit elements one evaluation forward may hold (1 GiB in fp32; the cross-entropy holds a
# second copy): a 64-row batch of 1024-token blocks with GPT-2's 50,257-word vocabulary would
# otherwise need 2 x 13 GB.
LOGITS_BUDGET = 1 << 28


@dataclass(frozen=True)
class Task:
    """What one task needs from the shared machinery."""

    name: str
    summary: str  # one line, for `llmkit finetune --help`
    # The task's data settings: a DataConfig subclass whose fields (with their help texts)
    # become this task's `finetune` options, recipe keys and `data.*` override paths. The
    # functions below receive an instance of it as `data`.
    settings: type[DataConfig]
    examples: str  # command lines for `llmkit finetune TASK --help`
    auto_model: str  # the transformers Auto class, imported by name only when a model is loaded
    # What metric_for_best may name besides eval_loss (checked before any work); the first is
    # the default
    metrics: tuple[str, ...]
    # Columns the raw rows must hold; `labelled` is False for prediction on unlabelled rows.
    columns: Callable[[Any, bool], list[str]]
    # Extra from_pretrained kwargs derived from the rows (e.g. the label list).
    model_kwargs: Callable[[Dataset, Dataset, Any], dict[str, Any]]
    # Raw rows -> model features (input_ids first; `labels` when the rows have them).
    featurize: Callable[[Dataset, PreTrainedTokenizerBase, PretrainedConfig, Any], Dataset]
    collator: Callable[[PreTrainedTokenizerBase], Callable[[list[dict[str, Any]]], Any]]
    # (model, one batch) -> per-example tensors of a fixed width, to gather across processes
    # for scoring; labelled batches include `loss_sum` and `loss_count` (the loss is their
    # ratio of sums). The model is the plain one (not the distributed wrapper).
    eval_step: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    # Gathered outputs + the evaluated features (in the same order) -> metrics; strings
    # (a metric's signature) are kept in the record, "predictions" is written to a file.
    score: Callable[[dict[str, np.ndarray], Dataset, Any, PretrainedConfig,
                     PreTrainedTokenizerBase], dict[str, Any]]
    # Gathered outputs -> one JSON-able record per row, for `llmkit predict`.
    present: Callable[[dict[str, np.ndarray], Dataset, Any, PretrainedConfig,
                       PreTrainedTokenizerBase], list[dict[str, Any]]]
    # Fits a loaded model and tokenizer to the data settings (languages, generation settings)
    # before featurizing; what it sets is saved with the run.
    prepare: Callable[[Any, PreTrainedTokenizerBase, Any], None] | None = None
    # Raw rows -> the rows to use, after the column check: text columns must hold text, and
    # labelled rows (training, evaluation) that cannot be learned from are refused or left out
    clean: Callable[[Dataset, Any, bool], Dataset] | None = None
    # Training rows and the data settings -> the settings with columns the data shows (said in
    # the log), before the columns are checked; saved with the run
    detect: Callable[[Dataset, Any], Any] | None = None
    # --group-by-length inside each batch (sorted micro-batches) rather than across batches
    group_inside: bool = False
    # The training loss of a batch and figures to log beside it (means over the batch), where
    # it is not the model's own `loss` (preference losses): (model, batch) -> (loss, figures)
    loss: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None \
        = None
    # Sets up what `loss` needs beside the model, before adapters are added (a preference
    # reference model), and may add columns to the features (precomputed reference
    # log-probabilities): (model, tokenizer, data, run config, device, (train, validation))
    # -> (train, validation)
    attach: Callable[..., tuple[Dataset, Dataset]] | None = None
    rows_per_sample: int = 1  # model rows per example (2 for a pair: chosen and rejected)
    # False: trained without dropout, the adapters' included (TRL's preference and reward
    # trainers turn it off; a policy then computes as its reference does)
    dropout: bool = True

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def usable(self, rows: Dataset, data: Any, labelled: bool) -> Dataset:
        return self.clean(rows, data, labelled) if self.clean else rows

    def chance_loss(self, config: PretrainedConfig) -> float | None:
        """The eval loss of guessing uniformly, where the task has one: a sequence classifier's
        cross-entropy over its labels, log(num_labels); None elsewhere (a reward model's single
        score, a language model)."""
        import math

        labels = getattr(config, "num_labels", 0)
        if self.auto_model == "AutoModelForSequenceClassification" and labels > 1:
            return math.log(labels)
        return None


def context_size(config: PretrainedConfig, tokenizer: Any = None) -> int | None:
    """Tokens the model can take at once: its learned positions, or its tokenizer's
    model_max_length where that is smaller (RoBERTa's 514 positions hold 512 tokens); None for
    a model without position embeddings (T5's relative positions)."""
    positions = getattr(config, "n_positions", None) or getattr(config,
                                                                "max_position_embeddings", None)
    if not positions:
        return None
    limit = getattr(tokenizer, "model_max_length", None) or positions
    return int(min(positions, limit))


_WARNED: set[tuple[int, str]] = set()


def warn_once(config: PretrainedConfig, message: str, *args: Any, level: int = logging.WARNING
              ) -> None:
    """A warning about a model, said once (train and validation data meet the same limit)."""
    if (id(config), message) not in _WARNED:
        _WARNED.add((id(config), message))
        logging.getLogger("llmkit").log(level, message, *args)


def capped(length: int, option: str, config: PretrainedConfig, tokenizer: Any = None,
           data: Any = None) -> int:
    """`length`, or the model's context where it is longer (a warning where the user asked
    for it; where it is the setting's default in `data`, a note)."""
    context = context_size(config, tokenizer)
    if context is None or length <= context:
        return length
    import dataclasses

    name = option[2:].replace("-", "_")
    default = next((f.default for f in dataclasses.fields(data) if f.name == name), None) \
        if dataclasses.is_dataclass(data) else None
    warn_once(config, f"{option} %d is more than the model's context of %d tokens; using %d",
              length, context, context,
              level=logging.INFO if length == default else logging.WARNING)
    return context


def loss_of(gathered: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean eval loss (a ratio of sums, exact however batches were split) and the row count."""
    return {"eval_loss": float(gathered["loss_sum"].sum() / gathered["loss_count"].sum()),
            "eval_samples": len(gathered["loss_sum"])}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example sums of token cross-entropy (`loss_sum`) and counts of scored tokens
    (`loss_count`), IGNORE labels skipped. Over rows of the flattened [tokens, vocab] logits:
    on the CPU 2.7-2.9x faster than over the class dimension of a transposed [batch, vocab,
    length] view, which reads the vocabulary with a stride."""
    import torch.nn.functional as F

    flat = logits.float().reshape(-1, logits.shape[-1])
    losses = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    return {"loss_sum": losses.view(labels.shape).sum(-1),
            "loss_count": (labels != IGNORE).sum(-1).float()}


def sliced_losses(logits_of: Callable[[slice], torch.Tensor], labels: torch.Tensor,
                  config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """token_losses of a batch whose logits come from `logits_of(rows)`, called on slices of
    rows small enough that one slice's logits fit LOGITS_BUDGET."""
    import torch

    vocab = getattr(config.get_text_config(), "vocab_size", None) or 1
    step = max(1, LOGITS_BUDGET // (max(1, labels.shape[1]) * vocab))
    parts = [token_losses(logits_of(slice(i, i + step)), labels[i:i + step])
             for i in range(0, len(labels), step)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def perplexity(gathered: dict[str, np.ndarray]) -> dict[str, Any]:
    """exp(token-weighted mean loss over every predicted token), and that token count."""
    from llmkit.scoring.metrics import perplexity_of

    tokens = float(gathered["loss_count"].sum())
    mean = float(gathered["loss_sum"].sum()) / tokens
    return {"perplexity": perplexity_of(mean), "eval_tokens": int(tokens)}


def own_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return model(**batch).loss, {}


def forward_backward(acc: Accelerator, model: Any, batch: dict[str, Any], task: Task
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's loss and its gradients, and the task's figures of the batch; a batch in
    micro-batches (`data.MicroBatches`) runs each, its loss weighted by its share, the gradients
    synced across processes after the last. Returns the loss, detached: the graph kept alive
    into the next forward holds hundreds of MB."""
    import torch

    objective = task.loss or own_loss
    if "micro_batches" not in batch:
        loss, figures = objective(model, batch)
        acc.backward(loss)
        return loss.detach(), figures
    total = torch.zeros((), device=acc.device)
    parts = batch["micro_batches"]
    for i, (part, share) in enumerate(zip(parts, batch["shares"], strict=True)):
        quiet = acc.sync_gradients and i < len(parts) - 1  # else accumulate() decided
        with acc.no_sync(model) if quiet else contextlib.nullcontext():
            loss = objective(model, part)[0] * share
            acc.backward(loss)
        total += loss.detach()
    return total, {}
