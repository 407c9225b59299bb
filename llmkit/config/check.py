"""Values checked against the schema: types, ranges and the cross-field rules, each problem
named by its dotted path."""

from __future__ import annotations

import difflib
import types
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from llmkit.config.schema import RunConfig, leaves
from llmkit.errors import LlmkitError

REQUIRED = {"task": "the task", "model": "--model", "output": "--output", "data.train": "--train"}


def fits_type(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(fits_type(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if origin in (tuple, list):  # tuple[str, ...]: repeatable options
        return isinstance(value, origin) and all(fits_type(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def coerce(value: Any, tp: Any) -> Any:
    if isinstance(value, list) and fits_type(tuple(value), tp):  # YAML has lists only
        return tuple(value)
    if isinstance(value, str) and fits_type((value,), tp) and not fits_type(value, tp):
        return (value,)  # one value where a list is expected, as the repeatable option takes it
    # YAML 1.1 reads "3e-5" as a string; accept it wherever a float is expected.
    if isinstance(value, str) and fits_type(1.5, tp) and not fits_type(value, tp):
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


def unknown_key(key: str, names: list[str], path: str, elsewhere: dict[str, list[str]]) -> str:
    if key in elsewhere:
        return (f"{path}{key}: a setting of {' and '.join(elsewhere[key])}, not of this task "
                "(llmkit finetune TASK --help lists each task's settings)")
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {path}{close[0]}?)" if close else f" (known: {', '.join(names)})"
    return f"{path}{key}: unknown key{hint}"


def build(cls: type, raw: Any, path: str, problems: list[str],
           sections: dict[str, type], elsewhere: dict[str, list[str]]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{path or 'the recipe'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    problems += [unknown_key(str(key), names, path, elsewhere if path == "data." else {})
                 for key in raw if key not in names]
    values = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        tp, value = sections.get(f"{path}{f.name}", hints[f.name]), raw[f.name]
        if is_dataclass(tp):
            values[f.name] = build(tp, value, f"{path}{f.name}.", problems,  # type: ignore[arg-type]
                                    sections, elsewhere)
            continue
        value = coerce(value, tp)
        if fits_type(value, tp):
            values[f.name] = value
        else:
            problems.append(f"{path}{f.name}: expected {describe(tp)}, got {value!r}")
    return cls(**values)


def validate(cfg: RunConfig, metrics: tuple[str, ...] | None) -> list[str]:
    """Every problem of a built config: required values and ranges first, then the rules that
    tie fields together (`metrics`: what the task's metric_for_best may name; None: not
    checked)."""
    values = {dotted: value for dotted, _, value in leaves(cfg)}
    problems = [f"{key} is required (set {how})" for key, how in REQUIRED.items()
                if values[key] in ("", None)]
    for dotted, f, value in leaves(cfg):
        if value is None or isinstance(value, (bool, str, tuple, list)):
            continue
        wrong = bound_problem(value, f.metadata.get("bounds", (None,) * 4))
        if wrong:
            problems.append(f"{dotted} {wrong}")
    return problems or related(cfg, metrics)


def related(cfg: RunConfig, metrics: tuple[str, ...] | None) -> list[str]:
    """The cross-field rules, each checked here only."""
    problems = []
    known = ("eval_loss", *(metrics or ()))
    if metrics is not None and cfg.train.metric_for_best not in (None, *known):
        problems.append(f"train.metric_for_best {cfg.train.metric_for_best!r} is not a metric "
                        f"of {cfg.task}; choose one of {', '.join(known)}")
    adapter = cfg.adapter
    needs_lora = [name for name, given in (("--merge", adapter.merge),
                                           ("--load-in-4bit", adapter.load_in_4bit),
                                           ("--lora-target-modules", adapter.lora_target_modules))
                  if given]
    if needs_lora and not adapter.lora:
        problems.append(f"{', '.join(needs_lora)} applies to adapter runs: add --lora")
    if adapter.lora and cfg.from_scratch:  # adapters over a frozen random base learn nothing
        problems.append("--from-scratch trains every weight of a new model and --lora freezes "
                        "the base model's: drop one of them")
    problems += cfg.data.problems()
    if cfg.train.lr_scheduler not in COMMON_SCHEDULES:  # else transformers (and peft) load:
        problems += schedule_problem(cfg.train.lr_scheduler)  # 6 s on a busy machine
    return problems


# transformers' SchedulerType values of every 5.x release: no import needed to accept them
COMMON_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                    "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                    "cosine_with_min_lr", "warmup_stable_decay")


def schedule_problem(name: str) -> list[str]:
    """A schedule name that is not one of transformers' SchedulerType values."""
    from transformers import SchedulerType

    schedules = [s.value for s in SchedulerType]
    if name not in schedules:
        return [f"train.lr_scheduler {name!r} is not one of transformers' schedules: "
                f"{', '.join(schedules)}"]
    return []


def check_settings(settings: Any) -> None:
    """A command's settings dataclass (not a run config): every value of the right type and
    inside its range, else one ConfigError naming each option."""
    problems = []
    hints = get_type_hints(type(settings))
    for f in fields(settings):
        value, option = getattr(settings, f.name), "--" + f.name.replace("_", "-")
        if not fits_type(value, hints[f.name]):
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
