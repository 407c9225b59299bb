"""The export's folder: which run can be exported and where to, what it holds besides the graph
(tokenizer, config.json, the run's config.yaml, README.md, export.json with the check's
figures), and its move into place once the check passed."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.inference.exported import DECODER, DONE, ENCODER, GENERATES, GRAPH

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def check_run(run: Path) -> None:
    if not run.is_dir():
        raise LlmkitError(f"{run}: no such run directory")
    if not (run / "config.yaml").is_file():
        raise LlmkitError(f"{run} is not an llmkit run directory (no config.yaml): give the "
                          "folder llmkit finetune --output wrote")
    if not any((run / name).is_file() for name in WEIGHTS):
        raise LlmkitError(f"{run} has no weights (model.safetensors or "
                          "adapter_model.safetensors): give a finished run directory")


def check_output(output: Path, run: Path, overwrite: bool) -> None:
    """A new or empty folder, or a finished export with --overwrite; never the run itself."""
    if output.exists() and not output.is_dir():
        raise LlmkitError(f"--output {output} is a file; give a folder")
    above = next(p for p in output.absolute().parents if p.exists())
    if not above.is_dir():
        raise LlmkitError(f"--output {output}: {above} is a file, not a folder")
    if output.resolve() == run.resolve():
        raise LlmkitError("--output is the run directory itself; give a new folder")
    if (output / DONE).is_file():
        if not overwrite:
            raise LlmkitError(f"--output {output} holds a finished export: add --overwrite to "
                              "replace it, or choose another folder")
    elif output.is_dir() and any(output.iterdir()):
        raise LlmkitError(f"--output {output} is not empty (and not an export); choose "
                          "another folder")


def staging(output: Path) -> Path:
    """A hidden folder beside `output`, moved into place when the export is done."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))


def place(folder: Path, output: Path) -> None:
    if output.exists():  # an empty folder or a finished export (check_output)
        shutil.rmtree(output)
    folder.rename(output)


def write_folder(folder: Path, net: Any, tokenizer: Any, run: Path, report: dict[str, Any]
                 ) -> None:
    """Everything but the graphs, export.json last."""
    net.config.save_pretrained(folder)
    if report["task"] in GENERATES and getattr(net, "generation_config", None) is not None:
        net.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(run / "config.yaml", folder / "config.yaml")
    (folder / "README.md").write_text(readme(report), encoding="utf-8")
    (folder / DONE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


USAGE = {
    "classify": ('logits = session.run(["logits"], feed)[0]\n'
                 'labels = [config.id2label[int(i)] for i in logits.argmax(-1)]'),
    "qa": ('start, end = session.run(["start_logits", "end_logits"], feed)\n'
           "# best span: start <= end within the context tokens (the offsets of a fast "
           "tokenizer)"),
    "generate": ('feed["position_ids"] = np.maximum(feed["attention_mask"].cumsum(-1) - 1, 0)\n'
                 'logits, *present = session.run(None, feed)\n'
                 "next_token = logits[:, -1].argmax(-1)  # append it and run again, or feed the "
                 "present.* outputs\n# to model_with_past.onnx as past_key_values.* with the "
                 "new token, its position and the whole mask"),
    "seq2seq": ('states = encoder.run(["last_hidden_state"], feed)[0]\n'
                "ids = np.full((len(states), 1), config.decoder_start_token_id)\n"
                'logits = decoder.run(["logits"], {"input_ids": ids, "encoder_hidden_states": '
                'states,\n                                   "encoder_attention_mask": '
                'feed["attention_mask"]})[0]\n'
                "next_token = logits[:, -1].argmax(-1)  # append it and run again, or feed the "
                "present.* outputs\n# to decoder_with_past_model.onnx as past_key_values.* "
                "with the new token only"),
}


def readme(report: dict[str, Any]) -> str:
    """How to load the export with plain onnxruntime, and what its check found."""
    check = report["check"]
    seq2seq = ENCODER in report["files"]
    sessions = {"encoder": ENCODER, "decoder": DECODER} if seq2seq else {"session": GRAPH}
    lines = [f"# ONNX export of {report['run']} ({report['task']})", "",
             f"Exported by llmkit with torch.onnx (dynamo), opset {report['opset']}; batch and "
             "sequence axes are dynamic. " + graph_inputs(report), "",
             "```python", "import onnxruntime, numpy as np",
             "from transformers import AutoConfig, AutoTokenizer", "",
             *[f'{name} = onnxruntime.InferenceSession("{file}", '
               'providers=["CPUExecutionProvider"])' for name, file in sessions.items()],
             'tokenizer = AutoTokenizer.from_pretrained(".")',
             'config = AutoConfig.from_pretrained(".")',
             f'names = {{i.name for i in {next(iter(sessions))}.get_inputs()}}',
             'feed = {k: v for k, v in tokenizer(["some text"], padding=True, '
             'return_tensors="np").items() if k in names}',
             USAGE["seq2seq" if seq2seq else report["task"]], "```", "",
             f"Checked against the PyTorch model on {check['rows']} rows: largest logit "
             f"difference {check['largest_difference']:.3g} (tolerance {check['tolerance']:g}), "
             f"{check['predictions_differ']} predictions differ."]
    if report.get("quantized"):
        q = report["quantized"]
        files = ", ".join(f"`{f}`" for f in q.get("files", [q["file"]]))
        lines += ["", f"{files} hold int8 weights (onnxruntime dynamic quantization): "
                  f"{q['size_mb']} MB against {q['fp32_size_mb']} MB; metrics "
                  f"{json.dumps(q['metrics'])} against {json.dumps(check['metrics'])}."]
    lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines).rstrip() + "\n"


def graph_inputs(report: dict[str, Any]) -> str:
    """The graphs' inputs, one sentence."""
    if "graphs" not in report:
        return "Inputs: " + ", ".join(report["inputs"]) + "."
    optimum = "ORTModelForSeq2SeqLM" if ENCODER in report["files"] else "ORTModelForCausalLM"
    return (f"Graphs (input and output names as Optimum's {optimum} has them): " +
            "; ".join(f"`{name}` ({', '.join(inputs)})" for name, inputs in
                      report["graphs"].items()) + ".")
