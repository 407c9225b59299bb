"""`finetune --dry-run`: the run's own preparation (config, data, columns, model, tokenization,
loaders, optimizer) with no training after it and nothing written, and what the run will cost.

Peak memory per device = weights + fp32 gradients of the trainable parameters + AdamW's two
fp32 states + activations + the largest one of them again (its gradient, while backward
starts). Activations are not guessed from a formula: one forward pass of the worst batch (the
longest rows, --batch-size of them), in the run's precision, with gradient checkpointing and
adapters as the run has them, counts every tensor autograd keeps for backward (each storage
once, parameters left out). Checkpointed blocks keep only their inputs; the one block recomputed
during backward is counted from a one-row forward without checkpointing, scaled to the batch.
On a CPU, the figure is the process's resident memory (libraries and data, measured before
that forward) plus the rest; on a GPU, what PyTorch allocates on the device. Evaluation can peak
above training (--eval-batch-size rows at once, a language model's logits over its vocabulary):
one evaluation step of the longest validation rows is measured (the peak of allocations on a
GPU, of resident memory on Linux), and the estimate is the larger of the two phases, evaluation
holding the weights and optimizer states (gradients are freed after each step). Not counted:
on a CPU, what the allocator holds on to between steps of varying shapes.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llmkit.config import RunConfig
    from llmkit.train import Parts

log = logging.getLogger("llmkit")
MB = 2**20


def rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / MB
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(counts: Any, cap: int | None) -> dict[str, Any]:
    import numpy as np

    if not len(counts):
        return {}
    values = np.asarray(counts)
    found: dict[str, Any] = {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99)}
    found["max"] = int(values.max())
    if cap:
        found["at_cap"] = round(float((values >= cap).mean()), 4)  # cut there, or exactly that long
    return found


def token_lengths(parts: Parts, cfg: RunConfig) -> dict[str, Any]:
    """Token-length percentiles per split (source and target for seq2seq), and the share of rows
    at the length cap."""
    from llmkit.data import lengths
    from llmkit.tasks.task import capped

    model = parts.accelerator.unwrap_model(parts.model)
    data = parts.data
    cap = getattr(data, "max_length", None) or getattr(data, "block_size", None)
    if cap:
        option = "--max-length" if hasattr(data, "max_length") else "--block-size"
        cap = capped(cap, option, model.config, parts.tokenizer)
    found: dict[str, Any] = {}
    for split, features in (("train", parts.train_loader.dataset),
                            ("validation", parts.eval_features)):
        found[split] = {"tokens": percentiles(lengths(features), cap)}
        if "labels" in features.column_names and parts.task.name in ("translate", "summarize"):
            target = getattr(data, "max_target_length", None)
            found[split]["target_tokens"] = percentiles(lengths(features, "labels"), target)
    return found


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

    from llmkit.data import by_length

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
    with Saved(model) as saved, acc.autocast():
        loss = model(**batch).loss
    del loss
    for handle in handles:
        handle.remove()
    total = saved.total + sum(inputs)
    if cfg.train.gradient_checkpointing and blocks:
        one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        plain.activation_checkpointing_disable()
        with Saved(model) as single, acc.autocast():
            loss = model(**one).loss
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
    before = rss_mb()
    kept, largest = activations(parts, cfg)
    parts_mb = {"weights": weights / MB, "gradients": trainable * 4 / MB,
                "optimizer_states": 2 * trainable * 4 / MB, "activations": kept / MB,
                "backward_start": largest / MB}
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


def measure(parts: Parts, cfg: RunConfig, steps: int, total_steps: int) -> dict[str, Any]:
    """Time a few real optimizer steps (the first one, warm-up, left out of the time)."""
    from llmkit import checkpoint as ckpt
    from llmkit.tasks.task import forward_backward
    from llmkit.train import optimizer_step

    acc, model, tc = parts.accelerator, parts.model, cfg.train
    guard = ckpt.Guard(tc, ckpt.RunState(), Path(cfg.output))
    times: list[float] = []
    loader = iter(parts.train_loader)
    for step in range(1, steps + 2):
        start = time.perf_counter()
        for _ in range(acc.gradient_accumulation_steps):
            batch = next(loader, None)
            if batch is None:
                loader = iter(parts.train_loader)
                batch = next(loader)
            with acc.accumulate(model):
                forward_backward(acc, model, batch)
                optimizer_step(parts, tc, guard, step)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = sum(times[1:]) / len(times[1:])
    found: dict[str, Any] = {"measured_steps": steps, "seconds_per_step": round(per_step, 4),
                             "estimated_train_seconds": round(per_step * total_steps, 1)}
    from llmkit.report import peak_memory

    found.update(peak_memory(acc.device))
    return found


def plan(cfg: RunConfig, mode: str = "plan") -> dict[str, Any]:
    """Everything the run would prepare, and its cost, without training or writing."""
    from llmkit.adapters import parameter_counts
    from llmkit.launch import start_accelerator
    from llmkit.report import quiet_libraries
    from llmkit.train import build, run_length

    quiet_libraries()
    accelerator = start_accelerator(cfg)
    parts = build(cfg, accelerator)
    total_steps, epochs = run_length(cfg.train, parts.steps_per_epoch)
    found: dict[str, Any] = {
        "task": cfg.task, "model": cfg.model, "output": cfg.output,
        "rows": {"train": parts.rows[0], "validation": parts.rows[1]},
        "features": {"train": len(parts.train_loader.dataset),
                     "validation": len(parts.eval_features)},
        "steps_per_epoch": parts.steps_per_epoch, "epochs": epochs, "total_steps": total_steps,
        "processes": accelerator.num_processes, "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        **parameter_counts(accelerator.unwrap_model(parts.model)),
        "token_lengths": token_lengths(parts, cfg)}
    if cfg.task == "qa":
        found["windows_per_question"] = round(found["features"]["train"]
                                              / max(parts.rows[0], 1), 3)
    found.update(estimate(parts, cfg))
    if mode == "measure":
        found.update(measure(parts, cfg, 3, total_steps))
    accelerator.free_memory()  # a run after it in the same process (the API) starts clean
    del parts
    return found


def report(cfg: RunConfig, mode: str, as_json: bool) -> str:
    import json

    found = plan(cfg, mode)
    return json.dumps(found) if as_json else "\n".join(describe(found))


def describe(found: dict[str, Any]) -> list[str]:
    """The report as lines for the terminal."""
    lines = [f"dry run of llmkit finetune {found['task']}: nothing trained, nothing written",
             f"model            {found['model']}",
             f"rows             train {found['rows']['train']:,}, validation "
             f"{found['rows']['validation']:,} (features {found['features']['train']:,} / "
             f"{found['features']['validation']:,})"]
    if "windows_per_question" in found:
        lines.append(f"windows          {found['windows_per_question']} per question")
    for split, stats in found["token_lengths"].items():
        for what, s in stats.items():
            if s:
                cut = f", {100 * s['at_cap']:.1f}% at the length cap" if "at_cap" in s else ""
                lines.append(f"{split[:5]} {what.split('_')[0]:<10} p50 {s['p50']}, p90 "
                             f"{s['p90']}, p99 {s['p99']}, max {s['max']}{cut}")
    lines += [f"steps            {found['steps_per_epoch']:,} per epoch, {found['total_steps']:,} "
              f"in all ({found['epochs']} epochs)",
              f"parameters       {found['total_parameters']:,} ({found['trainable_parameters']:,}"
              " trainable)",
              f"device           {found['device']} x {found['processes']}, precision "
              f"{found['mixed_precision']}"
              f"{', gradient checkpointing' if found['gradient_checkpointing'] else ''}",
              f"peak memory      ~{found['estimated_peak_memory_mb']:,.0f} MB per device "
              f"({found['memory_kind']}, in {found['peak_phase']}): " + ", ".join(
                  f"{k.replace('_', ' ')} {v:,.0f}" for k, v in found["memory_parts_mb"].items())]
    if "seconds_per_step" in found:
        eta = found["estimated_train_seconds"]
        lines.append(f"speed            {found['seconds_per_step']:.3f} s per step over "
                     f"{found['measured_steps']} steps: training ~{eta / 60:.1f} min "
                     f"(evaluations not counted)")
    return lines
