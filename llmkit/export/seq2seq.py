"""An encoder-decoder model (Marian, T5, BART) as three ONNX graphs, with the file, input and
output names of Optimum's ORTModelForSeq2SeqLM: the encoder; the decoder over the whole target
sequence, which also gives every layer's keys and values (`present.*`: its own and the
cross-attention ones of the encoder's states); and the decoder with past key values, which
takes them back (`past_key_values.*`) and runs the new tokens only. The keys and values travel
through transformers' own EncoderDecoderCache inside the graphs, so the graphs attend as the
model does; attention is exported as "eager" (SDPA's causal flag is a symbol under
torch.export, which SDPA refuses) and the model goes back to its own afterwards."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.export.onnx import eager_attention, export_module
from llmkit.inference.exported import DECODER, ENCODER, WITH_PAST

log = logging.getLogger("llmkit")
NO_CACHE = ("torch.onnx could not export the decoder with past key values, so the export has "
            "no key/value cache: every generated token runs the whole target sequence through "
            f"{DECODER} again (slower on long generations)")
CACHE = ("the decoder has its key/value cache: decoder_model.onnx runs the first step and "
         "returns the keys and values (the cross-attention ones computed once), "
         "decoder_with_past_model.onnx takes them back and runs one new token at a time")


def cache_argument(model: Any) -> str:
    """The name transformers' forward gives the cache: `cache` from 5.24, `past_key_values`
    before (deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def layers(model: Any) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


def present_names(count: int, cross: bool) -> list[str]:
    sides = ("decoder", "encoder") if cross else ("decoder",)
    return [f"present.{i}.{side}.{kv}" for i in range(count) for side in sides
            for kv in ("key", "value")]


def past_names(count: int) -> list[str]:
    return [n.replace("present.", "past_key_values.") for n in present_names(count, True)]


def flat(cache: Any, count: int, cross: bool) -> list[torch.Tensor]:
    """A cache's tensors in the order of present_names."""
    found = []
    for i in range(count):
        sides = [cache.self_attention_cache, cache.cross_attention_cache][:2 if cross else 1]
        for side in sides:
            found += [side.layers[i].keys, side.layers[i].values]
    return found


class EncoderStates(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class FirstDecoder(torch.nn.Module):
    """decoder_model.onnx: logits of the whole target sequence and every layer's keys and
    values."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model, self.name, self.count = model, cache_argument(model), layers(model)

    def forward(self, input_ids: Any, encoder_hidden_states: Any,
                encoder_attention_mask: Any) -> tuple[Any, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(decoder_input_ids=input_ids, encoder_outputs=(encoder_hidden_states,),
                         attention_mask=encoder_attention_mask, use_cache=True,
                         **{self.name: cache})
        return (out.logits, *flat(cache, self.count, True))


class CachedDecoder(FirstDecoder):
    """decoder_with_past_model.onnx: the new tokens' logits after the cached ones, and the
    decoder's own keys and values, past and new (the cross-attention ones stay as given)."""

    def forward(self, input_ids: Any, encoder_attention_mask: Any,  # type: ignore[override]
                *past: Any) -> tuple[Any, ...]:
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for i in range(self.count):
            cache.self_attention_cache.update(past[4 * i], past[4 * i + 1], i)
            cache.cross_attention_cache.update(past[4 * i + 2], past[4 * i + 3], i)
            cache.is_updated[i] = True
        batch, length = encoder_attention_mask.shape
        states = past[2].new_zeros(batch, length, self.model.config.d_model)  # not read: cached
        out = self.model(decoder_input_ids=input_ids, encoder_outputs=(states,),
                         attention_mask=encoder_attention_mask, use_cache=True,
                         **{self.name: cache})
        return (out.logits, *flat(cache, self.count, False))


def examples(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Small example tensors (2 rows, the first source padded) for every graph, and the past
    key values the model gives after a 3-token target."""
    vocab = max(2, min(len(tokenizer), model.get_input_embeddings().weight.shape[0]))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    target = torch.randint(1, vocab, (2, 3), generator=generator)
    with torch.no_grad():
        states = EncoderStates(model)(ids, mask)
        past = FirstDecoder(model)(target, states, mask)[1:]
    return {"ids": ids, "mask": mask, "target": target, "states": states.detach(),
            "past": [p.detach() for p in past],
            "new": torch.randint(1, vocab, (2, 2), generator=generator)}


def export_seq2seq(model: Any, tokenizer: Any, folder: Path, opset: int) -> dict[str, Any]:
    """The graphs in `folder`; the report's files, inputs and notes."""
    with eager_attention(model):
        return export_graphs(model, tokenizer, folder, opset)


def export_graphs(model: Any, tokenizer: Any, folder: Path, opset: int) -> dict[str, Any]:
    count, x = layers(model), examples(model, tokenizer)
    batch, source, target, past = (torch.export.Dim(n) for n in (
        "batch", "encoder_sequence", "decoder_sequence", "past_sequence"))
    export_module(EncoderStates(model).eval(), model, (x["ids"], x["mask"]), {},
                  ["last_hidden_state"], ({0: batch, 1: source}, {0: batch, 1: source}),
                  folder / ENCODER, opset, ["input_ids", "attention_mask"])
    first = ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    export_module(FirstDecoder(model).eval(), model, (x["target"], x["states"], x["mask"]), {},
                  ["logits", *present_names(count, True)],
                  ({0: batch, 1: target}, {0: batch, 1: source}, {0: batch, 1: source}),
                  folder / DECODER, opset, first)
    report: dict[str, Any] = {"files": [ENCODER, DECODER], "inputs": ["input_ids",
                                                                       "attention_mask"],
                              "graphs": {ENCODER: ["input_ids", "attention_mask"],
                                         DECODER: first}}
    axes = tuple({0: batch, 2: past if name.endswith(("decoder.key", "decoder.value"))
                  else source} for name in past_names(count))
    try:
        export_module(CachedDecoder(model).eval(), model, (x["new"], x["mask"], *x["past"]),
                      {}, ["logits", *present_names(count, False)],
                      ({0: batch, 1: target}, {0: batch, 1: source}, axes),
                      folder / WITH_PAST, opset,
                      ["input_ids", "encoder_attention_mask", *past_names(count)])
    except LlmkitError as err:
        log.warning("%s (%s)", NO_CACHE, err)
        return report | {"notes": [NO_CACHE], "cache": False}
    report["files"].append(WITH_PAST)
    report["graphs"][WITH_PAST] = ["input_ids", "encoder_attention_mask", "past_key_values.*"]
    return report | {"notes": [CACHE], "cache": True}
