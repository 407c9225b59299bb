"""Starting and stopping: uvicorn serves the app until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import socket

from llmkit.errors import LlmkitError
from llmkit.serve.limits import Limits

log = logging.getLogger("llmkit")


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
               api_key: str | None = None, task: str | None = None, name: str | None = None,
               base_model: str | None = None) -> None:
    """Load `model` and serve it until Ctrl-C or SIGTERM (requests in flight finish first)."""
    try:
        import uvicorn

        from llmkit.serve.app import create_app
    except ImportError as err:
        raise LlmkitError(f"llmkit serve needs {err.name}: pip install 'llmkit[serve]'") from err
    from llmkit.serve.engine import load_engine

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("--host %s takes requests from other machines and no --api-key is set: "
                    "anyone who reaches this port can use the model", host)
    engine = load_engine(model, task, name, base_model)
    app = create_app(engine, limits or Limits(), api_key)
    sock = listen(host, port)
    where = f"[{host}]" if ":" in host else host
    log.info("serving %s (%s) at http://%s:%d%s", engine.name, engine.task, where,
             sock.getsockname()[1], " (API key required)" if api_key else "")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=30))
    server.run(sockets=[sock])
    if not server.started:
        raise LlmkitError("the server did not start: the log above says why")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so that the log names the port even
    when --port 0 lets the system choose a free one."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                    else socket.AF_INET)
    except OSError as err:
        raise LlmkitError(f"cannot listen on {host} port {port}: {err.strerror or err}") from None
