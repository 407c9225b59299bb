"""Batched prediction with a fine-tuned run directory (or any checkpoint with the task's head)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.config.recipes import read_recipe
from llmkit.config.schema import DataConfig, RunConfig
from llmkit.data.features import by_length
from llmkit.data.read import check_columns, load_split, reading
from llmkit.errors import LlmkitError
from llmkit.hub import ADAPTER_CONFIG, is_adapter_run, quiet_libraries
from llmkit.inference.exported import check_source, exported_graph, load_exported
from llmkit.tasks import auto_class, get_task, load_config
from llmkit.tasks.task import Task, loss_of

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("llmkit")


def run_config(model: str) -> RunConfig | None:
    """The config a run directory was trained with, if `model` is one. Runs of llmkit 0.1
    saved every task's data keys: the ones this task does not have are left out."""
    graph = exported_graph(model)  # an export keeps the run's config.yaml beside its graphs
    saved = (graph.parent if graph else Path(model)) / "config.yaml"
    if not saved.is_file():
        return None
    raw = read_recipe(str(saved))
    task = get_task(str(raw.get("task", "")))
    if isinstance(raw.get("data"), dict):
        own = {f.name for f in fields(task.settings)}
        raw["data"] = {k: v for k, v in raw["data"].items() if k in own}
    return load_config(task.name, raw)


def prepare(model: str, task_name: str | None, columns: dict[str, Any] | None,
            base_model: str | None = None) -> tuple[Task, DataConfig, Any, Any]:
    """Task, column settings (the run's, then the caller's), model and tokenizer; an export's
    model runs through ONNX Runtime (inference.exported)."""
    check_source(model)  # before torch and transformers load: a mistyped path is quick
    graph = exported_graph(model)
    from llmkit.models import load_model

    quiet_libraries()
    saved = run_config(model)
    task = get_task(task_name or (saved.task if saved else "classify"))
    if saved and saved.task != task.name:
        hint = " (--question and --context are for qa runs)" if task.name == "qa" else ""
        raise LlmkitError(f"{model} is a {saved.task} run: it does not do {task.name}{hint}")
    data = saved.data if saved and saved.task == task.name else task.settings()
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    own = {f.name for f in fields(data)}
    foreign = [k for k in given if k not in own]
    if foreign:
        raise LlmkitError(f"--{foreign[0].replace('_', '-')} does not apply to a {task.name} "
                          "model")
    data = replace(data, **given)
    if graph is not None:
        net, tokenizer = load_exported(graph, base_model=base_model)
    else:
        net, tokenizer = load_model(task, model, data, trained=True, base_model=base_model)
    return task, data, net, tokenizer


def collect(task: Task, model: Any, loader: Any, gather: Callable[[Any], Any] | None = None,
            device: Any = None) -> dict[str, Any]:
    """The one evaluation loop (training's evaluations, predict, eval --model): the task's
    per-example outputs over every batch, as arrays. `gather` joins them across processes
    (Accelerate's gather_for_metrics); `device`, where batches of a plain loader go."""
    import torch
    from accelerate.utils import send_to_device

    gathered: dict[str, list[Any]] = {}
    with torch.inference_mode():
        for batch in loader:
            if device is not None:
                batch = send_to_device(batch, device)
            for key, value in task.eval_step(model, batch).items():
                gathered.setdefault(key, []).append((gather(value) if gather else value).cpu())
    return {k: torch.cat(v).numpy() for k, v in gathered.items()}


def outputs(task: Task, net: Any, tokenizer: Any, features: Any, batch_size: int
            ) -> tuple[dict[str, Any], list[int]]:
    """The task's per-example outputs over `features`, batched longest first; and that order."""
    from torch.utils.data import DataLoader

    from llmkit.models import inference_device

    order = by_length(features)
    loader = DataLoader(features.select(order), batch_size=batch_size,
                        collate_fn=task.collator(tokenizer))
    net.to(inference_device()).eval()
    return collect(task, net, loader, device=net.device), order  # an export's: the CPU


def predict(model: str, input: str, output: str | None = None, task_name: str | None = None,
            batch_size: int = 64, columns: dict[str, Any] | None = None,
            base_model: str | None = None) -> list[dict[str, Any]]:
    """Predict every row of `input` (a file or Hub dataset); rows come back in input order."""
    task, data, net, tokenizer = prepare(model, task_name, columns, base_model)
    rows = load_split(input, "train", None, "--input")
    check_columns(rows, task.columns(data, False), "--input")
    rows = rows.select_columns(task.columns(data, False))  # labels, if any, are not needed
    check_filled(rows, task.columns(data, False), input)
    rows = task.usable(rows, data, False)
    features = task.featurize(rows, tokenizer, net.config, data)
    arrays, order = outputs(task, net, tokenizer, features, batch_size)
    records = task.present(arrays, features.select(order), data, net.config, tokenizer)
    inputs = {c: rows[c] for c in task.columns(data, False)}
    # records follow the feature order; tasks with several features per row (qa windows)
    # answer per row instead, naming it by its index
    positions = ([int(r.pop("id")) for r in records] if records and "id" in records[0]
                 else order)
    results: list[dict[str, Any]] = [{} for _ in range(len(rows))]
    for position, row in zip(positions, records, strict=True):
        results[position] = {**{c: inputs[c][position] for c in inputs}, **row}
    if output:
        write_jsonl(results, Path(output))
    return results


def check_filled(rows: Any, columns: list[str], source: str) -> None:
    """Every row gets a prediction, in order: one without its text (null) cannot be left out.
    Rows count from 0, as llmkit's other messages count them."""
    for column in columns:
        missing = [i for i, value in enumerate(rows[column]) if value is None]
        if missing:
            raise LlmkitError(f"--input {source}: {len(missing)} of {len(rows)} rows have no "
                              f"text in column {column!r} (first: row {missing[0]}); fill them "
                              "in or remove those rows")


def predict_rows(model: str, input: str | None, output: str | None, task_name: str | None,
                 batch_size: int, question: str | None, context: str | None,
                 columns: dict[str, Any], base_model: str | None = None
                 ) -> list[dict[str, Any]]:
    """`llmkit predict`: rows of a file, or one question with its context for a qa model."""
    import tempfile

    from llmkit.data.read import check_output_file

    if output is not None:
        check_output_file(output)

    if question is not None and context is not None:
        rows = Path(tempfile.mkdtemp()) / "question.jsonl"
        rows.write_text(json.dumps({"question": question, "context": context}) + "\n",
                        encoding="utf-8")
        input, task_name = str(rows), task_name or "qa"
    if input is None:
        raise LlmkitError("give --input (or --question and --context for a qa model)")
    return predict(model, input, output, task_name, batch_size, columns, base_model)


def score(model: str, source: str, task_name: str | None = None, split: str = "validation",
          batch_size: int = 64, columns: dict[str, Any] | None = None,
          base_model: str | None = None) -> dict[str, Any]:
    """The task's metrics for a model on labelled rows (a file or a Hub split)."""
    task, data, net, tokenizer = prepare(model, task_name, columns, base_model)
    rows = load_split(source, split, data.dataset_config, "--data",
                      getattr(data, "sample_by", "line"))
    check_columns(rows, task.columns(data, True), "--data")
    rows = task.usable(rows, data, True)
    features = task.featurize(rows, tokenizer, net.config, data)
    arrays, order = outputs(task, net, tokenizer, features, batch_size)
    result = task.score(arrays, features.select(order), data, net.config, tokenizer)
    result.pop("predictions", None)
    return {**loss_of(arrays), **result}


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def merge(run: str | Path, output: str | Path, base_model: str | None = None) -> Path:
    """`llmkit merge`: the adapter run's merged model, tokenizer and llmkit settings in a folder
    that plain transformers (no peft, no llmkit) loads."""
    run, output = Path(run), Path(output)
    if not run.is_dir():
        raise LlmkitError(f"{run}: no such run directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LlmkitError(f"--output {output} is not an empty folder; choose another one")
    if not is_adapter_run(run):
        raise LlmkitError(f"{run} is not an adapter run (no {ADAPTER_CONFIG}): it is a full "
                          "model already, loadable as it is")
    from llmkit.models import load_merged, load_tokenizer

    quiet_libraries()
    saved = run_config(str(run))
    if saved is None:
        raise LlmkitError(f"{run} has no config.yaml: give the run directory llmkit wrote")
    model = load_merged(run, auto_class(get_task(saved.task)), base_model)
    model.save_pretrained(output)
    load_tokenizer(str(run)).save_pretrained(output)
    shutil.copyfile(run / "config.yaml", output / "config.yaml")  # the task, for llmkit predict
    return output


def test(run: Path, source: str) -> dict[str, Any]:
    """--test: the finished run predicts `source` (test_predictions.jsonl) and, where the rows
    carry labels, scores it; the metrics go into metrics.json under "test"."""
    cfg = run_config(str(run))
    assert cfg is not None
    task = get_task(cfg.task)
    rows = load_split(source, "test", cfg.data.dataset_config, "--test", *reading(cfg.data))
    found: dict[str, Any] = {}
    if cfg.task != "generate":  # a language model's rows are text to score, not to label
        predict(str(run), source, str(run / "test_predictions.jsonl"))
        found["predictions"] = "test_predictions.jsonl"
    if all(c in rows.column_names for c in task.columns(cfg.data, True)):
        found.update(score(str(run), source, split="test"))
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["test"] = found
    metrics_path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log.info("--test %s: %s", source, ", ".join(f"{k} {v:.4f}" for k, v in found.items()
                                                 if isinstance(v, float)) or "predicted")
    return found
