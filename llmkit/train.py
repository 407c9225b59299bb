"""The one training loop, task-blind, on Accelerate: accumulate, forward, backward, clip, step."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from llmkit import card
from llmkit import checkpoint as ckpt
from llmkit.adapters import adapt, four_bit, parameter_counts, unquantized
from llmkit.config import DataConfig, RunConfig, TrainConfig, dump_config
from llmkit.data import (
    LengthGroupedBatches,
    MicroBatches,
    by_length,
    check_columns,
    lengths,
    load_splits,
    micro_batches,
)
from llmkit.errors import LlmkitError
from llmkit.launch import fsdp_units, sharded, start_run, start_trackers
from llmkit.predict import merge, test
from llmkit.report import (
    Meter,
    Reporter,
    header,
    peak_memory,
    quiet_libraries,
    throughput,
    track,
)
from llmkit.tasks import check_pairing, get_task, load_model
from llmkit.tasks.task import Task, forward_backward, loss_of

log = logging.getLogger("llmkit")
# the best evaluation's predictions: QA id -> answer text as JSON; generated texts one per line
PREDICTIONS = ("predictions.json", "predictions.txt")


@dataclass
class Parts:
    """What the loop works with, after `accelerator.prepare`."""

    accelerator: Accelerator
    task: Task
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    eval_features: Any  # in the eval loader's order, for tasks that score against them
    data: DataConfig
    batches: LengthGroupedBatches
    steps_per_epoch: int  # optimizer steps per epoch on each process
    rows: tuple[int, int]  # training and validation rows, before tokenization


def evaluate(parts: Parts) -> dict[str, float]:
    """Validation loss and the task's metrics; every example counted once across processes.

    Tasks report a loss sum and a count per example (tokens for language models), so the loss
    is the exact mean over the data however the batches were split and padded across processes.
    """
    acc, model = parts.accelerator, parts.model
    start = time.perf_counter()
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    plain = acc.unwrap_model(model)
    with torch.inference_mode():
        for batch in parts.eval_loader:
            for key, value in parts.task.eval_step(plain, batch).items():
                gathered.setdefault(key, []).append(acc.gather_for_metrics(value).cpu())
    model.train()
    arrays = {k: torch.cat(v).numpy() for k, v in gathered.items()}
    return {**loss_of(arrays),
            **parts.task.score(arrays, parts.eval_features, parts.data, plain.config,
                               parts.tokenizer),
            "eval_seconds": round(time.perf_counter() - start, 3)}


def build(cfg: RunConfig, accelerator: Accelerator) -> Parts:
    """Rows, model, loaders, optimizer and schedule, prepared for this process."""
    task = get_task(cfg.task)
    with accelerator.main_process_first():
        check_pairing(task, None, cfg.model)  # a wrong model before any data is read
        if cfg.adapter.load_in_4bit:
            four_bit()  # and a machine that cannot run 4-bit layers
        train_rows, valid_rows = load_splits(cfg.data, cfg.train.seed)
        data = task.detect(train_rows, cfg.data) if task.detect else cfg.data
        check_columns(train_rows, task.columns(data, True), "--train")
        check_columns(valid_rows, task.columns(data, True), "--validation")
        train_rows = task.usable(train_rows, data, True)
        valid_rows = task.usable(valid_rows, data, True)
        model, tokenizer = load_model(task, cfg.model, data, quantized=cfg.adapter.load_in_4bit,
                                      run=cfg, **task.model_kwargs(train_rows, valid_rows, data))
        train_set = task.featurize(train_rows, tokenizer, model.config, data)
        eval_set = task.featurize(valid_rows, tokenizer, model.config, data)
    for module in model.modules():
        # fixed by design (Marian, Pegasus), but loaded as trainable: DDP would wait for their
        # gradients forever
        if "Sinusoidal" in type(module).__name__:
            module.requires_grad_(False)
    model = adapt(model, cfg, accelerator)
    collate = task.collator(tokenizer)
    # DeepSpeed's engine counts its own accumulation steps: one backward per batch there
    inside = task.group_inside and accelerator.distributed_type != DistributedType.DEEPSPEED
    batches = LengthGroupedBatches(lengths(train_set), cfg.train.batch_size, cfg.train.seed,
                                   cfg.train.group_by_length and not task.group_inside,
                                   micro_batches(cfg.train, inside))
    # Own generators keep loader start-up from drawing on the global RNG that dropout uses,
    # so a resumed run replays the same random numbers as an uninterrupted one.
    pin = torch.cuda.is_available()  # page-locked batches copy to the GPU without a sync
    train_loader = DataLoader(train_set, batch_sampler=batches,
                              collate_fn=MicroBatches(collate, batches.split),
                              generator=torch.Generator(), pin_memory=pin)
    eval_features = eval_set.select(by_length(eval_set))
    eval_loader = DataLoader(eval_features, collate_fn=collate, pin_memory=pin,
                             batch_size=cfg.train.eval_batch_size, generator=torch.Generator())
    # the fused AdamW (one kernel for all parameters, as Trainer's default) needs the
    # parameters on their device first; FSDP swaps them for sharded ones after
    fused = accelerator.device.type in ("cuda", "cpu") and not sharded(accelerator)
    if not cfg.adapter.load_in_4bit:  # 4-bit layers are placed when loaded
        model.to(accelerator.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay),
                                  lr=cfg.train.learning_rate, fused=fused)
    fsdp_units(accelerator, model)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.gradient_accumulation_steps)
    scheduler = accelerator.prepare(make_scheduler(cfg, optimizer, steps_per_epoch,
                                                   accelerator.num_processes))
    return Parts(accelerator, task, model, tokenizer, optimizer, scheduler, train_loader,
                 eval_loader, eval_features, data, batches, steps_per_epoch,
                 (len(train_rows), len(valid_rows)))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights, as in BERT's recipe."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def run_length(tc: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """Optimizer steps and epochs of the run: --max-steps when set (as Trainer's), else
    --epochs."""
    if tc.max_steps:
        return tc.max_steps, math.ceil(tc.max_steps / steps_per_epoch)
    return steps_per_epoch * tc.epochs, tc.epochs


def make_scheduler(cfg: RunConfig, optimizer: Any, steps_per_epoch: int, processes: int) -> Any:
    from transformers import get_scheduler

    # Accelerate steps a prepared scheduler once per process on each optimizer step. Warm-up
    # steps round up, as Trainer's do: on short runs one step changes the result.
    steps = run_length(cfg.train, steps_per_epoch)[0]
    warmup = cfg.train.warmup_steps or math.ceil(cfg.train.warmup_ratio * steps)
    try:
        return get_scheduler(cfg.train.lr_scheduler, optimizer,
                             num_warmup_steps=warmup * processes,
                             num_training_steps=steps * processes)
    except ValueError as err:
        raise LlmkitError(f"train.lr_scheduler: {err}".splitlines()[0]) from err


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best`; a NaN or infinite value never does."""
    lower_is_better = metric.endswith("loss") or metric == "perplexity"
    if not math.isfinite(value):
        return False
    return best is None or (value < best if lower_is_better else value > best)


def eval_and_save(parts: Parts, cfg: RunConfig, state: ckpt.RunState, reporter: Reporter,
                  out: Path, train_loss: float, guard: ckpt.Guard) -> bool:
    """Evaluate, checkpoint, keep the best; True when early stopping says to stop."""
    guard.check(parts.accelerator)
    metric = cfg.train.metric_for_best or parts.task.default_metric
    metrics = evaluate(parts)
    predictions: Any = metrics.pop("predictions", None)  # per-example outputs some tasks give
    if metric not in metrics:
        raise LlmkitError(f"train.metric_for_best {metric!r} is not one of this run's metrics: "
                          f"{', '.join(metrics)}")
    record = {"step": state.global_step, "epoch": round(state.global_step
                                                        / parts.steps_per_epoch, 2),
              "train_loss": train_loss, **metrics}
    state.history.append(record)
    if is_better(metrics[metric], state.best_metric, metric):
        state.best_metric = metrics[metric]
        state.best_checkpoint = f"checkpoint-{state.global_step}"
        if predictions is not None and parts.accelerator.is_main_process:
            as_json = isinstance(predictions, dict)
            text = (json.dumps(predictions, indent=1, ensure_ascii=False) if as_json
                    else "".join(" ".join(p.split()) + "\n" for p in predictions))
            (out / PREDICTIONS[0 if as_json else 1]).write_text(text, encoding="utf-8")
        state.bad_evals = 0
    else:
        state.bad_evals += 1
    began = time.perf_counter()
    ckpt.save_checkpoint(parts.accelerator, out, state)
    record["save_seconds"] = round(time.perf_counter() - began, 3)  # after: not in the saved copy
    reporter.evaluation(record)
    track(parts.accelerator, "eval", record)
    if parts.accelerator.is_main_process:
        ckpt.prune(out, state.best_checkpoint, cfg.train.save_total_limit)
    patience = cfg.train.early_stopping_patience
    if patience and state.bad_evals >= patience:
        reporter.say(f"early stopping: no better {metric} in {patience} evaluations")
        return True
    return False


def train_loop(parts: Parts, cfg: RunConfig, state: ckpt.RunState, reporter: Reporter,
               out: Path) -> dict[str, float]:
    """Run the remaining epochs; returns throughput figures of the training steps."""
    acc, tc, model = parts.accelerator, cfg.train, parts.model
    window, since_eval, total = Meter(), Meter(), Meter()
    guard = ckpt.Guard(tc, state, out)
    evals_before = len(state.history)
    model.train()
    for epoch in range(state.epoch, run_length(tc, parts.steps_per_epoch)[1]):
        # Accelerate's loader resets the sampler's epoch from its own pass counter on every
        # pass, which a resumed run has not counted: set both. (Across processes the sampler
        # sits inside a shard that does not forward the epoch.)
        parts.train_loader.set_epoch(epoch)
        parts.batches.set_epoch(epoch)
        skip = state.step_in_epoch * acc.gradient_accumulation_steps
        loader = acc.skip_first_batches(parts.train_loader, skip) if skip else parts.train_loader
        for batch in loader:
            with acc.accumulate(model):
                loss = forward_backward(acc, model, batch)
                step = state.global_step + 1
                guard.note(loss, step)
                optimizer_step(parts, tc, guard, step)
            for meter in (window, since_eval, total):
                meter.add(loss, batch, acc.num_processes)
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            state.step_in_epoch += 1
            record = logged(parts, state, window, guard) \
                if state.global_step % tc.logging_steps == 0 else None
            reporter.advance(state.global_step, state.global_step / parts.steps_per_epoch, record)
            if state.step_in_epoch == parts.steps_per_epoch:
                continue  # the end-of-epoch evaluation and checkpoint follow
            last = state.global_step == tc.max_steps  # --max-steps ends inside an epoch
            if last or (tc.eval_steps and state.global_step % tc.eval_steps == 0):
                if eval_and_save(parts, cfg, state, reporter, out, since_eval.flush(acc)["loss"],
                                 guard) or last:
                    return throughput(total.flush(acc), state.history[evals_before:])
            elif tc.save_steps and state.global_step % tc.save_steps == 0:
                guard.check(acc)
                ckpt.save_checkpoint(acc, out, state)
                if acc.is_main_process:
                    ckpt.prune(out, state.best_checkpoint, tc.save_total_limit)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if eval_and_save(parts, cfg, state, reporter, out, since_eval.flush(acc)["loss"],
                         guard):
            break
    return throughput(total.flush(acc), state.history[evals_before:])


def logged(parts: Parts, state: ckpt.RunState, window: Meter, guard: ckpt.Guard
           ) -> dict[str, Any]:
    """The training record of a logging step, also sent to the trackers."""
    guard.check(parts.accelerator)
    record = {"step": state.global_step, "epoch": round(state.global_step
                                                        / parts.steps_per_epoch, 3),
              "learning_rate": parts.scheduler.get_last_lr()[0],
              **window.flush(parts.accelerator)}
    track(parts.accelerator, "train", record)
    return record


def optimizer_step(parts: Parts, tc: TrainConfig, guard: ckpt.Guard, step: int) -> None:
    """Clip, then step the optimizer and the schedule (Accelerate makes these no-ops until the
    accumulated gradients sync); under on_nonfinite=skip, a step whose gradient norm is not
    finite is left out."""
    skipping = tc.on_nonfinite == "skip"
    if parts.accelerator.sync_gradients and (tc.max_grad_norm > 0 or skipping):
        norm = parts.accelerator.clip_grad_norm_(parts.model.parameters(),
                                                 tc.max_grad_norm or math.inf)
        if guard.norms and norm is not None:
            if skipping and guard.skip(norm, step):
                parts.optimizer.zero_grad()
                return
            guard.note(norm, step)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad()


def finetune(cfg: RunConfig, resume: bool = False, resume_from: str | None = None,
             overwrite: bool = False) -> Path:
    """Fine-tune `cfg.model` on `cfg.task`; returns the run directory."""
    quiet_libraries()
    started = time.time()
    accelerator, start = start_run(cfg, resume, resume_from, overwrite)
    out = Path(cfg.output)
    set_seed(cfg.train.seed)
    parts = build(cfg, accelerator)
    if parts.data != cfg.data:  # columns found in the data: the run directory says which
        cfg = replace(cfg, data=parts.data)
        if accelerator.is_main_process:
            dump_config(cfg, out / "config.yaml")
    start_trackers(accelerator, cfg)
    state = ckpt.RunState()
    if start:
        state = ckpt.restore(accelerator, out, start, fallback=not resume_from)
        log.info("resuming at step %d (epoch %d)", state.global_step, state.epoch)
    total_steps = run_length(cfg.train, parts.steps_per_epoch)[0]
    # cuDNN attention plans each new sequence length (slow with padded-per-batch rows)
    reporter = Reporter(out, accelerator.is_main_process, total_steps, state.global_step,
                        cfg.train.logging_steps)
    reporter.say("\n".join(header(parts, cfg, total_steps)))
    with reporter, sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.MATH]):
        speed = train_loop(parts, cfg, state, reporter, out)
    reporter.summary(state.history, state.best_checkpoint or "")
    save_run(parts, cfg, state, out, speed, started)
    if cfg.data.test and accelerator.is_main_process:
        test(out, cfg.data.test)
    for tracker in accelerator.trackers:  # flush and close; not end_training, whose
        tracker.finish()  # destroy_process_group with DDP alive can deadlock gloo's teardown
    reporter.done(state.history, state.best_checkpoint or "", cfg.train.metric_for_best
                  or parts.task.default_metric, time.time() - started)
    return out


def save_run(parts: Parts, cfg: RunConfig, state: ckpt.RunState, out: Path,
             speed: dict[str, float], started: float) -> None:
    """The best weights and tokenizer via save_pretrained, then metrics.json, which marks done;
    then the curves, the model card and the manifest."""
    acc = parts.accelerator
    if state.best_checkpoint and state.best_checkpoint != f"checkpoint-{state.global_step}":
        acc.load_state(str(out / "checkpoints" / state.best_checkpoint))
    acc.wait_for_everyone()
    # FSDP and DeepSpeed hold shards: every process takes part in gathering the whole weights
    whole = acc.get_state_dict(parts.model) if sharded(acc) else None
    if acc.is_main_process:
        model = acc.unwrap_model(parts.model)
        try:
            model.save_pretrained(out, state_dict=whole)  # an adapter run: peft's adapter files
            parts.tokenizer.save_pretrained(out)
            if cfg.adapter.lora:  # the run's labels and generation settings, to load it back
                base = model.get_base_model()
                unquantized(copy.deepcopy(base.config)).save_pretrained(out)
                if base.can_generate():
                    base.generation_config.save_pretrained(out)
        except Exception as err:  # the checkpoints are kept: --resume saves again
            raise ckpt.save_failed(err, out, shutil.disk_usage(out).free < 4 << 20) from err
        best = next(r for r in state.history if f"checkpoint-{r['step']}" == state.best_checkpoint)
        metrics = {"final": best, "metric_for_best": cfg.train.metric_for_best
                   or parts.task.default_metric, "history": state.history,
                   "run": {**speed, **parameter_counts(model),
                           "skipped_steps": state.skipped_steps,
                           "num_processes": acc.num_processes,
                           "global_batch_size": cfg.train.batch_size * acc.num_processes
                           * cfg.train.gradient_accumulation_steps,
                           "device": str(acc.device), "mixed_precision": acc.mixed_precision,
                           **peak_memory(acc.device)}}
        (out / ckpt.FINISHED_MARK).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        if not cfg.train.keep_checkpoints:
            ckpt.remove_checkpoints(out)
        card.write(out, cfg, started, time.time())
        if cfg.adapter.merge:
            log.info("merged model: %s", merge(out, out / "merged"))
    acc.wait_for_everyone()

