"""The search space: `--param NAME=KIND:...` read into Optuna distributions over config paths.

KIND is `log:LOW:HIGH` (a float drawn on a log scale), `float:LOW:HIGH`, `int:LOW:HIGH` or
`choice:A,B,...` (values read as YAML). NAME is an option's name (`learning_rate`, `lr_r`...) or
its dotted config path (`train.learning_rate`), as `finetune` and `-s` take them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from llmkit.config.schema import schema
from llmkit.errors import LlmkitError
from llmkit.tasks.task import Task

KINDS = ("log", "float", "int", "choice")


@dataclass(frozen=True)
class Param:
    """One searched setting: its dotted config path and the distribution it is drawn from."""

    path: str
    kind: str
    values: tuple[Any, ...]  # (low, high), or the choices

    def suggest(self, trial: Any) -> Any:
        """This trial's value, drawn by the study's sampler."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.values[0]), int(self.values[1]))
        return trial.suggest_float(self.path, float(self.values[0]), float(self.values[1]),
                                   log=self.kind == "log")

    def extremes(self) -> list[Any]:
        """The values to check against the setting's type and range before anything runs."""
        return list(self.values)


def config_paths(task: Task) -> dict[str, str]:
    """Option name -> dotted config path, for every setting of the task."""
    return {dotted.rsplit(".", 1)[-1]: dotted for dotted, _, _ in schema(task.settings)}


def read_param(text: str, paths: dict[str, str]) -> Param:
    """One `--param`, its name resolved and its distribution read; mistakes in one line."""
    import yaml

    name, sep, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    name = name.strip().replace("-", "_").lstrip("_")
    path = paths.get(name) or (name if name in paths.values() else None)
    if not sep or path is None:
        close = difflib.get_close_matches(name, list(paths), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LlmkitError(f"--param {text!r}: {name!r} is not a setting of this task{hint}; "
                          "write NAME=KIND:..., e.g. learning_rate=log:1e-5:1e-3")
    if kind not in KINDS:
        raise LlmkitError(f"--param {text!r}: the distribution is one of {', '.join(KINDS)} "
                          "(log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,...)")
    if kind == "choice":
        choices = tuple(yaml.safe_load(v) for v in rest.split(",") if v.strip())
        if len(set(map(repr, choices))) < 2:
            raise LlmkitError(f"--param {text!r}: give two or more different choices")
        return Param(path, kind, choices)
    try:
        low, high = (float(v) for v in rest.split(":"))
    except ValueError:
        raise LlmkitError(f"--param {text!r}: expected {kind}:LOW:HIGH with two numbers"
                          ) from None
    if not low < high:
        raise LlmkitError(f"--param {text!r}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
        raise LlmkitError(f"--param {text!r}: a log scale needs LOW above 0")
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise LlmkitError(f"--param {text!r}: int takes whole numbers")
    return Param(path, kind, (int(low), int(high)) if kind == "int" else (low, high))


def read_space(texts: list[str], task: Task) -> list[Param]:
    """Every `--param`, each setting searched once."""
    if not texts:
        raise LlmkitError("give at least one --param, e.g. --param learning_rate=log:1e-5:1e-3")
    params = [read_param(text, config_paths(task)) for text in texts]
    seen = [p.path for p in params]
    twice = sorted({p for p in seen if seen.count(p) > 1})
    if twice:
        raise LlmkitError(f"--param names {twice[0]} twice: give each setting once")
    return params
