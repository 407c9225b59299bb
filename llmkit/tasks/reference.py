"""The reference model of a preference loss: the base with the adapters disabled under
--lora, a frozen copy for full fine-tuning, or its log-probabilities computed once before
training (--precompute-ref); reference-free losses (SimPO) hold none. What a policy's objective
needs beside its batch is attached to the model (`attach`) and found from it (`setup_of`)."""

from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.tasks.pairs import collator, log_probs

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
REFERENCE_FREE = ("simpo",)


@dataclass
class Setup:
    """What a policy model's objective needs beside its batch."""

    settings: Any  # the run's preference.DpoData
    reference: Any = None  # a frozen copy; None: adapters disabled, precomputed or not needed
    precision: str = "no"  # --mixed-precision: the copy computes as the policy does

    def autocast(self, device: torch.device) -> Any:
        """The policy's autocast (Accelerate's, in training) for the reference's forwards."""
        import contextlib

        import torch

        if self.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, {"bf16": "bfloat16"}.get(
            self.precision, "float16")))


SETUPS: weakref.WeakKeyDictionary[Any, Setup] = weakref.WeakKeyDictionary()


def setup_of(model: Any) -> Setup:
    """The setup attached to a policy, through its distributed and adapter wrappers."""
    plain = getattr(model, "module", model)
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
    if base not in SETUPS:
        raise LlmkitError("a preference-tuned model's rewards are measured against its "
                          "reference model, which only its training run holds: they are in "
                          "the run's metrics.json; llmkit generate uses the model")
    return SETUPS[base]


def reference_log_probs(model: Any, batch: dict[str, torch.Tensor], setup: Setup,
                        sliced: bool = False) -> torch.Tensor:
    """The reference model's log-probabilities of the batch's replies: precomputed, from the
    frozen copy, or from the policy with its adapters disabled."""
    import torch

    if "ref_logps" in batch:
        return batch["ref_logps"]
    plain = getattr(model, "module", model)
    with torch.no_grad():
        if setup.reference is not None:
            with setup.autocast(batch["input_ids"].device):
                return log_probs(setup.reference, batch, sliced)[0].float()
        with plain.disable_adapter():
            return log_probs(plain, batch, sliced)[0]


def attach(model: Any, tokenizer: PreTrainedTokenizerBase, data: Any, run: Any,
           device: torch.device, sets: tuple[Dataset, Dataset]) -> tuple[Dataset, Dataset]:
    """Before adapters are added (the task trains without dropout), the reference: none for a
    reference-free loss, the policy's own log-probabilities computed now (--precompute-ref),
    the base with adapters disabled (--lora), else a frozen copy of the model."""
    SETUPS[model] = Setup(data, precision=run.train.mixed_precision)
    if data.loss in REFERENCE_FREE or run.adapter.lora and not data.precompute_ref:
        return sets
    if data.precompute_ref:
        return tuple(precompute(model, tokenizer, features, run, device)
                     for features in sets)
    SETUPS[model].reference = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    log.info("reference model: a frozen copy of %s (--lora or --precompute-ref hold none)",
             run.model)
    return sets


def precompute(model: Any, tokenizer: PreTrainedTokenizerBase, features: Dataset, run: Any,
               device: torch.device) -> Dataset:
    """The reference log-probabilities of every pair, as two columns kept in datasets' Arrow
    cache (a rerun, --resume or a second process reads them back)."""
    import torch
    from accelerate.utils import send_to_device
    from datasets.fingerprint import Hasher

    from llmkit.hub import weights_identity

    collate = collator(tokenizer)
    if not getattr(model, "hf_device_map", None):  # a 4-bit base is placed when loaded
        model.to(device)
    setup = SETUPS[model]

    def add(batch: dict[str, list[Any]]) -> dict[str, list[float]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(),
                                                                         strict=True)]
        with torch.inference_mode(), setup.autocast(device):
            logps = log_probs(model, send_to_device(collate(rows), device), sliced=True)[0]
        chosen, rejected = logps.float().cpu().chunk(2)
        return {"ref_chosen_logps": chosen.tolist(), "ref_rejected_logps": rejected.tolist()}

    return features.map(add, batched=True, batch_size=run.train.eval_batch_size,
                         desc="reference log-probabilities",
                         new_fingerprint=Hasher.hash((features._fingerprint, "reference",
                                                      weights_identity(run.model),
                                                      run.config_overrides, run.from_scratch,
                                                      run.train.seed, setup.precision)))
