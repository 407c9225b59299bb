"""Typed, frozen run configuration: dataclasses are the schema, recipes and options supply values.

Precedence, lowest first: dataclass defaults < recipe YAML < CLI options < `-s a.b=c` overrides.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from llmkit.errors import ConfigError, LlmkitError

MixedPrecision = Literal["no", "bf16", "fp16"]
SampleBy = Literal["document", "paragraph", "line"]  # how a .txt file splits into rows
BadRows = Literal["fail", "skip"]  # rows that cannot be trained on: stop, or leave them out


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from and which columns hold what."""

    train: str = ""
    validation: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    validation_fraction: float = 0.1
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # causal language modelling
    block_size: int = 1024
    sample_by: SampleBy = "paragraph"
    separate_documents: bool = False
    prompt_column: str | None = None
    completion_column: str | None = None
    # extractive question answering
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    doc_stride: int = 128
    version_2: bool | None = None  # unanswerable questions; None = detect from the data
    n_best: int = 20
    max_answer_length: int = 30
    null_threshold: float = 0.0
    bad_answers: BadRows = "fail"
    # seq2seq (translate, summarize); max_length is the source length
    source_lang: str | None = None
    target_lang: str | None = None
    translation_column: str = "translation"  # {lang: text} dicts; "" = a column per language
    summary_column: str = "summary"
    source_prefix: str | None = None  # None = the checkpoint's convention (T5), else none
    max_target_length: int = 128
    empty_rows: BadRows = "fail"
    num_beams: int | None = None  # evaluation by generation; None = the checkpoint's setting
    max_new_tokens: int | None = None  # None = max_target_length


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation and checkpointing schedule."""

    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "linear"
    seed: int = 42
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    eval_steps: int = 0
    save_steps: int = 0
    logging_steps: int = 10
    metric_for_best: str | None = None
    early_stopping_patience: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning run needs; saved as `config.yaml` in the run directory."""

    task: str = ""
    model: str = ""
    output: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


REQUIRED = {"task": "the task", "model": "--model", "output": "--output", "data.train": "--train"}
POSITIVE = ("train.epochs", "train.batch_size", "train.eval_batch_size",
            "train.gradient_accumulation_steps", "train.logging_steps", "data.max_length",
            "data.block_size", "data.doc_stride", "data.n_best", "data.max_answer_length",
            "data.max_target_length", "data.num_beams", "data.max_new_tokens")


def _check_value(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_check_value(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    # YAML 1.1 reads "3e-5" as a string; accept it wherever a float is expected.
    if isinstance(value, str) and _check_value(1.5, tp) and not _check_value(value, tp):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{path or 'the recipe'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (f" (did you mean {path}{close[0]}?)" if close
                    else f" (known: {', '.join(names)})")
            problems.append(f"{path}{key}: unknown key{hint}")
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        tp, value = hints[f.name], raw[f.name]
        if is_dataclass(tp):
            values[f.name] = _build(tp, value, f"{path}{f.name}.", problems)  # type: ignore[arg-type]
            continue
        value = _coerce(value, tp)
        if _check_value(value, tp):
            values[f.name] = value
        else:
            problems.append(f"{path}{f.name}: expected {_describe(tp)}, got {value!r}")
    return cls(**values)


def _lookup(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _validate(cfg: RunConfig) -> list[str]:
    problems = [f"{key} is required (set {how})" for key, how in REQUIRED.items()
                if _lookup(cfg, key) in ("", None)]
    problems += [f"{key} must be at least 1, got {_lookup(cfg, key)}"
                 for key in POSITIVE if _lookup(cfg, key) is not None and _lookup(cfg, key) < 1]
    if not 0.0 < cfg.data.validation_fraction < 1.0:
        problems.append("data.validation_fraction must be between 0 and 1, "
                        f"got {cfg.data.validation_fraction}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        problems.append(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    return problems


def parse_override(text: str) -> tuple[str, Any]:
    """`train.learning_rate=3e-5` -> ("train.learning_rate", 3e-05); values are read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override {text!r} is not of the form section.key=value"])
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


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


def load_config(task: str, recipe: str | None = None, options: dict[str, Any] | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Resolve a RunConfig from recipe, CLI options (dotted keys, None = not given), overrides."""
    raw = read_recipe(recipe) if recipe else {}
    if raw.get("task", task) != task:
        raise ConfigError([f"task: the recipe is for {raw['task']!r}, not {task!r}"])
    raw["task"] = task
    for key, value in (options or {}).items():
        if value is not None:
            _set(raw, key, value)
    for text in overrides or []:
        _set(raw, *parse_override(text))
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    problems += [] if problems else _validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)


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

    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


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


def default_of(dotted: str) -> Any:
    """The schema default at a dotted path (for help texts)."""
    cls: Any = RunConfig
    *parents, last = dotted.split(".")
    for part in parents:
        cls = get_type_hints(cls)[part]
    default = next(f for f in fields(cls) if f.name == last).default
    return None if default is MISSING else default


def option_paths() -> dict[str, str]:
    """CLI parameter name -> dotted config path, e.g. "epochs" -> "train.epochs"."""
    paths: dict[str, str] = {}
    for f in fields(RunConfig):
        tp = get_type_hints(RunConfig)[f.name]
        leaves = [f"{f.name}.{g.name}" for g in fields(tp)] if is_dataclass(tp) else [f.name]
        for dotted in leaves:
            leaf = dotted.rsplit(".", 1)[-1]
            assert leaf not in paths, f"config field {leaf} is not unique"
            paths[leaf] = dotted
    del paths["task"]
    return paths
