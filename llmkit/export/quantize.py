"""int8 weights for an exported graph: ONNX Runtime's dynamic quantization (weights stored as
int8, activations quantized per batch at run time), the CPU's usual fast path."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit")
KINDS = ("int8",)


def check_quantize(kind: str | None, format: str) -> None:
    if kind is not None and kind not in KINDS:
        raise LlmkitError(f"--quantize {kind}: the {format} exporter quantizes to "
                          f"{', '.join(KINDS)}")


def quantize(source: Path, target: Path) -> Path:
    """`source` with 8-bit weights (MatMul and Gather: the linear layers and embeddings),
    unsigned as the activations are: ONNX Runtime's u8s8 kernels saturate on CPUs without VNNI
    (AVX2), which cost a MiniLM SST-2 classifier 1.2 points of accuracy, u8u8 none (0.3 above
    fp32), at 2.3x PyTorch's rows/s at batch 1 on one thread (benchmarks/export.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet_root():
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
    except (RuntimeError, ValueError, KeyError) as err:
        raise LlmkitError(f"onnxruntime could not quantize {source.name}: "
                          f"{' '.join(str(err).split())[:300]}") from err
    log.info("int8 graph: %s (%.1f MB, fp32 %.1f MB)", target.name, size_mb(target),
             size_mb(source))
    return target


@contextlib.contextmanager
def quiet_root() -> Iterator[None]:
    """onnxruntime.quantization advises through the root logger (logging.warning, which would
    also install a stderr handler on it): its advice is not the user's to act on."""
    root = logging.getLogger()
    handler, drop = logging.NullHandler(), logging.Filter("llmkit")
    root.addHandler(handler)  # a root with a handler is not configured by logging.warning
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        root.removeHandler(handler)


def size_mb(path: Path) -> float:
    """A graph's size on disk, its external weights included."""
    files = [path, *path.parent.glob(path.name + ".data")]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 2)
