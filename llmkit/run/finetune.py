"""One fine-tuning run from start to finish: set up, train, save, test, report."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from accelerate.utils import set_seed
from torch.nn.attention import SDPBackend, sdpa_kernel

from llmkit.config.schema import RunConfig
from llmkit.hub import quiet_libraries
from llmkit.inference.predict import test
from llmkit.models import unquantized
from llmkit.run import card
from llmkit.run import checkpoint as ckpt
from llmkit.run.adapters import parameter_counts
from llmkit.run.build import Parts, build, run_length
from llmkit.run.launch import open_output, sharded, start_run, start_trackers
from llmkit.run.loop import advice, diverged, said, train_loop
from llmkit.run.report import Reporter, RunLog, format_value, header, peak_memory

log = logging.getLogger("llmkit")


def finetune(cfg: RunConfig, resume: bool = False, resume_from: str | None = None,
             overwrite: bool = False, reporter: Reporter | None = None,
             group: str | None = None) -> Path:
    """Fine-tune `cfg.model` on `cfg.task`; returns the run directory. `reporter` hears of the
    run's progress on the main process (the CLI's draws it on the terminal); without one, the
    run says nothing but its log lines and its files. `group` files the run's tracker runs
    under a name (a sweep's study)."""
    quiet_libraries()
    started = time.time()
    accelerator, start, wipe = start_run(cfg, resume, resume_from, overwrite)
    out = Path(cfg.output)
    set_seed(cfg.train.seed)
    parts = build(cfg, accelerator)
    # columns found in the data: the run directory says which
    cfg = replace(cfg, data=parts.data)
    open_output(accelerator, cfg, start, wipe)
    start_trackers(accelerator, cfg, group)
    state = ckpt.RunState()
    if start:
        state = ckpt.restore(accelerator, out, start, fallback=not resume_from)
        log.info("resuming at step %d (epoch %d)", state.global_step, state.epoch)
    total_steps = run_length(cfg.train, parts.steps_per_epoch)[0]
    main = accelerator.is_main_process
    told = RunLog(out, reporter if reporter and main else Reporter(), main, state.global_step)
    told.say("\n".join(header(parts, cfg, total_steps)))
    told.start(total_steps, state.global_step, cfg.train.logging_steps)
    try:  # cuDNN attention plans each new sequence length (slow with padded-per-batch rows)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            speed = train_loop(parts, cfg, state, told, out)
    finally:
        told.stop()
    told.summary(state.history, state.best_checkpoint or "")
    losses = diverged(parts, state)
    save_run(parts, cfg, state, out, speed, started, losses)
    if cfg.data.test and main:
        test(out, cfg.data.test)
    if losses and main:
        log.warning("the run diverged: %s. The model saved is the best evaluation's (%s); "
                    "metrics.json says diverged. %s; -s train.on_divergence=stop stops at such "
                    "an evaluation", said(losses), state.best_checkpoint, advice(cfg.train))
    for tracker in accelerator.trackers:  # flush and close; not end_training, whose
        tracker.finish()  # destroy_process_group with DDP alive can deadlock gloo's teardown
    metric = cfg.train.metric_for_best or parts.task.default_metric
    kept = next(r for r in state.history if f"checkpoint-{r['step']}" == state.best_checkpoint)
    told.say(f"best {metric} [bold]{format_value(kept[metric])}[/] at step {kept['step']}; "
             f"{time.time() - started:.0f} s in all; the model is in {out}")
    return out


def save_run(parts: Parts, cfg: RunConfig, state: ckpt.RunState, out: Path,
             speed: dict[str, float], started: float,
             losses: dict[str, float | None] | None = None) -> None:
    """The best weights and tokenizer via save_pretrained, then metrics.json, which marks done
    (and says whether the run diverged: `losses`); then the curves, the model card and the
    manifest."""
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
                   or parts.task.default_metric, "diverged": losses is not None,
                   **({"divergence": losses} if losses else {}), "history": state.history,
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
            log.info("merged model: %s", card.merged(out, out / "merged"))
    elif ckpt.keeps_files(acc) and not cfg.train.keep_checkpoints:  # a node-local disk's copy
        ckpt.remove_checkpoints(out)
    acc.wait_for_everyone()
