"""Tasks are values: a frozen record per task says what differs; the loop does the rest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit")

IGNORE = -100  # label of tokens the loss skips (padding, prompts)
# Logit elements one evaluation forward may hold (1 GiB in fp32; the cross-entropy holds a
# second copy): a 64-row batch of 1024-token blocks with GPT-2's 50,257-word vocabulary would
# otherwise need 2 x 13 GB.
LOGITS_BUDGET = 1 << 28

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from llmkit.config import DataConfig


@dataclass(frozen=True)
class Task:
    """What one task needs from the shared machinery."""

    name: str
    summary: str
    auto_model: str  # the transformers Auto class, imported by name only when a model is loaded
    default_metric: str  # metric_for_best when the config leaves it unset
    # Columns the raw rows must hold; `labelled` is False for prediction on unlabelled rows.
    columns: Callable[[DataConfig, bool], list[str]]
    # Extra from_pretrained kwargs derived from the rows (e.g. the label list).
    model_kwargs: Callable[[Dataset, Dataset, DataConfig], dict[str, Any]]
    # Raw rows -> model features (input_ids first; `labels` when the rows have them).
    featurize: Callable[[Dataset, PreTrainedTokenizerBase, PretrainedConfig, DataConfig], Dataset]
    collator: Callable[[PreTrainedTokenizerBase], Callable[[list[dict[str, Any]]], Any]]
    # (model, one batch) -> per-example tensors of a fixed width, to gather across processes
    # for scoring; labelled batches include `loss_sum` and `loss_count` (the loss is their
    # ratio of sums). The model is the plain one (not the distributed wrapper).
    eval_step: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    # Gathered outputs + the evaluated features (in the same order) -> metrics; strings
    # (a metric's signature) are kept in the record, "predictions" is written to a file.
    score: Callable[[dict[str, np.ndarray], Dataset, DataConfig, PretrainedConfig,
                     PreTrainedTokenizerBase], dict[str, Any]]
    # Gathered outputs -> one JSON-able record per row, for `llmkit predict`.
    present: Callable[[dict[str, np.ndarray], Dataset, DataConfig, PretrainedConfig,
                       PreTrainedTokenizerBase], list[dict[str, Any]]]
    # Fits a loaded model and tokenizer to the data settings (languages, generation settings)
    # before featurizing; what it sets is saved with the run.
    prepare: Callable[[Any, PreTrainedTokenizerBase, DataConfig], None] | None = None


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
    import math

    tokens = float(gathered["loss_count"].sum())
    mean = float(gathered["loss_sum"].sum()) / tokens
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "eval_tokens": int(tokens)}


def _registry() -> dict[str, Task]:
    from llmkit.tasks.causal_lm import GENERATE
    from llmkit.tasks.classify import CLASSIFY
    from llmkit.tasks.qa import QA
    from llmkit.tasks.seq2seq import SUMMARIZE, TRANSLATE

    return {t.name: t for t in (CLASSIFY, QA, SUMMARIZE, TRANSLATE, GENERATE)}


def task_names() -> list[str]:
    return list(_registry())


def get_task(name: str) -> Task:
    tasks = _registry()
    if name not in tasks:
        raise LlmkitError(f"unknown task {name!r}; the tasks are {', '.join(tasks)}")
    return tasks[name]


def auto_class(task: Task) -> Any:
    import transformers

    return getattr(transformers, task.auto_model)


def fits(task: Task, config: PretrainedConfig) -> bool:
    """Whether transformers has a head for `task` on this architecture. Encoders (BERT) have a
    causal-LM class too, but only as a decoder half: they do not count."""
    if type(config) not in auto_class(task)._model_mapping:
        return False
    if task.auto_model == "AutoModelForCausalLM" and config.is_encoder_decoder:
        return False  # Marian and BART have a decoder-only class, but generate as seq2seq
    if task.auto_model == "AutoModelForCausalLM" and not getattr(config, "is_decoder", False):
        from transformers import AutoModelForMaskedLM

        return type(config) not in AutoModelForMaskedLM._model_mapping
    return True


def check_pairing(task: Task, config: PretrainedConfig, name: str) -> None:
    """A checkpoint whose architecture has no head for this task gets a line naming what fits."""
    if fits(task, config):
        return
    fits_ = [t.name for t in _registry().values() if fits(t, config)]
    hint = f"it fits: {', '.join(fits_)}" if fits_ else "no llmkit task fits it"
    raise LlmkitError(f"{name} is a {config.model_type} checkpoint, which has no "
                      f"{task.name} head in transformers; {hint}")


def fuse_gelu(model: Any) -> None:
    """Swap GPT-2-style tanh GELUs (gelu_new, gelu_fast: five elementwise passes over the MLP
    activations, more in the backward) for PyTorch's one-kernel tanh GELU: the same function to
    ~2e-7, 4.5x faster forward and backward on CPU (GPT-2's MLP: 11% of a training step). The
    config keeps its activation name, so the saved model is the one that was loaded."""
    from transformers.activations import ACT2CLS, ACT2FN

    slow = (ACT2CLS["gelu_new"], ACT2CLS["gelu_fast"])
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) in slow:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


def load_model(task: Task, name: str, data: DataConfig, **config_kwargs: Any
               ) -> tuple[Any, Any]:
    """Model and tokenizer of a checkpoint for `task`, fitted to the data settings; a missing
    head is added (and logged)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmkit.hub import load_pretrained

    config = load_pretrained(AutoConfig, name, **config_kwargs)
    for key, value in config_kwargs.items():  # transformers 5 drops keys it does not know
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    check_pairing(task, config, name)
    tokenizer = load_pretrained(AutoTokenizer, name)
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # transformers 5 builds an
        # empty tokenizer when the files are missing
        raise LlmkitError(f"{name} has no tokenizer files (tokenizer.json, vocab files); save "
                          "the tokenizer into the same folder with tokenizer.save_pretrained")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style vocabularies have no pad token
    import torch

    # fp32 weights whatever the checkpoint holds (transformers 5 keeps a bf16 checkpoint in
    # bf16): the optimizer needs fp32 master weights; --mixed-precision computes in bf16/fp16
    model, info = load_pretrained(auto_class(task), name, config=config, dtype=torch.float32,
                                  ignore_mismatched_sizes=True, output_loading_info=True)
    new = sorted(info["missing_keys"]) + sorted(k[0] if isinstance(k, tuple) else k
                                                 for k in info["mismatched_keys"])
    if new:
        log.info("%s has no trained %s head: new weights (%s) start from random values",
                 name, task.name, ", ".join(new[:6]) + (" ..." if len(new) > 6 else ""))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fuse_gelu(model)
    if task.prepare is not None:
        task.prepare(model, tokenizer, data)
    return model, tokenizer
