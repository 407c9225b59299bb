"""`llmkit export`: a run directory (full or adapter, merged on the way) as ONNX, loaded by the
same loader as `llmkit predict` and checked against it before the folder is written."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.export.check import Check, compare, fail
from llmkit.export.folder import check_output, check_run, place, staging, write_folder
from llmkit.export.onnx import DEFAULT_OPSET, check_opset, export_graph, require_runtime
from llmkit.export.quantize import check_quantize, quantize, size_mb
from llmkit.inference.exported import GENERATES, GRAPH, ort_generator

log = logging.getLogger("llmkit")
FORMATS = ("onnx",)
TASKS = ("classify", "qa", "generate", "translate", "summarize")
CHECK_ROWS = 256  # validation rows the check runs (the first ones)
PROMPTS, NEW_TOKENS = 32, 16  # generate: greedy generations compared


def check_arguments(format: str, opset: int, kind: str | None, tolerance: float) -> None:
    if format not in FORMATS:
        raise LlmkitError(f"--format {format}: the formats are {', '.join(FORMATS)}")
    check_quantize(kind, format)
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise LlmkitError(f"--tolerance {tolerance}: give a positive number, e.g. 1e-4")
    require_runtime()
    check_opset(opset)


def export(run: str | Path, output: str | Path, format: str = "onnx",
           opset: int = DEFAULT_OPSET, quantize: str | None = None,
           check_data: str | None = None, tolerance: float = 1e-4, overwrite: bool = False,
           rows: int = CHECK_ROWS) -> dict[str, Any]:
    """Export `run` to `output` and check it; returns the report written as export.json."""
    from llmkit.inference.predict import prepare, run_config

    check_arguments(format, opset, quantize, tolerance)
    run, output = Path(run), Path(output)
    check_run(run)
    check_output(output, run, overwrite)
    saved = run_config(str(run))
    if saved is not None and saved.task not in TASKS:
        raise LlmkitError(f"{run} is a {saved.task} run: llmkit export handles "
                          f"{', '.join(TASKS)} runs so far")
    task, data, net, tokenizer = prepare(str(run), None, None)
    net.to("cpu").eval()
    rows_, features = check_rows(task, data, net, tokenizer, check_data, rows)
    folder = staging(output)
    try:
        report = build(task, data, net, tokenizer, folder, features, rows_, opset, tolerance,
                       quantize)
        report |= {"run": str(run), "format": format, "opset": opset,
                   "check_data": check_data or data.validation}
        write_folder(folder, net, tokenizer, run, report)
        place(folder, output)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return report


def check_rows(task: Any, data: Any, net: Any, tokenizer: Any, check_data: str | None,
               limit: int) -> tuple[Any, Any]:
    """The first `limit` rows of --check-data (else the run's validation data) and their
    features; labelled rows keep their labels, for the metrics."""
    from llmkit.data.read import check_columns, load_split, reading

    source = check_data or data.validation
    if source is None:
        raise LlmkitError("the run was trained without --validation: give --check-data with "
                          "rows to check the export on")
    option = "--check-data" if check_data else "the run's validation data (or --check-data)"
    rows = load_split(source, data.validation_split, data.dataset_config, option,
                      *reading(data))
    check_columns(rows, task.columns(data, False), option)
    rows = rows.select(range(min(limit, len(rows))))
    labelled = all(c in rows.column_names for c in task.columns(data, True))
    rows = task.usable(rows.select_columns(task.columns(data, labelled)), data, labelled)
    features = task.featurize(rows, tokenizer, net.config, data)
    if len(features) == 0:
        raise LlmkitError(f"{option} {source}: no rows left to check the export on")
    return rows, features


def build(task: Any, data: Any, net: Any, tokenizer: Any, folder: Path, features: Any,
          rows: Any, opset: int, tolerance: float, kind: str | None) -> dict[str, Any]:
    """The graph(s) in `folder`, checked; the report's figures."""
    report = {"task": task.name, **graphs(task, net, tokenizer, folder, opset)}
    graph = folder / report["files"][0]  # an encoder-decoder's: its encoder, naming them all
    check = compare(task, net, graph, tokenizer, features, data, tolerance)
    fail(check, f"{check.rows} rows")
    report |= {"size_mb": round(sum(size_mb(folder / f) for f in report["files"]), 2),
               "check": {**asdict(check)}}
    prompts = generation_prompts(task, data, rows, features, tokenizer, net)
    if prompts:
        generations = generations_of(net, graph, tokenizer, prompts)
        report["generations"] = generations
        if generations["differ"]:
            raise LlmkitError(f"the export's greedy generations differ from PyTorch's on "
                              f"{generations['differ']} of {generations['prompts']} prompts "
                              f"({check.line()}); nothing was written")
    if kind == "int8":
        report["quantized"] = quantized(task, data, net, tokenizer, folder, features, check,
                                        prompts, report["files"])
        report["files"] += report["quantized"]["files"]
    log.info("export checked: %s", check.line())
    return report


def graphs(task: Any, net: Any, tokenizer: Any, folder: Path, opset: int) -> dict[str, Any]:
    """The export's graphs in `folder`: an encoder-decoder's three (export.seq2seq), a causal
    LM's two (export.causal), else one; their files, inputs and notes."""
    if net.config.is_encoder_decoder:
        from llmkit.export.seq2seq import export_seq2seq

        return export_seq2seq(net, tokenizer, folder, opset)
    if task.name == "generate":
        from llmkit.export.causal import export_causal

        return export_causal(net, tokenizer, folder, opset)
    return {"files": [GRAPH], "inputs": export_graph(net, tokenizer, folder / GRAPH, opset),
            "notes": []}


def generation_prompts(task: Any, data: Any, rows: Any, features: Any, tokenizer: Any,
                       net: Any) -> list[list[int]]:
    """Prompts for the greedy check: the first token ids of the check rows' texts, the chat
    template's prompt of their conversations, or an encoder-decoder's sources as the run reads
    them (prefixed, truncated); none for tasks that do not generate."""
    from llmkit.export.generation import conversation_prompts, prompt_ids

    if task.name not in GENERATES:
        return []
    if net.config.is_encoder_decoder:
        return [list(ids) for ids in features["input_ids"][:PROMPTS]]
    values = rows[task.columns(data, False)[0]]
    if any(isinstance(v, list) for v in values[:PROMPTS]):  # conversations
        return conversation_prompts(values, tokenizer, PROMPTS)
    return prompt_ids([t for t in values if isinstance(t, str)], tokenizer, PROMPTS)


def generations_of(net: Any, graph: Path, tokenizer: Any, prompts: list[list[int]]
                   ) -> dict[str, Any]:
    """Greedy generations of the PyTorch model and of the export: NEW_TOKENS of a causal LM,
    as many as the run evaluated with for an encoder-decoder."""
    from llmkit.export.generation import compare_generations

    exported = ort_generator(graph, net.config, net.generation_config)
    length = net.generation_config.max_new_tokens if net.config.is_encoder_decoder else None
    found = compare_generations(net, exported, tokenizer, prompts, length or NEW_TOKENS)
    return asdict(found)


def quantized(task: Any, data: Any, net: Any, tokenizer: Any, folder: Path, features: Any,
              fp32: Check, prompts: list[list[int]], files: list[str]) -> dict[str, Any]:
    """The int8 graph(s) beside the fp32 ones: size, metrics, how far their logits moved (no
    tolerance: quantization changes them by design)."""
    sources = [folder / f for f in files]
    targets = [quantize(s, folder / s.name.replace(".onnx", ".int8.onnx")) for s in sources]
    int8 = compare(task, net, targets[0], tokenizer, features, data, math.inf)
    size, fp32_size = sum(map(size_mb, targets)), sum(map(size_mb, sources))
    found: dict[str, Any] = {
        "file": targets[0].name, "files": [t.name for t in targets], "size_mb": round(size, 2),
        "fp32_size_mb": round(fp32_size, 2), "size_ratio": round(size / max(fp32_size, 1e-9), 3),
        "metrics": int8.onnx_metrics, "fp32_metrics": fp32.onnx_metrics,
        "largest_difference": int8.largest_difference,
        "predictions_differ": int8.predictions_differ}
    if prompts:
        found["generations"] = generations_of(net, targets[0], tokenizer, prompts)
    return found
