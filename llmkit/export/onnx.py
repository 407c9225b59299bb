"""A transformers model as an ONNX graph, with torch.onnx's dynamo exporter (torch.export, then
onnxscript): batch and sequence axes dynamic. The TorchScript exporter is not used: under
transformers 5 it traces the attention mask's padding branch as a constant and answers padded
batches wrongly (logits 2e-2 apart on a tiny BERT), where the dynamo graph matches to 1e-8."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.inference.exported import INSTALL

log = logging.getLogger("llmkit")
LOWEST_OPSET = 14  # the oldest opset with the operators transformers' encoders need
DEFAULT_OPSET = 18  # the dynamo exporter's own: no version conversion
OPTIMIZE = True


def require_runtime() -> None:
    """onnx, onnxruntime and onnxscript, or one line saying how to install them."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m)
               is None]
    if missing:
        raise LlmkitError(f"llmkit export needs {', '.join(missing)}: {INSTALL}")


def highest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    top = highest_opset()
    if not LOWEST_OPSET <= opset <= top:
        raise LlmkitError(f"--opset {opset} is out of range: give {LOWEST_OPSET} to {top} "
                          f"(default {DEFAULT_OPSET})")


@contextlib.contextmanager
def eager_attention(model: Any) -> Any:
    """The model with "eager" attention while its cache graphs are traced (SDPA's causal flag
    is a symbol under torch.export, which SDPA refuses), its own attention back afterwards."""
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(attention)


def example_inputs(model: Any, tokenizer: Any, causal: bool) -> dict[str, Any]:
    """A small batch (2 rows of 8 tokens, the first padded) to trace the graph with; the
    tokenizer's own input names, as far as the model's forward takes them."""
    takes = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask", "position_ids"] if causal else [
        n for n in tokenizer.model_input_names if n in takes]
    vocab = max(2, min(len(tokenizer), model.get_input_embeddings().weight.shape[0]))
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    values = {"input_ids": torch.randint(1, vocab, (2, 8), generator=generator),
              "attention_mask": mask,
              "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return {n: values[n] for n in names if n in values}


def output_names(model: Any, example: dict[str, Any]) -> list[str]:
    """The model's output fields on `example` (logits; start_logits and end_logits)."""
    with torch.inference_mode():
        found = model(**example)
    return [k for k in found.keys() if k not in ("loss", "hidden_states", "attentions")]


def export_graph(model: Any, tokenizer: Any, path: Path, opset: int) -> list[str]:
    """Write an encoder `model` (in eval mode, on the CPU) to `path` as ONNX; returns its input
    names (a causal LM's graphs: export.causal, an encoder-decoder's: export.seq2seq)."""
    example = example_inputs(model, tokenizer, False)
    outputs = output_names(model, example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    export_module(model, model, (), example, outputs,
                  {n: {0: batch, 1: sequence} for n in example}, path, opset)
    return list(example)


def export_module(module: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  outputs: list[str], dynamic: Any, path: Path, opset: int,
                  inputs: list[str] | None = None) -> None:
    """torch.onnx's dynamo export of `module` (a part of `model`, or all of it) on the example
    `args` and `kwargs`, saved at `path`; its failure is one line naming the model."""
    quiet = io.StringIO()  # the exporter prints its steps
    exporter = logging.getLogger("torch.onnx")  # "torchvision is not installed" lines
    level = exporter.level
    exporter.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, kwargs=kwargs or None, input_names=inputs or list(kwargs),
                output_names=outputs, dynamo=True, opset_version=opset, verbose=False,
                optimize=OPTIMIZE, dynamic_shapes=dynamic)
            assert program is not None
            program.save(str(path), external_data=size_of(model) > 1.5 * 2**30)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        reason = " ".join(str(err).split())[:300]
        raise LlmkitError(f"torch.onnx cannot export {type(model).__name__} "
                          f"({model.config.model_type}) at opset {opset}: {reason}") from err
    finally:
        exporter.setLevel(level)
    log.info("exported %s to %s (opset %d)", type(module).__name__, path.name, opset)


def size_of(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
