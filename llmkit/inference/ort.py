"""An exported ONNX graph run by ONNX Runtime behind the interface llmkit's inference calls on a
transformers model: `model(**batch)` with the graph's outputs as attributes, for a task's
`eval_step` (export's check, predict, eval); and, for a causal LM, transformers' own `generate`
(greedy, sampling, beams, stop strings, streaming) over the graph's logits."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from llmkit.errors import LlmkitError

CPU = torch.device("cpu")  # the session's provider: batches come back to the CPU for it


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
        feed = {}
        for name in self.inputs:
            value = batch.get(name)
            if value is None:
                value = missing_input(name, batch)
            feed[name] = value.cpu().numpy()
        found = self.session.run(self.outputs, feed)
        return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in zip(self.outputs, found,
                                                                          strict=True)})

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


class OrtCausalLM(PreTrainedModel, GenerationMixin):
    """An exported causal LM (logits of the whole sequence, no KV cache) as a transformers
    model: transformers' `generate` decodes with it, every step running the whole sequence
    through the graph, so its generations are the PyTorch model's (same logits to ~1e-6)."""

    main_input_name = "input_ids"

    def __init__(self, path: Path, config: Any, generation_config: Any = None) -> None:
        config = copy.deepcopy(config)  # not the PyTorch model's (export's check): its own
        config._attn_implementation = "eager"  # attention is the graph's; "sdpa" is refused
        super().__init__(config)
        self.ort = OrtModel(path, config)
        if generation_config is not None:
            self.generation_config = generation_config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **unused: Any) -> CausalLMOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        return CausalLMOutput(logits=self.ort(**batch).logits)

    @property
    def device(self) -> torch.device:  # no parameters to ask
        return CPU

    def to(self, *args: Any, **kwargs: Any) -> OrtCausalLM:  # type: ignore[override]
        return self

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate without a cache: the graph has no past key values."""
        kwargs.pop("cache_implementation", None)
        return super().generate(*args, **{**kwargs, "use_cache": False})
