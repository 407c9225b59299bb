"""Typed, frozen run configuration: dataclasses are the schema, recipes and options supply values.

Precedence, lowest first: dataclass defaults < recipe YAML < CLI options < `-s a.b=c` overrides.
Every field carries its help text (`setting`), from which each `finetune` command's options are
made: the option name, the YAML key, the override path and the logged name are one string.
A task's own data settings are a subclass of `DataConfig` declared beside the task.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from llmkit.errors import ConfigError, LlmkitError

MixedPrecision = Literal["no", "bf16", "fp16"]
FileFormat = Literal["csv", "tsv", "json", "jsonl", "parquet", "txt"]
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

    train: str = setting("", "Training rows: a csv/tsv/json/jsonl/parquet/txt file, a glob of "
                         "them ('data/*.jsonl'), or a Hub dataset id.")
    validation: str | None = setting(None, "Validation rows; without it a seeded slice of "
                                     "--train is held out.")
    test: str | None = setting(None, "Rows to predict with the final model after training: "
                               "test_predictions.jsonl, and test metrics when labelled.")
    dataset_config: str | None = setting(None, "Hub dataset configuration (e.g. sst2 for glue).")
    format: FileFormat | None = setting(None, "Format of files whose name does not say it.")
    json_field: str | None = setting(None, "JSON files: read the rows under this top-level key.")
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
    group_by_length: bool = setting(True, "Batch rows of similar length (seq2seq: in each batch).")
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
    early_stopping_patience: int = setting(0, "Stop after N evaluations without improvement; "
                                           "0 = never.", minimum=0)
    report_to: tuple[str, ...] = setting((), "Log to trackers: tensorboard (under the run "
                                         "directory), wandb, mlflow, trackio, all (those "
                                         "installed) or none; repeatable.")


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


REQUIRED = {"task": "the task", "model": "--model", "output": "--output", "data.train": "--train"}


def _check_value(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_check_value(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if origin in (tuple, list):  # tuple[str, ...]: repeatable options
        return isinstance(value, origin) and all(_check_value(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    if isinstance(value, list) and _check_value(tuple(value), tp):  # YAML has lists only
        return tuple(value)
    # YAML 1.1 reads "3e-5" as a string; accept it wherever a float is expected.
    if isinstance(value, str) and _check_value(1.5, tp) and not _check_value(value, tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def describe(tp: Any) -> str:
    """A type as users read it: `int`, `'no' | 'bf16' | 'fp16'`, `str | null`."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _unknown(key: str, names: list[str], path: str, elsewhere: dict[str, list[str]]) -> str:
    if key in elsewhere:
        return (f"{path}{key}: a setting of {' and '.join(elsewhere[key])}, not of this task "
                "(llmkit finetune TASK --help lists each task's settings)")
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {path}{close[0]}?)" if close else f" (known: {', '.join(names)})"
    return f"{path}{key}: unknown key{hint}"


def _build(cls: type, raw: Any, path: str, problems: list[str],
           sections: dict[str, type], elsewhere: dict[str, list[str]]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{path or 'the recipe'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    problems += [_unknown(str(key), names, path, elsewhere if path == "data." else {})
                 for key in raw if key not in names]
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        tp, value = sections.get(f"{path}{f.name}", hints[f.name]), raw[f.name]
        if is_dataclass(tp):
            values[f.name] = _build(tp, value, f"{path}{f.name}.", problems,  # type: ignore[arg-type]
                                    sections, elsewhere)
            continue
        value = _coerce(value, tp)
        if _check_value(value, tp):
            values[f.name] = value
        else:
            problems.append(f"{path}{f.name}: expected {describe(tp)}, got {value!r}")
    return cls(**values)


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


def _validate(cfg: RunConfig) -> list[str]:
    values = {dotted: value for dotted, _, value in leaves(cfg)}
    problems = [f"{key} is required (set {how})" for key, how in REQUIRED.items()
                if values[key] in ("", None)]
    for dotted, f, value in leaves(cfg):
        if value is None or isinstance(value, (bool, str, tuple, list)):
            continue
        wrong = bound_problem(value, f.metadata.get("bounds", (None,) * 4))
        if wrong:
            problems.append(f"{dotted} {wrong}")
    return problems


def check_settings(settings: Any) -> None:
    """A command's settings dataclass (not a run config): every value of the right type and
    inside its range, else one ConfigError naming each option."""
    problems = []
    hints = get_type_hints(type(settings))
    for f in fields(settings):
        value, option = getattr(settings, f.name), "--" + f.name.replace("_", "-")
        if not _check_value(value, hints[f.name]):
            problems.append(f"{option}: expected {describe(hints[f.name])}, got {value!r}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            wrong = bound_problem(value, f.metadata.get("bounds", (None,) * 4))
            problems += [f"{option} {wrong}"] if wrong else []
    if problems:
        raise LlmkitError("; ".join(problems))


def bound_problem(value: float, bounds: tuple[float | None, ...]) -> str | None:
    """What is wrong with a number outside (minimum, maximum, above, below), else None."""
    minimum, maximum, above, below = bounds
    if value != value:  # NaN passes every comparison
        return "must be a number, got nan"
    if value in (float("inf"), float("-inf")):
        return f"must be finite, got {value}"

    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    for limit, wrong, words in ((minimum, value < (minimum or 0), "at least"),
                                (maximum, value > (maximum or 0), "at most"),
                                (above, value <= (above or 0), "above"),
                                (below, value >= (below or 0), "below")):
        if limit is not None and wrong:
            return f"must be {words} {show(limit)}, got {show(value)}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """`train.learning_rate=3e-5` -> ("train.learning_rate", 3e-05); values are read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {text!r} is not of the form section.key=value"])
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError([f"override {text!r}: the value is not valid YAML "
                           f"({' '.join(str(err).split())})"]) from err


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: {part} is not a section"])
        node = child
    node[last] = value


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """Load a recipe by path, or by the name of one shipped with llmkit."""
    import yaml

    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise LlmkitError(f"recipe {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise ConfigError([f"recipe {path}: expected a mapping at the top level"])
    return raw


def resolve(task: str, settings: type[DataConfig], raw: dict[str, Any],
            options: dict[str, Any] | None = None, overrides: list[str] | None = None,
            elsewhere: dict[str, list[str]] | None = None) -> RunConfig:
    """A RunConfig for `task` (whose data section is `settings`) from a recipe's values, CLI
    options (dotted keys, None = not given) and overrides; `elsewhere` names the tasks that own
    a data key this task does not have."""
    if raw.get("task", task) != task:
        raise ConfigError([f"task: the recipe is for {raw['task']!r}, not {task!r}"])
    raw = {**raw, "task": task}
    for key, value in (options or {}).items():
        if value is not None:
            _set(raw, key, value)
    for text in overrides or []:
        _set(raw, *parse_override(text))
    raw.setdefault("data", {})
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems, {"data": settings}, elsewhere or {})
    problems += [] if problems else _validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} -> {"train.seed": 1}: the override paths."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_config(cfg: RunConfig, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), encoding="utf-8")


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe bundled with llmkit."""
    folder = resources.files("llmkit.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise LlmkitError(f"no recipe file {name_or_path!r} and no shipped recipe of that name; "
                      f"shipped recipes: {', '.join(sorted(shipped)) or 'none'}")


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


def copy_recipe(name: str, dest: Path) -> Path:
    """A shipped recipe copied to a file, or into a folder, to edit it."""
    import shutil

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise LlmkitError(f"{target} exists; choose another destination")
    if not target.parent.is_dir():
        raise LlmkitError(f"{target.parent} is not a folder; create it first")
    shutil.copyfile(source, target)
    return target
