"""Preference tuning of a causal language model on chosen/rejected pairs: DPO (the sigmoid
loss), IPO, and the reference-free SimPO, as TRL's DPOTrainer (sigmoid, ipo) and CPOTrainer
(simpo, cpo_alpha 0) compute them. The reference model is the base with the adapters disabled
under --lora, a frozen copy for full fine-tuning, or its log-probabilities computed once before
training (--precompute-ref); SimPO needs none."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llmkit.config.schema import setting
from llmkit.errors import LlmkitError
from llmkit.tasks import pairs
from llmkit.tasks.reference import REFERENCE_FREE, attach, reference_log_probs, setup_of
from llmkit.tasks.task import Task

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
Loss = Literal["sigmoid", "ipo", "simpo"]


@dataclass(frozen=True)
class DpoData(pairs.PairData):
    """Preference pairs and the preference loss."""

    loss: Loss = setting("sigmoid", "sigmoid (DPO), ipo (IPO, on per-token means) or simpo "
                         "(SimPO: reference-free, length-normalised, margin --simpo-gamma).")
    beta: float = setting(0.1, "How far the model may move from the reference (DPO's beta, "
                          "IPO's tau); SimPO's reward scale (its paper uses 2 to 2.5).",
                          above=0.0)
    simpo_gamma: float = setting(0.5, "SimPO: the reward margin the chosen reply must beat "
                                 "the rejected one by.", minimum=0.0)
    precompute_ref: bool = setting(False, "Compute the reference log-probabilities once "
                                   "before training (kept in the Arrow cache) instead of "
                                   "holding a frozen copy of the model.")

    def problems(self) -> list[str]:
        found = super().problems()
        if self.test:
            found.append("--test: a preference-tuned model's pairs are scored against the "
                         "reference during training; give them as --validation")
        if self.precompute_ref and self.loss in REFERENCE_FREE:
            found.append(f"data.precompute_ref: the {self.loss} loss uses no reference model, "
                         "so there is nothing to precompute; drop --precompute-ref")
        return found


EXAMPLES = """\
llmkit finetune dpo --model runs/sft --train pairs.jsonl --output runs/dpo
llmkit finetune dpo --model ./qwen --train chats.jsonl --lora --beta 0.1 --output runs/dpo-lora
llmkit finetune dpo --model runs/sft --train pairs.jsonl --loss simpo --beta 2 \\
    --output runs/simpo"""


def model_kwargs(train: Dataset, valid: Dataset, data: DpoData) -> dict[str, Any]:
    from llmkit.tasks.chat import check_template_file

    check_template_file(data.chat_template)
    return {}


def prepare(model: Any, tokenizer: PreTrainedTokenizerBase, data: DpoData) -> None:
    """The chat template (saved with the tokenizer) and generation that stops at the end of an
    assistant turn, as `finetune generate` sets them."""
    from llmkit.tasks.chat import stop_at_turn_end, use_template

    use_template(tokenizer, data.chat_template, required=False)
    stop_at_turn_end(model, tokenizer)


def featurize(rows: Dataset, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
              data: DpoData) -> Dataset:
    from dataclasses import replace

    from llmkit.data.features import workers
    from llmkit.tasks.task import capped

    size = capped(data.max_length, "--max-length", config, tokenizer, data)
    return pairs.encode(rows, tokenizer, replace(data, max_length=size), workers(data))


def pair_losses(settings: DpoData, policy: torch.Tensor, counts: torch.Tensor,
                reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-pair loss, rewards and log-probabilities (TRL's definitions for each loss)."""
    import torch.nn.functional as F

    beta = settings.beta
    chosen, rejected = policy.chunk(2)
    chosen_count, rejected_count = counts.chunk(2)
    if settings.loss == "simpo":  # CPOTrainer: per-token means, no reference
        chosen, rejected = chosen / chosen_count, rejected / rejected_count
        return {"loss": -F.logsigmoid(beta * (chosen - rejected) - settings.simpo_gamma),
                "reward_chosen": beta * chosen, "reward_rejected": beta * rejected,
                "logps_chosen": chosen, "logps_rejected": rejected}
    assert reference is not None
    ref_chosen, ref_rejected = reference.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if settings.loss == "ipo":  # DPOTrainer: the log ratios as per-token means
        loss = (chosen_ratio / chosen_count - rejected_ratio / rejected_count
                - 1 / (2 * beta)) ** 2
    else:
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return {"loss": loss, "reward_chosen": beta * chosen_ratio,
            "reward_rejected": beta * rejected_ratio, "logps_chosen": chosen,
            "logps_rejected": rejected}


def outputs(model: Any, batch: dict[str, torch.Tensor], sliced: bool = False
            ) -> dict[str, torch.Tensor]:
    setup = setup_of(model)
    policy, counts = pairs.log_probs(model, batch, sliced)
    reference = (None if setup.settings.loss in REFERENCE_FREE
                 else reference_log_probs(model, batch, setup, sliced))
    return pair_losses(setup.settings, policy, counts, reference)


def figures(chosen: torch.Tensor, rejected: torch.Tensor, logps_chosen: torch.Tensor,
            logps_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's reward figures, as means over pairs."""
    return {"rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(), "logps/chosen": logps_chosen.mean(),
            "logps/rejected": logps_rejected.mean()}


def objective(model: Any, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of a batch of pairs (their mean), and TRL's reward figures."""
    out = outputs(model, batch)
    return out["loss"].mean(), {k: v.detach() for k, v in figures(
        out["reward_chosen"], out["reward_rejected"], out["logps_chosen"],
        out["logps_rejected"]).items()}


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    out = outputs(model, batch, sliced=True)
    return {"loss_sum": out.pop("loss"), "loss_count": torch.ones_like(out["reward_chosen"]),
            **out}


def score(gathered: dict[str, np.ndarray], features: Dataset, data: DpoData,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    import torch

    return {k: float(v) for k, v in figures(*(torch.from_numpy(gathered[k]) for k in (
        "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected"))).items()}


def present(gathered: dict[str, np.ndarray], features: Dataset, data: DpoData,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    raise LlmkitError("a preference-tuned language model has no labels to predict: use "
                      "llmkit generate")


DPO = Task(
    name="dpo",
    summary="preference pairs (chosen/rejected): DPO, IPO or SimPO",
    settings=DpoData,
    examples=EXAMPLES,
    auto_model="AutoModelForCausalLM",
    metrics=("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected"),
    columns=pairs.columns,
    model_kwargs=model_kwargs,
    featurize=featurize,
    collator=pairs.collator,
    eval_step=eval_step,
    score=score,
    present=present,
    prepare=prepare,
    clean=pairs.clean,
    detect=pairs.detect,
    loss=objective,
    attach=attach,
    rows_per_sample=2,
    dropout=False,
)
