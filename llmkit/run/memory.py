"""Peak memory of a run, measured on its own worst batch (see run.preflight)."""

from __future__ import annotations

import logging
import resource
from typing import TYPE_CHECKING, Any

import torch

from llmkit.tasks.task import own_loss

if TYPE_CHECKING:
    from llmkit.config.schema import RunConfig
    from llmkit.run.build import Parts

log = logging.getLogger("llmkit")


MB = 2**20


def rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / MB
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Saved:
    """Bytes of the tensors autograd keeps for backward while it is active, each storage once."""

    def __init__(self, model: Any):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip and storage.device.type != "meta":
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> Saved:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    @property
    def largest(self) -> int:
        return max(self.seen.values(), default=0)


def worst_batch(parts: Parts, rows: int) -> dict[str, torch.Tensor]:
    from accelerate.utils import send_to_device

    from llmkit.data.features import by_length

    features = parts.train_loader.dataset
    longest = by_length(features)[:rows]
    batch = parts.task.collator(parts.tokenizer)([features[i] for i in longest])
    return send_to_device(dict(batch), parts.accelerator.device)


def activations(parts: Parts, cfg: RunConfig) -> tuple[int, int]:
    """Bytes kept for backward by one forward of the worst batch, and the largest tensor."""
    acc, model = parts.accelerator, parts.model
    plain = acc.unwrap_model(model)
    # a batch run in micro-batches keeps one micro-batch's activations at a time
    batch = worst_batch(parts, -(-cfg.train.batch_size // parts.batches.split))
    blocks = [m for m in plain.modules()
              if type(m).__name__ in (getattr(plain, "_no_split_modules", None) or [])]
    inputs: list[int] = []  # checkpointed blocks keep their inputs outside autograd's view
    handles = [b.register_forward_pre_hook(
        lambda _m, args, kw: inputs.append(next((a.nbytes for a in (*args, *kw.values())
                                                 if isinstance(a, torch.Tensor)), 0)),
        with_kwargs=True) for b in blocks] if cfg.train.gradient_checkpointing else []
    model.train()
    objective = parts.task.loss or own_loss  # a preference loss runs its reference too
    with Saved(model) as saved, acc.autocast():
        loss = objective(model, batch)[0]
    del loss
    for handle in handles:
        handle.remove()
    total = saved.total + sum(inputs)
    if cfg.train.gradient_checkpointing and blocks:
        one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        plain.activation_checkpointing_disable()
        with Saved(model) as single, acc.autocast():
            loss = objective(model, one)[0]
        del loss
        plain.activation_checkpointing_enable()
        total += single.total * batch["input_ids"].shape[0] // len(blocks)
    return total, saved.largest


def resident_peak_reset() -> bool:
    """Reset this process's peak resident size (Linux's VmHWM); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def resident_peak_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def evaluation(parts: Parts, cfg: RunConfig) -> float | None:
    """MB one evaluation step of the longest --eval-batch-size validation rows adds at its peak
    (None where a CPU's peak resident size cannot be reset)."""
    from accelerate.utils import send_to_device

    acc = parts.accelerator
    plain = acc.unwrap_model(parts.model)
    features = parts.eval_features  # longest first
    rows = [features[i] for i in range(min(cfg.train.eval_batch_size, len(features)))]
    batch = send_to_device(dict(parts.task.collator(parts.tokenizer)(rows)), acc.device)
    gpu = acc.device.type == "cuda"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / MB
    elif not resident_peak_reset():
        return None
    else:
        before = rss_mb()
    plain.eval()
    with torch.inference_mode(), acc.autocast():
        parts.task.eval_step(plain, batch)
    plain.train()
    after = torch.cuda.max_memory_allocated() / MB if gpu else resident_peak_mb()
    return max(0.0, after - before)


def estimate(parts: Parts, cfg: RunConfig) -> dict[str, Any]:
    """Peak memory per device, by part, in MB."""
    acc, model = parts.accelerator, parts.model
    gpu = acc.device.type == "cuda"
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]
                  if t.device.type == acc.device.type)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if gpu:
        torch.cuda.synchronize()
    # on a GPU, tensors the run holds beside the model's (a preference reference model)
    held = torch.cuda.memory_allocated() - weights if gpu else 0
    before = rss_mb()
    kept, largest = activations(parts, cfg)
    parts_mb = {"weights": weights / MB, "gradients": trainable * 4 / MB,
                "optimizer_states": 2 * trainable * 4 / MB, "activations": kept / MB,
                "backward_start": largest / MB, **({"other_tensors": held / MB}
                                                   if held > MB else {})}
    if not gpu:  # safetensors weights are mapped from the file: resident once training
        parts_mb["process_before_training"] = before  # touches them
    training = sum(parts_mb.values())
    transient = evaluation(parts, cfg)
    parts_mb["evaluation_step"] = transient or 0.0
    evaluating = training - parts_mb["gradients"] - parts_mb["activations"] - parts_mb[
        "backward_start"] + parts_mb["evaluation_step"]
    return {"estimated_peak_memory_mb": round(max(training, evaluating), 1),
            "peak_phase": "evaluation" if evaluating > training else "training",
            "memory_parts_mb": {k: round(v, 1) for k, v in parts_mb.items()},
            "memory_kind": "GPU allocations" if gpu else "resident set (RSS)"}
