"""Batched prediction with a fine-tuned run directory (or any checkpoint with the task's head)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from llmkit.config import DataConfig, RunConfig, read_recipe
from llmkit.data import by_length, check_columns, load_split
from llmkit.errors import LlmkitError
from llmkit.report import quiet_libraries
from llmkit.tasks import get_task, load_config, load_model
from llmkit.tasks.task import Task, loss_of

log = logging.getLogger("llmkit")


def run_config(model: str) -> RunConfig | None:
    """The config a run directory was trained with, if `model` is one. Runs of llmkit 0.1
    saved every task's data keys: the ones this task does not have are left out."""
    saved = Path(model) / "config.yaml"
    if not saved.is_file():
        return None
    raw = read_recipe(str(saved))
    spec = get_task(str(raw.get("task", "")))
    if isinstance(raw.get("data"), dict):
        own = {f.name for f in fields(spec.settings)}
        raw["data"] = {k: v for k, v in raw["data"].items() if k in own}
    return load_config(spec.name, raw)


def prepare(model: str, task: str | None, columns: dict[str, Any] | None,
            base_model: str | None = None) -> tuple[Task, DataConfig, Any, Any]:
    """Task, column settings (the run's, then the caller's), model and tokenizer."""
    quiet_libraries()
    saved = run_config(model)
    spec = get_task(task or (saved.task if saved else "classify"))
    if saved and saved.task != spec.name:
        hint = " (--question and --context are for qa runs)" if spec.name == "qa" else ""
        raise LlmkitError(f"{model} is a {saved.task} run: it does not do {spec.name}{hint}")
    data = saved.data if saved and saved.task == spec.name else spec.settings()
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    own = {f.name for f in fields(data)}
    foreign = [k for k in given if k not in own]
    if foreign:
        raise LlmkitError(f"--{foreign[0].replace('_', '-')} does not apply to a {spec.name} "
                          "model")
    data = replace(data, **given)
    net, tokenizer = load_model(spec, model, data, trained=True, base_model=base_model)
    return spec, data, net, tokenizer


def outputs(spec: Task, net: Any, tokenizer: Any, features: Any, batch_size: int
            ) -> tuple[dict[str, Any], list[int]]:
    """The task's per-example outputs over `features`, batched longest first; and that order."""
    import torch
    from torch.utils.data import DataLoader

    order = by_length(features)
    loader = DataLoader(features.select(order), batch_size=batch_size,
                        collate_fn=spec.collator(tokenizer))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device).eval()
    gathered: dict[str, list[Any]] = {}
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            for key, value in spec.eval_step(net, batch).items():
                gathered.setdefault(key, []).append(value.cpu())
    return {k: torch.cat(v).numpy() for k, v in gathered.items()}, order


def predict(model: str, input: str, output: str | None = None, task: str | None = None,
            batch_size: int = 64, columns: dict[str, Any] | None = None,
            base_model: str | None = None) -> list[dict[str, Any]]:
    """Predict every row of `input` (a file or Hub dataset); rows come back in input order."""
    spec, data, net, tokenizer = prepare(model, task, columns, base_model)
    rows = load_split(input, "train", None, "--input")
    check_columns(rows, spec.columns(data, False), "--input")
    rows = rows.select_columns(spec.columns(data, False))  # labels, if any, are not needed
    rows = spec.usable(rows, data, False)
    features = spec.featurize(rows, tokenizer, net.config, data)
    arrays, order = outputs(spec, net, tokenizer, features, batch_size)
    records = spec.present(arrays, features.select(order), data, net.config, tokenizer)
    inputs = {c: rows[c] for c in spec.columns(data, False)}
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


def predict_rows(model: str, input: str | None, output: str | None, task: str | None,
                 batch_size: int, question: str | None, context: str | None,
                 columns: dict[str, Any], base_model: str | None = None
                 ) -> list[dict[str, Any]]:
    """`llmkit predict`: rows of a file, or one question with its context for a qa model."""
    import tempfile

    from llmkit.data import check_output_file

    if output is not None:
        check_output_file(output)

    if question is not None and context is not None:
        rows = Path(tempfile.mkdtemp()) / "question.jsonl"
        rows.write_text(json.dumps({"question": question, "context": context}) + "\n",
                        encoding="utf-8")
        input, task = str(rows), task or "qa"
    if input is None:
        raise LlmkitError("give --input (or --question and --context for a qa model)")
    return predict(model, input, output, task, batch_size, columns, base_model)


def score(model: str, data_spec: str, task: str | None = None, split: str = "validation",
          batch_size: int = 64, columns: dict[str, Any] | None = None,
          base_model: str | None = None) -> dict[str, Any]:
    """The task's metrics for a model on labelled rows (a file or a Hub split)."""
    spec, data, net, tokenizer = prepare(model, task, columns, base_model)
    rows = load_split(data_spec, split, data.dataset_config, "--data",
                      getattr(data, "sample_by", "line"))
    check_columns(rows, spec.columns(data, True), "--data")
    rows = spec.usable(rows, data, True)
    features = spec.featurize(rows, tokenizer, net.config, data)
    arrays, order = outputs(spec, net, tokenizer, features, batch_size)
    result = spec.score(arrays, features.select(order), data, net.config, tokenizer)
    result.pop("predictions", None)
    return {**loss_of(arrays), **result}


def rolling_score(model: str, data_spec: str, task: str | None, split: str, stride: int | None,
                  batch_size: int = 64, columns: dict[str, Any] | None = None,
                  base_model: str | None = None) -> dict[str, Any]:
    """A language model's perplexity of each document of `data_spec` in sliding windows of its
    block size moved `stride` tokens (default: the block size), with word and byte perplexity
    and bits per byte (causal_lm.rolling)."""
    import torch

    from llmkit.tasks.causal_lm import block_size, rolling

    spec, data, net, tokenizer = prepare(model, task, columns, base_model)
    if spec.name != "generate" or getattr(data, "messages_column", None) or getattr(
            data, "prompt_column", None):
        raise LlmkitError("--stride, word_perplexity, byte_perplexity and bits_per_byte score "
                          "plain text with a language model (a generate run, or --task generate)")
    length = block_size(data, net.config)  # type: ignore[arg-type]
    if stride is not None and stride > length:
        raise LlmkitError(f"--stride {stride} is longer than the window ({length} tokens, "
                          "--block-size clamped to the model's context): at most that")
    rows = load_split(data_spec, split, data.dataset_config, "--data",
                      getattr(data, "sample_by", "line"))
    column = getattr(data, "text_column", "text")
    check_columns(rows, [column], "--data")
    net.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()
    result = rolling(net, tokenizer, rows[column], length, stride or length, batch_size)
    return {**result, "window": length, "stride": stride or length}


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def merge(run: str | Path, output: str | Path, base_model: str | None = None) -> Path:
    """`llmkit merge`: the adapter run's merged model, tokenizer and llmkit settings in a folder
    that plain transformers (no peft, no llmkit) loads."""
    from transformers import AutoTokenizer

    from llmkit.adapters import ADAPTER_CONFIG, is_adapter_run, load_merged
    from llmkit.tasks import auto_class

    quiet_libraries()
    run, output = Path(run), Path(output)
    if not is_adapter_run(run):
        raise LlmkitError(f"{run} is not an adapter run (no {ADAPTER_CONFIG}): it is a full "
                          "model already, loadable as it is")
    saved = run_config(str(run))
    if saved is None:
        raise LlmkitError(f"{run} has no config.yaml: give the run directory llmkit wrote")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LlmkitError(f"--output {output} is not an empty folder; choose another one")
    model = load_merged(run, auto_class(get_task(saved.task)), base_model)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(str(run)).save_pretrained(output)
    shutil.copyfile(run / "config.yaml", output / "config.yaml")  # the task, for llmkit predict
    return output


def test(run: Path, spec: str) -> dict[str, Any]:
    """--test: the finished run predicts `spec` (test_predictions.jsonl) and, where the rows
    carry labels, scores it; the metrics go into metrics.json under "test"."""
    cfg = run_config(str(run))
    assert cfg is not None
    task = get_task(cfg.task)
    rows = load_split(spec, "test", cfg.data.dataset_config, "--test",
                      getattr(cfg.data, "sample_by", "line"), cfg.data.format,
                      cfg.data.json_field)
    found: dict[str, Any] = {}
    if cfg.task != "generate":  # a language model's rows are text to score, not to label
        predict(str(run), spec, str(run / "test_predictions.jsonl"))
        found["predictions"] = "test_predictions.jsonl"
    if all(c in rows.column_names for c in task.columns(cfg.data, True)):
        found.update(score(str(run), spec, split="test"))
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["test"] = found
    metrics_path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    log.info("--test %s: %s", spec, ", ".join(f"{k} {v:.4f}" for k, v in found.items()
                                                 if isinstance(v, float)) or "predicted")
    return found
