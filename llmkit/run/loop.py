"""The one training loop, task-blind, on Accelerate: accumulate, forward, backward, clip, step;
evaluation and checkpoints around it."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from llmkit.config.schema import RunConfig, TrainConfig
from llmkit.errors import LlmkitError
from llmkit.inference.predict import collect
from llmkit.run import checkpoint as ckpt
from llmkit.run.build import Parts, run_length
from llmkit.run.report import Meter, Reporter, format_value, throughput, track
from llmkit.tasks.task import forward_backward, loss_of

log = logging.getLogger("llmkit")
# the best evaluation's predictions: QA id -> answer text as JSON; generated texts one per line
PREDICTIONS = ("predictions.json", "predictions.txt")
DIVERGENCE = 10  # times the first or untrained eval loss that a diverged run's last exceeds


def evaluate(parts: Parts) -> dict[str, float]:
    """Validation loss and the task's metrics; every example counted once across processes.

    Tasks report a loss sum and a count per example (tokens for language models), so the loss
    is the exact mean over the data however the batches were split and padded across processes.
    """
    acc, model = parts.accelerator, parts.model
    start = time.perf_counter()
    model.eval()
    plain = acc.unwrap_model(model)
    arrays = collect(parts.task, plain, parts.eval_loader, acc.gather_for_metrics)
    model.train()
    return {**loss_of(arrays),
            **parts.task.score(arrays, parts.eval_features, parts.data, plain.config,
                               parts.tokenizer),
            "eval_seconds": round(time.perf_counter() - start, 3)}


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric == "perplexity"


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best`; a NaN or infinite value never does."""
    if not math.isfinite(value):
        return False
    return best is None or (value < best if lower_is_better(metric) else value > best)


def divergence(history: list[dict[str, Any]], start_loss: float | None,
               chance: float | None) -> dict[str, float | None] | None:
    """The losses that show a run diverged, else None: the last evaluation's loss more than
    DIVERGENCE times the first evaluation's or the untrained model's (`start_loss`, its first
    step's), and above the untrained model's and `chance` (guessing's loss, where the task has
    one). A noisy curve never comes near, nor one that overfits from a tiny loss: the model
    is worse than it was before training."""
    if not history:
        return None
    first, last = history[0]["eval_loss"], history[-1]["eval_loss"]
    known = [x for x in (start_loss, first) if x is not None and math.isfinite(x)]
    if not known or not (last > DIVERGENCE * min(known) and last > known[0]
                         and (chance is None or last > chance)):
        return None
    return {"start_loss": start_loss, "first_eval_loss": first, "last_eval_loss": last,
            "chance_loss": chance}


def diverged(parts: Parts, state: ckpt.RunState) -> dict[str, float | None] | None:
    """divergence() of this run's evaluations so far."""
    config = parts.accelerator.unwrap_model(parts.model).config
    return divergence(state.history, state.start_loss, parts.task.chance_loss(config))


def said(losses: dict[str, float | None]) -> str:
    """A divergence in words: the last eval loss against the smaller of its references."""
    start, first = losses["start_loss"], losses["first_eval_loss"]
    assert first is not None and losses["last_eval_loss"] is not None
    base, what = ((start, "before training") if start is not None and start < first
                  else (first, "at the first evaluation"))
    chance = losses["chance_loss"]
    return (f"the eval loss rose to {format_value(losses['last_eval_loss'])} from "
            f"{format_value(base)} {what}" + (f" (guessing scores {format_value(chance)})"
                                              if chance is not None else ""))


def advice(tc: TrainConfig) -> str:
    """What to change in a run that diverged."""
    clip = "" if tc.max_grad_norm else ", gradient clipping (--max-grad-norm 1)"
    return f"Try a lower --learning-rate{clip} or a warm-up (--warmup-ratio 0.1)"


def stop_diverged(state: ckpt.RunState, out: Path, losses: dict[str, float | None],
                  tc: TrainConfig) -> None:
    """on_divergence=stop: one line, the best checkpoint kept (this evaluation's weights are
    not saved)."""
    best = out / "checkpoints" / state.best_checkpoint if state.best_checkpoint else None
    where = (f"the best checkpoint is kept (--resume-from {best} continues from it)"
             if best and best.is_dir() else "no checkpoint had been saved yet")
    raise LlmkitError(f"the run diverged at step {state.global_step}: {said(losses)}; training "
                      f"stopped (train.on_divergence=stop) and no weights from then on were "
                      f"saved; {where}. {advice(tc)}")


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
    if cfg.train.on_divergence == "stop" and (losses := diverged(parts, state)):
        reporter.evaluation(record)
        stop_diverged(state, out, losses, cfg.train)
    kept = next((r for r in state.history if f"checkpoint-{r['step']}"
                 == state.best_checkpoint), None)
    # a metric that saturates (DPO's reward accuracy at 1.0): a tie goes to the lower loss
    tie = (kept is not None and metrics[metric] == state.best_metric
           and metrics["eval_loss"] < kept["eval_loss"])
    if is_better(metrics[metric], state.best_metric, metric) or tie:
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
    if ckpt.keeps_files(parts.accelerator):  # node-local disks are pruned by their node
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
    window, since_eval, total = (Meter(parts.task.rows_per_sample) for _ in range(3))
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
                loss, figures = forward_backward(acc, model, batch, parts.task)
                remember_start(acc, state, loss)
                step = state.global_step + 1
                guard.note(loss, step)
                optimizer_step(parts, tc, guard, step)
            for meter in (window, since_eval, total):
                meter.add(loss, batch, acc.num_processes, figures)
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
                if ckpt.keeps_files(acc):
                    ckpt.prune(out, state.best_checkpoint, tc.save_total_limit)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if eval_and_save(parts, cfg, state, reporter, out, since_eval.flush(acc)["loss"],
                         guard):
            break
    return throughput(total.flush(acc), state.history[evals_before:])


def remember_start(acc: Any, state: ckpt.RunState, loss: Any) -> None:
    """The first batch's training loss, the untrained model's (a mean over processes), for
    divergence(): one sync, once in a run."""
    if state.global_step == 0 and state.start_loss is None:
        start = acc.reduce(loss.float().reshape(1), "mean").item()
        state.start_loss = start if math.isfinite(start) else None


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
