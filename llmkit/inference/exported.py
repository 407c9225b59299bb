"""An `llmkit export` folder put to use: which `--model` names one (the folder: its model.onnx,
or one of its graphs: DIR/model.int8.onnx), and its model behind ONNX Runtime, loaded where a
run's model would be for predict, eval, generate and chat."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.hub import check_model_source, quiet_libraries

log = logging.getLogger("llmkit")
DONE = "export.json"  # written last by llmkit export: a folder holding it is a finished export
GRAPH = "model.onnx"  # the fp32 graph; quantized ones beside it (model.int8.onnx)
# an encoder-decoder's graphs, named as Optimum's ORTModelForSeq2SeqLM names them; int8 ones
# beside them (encoder_model.int8.onnx, ...); the last is absent from an export without cache
ENCODER, DECODER, WITH_PAST = "encoder_model.onnx", "decoder_model.onnx", \
    "decoder_with_past_model.onnx"
SEQ2SEQ = (ENCODER, DECODER, WITH_PAST)
# a causal LM's: the whole sequence, and the new tokens after past key values (absent from an
# export without cache, and from the exports of earlier llmkit versions)
CAUSAL_WITH_PAST = "model_with_past.onnx"
CAUSAL = (GRAPH, CAUSAL_WITH_PAST)
GENERATES = ("generate", "translate", "summarize")  # the tasks whose exports generate
INSTALL = "pip install 'llmkit[export]' (onnx, onnxruntime, onnxscript)"
NO_CACHE = ("the export has no KV cache: every new token runs the whole sequence through the "
            "graph (slower than the run's model as generations grow long)")


def exported_graph(model: str | Path) -> Path | None:
    """The ONNX graph `model` names, if it is an export: a finished export folder's model.onnx,
    or a .onnx file inside one; None for anything else (a run, a checkpoint, a Hub id)."""
    path = Path(model).expanduser()
    if path.suffix == ".onnx" and path.is_file() and (path.parent / DONE).is_file():
        return path
    if not (path / DONE).is_file():
        return None
    for name in (GRAPH, ENCODER):
        if (path / name).is_file():
            return path / name
    raise LlmkitError(f"{model} is an ONNX export without its {GRAPH} (or {ENCODER}): give "
                      f"one of the graphs it holds ({', '.join(exported_files(path)) or 'none'}) "
                      "or export the run again")


def family(graph: Path, names: tuple[str, ...]) -> list[Path] | None:
    """The graphs `names` in the precision of `graph` (model.int8.onnx: the int8 ones) if it is
    one of them; None if it is not."""
    for name in names:
        stem = name.removesuffix(".onnx") + "."
        if graph.name.startswith(stem):
            variant = graph.name[len(stem) - 1:]  # .onnx, .int8.onnx
            return [graph.parent / (n.removesuffix(".onnx") + variant) for n in names]
    return None


def seq2seq_graphs(graph: Path) -> tuple[Path, Path, Path | None] | None:
    """The encoder, decoder and cached decoder (None: exported without) of the seq2seq export
    that `graph` is one of, in its precision (decoder_model.int8.onnx: the int8 ones); None
    for a single-graph export."""
    paths = family(graph, SEQ2SEQ)
    if paths is None:
        return None
    missing = [p.name for p in paths[:2] if not p.is_file()]
    if missing:
        raise LlmkitError(f"{graph.parent} is a seq2seq export without its "
                          f"{', '.join(missing)}: export the run again")
    return paths[0], paths[1], paths[2] if paths[2].is_file() else None


def causal_graphs(graph: Path) -> tuple[Path, Path | None]:
    """A single-graph export's graph (a causal LM's model_with_past.onnx named: its model.onnx)
    and, for a causal LM, its graph with past key values (None: exported without)."""
    paths = family(graph, CAUSAL)
    if paths is None:  # a graph renamed by hand: run as it is
        return graph, None
    if not paths[0].is_file():
        raise LlmkitError(f"{graph.parent} is an export without its {paths[0].name}: export "
                          "the run again")
    return paths[0], paths[1] if paths[1].is_file() else None


def check_source(model: str) -> None:
    """hub.check_model_source (one line for a mistyped path, before torch loads), letting an
    export's graph file (DIR/model.int8.onnx) through as a model."""
    if exported_graph(model) is None:
        check_model_source(model)


def exported_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.onnx"))


def exported_task(graph: Path) -> str:
    """The task of the run an export was made from (its export.json)."""
    try:
        report = json.loads((graph.parent / DONE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LlmkitError(f"{graph.parent / DONE} is damaged ({err}): export the run again"
                          ) from None
    return str(report.get("task", "")) if isinstance(report, dict) else ""


def load_exported(graph: Path, generator: bool = False, base_model: str | None = None
                  ) -> tuple[Any, Any]:
    """An export's model through ONNX Runtime (on the CPU) and its tokenizer, as the export
    saved them: an `ort.OrtModel` for a task's eval_step (predict, eval); with `generator`, a
    causal LM that transformers' generate decodes (left padding, as models.load_generator pads
    decoder-only batches); an encoder-decoder's graphs as an `ort.OrtSeq2SeqLM` for both."""
    if base_model is not None:
        raise LlmkitError(f"--base-model {base_model}: {graph.parent} is an ONNX export of "
                          "a whole model (an adapter run's is merged into its base on export); "
                          "drop --base-model")
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise LlmkitError(f"{graph.parent} is an ONNX export: running it needs onnxruntime: "
                          f"{INSTALL}")
    from llmkit.inference.ort import OrtModel
    from llmkit.models import load_pretrained, load_tokenizer, model_config

    quiet_libraries()
    folder = str(graph.parent)
    config = model_config(folder)
    graphs = seq2seq_graphs(graph)
    graph = graph if graphs else causal_graphs(graph)[0]
    left = generator and graphs is None
    tokenizer = load_tokenizer(folder, padding_side="left" if left else None)
    log.info("%s: the ONNX export's %s, run by ONNX Runtime on the CPU", folder, graph.name)
    if not (generator or graphs):
        return OrtModel(graph, config), tokenizer
    settings = None
    if (graph.parent / "generation_config.json").is_file():  # the run's
        from transformers import GenerationConfig

        settings = load_pretrained(GenerationConfig, folder)
    return ort_generator(graph, config, settings), tokenizer


def ort_generator(graph: Path, config: Any, settings: Any = None) -> Any:
    """The export at `graph` as a transformers model that `generate` decodes, with these
    generation settings: an `ort.OrtSeq2SeqLM` for an encoder-decoder's graphs, else an
    `ort.OrtCausalLM`."""
    from llmkit.inference.ort import OrtCausalLM, OrtSeq2SeqLM

    graphs = seq2seq_graphs(graph)
    if graphs is None:
        whole, past = causal_graphs(graph)
        if past is None:
            log.info(NO_CACHE)
        return OrtCausalLM(whole, config, settings, past)
    if graphs[2] is None:
        log.info(NO_CACHE)
    return OrtSeq2SeqLM(*graphs, config, settings)


def load_generator(model: str, base_model: str | None = None) -> tuple[Any, Any]:
    """The model behind `llmkit generate` and `llmkit chat`, and its tokenizer: an exported
    generate run through ONNX Runtime, else models.load_generator's."""
    graph = exported_graph(model)
    if graph is None:
        from llmkit import models

        return models.load_generator(model, base_model)
    task = exported_task(graph)
    if task not in GENERATES:
        raise LlmkitError(f"{model} is an ONNX export of a {task} run: it cannot generate "
                          f"text; llmkit predict --model {model} runs it")
    return load_exported(graph, True, base_model)
