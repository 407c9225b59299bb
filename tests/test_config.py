"""Config: schema, recipe + options + overrides, every problem reported with its dotted path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmkit.config.recipes import dump_config, parse_override, shipped_recipes
from llmkit.config.schema import RunConfig, schema
from llmkit.errors import ConfigError, LlmkitError
from llmkit.tasks import get_task, load_config, task_names

BASE = {"model": "m", "output": "o", "data.train": "t.csv"}


def test_precedence_recipe_then_options_then_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: from-recipe\noutput: out\ndata:\n  train: a.csv\n"
                      "train:\n  epochs: 7\n  learning_rate: 3e-5\n  seed: 1\n")
    cfg = load_config("classify", str(recipe), {"train.epochs": 2, "train.seed": None},
                      ["train.learning_rate=1e-4"])
    assert cfg.model == "from-recipe"
    assert cfg.train.epochs == 2  # option beats recipe
    assert cfg.train.seed == 1  # an option left unset (None) lets the recipe show through
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # override beats both
    assert isinstance(cfg.train.learning_rate, float)  # YAML's "3e-5" string is accepted


def test_all_problems_reported_together_with_dotted_paths(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: m\noutput: o\ndata:\n  train: a.csv\n  text_colum: s\n"
                      "train:\n  epochs: three\n  mixed_precision: fp8\n  bogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config("classify", str(recipe))
    problems = err.value.problems
    assert any(p.startswith("data.text_colum: unknown key (did you mean data.text_column?)")
               for p in problems)
    assert any(p.startswith("train.epochs: expected int") for p in problems)
    assert any(p.startswith("train.mixed_precision: expected 'no' | 'bf16' | 'fp16'")
               for p in problems)
    assert any(p.startswith("train.bogus: unknown key") for p in problems)
    assert len(problems) == 4


def test_required_and_range_checks() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("classify", None, {"train.epochs": 0})
    text = str(err.value)
    for needed in ("model is required", "output is required", "data.train is required",
                   "train.epochs must be at least 1"):
        assert needed in text


def test_booleans_are_not_ints() -> None:
    with pytest.raises(ConfigError, match="train.epochs: expected int, got True"):
        load_config("classify", None, {**BASE, "train.epochs": True})


def test_override_parsing() -> None:
    assert parse_override("train.seed=3") == ("train.seed", 3)
    assert parse_override("data.validation=null") == ("data.validation", None)
    assert parse_override("data.text_column=a=b") == ("data.text_column", "a=b")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("train.seed")
    with pytest.raises(ConfigError, match="model.x: model is not a section"):
        load_config("classify", None, BASE, ["model.x=1"])


def test_recipe_for_another_task(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: qa\nmodel: m\n")
    with pytest.raises(ConfigError, match="the recipe is for 'qa', not 'classify'"):
        load_config("classify", str(recipe))


def test_missing_recipe_names_shipped_ones() -> None:
    with pytest.raises(LlmkitError, match="shipped recipes: .*classify-sst2"):
        load_config("classify", "no-such-recipe")


def test_schema_lists_shared_and_own_settings_only() -> None:
    paths = {dotted.rsplit(".", 1)[-1]: dotted for dotted, _, _ in
             schema(get_task("classify").settings)}
    assert paths["epochs"] == "train.epochs" and paths["train"] == "data.train"
    assert paths["text_pair_column"] == "data.text_pair_column"
    assert "task" not in paths and paths["model"] == "model"
    assert not {"doc_stride", "block_size", "source_lang", "summary_column"} & set(paths)
    for task in task_names():  # every setting documents itself
        assert all(f.metadata.get("help") for _, f, _ in schema(get_task(task).settings))


def test_saved_config_holds_the_task_settings_only(tmp_path: Path) -> None:
    import yaml

    cfg = load_config("classify", None, BASE)
    dump_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert set(data) == {"train", "validation", "test", "dataset_config", "format", "json_field",
                         "encoding",
                         "train_split",
                         "validation_split", "validation_fraction", "max_train_samples",
                         "preprocessing_workers",
                         "max_eval_samples", "text_column", "text_pair_column", "label_column",
                         "max_length", "positive_label", "empty_rows"}
    assert load_config("classify", str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(("task", "key", "owners"), [
    ("classify", "doc_stride", "qa"), ("qa", "text_column", "classify and summarize and "
                                                            "generate and reward"),
    ("summarize", "source_lang", "translate"), ("translate", "block_size", "generate")])
def test_a_key_of_another_task_names_that_task(task: str, key: str, owners: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(task, None, BASE, [f"data.{key}=3"])
    assert err.value.problems == [f"data.{key}: a setting of {owners}, not of this task "
                                  "(llmkit finetune TASK --help lists each task's settings)"]


def test_ranges_come_from_the_schema() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("qa", None, BASE, ["train.learning_rate=-1", "data.n_best=21",
                                       "data.validation_fraction=0", "train.seed=-3",
                                       "train.warmup_ratio=1.0", "train.weight_decay=.nan"])
    assert set(err.value.problems) == {
        "train.learning_rate must be at least 0, got -1",
        "data.n_best must be at most 20, got 21",
        "data.validation_fraction must be above 0, got 0",
        "train.seed must be at least 0, got -3",
        "train.warmup_ratio must be below 1, got 1",
        "train.weight_decay must be a number, got nan"}


def test_bad_yaml_in_an_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("classify", None, BASE, ["data.text_column=[unclosed"])


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_load_and_validate(name: str) -> None:
    path = shipped_recipes()[name]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# llmkit finetune "), "first line is the command that runs it"
    task = first.split()[3]
    cfg = load_config(task, name, {"output": "runs/x"})
    assert isinstance(cfg, RunConfig) and cfg.task == task and cfg.model
    assert get_task(task).columns(cfg.data, True)  # e.g. translate needs its languages


def test_shipped_recipes_exist() -> None:
    assert "classify-sst2" in shipped_recipes()


@pytest.mark.parametrize(("steps", "processes"), [(86, 1), (86, 2), (7, 1), (100, 1)])
def test_warmup_steps_round_up_as_trainer_does(steps: int, processes: int) -> None:
    """A 5% warm-up of 86 steps is 5 optimizer steps, as in Trainer (4 made a 6-layer GPT-2
    end 18% worse in perplexity); with several processes Accelerate steps the schedule once
    per process."""
    import math

    import torch
    from transformers import TrainingArguments

    from llmkit.run.build import make_scheduler

    cfg = load_config("classify", None, {"model": "m", "data.train": "t.csv", "output": "o",
                                         "train.warmup_ratio": 0.05, "train.epochs": 1})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(cfg, optimizer, steps, processes)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        for _ in range(processes):
            optimizer.step()
            scheduler.step()
    expected = TrainingArguments(output_dir="unused", warmup_steps=0.05,
                                 report_to=[]).get_warmup_steps(steps)
    assert expected == math.ceil(0.05 * steps)
    assert rates.index(max(rates)) == expected


def test_a_run_saved_with_every_tasks_keys_still_loads(tmp_path: Path) -> None:
    """llmkit 0.1 saved all five tasks' data keys in every run's config.yaml."""
    import yaml

    from llmkit.inference.predict import run_config

    old = {"task": "classify", "model": "m", "output": "o",
           "data": {"train": "t.csv", "text_column": "sentence", "doc_stride": 128,
                    "block_size": 1024, "source_lang": None, "summary_column": "summary"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = run_config(str(tmp_path))
    assert cfg is not None and cfg.data.text_column == "sentence"


def test_resuming_with_the_same_settings_warns_of_nothing(tmp_path: Path, monkeypatch) -> None:
    """Tuple settings come back from config.yaml as lists: not a change."""
    from dataclasses import replace

    from llmkit.run import launch

    said: list[tuple] = []
    monkeypatch.setattr(launch.log, "warning", lambda *args: said.append(args))
    cfg = load_config("classify", None, {"model": "m", "output": "o", "data.train": "t.tsv",
                                         "adapter.lora_target_modules": ("query",),
                                         "adapter.lora": True})
    dump_config(cfg, tmp_path / "config.yaml")
    launch.warn_config_changes(tmp_path / "config.yaml", cfg)
    assert said == []
    launch.warn_config_changes(tmp_path / "config.yaml",
                               replace(cfg, train=replace(cfg.train, seed=1)))
    assert said and said[0][1] == "train.seed"


def test_a_single_value_where_a_list_is_expected(tmp_path: Path) -> None:
    """report_to: tensorboard in a recipe, as --report-to tensorboard on the command line."""
    cfg = load_config("classify", {"model": "m", "output": "o", "data": {"train": "t.tsv"},
                                   "train": {"report_to": "tensorboard"}})
    assert cfg.train.report_to == ("tensorboard",)


def test_a_recipe_file_and_an_override_take_one_tracker_as_a_string(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  report_to: tensorboard\n")
    assert load_config("classify", str(recipe), BASE).train.report_to == ("tensorboard",)
    assert load_config("classify", None, BASE, ["train.report_to=wandb"]).train.report_to \
        == ("wandb",)


def test_on_divergence_is_warn_or_stop() -> None:
    assert load_config("classify", None, BASE).train.on_divergence == "warn"
    assert load_config("classify", None, BASE,
                       ["train.on_divergence=stop"]).train.on_divergence == "stop"
    with pytest.raises(ConfigError, match=re.escape(
            "train.on_divergence: expected 'warn' | 'stop', got 'never'")):
        load_config("classify", None, BASE, ["train.on_divergence=never"])


def test_config_overrides_may_hold_spaces(tiny_gpt2: Path) -> None:
    from llmkit.models import model_config

    assert model_config(str(tiny_gpt2), "n_layer = 1, n_head= 2").n_layer == 1
