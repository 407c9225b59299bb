"""A causal LM (GPT-2, Llama, ...) as two ONNX graphs: `model.onnx` over the whole sequence,
which gives the logits and every layer's keys and values (`present.{i}.key`, `.value`), and
`model_with_past.onnx`, which takes them back (`past_key_values.{i}.key`, `.value`) with the
new tokens and the whole attention mask, and runs the new tokens only. The keys and values go
through transformers' own DynamicCache inside the graphs, so they attend as the model does;
attention is exported as "eager" (as for an encoder-decoder, export.seq2seq) and the model goes
back to its own afterwards. torch.export finds how the axes relate (Dim.AUTO): the mask is as
long as the past and the new tokens together."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.export.onnx import eager_attention, example_inputs, export_module
from llmkit.export.seq2seq import cache_argument, layers
from llmkit.inference.exported import CAUSAL_WITH_PAST, GRAPH

log = logging.getLogger("llmkit")
INPUTS = ["input_ids", "attention_mask", "position_ids"]
NO_CACHE = ("torch.onnx could not export the model with past key values, so the export has no "
            "KV cache: every generated token runs the whole sequence through model.onnx again")
CACHE = ("the KV cache is exported: model.onnx runs the prompt and returns every layer's keys "
         "and values (present.*), model_with_past.onnx takes them back (past_key_values.*) "
         "with the new token and the whole attention mask")


def present_names(count: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(count) for kv in ("key", "value")]


def past_names(count: int) -> list[str]:
    return [n.replace("present.", "past_key_values.") for n in present_names(count)]


class FirstStep(torch.nn.Module):
    """model.onnx: the logits of the whole sequence and every layer's keys and values."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model, self.name, self.count = model, cache_argument(model), layers(model)

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                *past: Any) -> tuple[Any, ...]:
        from transformers import DynamicCache

        cache: Any = DynamicCache()
        for i in range(len(past) // 2):  # model_with_past.onnx: the keys and values so far
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, **{self.name: cache})
        found = [t for i in range(self.count) for t in (cache.layers[i].keys,
                                                          cache.layers[i].values)]
        return (out.logits, *found)


def export_causal(model: Any, tokenizer: Any, folder: Path, opset: int) -> dict[str, Any]:
    """The graphs in `folder`; the report's files, inputs, graphs and notes."""
    with eager_attention(model):
        return export_graphs(model, tokenizer, folder, opset)


def export_graphs(model: Any, tokenizer: Any, folder: Path, opset: int) -> dict[str, Any]:
    count, example = layers(model), example_inputs(model, tokenizer, True)
    auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    step = FirstStep(model).eval()
    args = tuple(example[n] for n in INPUTS)
    export_module(step, model, args, {}, ["logits", *present_names(count)], (auto,) * 3,
                  folder / GRAPH, opset, INPUTS)
    report: dict[str, Any] = {"files": [GRAPH], "inputs": INPUTS, "graphs": {GRAPH: INPUTS}}
    with torch.no_grad():
        past = [t.detach() for t in step(*args)[1:]]
    mask = torch.cat([example["attention_mask"], torch.ones_like(example["attention_mask"])], 1)
    new = (example["input_ids"], mask, example["position_ids"] + mask.shape[1] // 2)
    axes = tuple({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO} for _ in past)
    try:
        export_module(step, model, (*new, *past), {}, ["logits", *present_names(count)],
                      (auto, auto, auto, axes), folder / CAUSAL_WITH_PAST, opset,
                      [*INPUTS, *past_names(count)])
    except LlmkitError as err:
        log.warning("%s (%s)", NO_CACHE, err)
        return report | {"notes": [NO_CACHE], "cache": False}
    report["files"].append(CAUSAL_WITH_PAST)
    report["graphs"][CAUSAL_WITH_PAST] = [*INPUTS, "past_key_values.*"]
    return report | {"notes": [CACHE], "cache": True}
