"""An exported ONNX graph run by ONNX Runtime behind the interface llmkit's inference calls on a
transformers model: `model(**batch)` with the graph's outputs as attributes, for a task's
`eval_step` (export's check, predict, eval); and, for a causal LM or an encoder-decoder,
transformers' own `generate` (greedy, sampling, beams, stop strings, streaming) over the graphs'
logits."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

from llmkit.errors import LlmkitError

CPU = torch.device("cpu")  # the session's provider: batches come back to the CPU for it
# the cache's field in transformers' outputs: `cache` from 5.24, `past_key_values` before
CACHE = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"


def session_of(path: Path) -> Any:
    """An ONNX Runtime session of the graph at `path` on the CPU."""
    import onnxruntime  # installed: exported.load_exported and export check first

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's
    try:
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
    except (RuntimeError, ValueError) as err:  # onnxruntime's Fail / InvalidGraph
        raise LlmkitError(f"onnxruntime cannot load {path.name}: "
                          f"{' '.join(str(err).split())[:300]}") from err


class OrtModel:
    """An ONNX Runtime session that answers like the transformers model for a task's
    `eval_step`: `model(**batch)` gives the graph's outputs as attributes (torch tensors);
    batch entries the graph does not take (labels) are left out. It runs on the CPU: `to`
    and `eval` leave it as it is."""

    def __init__(self, path: Path, config: Any) -> None:
        self.session = session_of(path)
        self.path, self.config, self.device = path, config, CPU
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, **batch: Any) -> SimpleNamespace:
        return SimpleNamespace(**self.run(batch))

    def run(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The graph's outputs by name on the inputs it takes from `batch`."""
        feed = {}
        for name in self.inputs:
            value = batch.get(name)
            if value is None:
                value = missing_input(name, batch)
            feed[name] = np.ascontiguousarray(value.cpu().numpy())
        found = self.session.run(self.outputs, feed)
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, found, strict=True)}

    def to(self, *args: Any, **kwargs: Any) -> OrtModel:
        return self

    def eval(self) -> OrtModel:
        return self


def missing_input(name: str, batch: dict[str, Any]) -> torch.Tensor:
    """Inputs a batch may leave out: an all-ones mask, zero token types, positions after the
    mask (as transformers' generate counts them)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if name == "attention_mask":
        return mask
    if name == "token_type_ids":
        return torch.zeros_like(ids)
    if name == "position_ids":
        return (mask.long().cumsum(-1) - 1).clamp(min=0)
    raise LlmkitError(f"the batch has no {name!r}, which the ONNX graph takes")


class OrtGenerator(PreTrainedModel, GenerationMixin):
    """A graph (`self.ort`) as a transformers model without parameters, on the CPU, with the
    config and generation settings of the model it was exported from (copies: export's check
    keeps the PyTorch model's own)."""

    main_input_name = "input_ids"

    def __init__(self, path: Path, config: Any, generation_config: Any = None) -> None:
        config = copy.deepcopy(config)
        config._attn_implementation = "eager"  # attention is the graph's; "sdpa" is refused
        super().__init__(config)
        self.ort = OrtModel(path, config)
        if generation_config is not None:
            self.generation_config = copy.deepcopy(generation_config)

    @property
    def device(self) -> torch.device:  # no parameters to ask
        return CPU

    def to(self, *args: Any, **kwargs: Any) -> OrtGenerator:  # type: ignore[override]
        return self


class OrtCausalLM(OrtGenerator):
    """An exported causal LM (export.causal) as a transformers model that `generate` decodes:
    the keys and values live in generate's own DynamicCache (beams reorder it); the first step
    runs model.onnx over the prompt, which returns them, later steps model_with_past.onnx over
    the new token. Without that graph (or without present.* outputs: an older export) every
    step runs the whole sequence. Its generations are the PyTorch model's (logits to ~1e-6)."""

    def __init__(self, path: Path, config: Any, generation_config: Any = None,
                 with_past: Path | None = None) -> None:
        super().__init__(path, config, generation_config)
        self.layers = sum(n.startswith("present.") and n.endswith(".key")
                          for n in self.ort.outputs)
        self.with_past = None if with_past is None or not self.layers \
            else OrtModel(with_past, self.config)
        self.generation_config.cache_implementation = None  # generate's dynamic cache only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                past_key_values: Any = None, **unused: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        mask = torch.ones(input_ids.shape[0], input_ids.shape[1] + (
            0 if cache is None else cache.get_seq_length()), dtype=torch.long) \
            if attention_mask is None else attention_mask
        if position_ids is None:  # after the mask, as generate counts them
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
        if self.with_past is None or cache is None:
            return CausalLMOutputWithPast(logits=self.ort.run(batch)["logits"])
        past = {f"past_key_values.{i}.{kv}": getattr(cache.layers[i], kv + "s")
                for i in range(self.layers) for kv in ("key", "value")} \
            if cache.get_seq_length() else {}
        found = self.with_past.run(batch | past) if past else self.ort.run(batch)
        new = input_ids.shape[1]
        for i in range(self.layers):
            cache.update(found[f"present.{i}.key"][:, :, -new:],
                         found[f"present.{i}.value"][:, :, -new:], i)
        return CausalLMOutputWithPast(logits=found["logits"], **{CACHE: cache})

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate with its dynamic cache (without one when the export has no
        graph with past key values)."""
        kwargs.pop("cache_implementation", None)
        if self.with_past is None:
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


class OrtEncoder:
    """An encoder graph as transformers' generate calls a model's encoder."""

    main_input_name = "input_ids"

    def __init__(self, path: Path, config: Any) -> None:
        self.ort = OrtModel(path, config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **unused: Any) -> BaseModelOutput:
        states = self.ort.run({"input_ids": input_ids, "attention_mask": attention_mask})
        return BaseModelOutput(last_hidden_state=states["last_hidden_state"])

    __call__ = forward


class OrtSeq2SeqLM(OrtGenerator):
    """An exported encoder-decoder (llmkit.export.seq2seq: encoder, decoder, decoder with past
    key values) as a transformers model: `get_encoder()` runs the encoder graph, `forward` the
    decoder, so a seq2seq task's eval_step and transformers' `generate` run it as they run the
    PyTorch model. The keys and values live in generate's own EncoderDecoderCache (beams
    reorder it): the first step runs the whole-sequence decoder, which returns them, later
    steps the decoder with past. Without that graph, every step runs the whole sequence."""

    def __init__(self, encoder: Path, decoder: Path, with_past: Path | None, config: Any,
                 generation_config: Any = None) -> None:
        super().__init__(decoder, config, generation_config)
        self.generation_config.cache_implementation = None  # generate's dynamic cache only
        self.encoder = OrtEncoder(encoder, self.config)
        self.with_past = None if with_past is None else OrtModel(with_past, self.config)
        self.layers = sum(n.endswith(".decoder.key") for n in self.ort.outputs)

    def get_encoder(self, *args: Any, **kwargs: Any) -> OrtEncoder:
        return self.encoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels shifted right after the decoder start, -100 as padding (as Marian, BART and
        T5 shift them)."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, encoder_outputs: Any = None,
                labels: torch.Tensor | None = None, cache: Any = None,
                past_key_values: Any = None, **unused: Any) -> Seq2SeqLMOutput:
        cache = cache if cache is not None else past_key_values
        if encoder_outputs is None:
            assert input_ids is not None, "an encoder-decoder needs input_ids or encoder_outputs"
            encoder_outputs = self.encoder(input_ids, attention_mask)
        if decoder_input_ids is None:
            assert labels is not None, "a decoder needs decoder_input_ids or labels"
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        states = encoder_outputs[0]
        mask = torch.ones(states.shape[:2], dtype=torch.long) if attention_mask is None \
            else attention_mask
        batch = {"input_ids": decoder_input_ids, "encoder_hidden_states": states,
                 "encoder_attention_mask": mask}
        if self.with_past is None or cache is None:
            return Seq2SeqLMOutput(logits=self.ort.run(batch)["logits"])
        first = cache.get_seq_length() == 0
        found = self.ort.run(batch) if first else self.with_past.run(
            batch | past_of(cache, self.layers))
        self.keep(cache, found, first, decoder_input_ids.shape[1])
        return Seq2SeqLMOutput(logits=found["logits"], **{CACHE: cache})

    def keep(self, cache: Any, found: dict[str, torch.Tensor], first: bool, new: int) -> None:
        """The graph's keys and values into generate's cache: after the first step every
        layer's (its own and the cross-attention ones), later the new tokens' own."""
        for i in range(self.layers):
            keys, values = found[f"present.{i}.decoder.key"], found[f"present.{i}.decoder.value"]
            cache.self_attention_cache.update(keys[:, :, -new:], values[:, :, -new:], i)
            if first:
                cache.cross_attention_cache.update(found[f"present.{i}.encoder.key"],
                                                   found[f"present.{i}.encoder.value"], i)
                cache.is_updated[i] = True

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate with its dynamic cache (without one when the export has no
        decoder with past)."""
        kwargs.pop("cache_implementation", None)
        if self.with_past is None:
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)


def past_of(cache: Any, layers: int) -> dict[str, torch.Tensor]:
    """A cache's keys and values as the decoder with past takes them."""
    found = {}
    for i in range(layers):
        for side, part in (("decoder", cache.self_attention_cache),
                           ("encoder", cache.cross_attention_cache)):
            layer = part.layers[i]
            found[f"past_key_values.{i}.{side}.key"] = layer.keys
            found[f"past_key_values.{i}.{side}.value"] = layer.values
    return found
