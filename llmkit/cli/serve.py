"""`llmkit serve`: a run directory behind an HTTP API (OpenAI's for generation, TEI's for
classification, /v1/qa for question answering)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli.options import BaseModel, shown

EXAMPLES = """\
llmkit serve runs/gpt --port 8000          # OpenAI API: /v1/completions, /v1/chat/completions
llmkit serve runs/sst2                     # POST /predict, as Text Embeddings Inference
LLMKIT_API_KEY=secret llmkit serve runs/squad --host 0.0.0.0   # POST /v1/qa, key required
llmkit serve runs/gpt --max-batch-size 32 --batch-wait-ms 10 --max-concurrent 128"""


def serve(
    run: Annotated[str, typer.Argument(help="Run directory or checkpoint to serve.")],
    host: Annotated[str, typer.Option(help=shown("Address to bind; 0.0.0.0 takes requests "
                                                 "from other machines.", "127.0.0.1"),
                                      show_default=False)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help=shown("Port (0: a free one, which the log "
                                                 "line names).", 8000), show_default=False, min=0,
                                      max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LLMKIT_API_KEY", help="Require "
                       "'Authorization: Bearer KEY' on every request but /health.")] = None,
    max_batch_size: Annotated[int, typer.Option(help=shown("Requests per forward or generate "
                              "call.", 16), show_default=False, min=1)] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help=shown("How long a request waits for "
                             "others to batch with.", 5.0), show_default=False, min=0)] = 5.0,
    max_concurrent: Annotated[int, typer.Option(help=shown("Requests in flight; more get 429.",
                              64), show_default=False, min=1)] = 64,
    max_tokens: Annotated[int, typer.Option(help=shown("New tokens one request may ask for.",
                          1024), show_default=False, min=1)] = 1024,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Prompt tokens one request may "
                                 "send (default: the model's context).", min=1)] = None,
    max_n: Annotated[int, typer.Option(help=shown("Completions one request may ask for.", 8),
                     show_default=False, min=1)] = 8,
    max_body_bytes: Annotated[int, typer.Option(help=shown("Largest request body.", 1 << 20),
                              show_default=False, min=1)] = 1 << 20,
    task: Annotated[str | None, typer.Option(help="Task, for a checkpoint that is not a run "
                    "directory (classify or qa for an encoder).")] = None,
    name: Annotated[str | None, typer.Option(help="Model name clients give (default: the "
                    "folder's name).")] = None,
    base_model: BaseModel = None,
) -> None:
    """Serve a model over HTTP until Ctrl-C: requests that arrive together are batched."""
    from llmkit.serve import Limits, run_server

    limits = Limits(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                    max_concurrent=max_concurrent, max_body_bytes=max_body_bytes,
                    max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_n=max_n)
    run_server(run, host, port, limits, api_key, task, name, base_model)
