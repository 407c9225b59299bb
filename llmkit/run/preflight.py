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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.run.memory import estimate

if TYPE_CHECKING:
    from llmkit.config.schema import RunConfig
    from llmkit.run.build import Parts

log = logging.getLogger("llmkit")


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
    from llmkit.data.features import lengths
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


def measure(parts: Parts, cfg: RunConfig, steps: int, total_steps: int) -> dict[str, Any]:
    """Time a few real optimizer steps (the first one, warm-up, left out of the time)."""
    from llmkit.run import checkpoint as ckpt
    from llmkit.run.loop import optimizer_step
    from llmkit.tasks.task import forward_backward

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
                forward_backward(acc, model, batch, parts.task)
                optimizer_step(parts, tc, guard, step)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = sum(times[1:]) / len(times[1:])
    found: dict[str, Any] = {"measured_steps": steps, "seconds_per_step": round(per_step, 4),
                             "estimated_train_seconds": round(per_step * total_steps, 1)}
    from llmkit.run.report import peak_memory

    found.update(peak_memory(acc.device))
    return found


def plan(cfg: RunConfig, mode: str = "plan") -> dict[str, Any]:
    """Everything the run would prepare, and its cost, without training or writing."""
    from llmkit.hub import quiet_libraries
    from llmkit.run.adapters import parameter_counts
    from llmkit.run.build import build, run_length
    from llmkit.run.launch import start_accelerator

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
