"""The FastAPI app: its routes by task, the guard on every request (body size, requests in
flight, the API key) and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmkit.errors import LlmkitError
from llmkit.serve.batching import Batcher
from llmkit.serve.engine import Engine, work_of
from llmkit.serve.limits import Limits
from llmkit.serve.schemas import RequestError, error_body

log = logging.getLogger("llmkit")
OPEN = ("/health",)  # answers without a key: load balancers and orchestrators probe it


def create_app(engine: Engine, limits: Limits, api_key: str | None = None) -> FastAPI:
    """The server of one loaded model."""
    from llmkit.serve.completions import router as openai_router
    from llmkit.serve.encoders import classify_router, qa_router

    batcher = Batcher(work_of(engine), limits.max_batch_size, limits.batch_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()  # uvicorn has let the requests in flight finish
        batcher.close()
        log.info("stopped serving %s: the requests in flight have finished", engine.name)

    # no /docs or /openapi.json: nothing answers that the operator did not mean to expose
    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.limits, app.state.batcher = engine, limits, batcher
    secured = [Depends(key_check(api_key))] if api_key else []
    app.get("/health")(health)
    app.get("/info", dependencies=secured)(info)
    app.get("/v1/models", dependencies=secured)(models)
    if engine.generates:
        app.include_router(openai_router, dependencies=secured)
    elif engine.task == "classify":
        app.include_router(classify_router, dependencies=secured)
    else:
        app.include_router(qa_router, dependencies=secured)
    add_error_handlers(app)
    app.state.guard = Tally()
    app.add_middleware(Guard, limits=limits, tally=app.state.guard)
    return app


def key_check(api_key: str) -> Any:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, expected):  # constant time: no timing oracle
            raise RequestError(401, "a valid API key is required: send the header "
                               "'Authorization: Bearer KEY'", "invalid_api_key")

    return check


async def health(request: Request) -> dict[str, Any]:
    """Up, and the work it holds: whether the model is running a batch, requests in flight
    (past the guard, until their answer is sent) and requests waiting for the model."""
    batcher: Batcher = request.app.state.batcher
    return {"status": "ok", "busy": batcher.busy, "in_flight": request.app.state.guard.active,
            "waiting": batcher.waiting}


async def info(request: Request) -> dict[str, Any]:
    """The task, the model and the limits (TEI's /info, in llmkit's terms)."""
    from llmkit import __version__

    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    batcher: Batcher = request.app.state.batcher
    return {"model_id": engine.name, "task": engine.task, "labels": engine.labels or None,
            "model_type": engine.net.config.model_type, "max_input_length": engine.context,
            "max_batch_size": limits.max_batch_size, "batch_wait_ms": limits.batch_wait_ms,
            "max_concurrent_requests": limits.max_concurrent,
            "max_body_bytes": limits.max_body_bytes, "max_tokens": limits.max_tokens,
            "max_n": limits.max_n, "max_inputs": limits.max_inputs,
            "version": __version__,
            "served": {"requests": batcher.requests, "batches": batcher.batches,
                       "cancelled": batcher.cancelled}}


async def models(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                        "owned_by": "llmkit"}]}


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's shape; no traceback ever reaches the client."""

    def answer(status: int, message: str, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, code), status_code=status)

    async def refused(request: Request, err: Exception) -> JSONResponse:
        if isinstance(err, RequestError):
            return answer(err.status, str(err), err.code)
        return answer(400, str(err))  # the library's own refusal of a request

    async def invalid(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        problems = list(err.errors())
        if any(p.get("type") == "json_invalid" or tuple(p.get("loc", ())) == ("body",)
               for p in problems):
            return answer(400, "the body must be a JSON object", "invalid_json")
        where = lambda p: ".".join(str(x) for x in p.get("loc", ())[1:]) or "body"  # noqa: E731
        return answer(422, "; ".join(f"{where(p)}: {p.get('msg')}" for p in problems[:5]),
                      "invalid_value")

    async def http(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.url.path} does not take {request.method}"}
        return answer(err.status_code, message.get(err.status_code, str(err.detail)))

    async def failed(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return answer(500, "the server failed to answer this request; its log says why")

    app.add_exception_handler(LlmkitError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, failed)


@dataclass
class Tally:
    """What the guard counts, for /health."""

    active: int = 0  # requests past the guard whose answer is not yet sent


class Guard:
    """Refuses, before any handler runs, a body over the size limit (413) and requests beyond
    the number allowed in flight (429)."""

    def __init__(self, app: ASGIApp, limits: Limits, tally: Tally):
        self.app, self.limits, self.tally = app, limits, tally

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN:
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large(send, limit)
            return
        if self.tally.active >= self.limits.max_concurrent:
            await refuse(send, 429, f"{self.tally.active} requests are in flight, this "
                         "server's limit: retry shortly", "too_many_requests")
            return
        self.tally.active += 1
        try:
            whole = receive if length is not None else await buffered(receive, limit)
            if whole is None:  # sent without its length (chunked), and over the limit
                await too_large(send, limit)
                return
            await self.app(scope, whole, send)
        finally:
            self.tally.active -= 1


async def buffered(receive: Receive, limit: int) -> Receive | None:
    """The app's `receive` once the whole body is read, if it stays within `limit` bytes (None
    past it): the body as one message, then what the client sends after (its disconnect)."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left before its body was whole
            return replay(message, receive)
        body += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if len(body) > limit:
            return None
    return replay({"type": "http.request", "body": bytes(body), "more_body": False}, receive)


def replay(first: Message, receive: Receive) -> Receive:
    """`first`, then what `receive` gets."""
    held = [first]

    async def read() -> Message:
        return held.pop() if held else await receive()

    return read


async def too_large(send: Send, limit: int) -> None:
    await refuse(send, 413, f"the body is over this server's limit of {limit} bytes",
                 "body_too_large")


async def refuse(send: Send, status: int, message: str, code: str) -> None:
    await JSONResponse(error_body(status, message, code), status_code=status)(
        {"type": "http"}, no_body, send)


async def no_body() -> Message:
    return {"type": "http.disconnect"}
