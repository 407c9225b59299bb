"""The run configuration's schema: frozen dataclasses whose fields carry their help text,
allowed range and option aliases (`setting`). The YAML key, the dataclass field, the override
path and the logged name are one string; a task's own data settings subclass `DataConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, get_type_hints

MixedPrecision = Literal["no", "bf16", "fp16"]
FileFormat = Literal["csv", "tsv", "json", "jsonl", "parquet", "arrow", "txt", "text"]
BadRows = Literal["fail", "skip"]  # rows that cannot be trained on: stop, or leave them out


def setting(default: Any, help: str, *aliases: str, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None,
            below: float | None = None) -> Any:
    """A config field with its help text, extra option names, and its allowed range
    (`minimum`/`maximum` inclusive, `above`/`below` exclusive)."""
    return field(default=default, metadata={"help": help, "aliases": aliases, "bounds": (
        minimum, maximum, above, below)})


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from: the data settings every task shares."""

    train: str = setting("", "Training rows: a csv/tsv/json/jsonl/parquet/arrow/txt file (or a "
                         ".gz/.bz2/.xz of one), a glob of them ('data/*.jsonl'), a folder (of "
                         "datasets' save_to_disk, or of train/validation/test files), or a Hub "
                         "dataset id.")
    validation: str | None = setting(None, "Validation rows; without it a seeded slice of "
                                     "--train is held out.")
    test: str | None = setting(None, "Rows to predict with the final model after training: "
                               "test_predictions.jsonl, and test metrics when labelled.")
    dataset_config: str | None = setting(None, "Hub dataset configuration (e.g. sst2 for glue).")
    format: FileFormat | None = setting(None, "Format of files whose name does not say it.")
    json_field: str | None = setting(None, "JSON files: read the rows under this top-level key.")
    encoding: str = setting("utf-8", "Text encoding of csv/tsv/json/txt files (latin-1, cp1252 "
                            "...).")
    train_split: str = setting("train", "Hub split for --train.")
    validation_split: str = setting("validation", "Hub split for --validation.")
    validation_fraction: float = setting(0.1, "Share of --train held out when there is no "
                                         "--validation.", above=0.0, below=1.0)
    max_train_samples: int | None = setting(None, "Use only the first N training rows.",
                                            minimum=1)
    preprocessing_workers: int = setting(1, "Processes that tokenize (datasets' num_proc).",
                                         minimum=1)
    max_eval_samples: int | None = setting(None, "Use only the first N validation rows.",
                                           "--eval-max-samples", minimum=1)

    def problems(self) -> list[str]:
        """What is wrong with how this task's settings go together (none here)."""
        return []


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing schedule."""

    epochs: int = setting(3, "Passes over the training rows.", minimum=1)
    learning_rate: float = setting(5e-5, "Peak learning rate.", "--lr", minimum=0.0)
    batch_size: int = setting(32, "Rows per batch on each process.", minimum=1)
    eval_batch_size: int = setting(64, "Rows per evaluation batch.", minimum=1)
    gradient_accumulation_steps: int = setting(1, "Batches per optimizer step.", minimum=1)
    max_steps: int = setting(0, "Stop after N optimizer steps; 0 = --epochs decide (when set, "
                             "it overrides them).", minimum=0)
    warmup_steps: int = setting(0, "Warm-up steps; 0 = --warmup-ratio decides (when set, it "
                                "overrides it).", minimum=0)
    warmup_ratio: float = setting(0.0, "Share of the steps that warm the learning rate up.",
                                  minimum=0.0, below=1.0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", minimum=0.0)
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm; 0 = no clipping.",
                                   minimum=0.0)
    lr_scheduler: str = setting("linear", "linear, cosine, constant, ... (transformers' "
                                "get_scheduler).")
    seed: int = setting(42, "Seed for the data order and new weights.", minimum=0,
                         maximum=2**32 - 1)
    mixed_precision: MixedPrecision = setting("no", "no, bf16 or fp16 (fp32 is fastest on "
                                              "CPUs).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward "
                                           "pass: less memory, more compute.")
    group_by_length: bool = setting(True, "Batch rows of similar length: translate and "
                                    "summarize run each random batch as micro-batches sorted "
                                    "by length; the other tasks group across batches.")
    eval_steps: int = setting(0, "Also evaluate and checkpoint every N steps; 0 = each epoch "
                              "only.", minimum=0)
    save_steps: int = setting(0, "Also checkpoint every N steps.", minimum=0)
    save_total_limit: int = setting(2, "Checkpoints kept at most: the newest and the best "
                                    "(which is always kept); 0 = all.", minimum=0)
    keep_checkpoints: bool = setting(False, "Keep the checkpoints after a finished run (they "
                                     "hold optimizer states: several times the model).")
    logging_steps: int = setting(10, "Log loss and speed every N steps.", minimum=1)
    metric_for_best: str | None = setting(None, "Keep the checkpoint best at this metric "
                                          "(default: the task's).")
    on_nonfinite: Literal["stop", "skip"] = setting(
        "stop", "A NaN or infinite loss: stop the run (the last checkpoint kept), or skip the "
        "step.")
    max_nonfinite_steps: int = setting(10, "on_nonfinite skip: stop after N skips.", minimum=0)
    on_divergence: Literal["warn", "stop"] = setting(
        "warn", "An eval loss over 10x the first evaluation's or the untrained model's, and "
        "worse than the untrained model and than guessing (a classifier's log of its label "
        "count): warn (at the end of the run, and in metrics.json), or stop there, the best "
        "checkpoint kept.")
    early_stopping_patience: int = setting(0, "Stop after N evaluations without improvement; "
                                           "0 = never.", minimum=0)
    report_to: tuple[str, ...] = setting((), "Log to trackers: tensorboard (under the run "
                                         "directory), wandb, mlflow, trackio, all (those "
                                         "installed) or none; repeatable.")
    collective_timeout: int = setting(1800, "Seconds a process waits for the others (to join, "
                                      "in a collective) before the run stops with one error: a "
                                      "node that died or hangs stops the rest. Keep it above "
                                      "the longest stretch one process works alone (the main "
                                      "process tokenizing the data, the final save).",
                                      minimum=1)


@dataclass(frozen=True)
class AdapterConfig:
    """Parameter-efficient fine-tuning: LoRA adapters through peft, the base model frozen."""

    lora: bool = setting(False, "Train LoRA adapters instead of every weight (peft).")
    lora_r: int = setting(16, "LoRA rank.", minimum=1)
    lora_alpha: float = setting(32.0, "LoRA scaling numerator (scale = alpha / r).", above=0.0)
    lora_dropout: float = setting(0.05, "Dropout on the LoRA path.", minimum=0.0, below=1.0)
    lora_target_modules: tuple[str, ...] = setting(
        (), "Layer names to adapt (repeatable; default: every linear layer but the output "
        "head, as peft's all-linear finds them).")
    merge: bool = setting(False, "Also write the merged full model to OUTPUT/merged at the end.")
    load_in_4bit: bool = setting(False, "QLoRA: load the frozen base in 4 bits (CUDA and "
                                 "bitsandbytes).")


@dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning run needs; saved as `config.yaml` in the run directory.
    `data` holds the task's own settings class (a DataConfig subclass)."""

    task: str = ""
    model: str = setting("", "Hub id or local checkpoint folder.", "-m")
    output: str = setting("", "Run directory to write.", "-o")
    tokenizer: str | None = setting(None, "Tokenizer folder or Hub id, if not --model's.")
    config_overrides: str | None = setting(None, "Model config changes, 'n_layer=4,n_embd=256' "
                                           "(run_clm.py's --config_overrides).")
    from_scratch: bool = setting(False, "Random weights from --model's config: train a new "
                                 "model (with --config-overrides) instead of fine-tuning.")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


def leaves(cfg: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, field, value) of every setting in a config, sections walked."""
    found = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            found += leaves(value, f"{path}{f.name}.")
        else:
            found.append((f"{path}{f.name}", f, value))
    return found


def schema(settings: type[DataConfig]) -> list[tuple[str, Any, Any]]:
    """(dotted path, field, type) of every option of a task whose data section is `settings`;
    each leaf name is unique, so it is also the option's name."""
    found = []
    for section, cls in (("", RunConfig), ("data.", settings), ("train.", TrainConfig),
                         ("adapter.", AdapterConfig)):
        hints = get_type_hints(cls)
        found += [(f"{section}{f.name}", f, hints[f.name]) for f in fields(cls)
                  if f.name != "task" and not is_dataclass(hints[f.name])]
    names = [dotted.rsplit(".", 1)[-1] for dotted, _, _ in found]
    assert len(names) == len(set(names)), f"config field names are not unique: {names}"
    return found
