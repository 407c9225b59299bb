"""Tasks are values: a frozen record per task says what differs; the loop does the rest.
This module is the registry: tasks by name, their configs, and loading a model for one."""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from llmkit.config import RunConfig, read_recipe, resolve
from llmkit.errors import LlmkitError
from llmkit.tasks.task import Task

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llmkit.config import DataConfig

log = logging.getLogger("llmkit")


def _registry() -> dict[str, Task]:
    from llmkit.tasks.causal_lm import GENERATE
    from llmkit.tasks.classify import CLASSIFY
    from llmkit.tasks.qa import QA
    from llmkit.tasks.seq2seq import SUMMARIZE, TRANSLATE

    return {t.name: t for t in (CLASSIFY, QA, SUMMARIZE, TRANSLATE, GENERATE)}


def task_names() -> list[str]:
    return list(_registry())


def get_task(name: str) -> Task:
    tasks = _registry()
    if name not in tasks:
        raise LlmkitError(f"unknown task {name!r}; the tasks are {', '.join(tasks)}")
    return tasks[name]


def load_config(task: str, recipe: str | dict[str, Any] | None = None,
                options: dict[str, Any] | None = None, overrides: list[str] | None = None
                ) -> RunConfig:
    """Resolve a task's RunConfig from a recipe (a file, a shipped name, or its values), CLI
    options (dotted keys, None = not given) and `-s` overrides."""
    spec = get_task(task)
    raw = read_recipe(recipe) if isinstance(recipe, str) else dict(recipe or {})
    own = {f.name for f in fields(spec.settings)}
    elsewhere: dict[str, list[str]] = {}
    for other in _registry().values():
        for f in fields(other.settings):
            if f.name not in own:
                elsewhere.setdefault(f.name, []).append(other.name)
    cfg = resolve(spec.name, spec.settings, raw, options, overrides, elsewhere)
    known = ("eval_loss", *spec.metrics)
    if cfg.train.metric_for_best not in (None, *known):
        raise LlmkitError(f"train.metric_for_best {cfg.train.metric_for_best!r} is not a metric "
                          f"of {spec.name}; choose one of {', '.join(known)}")
    adapter = cfg.adapter
    needs_lora = [name for name, given in (("--merge", adapter.merge),
                                           ("--load-in-4bit", adapter.load_in_4bit),
                                           ("--lora-target-modules", adapter.lora_target_modules))
                  if given]
    if needs_lora and not adapter.lora:
        raise LlmkitError(f"{', '.join(needs_lora)} applies to adapter runs: add --lora")
    if adapter.lora and cfg.from_scratch:  # adapters over a frozen random base learn nothing
        raise LlmkitError("--from-scratch trains every weight of a new model and --lora freezes "
                          "the base model's: drop one of them")
    from transformers import SchedulerType

    schedules = [s.value for s in SchedulerType]
    if cfg.train.lr_scheduler not in schedules:
        raise LlmkitError(f"train.lr_scheduler {cfg.train.lr_scheduler!r} is not one of "
                          f"transformers' schedules: {', '.join(schedules)}")
    return cfg


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


def check_pairing(task: Task, config: PretrainedConfig | None, name: str) -> None:
    """A checkpoint whose architecture has no head for this task gets a line naming what fits
    (its config is read when not given: a check before the data is read)."""
    if config is None:
        from transformers import AutoConfig

        from llmkit.hub import load_pretrained

        config = load_pretrained(AutoConfig, name)
    if fits(task, config):
        return
    fits_ = [t.name for t in _registry().values() if fits(t, config)]
    hint = f"it fits: {', '.join(fits_)}" if fits_ else "no llmkit task fits it"
    raise LlmkitError(f"{name} is a {config.model_type} checkpoint, which has no "
                      f"{task.name} head in transformers; {hint}")


def fuse_gelu(model: Any) -> None:
    """Swap GPT-2-style tanh GELUs (gelu_new, gelu_fast: five elementwise passes over the MLP
    activations, more in the backward) for PyTorch's one-kernel tanh GELU: the same function to
    ~2e-7, 4.5x faster forward and backward on CPU (GPT-2's MLP: 11% of a training step). The
    config keeps its activation name, so the saved model is the one that was loaded."""
    from transformers.activations import ACT2CLS, ACT2FN

    slow = (ACT2CLS["gelu_new"], ACT2CLS["gelu_fast"])
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) in slow:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


def model_config(name: str, overrides: str | None, **config_kwargs: Any) -> PretrainedConfig:
    """The checkpoint's config with the task's settings and --config-overrides applied
    (transformers' `update_from_string`, as run_clm.py applies them)."""
    from transformers import AutoConfig

    from llmkit.hub import load_pretrained

    config = load_pretrained(AutoConfig, name, **config_kwargs)
    for key, value in config_kwargs.items():  # transformers 5 drops keys it does not know
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if overrides:
        if any("=" not in part for part in overrides.split(",")):
            raise LlmkitError(f"--config-overrides {overrides!r}: expected key=value pairs "
                              "separated by commas, e.g. n_layer=4,n_embd=256")
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as err:
            raise LlmkitError(f"--config-overrides {overrides!r}: {err} (the keys of "
                              f"{config.model_type}'s config.json can be changed)") from None
    return config


def load_model(task: Task, name: str, data: DataConfig, trained: bool = False,
               quantized: bool = False, base_model: str | None = None,
               run: RunConfig | None = None, **config_kwargs: Any) -> tuple[Any, Any]:
    """Model and tokenizer of a checkpoint for `task`, fitted to the data settings; a missing
    head is added (and logged) to train, and refused when the model must be `trained`
    (prediction and evaluation would answer from random weights). An adapter run comes back
    merged into its base (`base_model` overrides the one it names); `quantized`: 4-bit base.
    A training `run` may name another tokenizer, config overrides, or random weights."""
    from transformers import AutoTokenizer

    from llmkit.adapters import four_bit, is_adapter_run, load_merged
    from llmkit.hub import load_pretrained

    config = model_config(name, run.config_overrides if run else None, **config_kwargs)
    check_pairing(task, config, name)
    source = (run.tokenizer if run else None) or name
    tokenizer = load_pretrained(AutoTokenizer, source, "--tokenizer" if source != name else
                                "--model")
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # transformers 5 builds an
        # empty tokenizer when the files are missing
        raise LlmkitError(f"{source} has no tokenizer files (tokenizer.json, vocab files); save "
                          "the tokenizer into the same folder with tokenizer.save_pretrained")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-style vocabularies have no pad token
    import torch

    # fp32 weights whatever the checkpoint holds (transformers 5 keeps a bf16 checkpoint in
    # bf16): the optimizer needs fp32 master weights; --mixed-precision computes in bf16/fp16
    weights = four_bit() if quantized else {"dtype": torch.float32}
    new: list[str] = []
    if run and run.from_scratch:
        model = auto_class(task).from_config(config, dtype=torch.float32)
        log.info("--from-scratch: %s from %s's config with random weights (%s parameters)",
                 type(model).__name__, name, f"{model.num_parameters():,}")
    elif is_adapter_run(name):  # its heads come with the adapter
        model = load_merged(name, auto_class(task), base_model, **weights)
    else:
        model, info = load_pretrained(auto_class(task), name, config=config, **weights,
                                      ignore_mismatched_sizes=True, output_loading_info=True)
        new = sorted(info["missing_keys"]) + sorted(k[0] if isinstance(k, tuple) else k
                                                     for k in info["mismatched_keys"])
        check_reshaped(info["mismatched_keys"], run)
    finish(model, tokenizer, task, data, name, new, trained)
    return model, tokenizer


def check_reshaped(mismatched: list[Any], run: RunConfig | None) -> None:
    """--config-overrides that change the shape of pretrained weights would leave them random
    without a word: refused (task heads are new anyway)."""
    from llmkit.adapters import HEADS

    body = [k[0] if isinstance(k, tuple) else k for k in mismatched]
    body = sorted(k for k in body if not set(k.split(".")) & {*HEADS, "lm_head"})
    if run and run.config_overrides and body:
        raise LlmkitError(f"--config-overrides {run.config_overrides!r} changes the shape of "
                          f"pretrained weights ({', '.join(body[:3])}): add --from-scratch to "
                          "train a new model of that shape, or leave those keys alone")


def finish(model: Any, tokenizer: Any, task: Task, data: DataConfig, name: str, new: list[str],
           trained: bool) -> None:
    """Refuse or log new head weights; fit the embeddings and pad id to the tokenizer."""
    if new and trained:
        raise LlmkitError(f"{name} has no trained {task.name} head ({', '.join(new[:3])} "
                          f"{'...' if len(new) > 3 else 'are'} missing): fine-tune it first "
                          f"(llmkit finetune {task.name}) and give the run directory")
    if new:
        log.info("%s has no trained %s head: new weights (%s) start from random values",
                 name, task.name, ", ".join(new[:6]) + (" ..." if len(new) > 6 else ""))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # a --tokenizer with more tokens (run_clm.py does the same)
        log.info("the tokenizer has %d tokens, the embeddings %d rows: resizing them",
                 len(tokenizer), rows)
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    fuse_gelu(model)
    if task.prepare is not None:
        task.prepare(model, tokenizer, data)
