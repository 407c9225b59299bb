"""Where values come from: recipes (a file or a shipped name), CLI options and `-s a.b=c`
overrides, lowest first: dataclass defaults < recipe YAML < CLI options < overrides."""

from __future__ import annotations

from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from llmkit.config.check import build, validate
from llmkit.config.schema import DataConfig, RunConfig
from llmkit.errors import ConfigError, LlmkitError


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
            elsewhere: dict[str, list[str]] | None = None, metrics: tuple[str, ...] | None = None
            ) -> RunConfig:
    """A RunConfig for `task` (whose data section is `settings`) from a recipe's values, CLI
    options (dotted keys, None = not given) and overrides; `elsewhere` names the tasks that own
    a data key this task does not have; `metrics`, what its metric_for_best may name (None:
    not checked here)."""
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
    cfg = build(RunConfig, raw, "", problems, {"data": settings}, elsewhere or {})
    problems += [] if problems else validate(cfg, metrics)
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
