"""`llmkit eval --model`: a model's metrics on labelled rows (predict, then score)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError
from llmkit.inference.predict import run_config, score
from llmkit.inference.rolling import rolling_score
from llmkit.scoring.metrics import ROLLING, Score

DECIMALS = {"byte_perplexity": 4, "bits_per_byte": 4, "eval_tokens": 0}
ROLLING_SIGNATURE = ("each document from its first token, windows of {window} tokens moved "
                     "{stride}")


def score_model(names: list[str], model: str, data: str | None, task: str | None, split: str,
                columns: dict[str, Any], base_model: str | None = None,
                stride: int | None = None) -> list[Score]:
    """Predict with a model on labelled rows, then report the requested metrics of its task.
    Perplexity in sliding windows where --stride or a per-word/byte metric asks for it."""
    if data is None:
        raise LlmkitError("--model needs --data: the labelled rows to score it on")
    if stride is not None or set(names) & set(ROLLING):
        other = [n for n in names if n not in ("perplexity", "eval_tokens", *ROLLING)]
        if other:
            raise LlmkitError(f"-m {other[0]} does not come with --stride: score it in a "
                              "separate llmkit eval")
        result = rolling_score(model, data, task, split, stride, columns=columns,
                               base_model=base_model)
        return [Score(n, float(result[n]), ROLLING_SIGNATURE.format(**result), {},
                      {"data": data, "eval_tokens": result["eval_tokens"]},
                      decimals=DECIMALS.get(n, 2)) for n in dict.fromkeys([*names, "eval_tokens"])]
    result = score(model, data, task, split, columns=columns, base_model=base_model)
    values = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if "perplexity" in names and "eval_tokens" in values:  # the count it is the mean over
        names = list(dict.fromkeys([*names, "eval_tokens"]))
    missing = [n for n in names if n not in values]
    if missing:
        name = task or getattr(run_config(model), "task", "this")
        raise LlmkitError(f"metric {', '.join(map(repr, missing))} does not fit a {name} model; "
                          f"its metrics are {', '.join(k for k in values if k != 'eval_samples')}")
    settings = {"data": data, "eval_samples": result["eval_samples"]}
    fractions = ("accuracy", "macro_f1", "binary_f1", "eval_loss")  # 0-1 scale: 4 decimals
    # sacrebleu's signature where the task scored with it (translate), else llmkit's own
    return [Score(n, float(values[n]), str(result.get(f"{n}_signature", "llmkit")), {}, settings,
                  decimals=4 if n in fractions else DECIMALS.get(n, 1)) for n in names]
