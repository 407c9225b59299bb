"""Tokenized features in Arrow: their lengths, orders and cache keys."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

    from llmkit.config.schema import DataConfig

log = logging.getLogger("llmkit")


FEATURES_VERSION = 1  # raise when a task's features change shape: old cache files go unused


def by_length(features: Dataset) -> list[int]:
    """Row order, longest first: evaluation batches with the least padding."""
    import numpy as np

    return np.argsort(-lengths(features), kind="stable").tolist()


def lengths(features: Dataset, column: str = "input_ids") -> Any:
    """Each row's token count, read from the Arrow column (no Python list per row)."""
    import pyarrow.compute as pc

    return pc.list_value_length(features.with_format("arrow")[column]).to_numpy()


def workers(data: DataConfig) -> int | None:
    """datasets' num_proc for tokenizing: --preprocessing-workers, None for one process."""
    count = getattr(data, "preprocessing_workers", 1)
    return count if count > 1 else None


def fingerprint(rows: Dataset, tokenizer: Any, *settings: Any) -> str:
    """The cache key of tokenized rows: the rows, the tokenizer's own definition and the
    settings that shape the features, so a rerun, --resume or a second process reuses the
    cache file of datasets.map, and a changed tokenizer or setting does not."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (backend.to_str() if backend is not None
                  else sorted(tokenizer.get_vocab().items()))
    return Hasher.hash((rows._fingerprint, definition, FEATURES_VERSION, settings))
