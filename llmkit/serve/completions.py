"""OpenAI's completions and chat completions over the served generator: a request becomes
GenerationSettings and prompts for the batching queue; records become OpenAI's answers, or its
server-sent chunks when `stream` is true."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmkit.errors import LlmkitError
from llmkit.inference.generate import GenerationSettings, templated
from llmkit.serve.engine import Engine, Prompt
from llmkit.serve.limits import Limits
from llmkit.serve.schemas import ChatRequest, CompletionRequest, RequestError, Sampling, error_body
from llmkit.serve.streaming import Stream

log = logging.getLogger("llmkit")
router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    engine = served(request, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or not all(prompts):
        raise RequestError(400, "prompt is empty: give the text to continue", None)
    if len(prompts) > request.app.state.limits.max_inputs:
        raise RequestError(400, f"{len(prompts)} prompts in one request; at most "
                           f"{request.app.state.limits.max_inputs}", "too_many_inputs")
    settings = settings_of(body, body.max_tokens or 16, request.app.state.limits)
    return await respond(request, body, [engine.prefix + p for p in prompts], settings, False)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatRequest, request: Request) -> Any:
    engine = served(request, body.model)
    limits: Limits = request.app.state.limits
    text = templated(engine.tokenizer, [m.model_dump() for m in body.messages])
    wanted = body.max_completion_tokens or body.max_tokens or min(256, limits.max_tokens)
    return await respond(request, body, [text], settings_of(body, wanted, limits), True)


def served(request: Request, model: str) -> Engine:
    """The engine, if the request names it."""
    engine: Engine = request.app.state.engine
    if model != engine.name:
        raise RequestError(404, f"the model {model!r} does not exist: this server serves "
                           f"{engine.name!r}", "model_not_found")
    return engine


def settings_of(body: Sampling, max_tokens: int, limits: Limits) -> GenerationSettings:
    """OpenAI's sampling fields as llmkit's decoding settings: greedy when no temperature (or
    temperature 0) is given, as `llmkit generate` decodes."""
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens {max_tokens} is over this server's limit of "
                           f"{limits.max_tokens}", "max_tokens_too_large")
    if body.n > limits.max_n:
        raise RequestError(400, f"n {body.n} is over this server's limit of {limits.max_n}")
    greedy = not body.temperature
    if body.n > 1 and greedy:
        raise RequestError(400, f"n {body.n} needs sampling: give a temperature above 0 "
                           "(greedy decoding finds one completion)")
    return GenerationSettings(max_new_tokens=max_tokens, temperature=None if greedy
                              else body.temperature, top_p=None if greedy else body.top_p,
                              num_return_sequences=body.n, stop=body.stops(), seed=body.seed)


def check_prompt(engine: Engine, limits: Limits, text: str, chat: bool) -> None:
    """A prompt the model cannot read whole is refused (generate would cut it)."""
    ids = engine.tokenizer(text, add_special_tokens=not chat)["input_ids"]
    room = None if engine.context is None else engine.context - (
        0 if engine.net.config.is_encoder_decoder else 1)
    limit = min(x for x in (room, limits.max_prompt_tokens, 1 << 60) if x is not None)
    if len(ids) > limit:
        raise RequestError(400, f"the prompt has {len(ids)} tokens, over the {limit} this "
                           "model and server take: shorten it", "context_length_exceeded")


async def respond(request: Request, body: Sampling, texts: list[str],
                  settings: GenerationSettings, chat: bool) -> Any:
    engine: Engine = request.app.state.engine
    for text in texts:
        check_prompt(engine, request.app.state.limits, text, chat)
    answer = Answer(engine.name, chat, settings)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(request, answer, texts, usage),
                                 media_type="text/event-stream")
    batcher = request.app.state.batcher
    prompts = [Prompt(t) for t in texts]
    watching = asyncio.ensure_future(given_up(request, prompts))
    try:
        records = await asyncio.gather(*(batcher.submit(p, (settings, chat)) for p in prompts))
    finally:
        watching.cancel()
    return answer.whole(records)


async def given_up(request: Request, prompts: list[Prompt], every_s: float = 0.1) -> None:
    """A client that leaves before its whole answer is ready: its prompts' rows stop at the next
    token (a streaming request learns it from its response being cancelled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    for prompt in prompts:
        prompt.left.set()


class Answer:
    """Records in OpenAI's shapes."""

    def __init__(self, model: str, chat: bool, settings: GenerationSettings):
        self.model, self.chat, self.settings = model, chat, settings
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def head(self, chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.object + (".chunk" if chunk else ""),
                "created": self.created, "model": self.model}

    def choice(self, index: int, text: str | None, reason: str | None,
               chunk: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None,
                    "finish_reason": reason}
        content = {"content": text} if text is not None else {}
        message = {"delta": content} if chunk else {"message": {"role": "assistant", **content}}
        return {"index": index, **message, "logprobs": None, "finish_reason": reason}

    def texts(self, record: dict[str, Any]) -> list[str]:
        return record["output"] if isinstance(record["output"], list) else [record["output"]]

    def reason(self, record: dict[str, Any], choice: int) -> str:
        """'length' when the choice ran out of tokens (or of the model's context), 'stop'
        otherwise: each choice's own as the model's thread followed it; under beam search,
        which it cannot follow, the record's total spread evenly over its choices."""
        if record.get("reasons"):
            return str(record["reasons"][choice])
        per_choice = record["new_tokens"] / self.settings.num_return_sequences
        return "length" if per_choice >= self.settings.max_new_tokens else "stop"

    def usage(self, records: list[dict[str, Any]]) -> dict[str, int]:
        prompt = sum(r["prompt_tokens"] for r in records)
        new = sum(r["new_tokens"] for r in records)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def whole(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        n = self.settings.num_return_sequences
        choices = [self.choice(i * n + c, text, self.reason(record, c))
                   for i, record in enumerate(records)
                   for c, text in enumerate(self.texts(record))]
        return {**self.head(), "choices": choices, "usage": self.usage(records)}

    def event(self, choices: list[dict[str, Any]], **more: Any) -> str:
        return f"data: {json.dumps({**self.head(True), 'choices': choices, **more})}\n\n"


async def stream(request: Request, answer: Answer, texts: list[str], usage: bool
                 ) -> AsyncIterator[str]:
    """OpenAI's server-sent chunks: each choice's new text as it comes, its finish reason, the
    usage if asked, then [DONE]. A client that leaves ends this, and its rows stop generating
    at the next token (the rest of their batch runs on)."""
    n = answer.settings.num_return_sequences
    streams = [Stream(n, answer.settings.stop) for _ in texts]
    prompts = [Prompt(t, s.sink) for t, s in zip(texts, streams, strict=True)]
    batcher = request.app.state.batcher
    key = (answer.settings, answer.chat)
    jobs = [asyncio.ensure_future(batcher.submit(prompt, key)) for prompt in prompts]
    try:
        if answer.chat:
            yield answer.event([{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}
                                for i in range(len(texts) * n)])
        for i, (job, flow) in enumerate(zip(jobs, streams, strict=True)):
            async for event in follow(answer, i * n, job, flow):
                yield event
        records = [job.result() for job in jobs]
    except Exception as err:  # the headers are sent: the failure goes to the client as an event
        status = err.status if isinstance(err, RequestError) else 400
        if not isinstance(err, LlmkitError):
            log.error("streaming %s failed", answer.id, exc_info=err)
            status, err = 500, LlmkitError("the server failed to finish; its log says why")
        yield f"data: {json.dumps(error_body(status, str(err)))}\n\n"
        return
    finally:  # normally all done by now; else the client left (or the stream failed)
        for prompt, job in zip(prompts, jobs, strict=True):
            prompt.left.set()
            job.cancel()
    if usage:
        yield answer.event([], usage=answer.usage(records))
    yield "data: [DONE]\n\n"


async def follow(answer: Answer, first: int, job: asyncio.Future[Any], flow: Stream
                 ) -> AsyncIterator[str]:
    """One prompt's chunks: deltas while its job runs, the rest and the finish reasons after.
    Only this generator waits (on the stream's queue, which the job's end closes): a client
    that leaves leaves no task behind."""
    job.add_done_callback(lambda _: flow.queue.put_nowait(None))
    while (item := await flow.queue.get()) is not None:
        delta = flow.delta(*item)
        if delta:
            yield answer.event([answer.choice(first + item[0], delta, None, True)])
    record = job.result()  # a failed batch raises here; stream() sends it as an error event
    for c, text in enumerate(answer.texts(record)):
        rest = flow.delta(c, text, final=True)
        yield answer.event([answer.choice(first + c, rest or None, answer.reason(record, c),
                                          True)])
