"""Encoder runs: classification as Text Embeddings Inference's POST /predict, extractive QA as
POST /v1/qa."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from llmkit.serve.engine import Engine
from llmkit.serve.limits import Limits
from llmkit.serve.schemas import PredictRequest, QARequest, RequestError

classify_router = APIRouter()
qa_router = APIRouter()


@classify_router.post("/predict")
async def predict(body: PredictRequest, request: Request) -> Any:
    """TEI's answer: per input, every label with its score, best first (probabilities, or the
    logits with `raw_scores`); one input gives one list, a batch a list of lists."""
    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    single = isinstance(body.inputs, str)
    items = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not items:
        raise RequestError(400, "inputs is empty: give a text or a list of texts")
    if len(items) > limits.max_inputs:
        raise RequestError(413, f"{len(items)} inputs are over this server's limit of "
                           f"{limits.max_inputs} per request", "too_many_inputs")
    texts = [text_of(engine, item) for item in items]
    if not body.truncate:
        for text in texts:
            check_length(engine, text)
    batcher = request.app.state.batcher
    logits = await asyncio.gather(*(batcher.submit(text) for text in texts))
    answers = [scored(engine, row, body.raw_scores) for row in logits]
    return answers[0] if single else answers


def text_of(engine: Engine, item: str | list[str]) -> tuple[str, str | None]:
    """A text, or a [text, text pair] for a run trained on pairs."""
    paired = engine.data.text_pair_column is not None
    pair = [item] if isinstance(item, str) else item
    if len(pair) != (2 if paired else 1) or not all(t.strip() for t in pair):
        raise RequestError(422, "this model classifies " + (
            "pairs: give each input as [text, text pair]" if paired
            else "single texts: give each input as a string") + ", none empty", "invalid_value")
    return pair[0], pair[1] if paired else None


def check_length(engine: Engine, text: tuple[str, str | None]) -> None:
    """Over the run's max_length: refused as TEI refuses it, unless `truncate` is asked."""
    limit = min(engine.data.max_length, engine.context or engine.data.max_length)
    count = len(engine.tokenizer(*text)["input_ids"])
    if count > limit:
        raise RequestError(413, f"the input has {count} tokens, over this model's {limit}: "
                           "shorten it or send \"truncate\": true", "input_too_long")


def scored(engine: Engine, logits: Any, raw: bool) -> list[dict[str, Any]]:
    import torch

    values = torch.from_numpy(logits)
    values = values if raw else values.softmax(-1)
    ranked = sorted(zip(engine.labels, values.tolist(), strict=True), key=lambda p: -p[1])
    return [{"label": label, "score": round(score, 6)} for label, score in ranked]


@qa_router.post("/v1/qa")
async def answer(body: QARequest, request: Request) -> dict[str, Any]:
    """The answer span in the context, as `llmkit predict` finds it (empty when a SQuAD 2.0
    run finds none); its score, the span's start + end logit (the null score, CLS's, for the
    empty answer), and its character offsets: context[start:end] is the answer (-1 and -1 for
    the empty answer)."""
    found: dict[str, Any] = await request.app.state.batcher.submit((body.question, body.context))
    return {"answer": found["answer"], "score": found["score"], "start": found["start"],
            "end": found["end"]}
