"""Exporters: a run directory as ONNX (torch.onnx), checked against the PyTorch model it came
from before it is written; int8 by ONNX Runtime's dynamic quantization."""

from llmkit.export.exporter import FORMATS, TASKS, export

__all__ = ["FORMATS", "TASKS", "export"]
