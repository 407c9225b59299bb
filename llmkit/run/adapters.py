"""LoRA adapters through peft for training: the model wrapped, checkpoints that hold the adapter
and not the frozen base, and a leaner dropout on the adapter path."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.errors import LlmkitError
from llmkit.hub import peft_module
from llmkit.models import ADAPTER_WEIGHTS, HEADS

if TYPE_CHECKING:
    from accelerate import Accelerator

    from llmkit.config.schema import AdapterConfig, RunConfig

log = logging.getLogger("llmkit")


PEFT_TASKS = {"classify": "SEQ_CLS", "qa": "QUESTION_ANS", "translate": "SEQ_2_SEQ_LM",
              "summarize": "SEQ_2_SEQ_LM", "generate": "CAUSAL_LM",
              "dpo": "CAUSAL_LM", "reward": "SEQ_CLS"}


def linear_names(model: Any) -> list[str]:
    """The names (last part) of the model's linear layers outside its task head, as
    --lora-target-modules takes them."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and name
                   and name.split(".")[0] not in HEADS})


def wrap(model: Any, task: str, settings: AdapterConfig) -> Any:
    """The model with LoRA adapters on its linear layers; the base frozen, new heads trained."""
    peft = peft_module()
    targets: Any = list(settings.lora_target_modules) or "all-linear"
    if targets != "all-linear":
        known = linear_names(model)
        heads = [t for t in targets if t in HEADS and hasattr(model, t)]
        if heads:
            raise LlmkitError(f"--lora-target-modules {heads[0]}: that is the task head, which "
                              "trains in full beside the adapters (peft's modules_to_save); "
                              f"target the model's linear layers: {', '.join(known)}")
        missing = [t for t in targets if t not in known]
        if missing:
            raise LlmkitError(f"--lora-target-modules {', '.join(missing)}: the model has no "
                              f"such linear layer; its linear layers are {', '.join(known)}")
    config = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                             lora_dropout=settings.lora_dropout, target_modules=targets,
                             exclude_modules=[h for h in HEADS if hasattr(model, h)] or None,
                             fan_in_fan_out=any(type(m).__name__ == "Conv1D"  # GPT-2's layers
                                                for m in model.modules()),
                             task_type=getattr(peft.TaskType, PEFT_TASKS[task]))
    wrapped = peft.get_peft_model(model, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %s of %s parameters train (%.2f%%)", settings.lora_r,
             "every linear layer" if targets == "all-linear" else ", ".join(targets),
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return wrapped


class DropLinear(torch.autograd.Function):
    """`linear(dropout(x), weight)` keeping `x` (shared with the other layers that read it) and
    the mask at one bit per element for backward, instead of the dropped copy and a byte mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand(x.shape, device=x.device) >= p
        ctx.p, ctx.shape = p, x.shape
        ctx.save_for_backward(x, weight, pack_bits(keep))
        return torch.nn.functional.linear((x * keep).mul_(1 / (1 - p)), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, packed = ctx.saved_tensors
        # in the order and precision autocast's own backward of this forward would use
        scale = unpack_bits(packed, ctx.shape).to(x.dtype) / (1 - ctx.p)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype) * scale
        if ctx.needs_input_grad[1]:
            dropped = (x * scale).to(grad.dtype).reshape(-1, x.shape[-1])
            grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ dropped).to(weight.dtype)
        return grad_x, grad_weight, None


def bit_values(device: torch.device) -> torch.Tensor:
    """1, 2, 4, ..., 128 as bytes, made on the device (no copy from the host per call)."""
    return torch.pow(2, torch.arange(8, device=device)).to(torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    return (flat * bit_values(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = packed.unsqueeze(-1) & bit_values(packed.device)
    return bits.ne(0).reshape(-1)[:shape.numel()].view(shape)


class DroppedInput(torch.nn.Linear):
    """A LoRA `lora_A` that applies peft's dropout to its input itself, through `DropLinear`."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.p = linear.in_features, linear.out_features, p
        self.weight = linear.weight
        self.register_parameter("bias", None)  # peft's lora_A has none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return DropLinear.apply(x, self.weight, self.p)
        return torch.nn.functional.linear(x, self.weight)


def adapt(model: Any, cfg: RunConfig, accelerator: Accelerator, dropout: bool = True) -> Any:
    """Gradient checkpointing, and LoRA adapters when asked (their checkpoints hold the
    adapter only; without their dropout for a task trained without any)."""
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if not cfg.adapter.lora:
        return model
    if cfg.adapter.load_in_4bit:
        model = peft_module().prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings give checkpointed blocks
        # inputs without gradients, and the adapters inside them would get none
    adapter_checkpoints(accelerator)
    model = wrap(model, cfg.task, cfg.adapter if dropout else replace(cfg.adapter,
                                                                        lora_dropout=0.0))
    if not cfg.train.gradient_checkpointing:  # which recomputes the whole layer anyway
        lean_dropout(model)
    return model


def lean_dropout(model: Any) -> None:
    """Activation memory of a LoRA run about full fine-tuning's. peft drops out each adapted
    layer's input and its `lora_A` keeps that dropped copy (and the mask) for backward: one per
    layer, three where query, key and value read one input, which full fine-tuning keeps once
    (all-MiniLM-L6-v2, batch 32 x 64: 668 MB saved against 483). `DroppedInput` keeps the input
    alone and the mask in bits (487 MB; a step 2% slower than peft's on the CPU): the same
    dropout, under the same state keys (checkpoints and adapters are peft's)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not hasattr(module, "lora_A"):
            continue
        for name, dropout in dropouts.items():
            linear = module.lora_A[name]
            if (isinstance(dropout, torch.nn.Dropout) and dropout.p > 0
                    and type(linear) is torch.nn.Linear and linear.bias is None):
                module.lora_A[name] = DroppedInput(linear, dropout.p)
                dropouts[name] = torch.nn.Identity()


def parameter_counts(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable,
            "total_parameters": sum(p.numel() for p in model.parameters())}


def adapter_checkpoints(accelerator: Accelerator) -> None:
    """Checkpoints of an adapter run hold the adapter and the heads trained in full (peft's own
    files), not the frozen base: Accelerate saves and loads the other states as usual."""
    peft = peft_module()

    def save(models: list[Any], weights: list[Any], folder: str) -> None:
        for i in reversed(range(len(models))):
            inner = accelerator.unwrap_model(models[i])
            if isinstance(inner, peft.PeftModel):
                if accelerator.is_main_process:
                    inner.save_pretrained(folder)
                weights.pop(i)

    def load(models: list[Any], folder: str) -> None:
        from safetensors.torch import load_file

        for model in list(models):
            inner = accelerator.unwrap_model(model)
            if isinstance(inner, peft.PeftModel):
                state = load_file(Path(folder) / ADAPTER_WEIGHTS)
                result = peft.set_peft_model_state_dict(inner, state)
                if getattr(result, "unexpected_keys", None):
                    raise LlmkitError(f"{folder}: the adapter does not fit this model")
                models.remove(model)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
