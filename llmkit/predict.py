"""Batched prediction with a fine-tuned run directory (or any checkpoint with the task's head)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmkit.config import DataConfig, RunConfig, load_config
from llmkit.data import by_length, check_columns, load_split
from llmkit.errors import LlmkitError
from llmkit.report import quiet_libraries
from llmkit.tasks import Task, get_task, load_model, loss_of


def run_config(model: str) -> RunConfig | None:
    """The config a run directory was trained with, if `model` is one."""
    import yaml

    saved = Path(model) / "config.yaml"
    if not saved.is_file():
        return None
    task = yaml.safe_load(saved.read_text(encoding="utf-8")).get("task", "")
    return load_config(str(task), recipe=str(saved))


def prepare(model: str, task: str | None, columns: dict[str, Any] | None
            ) -> tuple[Task, DataConfig, Any, Any]:
    """Task, column settings (the run's, then the caller's), model and tokenizer."""
    quiet_libraries()
    saved = run_config(model)
    data = replace(saved.data if saved else DataConfig(),
                   **{k: v for k, v in (columns or {}).items() if v is not None})
    spec = get_task(task or (saved.task if saved else "classify"))
    net, tokenizer = load_model(spec, model, data)
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
            batch_size: int = 64, columns: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Predict every row of `input` (a file or Hub dataset); rows come back in input order."""
    spec, data, net, tokenizer = prepare(model, task, columns)
    rows = load_split(input, "train", None, "--input")
    check_columns(rows, spec.columns(data, False), "--input")
    rows = rows.select_columns(spec.columns(data, False))  # labels, if any, are not needed
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


def score(model: str, data_spec: str, task: str | None = None, split: str = "validation",
          batch_size: int = 64, columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's metrics for a model on labelled rows (a file or a Hub split)."""
    spec, data, net, tokenizer = prepare(model, task, columns)
    rows = load_split(data_spec, split, data.dataset_config, "--data", data.sample_by)
    check_columns(rows, spec.columns(data, True), "--data")
    features = spec.featurize(rows, tokenizer, net.config, data)
    arrays, order = outputs(spec, net, tokenizer, features, batch_size)
    result = spec.score(arrays, features.select(order), data, net.config, tokenizer)
    result.pop("predictions", None)
    return {**loss_of(arrays), **result}


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    if path.parent and not path.parent.exists():
        raise LlmkitError(f"--output {path}: folder {path.parent} does not exist")
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
