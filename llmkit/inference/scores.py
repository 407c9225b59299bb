"""`llmkit eval --model`: a model's metrics on labelled rows (predict, then score)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError
from llmkit.inference.predict import run_config, score
from llmkit.inference.rolling import rolling_score
from llmkit.scoring.metrics import ROLLING, Score

DECIMALS = {"byte_perplexity": 4, "bits_per_byte": 4, "eval_tokens": 0}
# one name, one definition: `perplexity` is the value training logs, whatever else is asked
PERPLEXITY_SIGNATURE = ("as training evaluates: exp of the token-weighted mean loss (text: "
                        "documents packed into --block-size blocks)")
ROLLING_SIGNATURE = ("each document on its own from its first token, in windows of {window} "
                     "tokens moved {stride} (lm-evaluation-harness's loglikelihood_rolling)")


def score_model(names: list[str], model: str, data: str | None, task: str | None, split: str,
                columns: dict[str, Any], base_model: str | None = None,
                stride: int | None = None) -> list[Score]:
    """Predict with a model on labelled rows, then report the requested metrics of its task;
    a language model's rolling metrics (each document on its own, in windows moved `stride`
    tokens) beside them. Scores in the order asked, then the counts added (eval_tokens)."""
    if data is None:
        raise LlmkitError("--model needs --data: the labelled rows to score it on")
    rolling = [n for n in names if n in ROLLING]
    if stride is not None and not rolling:
        raise LlmkitError(f"--stride moves the windows of {', '.join(ROLLING)} (each document "
                          "on its own); -m perplexity is training's, on packed blocks: ask -m "
                          "rolling_perplexity")
    found: dict[str, Score] = {}
    if rolling:
        result = rolling_score(model, data, task, split, stride, columns=columns,
                               base_model=base_model)
        counts = {k: result[k] for k in ("tokens", "words", "bytes", "documents", "windows")}
        settings = {k: result[k] for k in ("window", "stride", "sample_by")}
        found |= {n: Score(n, float(result[n]), ROLLING_SIGNATURE.format(**result), counts,
                           {"data": data, **settings}, decimals=DECIMALS.get(n, 2))
                  for n in rolling}
    others = [n for n in names if n not in ROLLING]
    if others:
        found |= task_scores(others, model, data, task, split, columns, base_model)
    return [found[n] for n in dict.fromkeys([*names, *found])]


def task_scores(names: list[str], model: str, data: str, task: str | None, split: str,
                columns: dict[str, Any], base_model: str | None) -> dict[str, Score]:
    """The task's own metrics, as its evaluation during training computes them."""
    result = score(model, data, task, split, columns=columns, base_model=base_model)
    values = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if "perplexity" in names and "eval_tokens" in values:  # the count it is the mean over
        names = list(dict.fromkeys([*names, "eval_tokens"]))
    missing = [n for n in names if n not in values]
    if missing:
        name = task or getattr(run_config(model), "task", "this")
        known = [k for k in values if k != "eval_samples"]
        if name == "generate":
            known += ROLLING
        raise LlmkitError(f"metric {', '.join(map(repr, missing))} does not fit a {name} model; "
                          f"its metrics are {', '.join(known)}")
    settings = {"data": data, "eval_samples": result["eval_samples"]}
    fractions = ("accuracy", "macro_f1", "binary_f1", "eval_loss")  # 0-1 scale: 4 decimals
    # sacrebleu's signature where the task scored with it (translate), else llmkit's own
    signatures = {"perplexity": PERPLEXITY_SIGNATURE,
                  "eval_tokens": "the tokens scored, as training evaluates"}
    return {n: Score(n, float(values[n]), str(result.get(f"{n}_signature",
                                                         signatures.get(n, "llmkit"))),
                     {}, settings, decimals=4 if n in fractions else DECIMALS.get(n, 1))
            for n in names}
