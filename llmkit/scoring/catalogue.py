"""Metrics that are not built in: the evaluate library's catalogue, whose code comes from the
Hub (or its cache)."""

from __future__ import annotations

import os
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.scoring.metrics import BUILTIN, ROLLING, Score


def check_metrics(names: list[str]) -> None:
    """Built-in names pass; others need the `evaluate` library and its metric code, which comes
    from the Hub (or its cache)."""
    import importlib.util

    from llmkit.hub import hub_offline

    unknown = [n for n in names if n not in BUILTIN]
    if not unknown:
        return
    model_only = [n for n in unknown if n in ("perplexity", *ROLLING)]
    if model_only:
        raise LlmkitError(f"-m {model_only[0]} scores a model, not files: give --model RUN (or "
                          "a checkpoint with --task generate) and --data FILE")
    listed = f"the built-in metrics are {', '.join(BUILTIN)}"
    if importlib.util.find_spec("evaluate") is None:
        raise LlmkitError(f"unknown metric {', '.join(map(repr, unknown))}; {listed} (other "
                          "names are looked up with the evaluate library: pip install evaluate)")
    if hub_offline() and not all(catalogue_cached(n) for n in unknown):
        raise LlmkitError(f"metric {', '.join(map(repr, unknown))} is not built in, and the "
                          "evaluate library fetches its code from the Hugging Face Hub, which "
                          f"this machine cannot reach (nor is it cached); {listed}")


def catalogue_cached(name: str) -> bool:
    from huggingface_hub.constants import HF_HOME

    folder = Path(os.environ.get("HF_MODULES_CACHE", Path(HF_HOME) / "modules"))
    return any((folder / "evaluate_modules" / "metrics").glob(f"*--{name}"))


def catalogue_scores(name: str, predictions: list[str], references: list[str]) -> list[Score]:
    """A metric from the evaluate library's catalogue; numbers as it returns them."""
    import evaluate

    module = evaluate.load(name)
    result = module.compute(predictions=predictions, references=references)
    return [Score(key, float(value), f"evaluate {name}") for key, value in result.items()
            if isinstance(value, (int, float))]
