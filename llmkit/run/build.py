"""What the loop works with: rows, model, loaders, optimizer and schedule, prepared for this
process."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from llmkit.config.schema import DataConfig, RunConfig, TrainConfig
from llmkit.data.batches import LengthGroupedBatches, MicroBatches, longest, micro_batches
from llmkit.data.features import by_length, lengths
from llmkit.data.read import check_columns, load_split, load_splits, reading
from llmkit.errors import LlmkitError
from llmkit.hub import is_adapter_run
from llmkit.models import four_bit, load_model, model_config
from llmkit.run.adapters import adapt
from llmkit.run.launch import fsdp_units, sharded
from llmkit.tasks import check_pairing, get_task
from llmkit.tasks.task import Task


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


def build(cfg: RunConfig, accelerator: Accelerator) -> Parts:
    """Rows, model, loaders, optimizer and schedule, prepared for this process."""
    task = get_task(cfg.task)
    with accelerator.main_process_first():
        model, tokenizer, data, train_set, eval_set, rows = load_run_inputs(cfg, task)
        if not task.dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if task.attach:  # what the task's loss needs beside the model: before the adapters
            train_set, eval_set = task.attach(model, tokenizer, data, cfg, accelerator.device,
                                              (train_set, eval_set))
    for module in model.modules():
        # fixed by design (Marian, Pegasus), but loaded as trainable: DDP would wait for their
        # gradients forever
        if "Sinusoidal" in type(module).__name__:
            module.requires_grad_(False)
    model = adapt(model, cfg, accelerator, task.dropout)
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
                              collate_fn=MicroBatches(collate, batches.split,
                                                      longest(batches.lengths)),
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
                 eval_loader, eval_features, data, batches, steps_per_epoch, rows)


def load_run_inputs(cfg: RunConfig, task: Task) -> tuple[Any, Any, DataConfig, Any, Any,
                                                          tuple[int, int]]:
    """Model, tokenizer, data settings (with the columns the rows show), the training and
    validation features, and the row counts. The checkpoint's config is read once, first: a
    model without this task's head, or a machine that cannot run 4-bit layers, is refused
    before any data is read."""
    if cfg.adapter.lora and is_adapter_run(cfg.model):
        raise LlmkitError(f"--model {cfg.model} is a LoRA run: a new adapter on it would be "
                          "saved against its base model, without that run's adapter; merge it "
                          f"first (llmkit merge {cfg.model} --output MERGED) and train on "
                          "MERGED, or drop --lora to train every weight")
    config = model_config(cfg.model, cfg.config_overrides)
    check_pairing(task, config, cfg.model)
    if cfg.adapter.load_in_4bit:
        four_bit()
    train_rows, valid_rows = load_splits(cfg.data, cfg.train.seed)
    data = task.detect(train_rows, cfg.data) if task.detect else cfg.data
    check_columns(train_rows, task.columns(data, True), "--train")
    check_columns(valid_rows, task.columns(data, True), "--validation")
    train_rows = task.usable(train_rows, data, True)
    valid_rows = task.usable(valid_rows, data, True)
    if cfg.data.test:  # predicted after training: its columns are checked now
        check_columns(load_split(cfg.data.test, "test", data.dataset_config, "--test",
                                 *reading(data)), task.columns(data, False), "--test")
    model, tokenizer = load_model(task, cfg.model, data, quantized=cfg.adapter.load_in_4bit,
                                  run=cfg, config=config,
                                  **task.model_kwargs(train_rows, valid_rows, data))
    train_set = task.featurize(train_rows, tokenizer, model.config, data)
    eval_set = task.featurize(valid_rows, tokenizer, model.config, data)
    return model, tokenizer, data, train_set, eval_set, (len(train_rows), len(valid_rows))


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
