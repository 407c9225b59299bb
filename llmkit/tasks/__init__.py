"""Tasks are values: a frozen record per task says what differs; the loop does the rest.
This module is the registry: tasks by name, the run config of one, and which tasks a
checkpoint's architecture has a head for."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from llmkit.config.recipes import read_recipe, resolve
from llmkit.config.schema import RunConfig
from llmkit.errors import LlmkitError
from llmkit.tasks.task import Task

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def registry() -> dict[str, Task]:
    from llmkit.tasks.causal_lm import GENERATE
    from llmkit.tasks.classify import CLASSIFY
    from llmkit.tasks.preference import DPO
    from llmkit.tasks.qa import QA
    from llmkit.tasks.reward import REWARD
    from llmkit.tasks.seq2seq import SUMMARIZE, TRANSLATE

    return {t.name: t for t in (CLASSIFY, QA, SUMMARIZE, TRANSLATE, GENERATE, DPO, REWARD)}


def task_names() -> list[str]:
    return list(registry())


def get_task(name: str) -> Task:
    tasks = registry()
    if name not in tasks:
        raise LlmkitError(f"unknown task {name!r}; the tasks are {', '.join(tasks)}")
    return tasks[name]


def load_config(task: str, recipe: str | dict[str, Any] | None = None,
                options: dict[str, Any] | None = None, overrides: list[str] | None = None
                ) -> RunConfig:
    """Resolve a task's RunConfig from a recipe (a file, a shipped name, or its values), CLI
    options (dotted keys, None = not given) and `-s` overrides."""
    chosen = get_task(task)
    raw = read_recipe(recipe) if isinstance(recipe, str) else dict(recipe or {})
    own = {f.name for f in fields(chosen.settings)}
    elsewhere: dict[str, list[str]] = {}
    for other in registry().values():
        for f in fields(other.settings):
            if f.name not in own:
                elsewhere.setdefault(f.name, []).append(other.name)
    return resolve(chosen.name, chosen.settings, raw, options, overrides, elsewhere,
                   chosen.metrics)


def auto_class(task: Task) -> Any:
    import transformers

    return getattr(transformers, task.auto_model)


def fits(task: Task, config: PretrainedConfig) -> bool:
    """Whether transformers has a head for `task` on this architecture. Encoders (BERT) have a
    causal-LM class too, but only as a decoder half: they do not count."""
    if type(config) not in auto_class(task)._model_mapping:
        return False
    if task.auto_model == "AutoModelForCausalLM" and config.is_encoder_decoder:
        return False  # Marian and BART have a decoder-only class, but generate as seq2seq
    if task.auto_model == "AutoModelForCausalLM" and not getattr(config, "is_decoder", False):
        from transformers import AutoModelForMaskedLM

        return type(config) not in AutoModelForMaskedLM._model_mapping
    return True


def check_pairing(task: Task, config: PretrainedConfig, name: str) -> None:
    """A checkpoint whose architecture has no head for this task gets a line naming what fits."""
    if fits(task, config):
        return
    fits_ = [t.name for t in registry().values() if fits(t, config)]
    hint = f"it fits: {', '.join(fits_)}" if fits_ else "no llmkit task fits it"
    raise LlmkitError(f"{name} is a {config.model_type} checkpoint, which has no "
                      f"{task.name} head in transformers; {hint}")
