"""The one error type users see, and the boundary that turns any failure into one line."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable


class LlmkitError(Exception):
    """A mistake the user can fix; the message says what to change."""


class ConfigError(LlmkitError):
    """A recipe, option or override that does not fit the config schema."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + "; ".join(problems))


# what the machine said, and what to do about it, when a file cannot be written or read
DISK = {errno.ENOSPC: "free some space (earlier checkpoints are intact; --resume continues)",
        errno.EDQUOT: "free some space (earlier checkpoints are intact; --resume continues)",
        errno.EACCES: "choose a folder you can write to", errno.EROFS: "choose a writable folder",
        errno.EPERM: "choose a folder you can write to"}


PEER_LOST = re.compile(r"Connection closed by peer|remote worker crash|Connection reset by peer|"
                       r"NCCL communicator was aborted|Broken pipe")
# a collective (or the start) that waited past --collective-timeout: gloo's, NCCL's watchdog,
# the store's wait for the processes to join
TIMED_OUT = re.compile(r"Timed out waiting|collective operation timeout|Socket Timeout|"
                       r"wait timeout after|Timed out after \d+ seconds waiting for clients")


# Who among the other processes left, asked when a collective fails: run.launch registers a
# function that reads their heartbeats while a run has several processes ("" when unknown).
PEERS: list[Callable[[], str]] = []


def who_left() -> str:
    try:
        return PEERS[-1]() if PEERS else ""
    except Exception:  # the store that holds the heartbeats may be gone with its node
        return ""


def one_line(err: BaseException, argv: list[str]) -> tuple[str, int]:
    """The line printed for a failure that ends a command, and the exit code.

    LlmkitError and Click's usage errors say what to change; a full disk or a folder that cannot
    be written is the machine's; anything else escaped us: it names the command and the
    exception, and says how to see the traceback (a test that meets it fails: see
    tests/test_bad_input.py)."""
    from typer._click.exceptions import ClickException

    if isinstance(err, LlmkitError):
        return " ".join(str(err).split()), 1
    if isinstance(err, ClickException):
        ctx = getattr(err, "ctx", None)  # its command path starts with the prog name, llmkit
        hint = f" (see {ctx.command_path} --help)" if ctx else ""
        return f"{err.format_message()}{hint}", err.exit_code
    if isinstance(err, OSError) and err.errno in DISK:
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where}: {err.strerror}; {DISK[err.errno]}", 1
    if TIMED_OUT.search(str(err)):
        said = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(err).split()))  # gloo's source line
        return (f"{who_left() or 'another process of this run'} did not answer within "
                "--collective-timeout (a node that died or hangs), so this one stopped; the "
                "checkpoints saved are intact: start every node again with --resume "
                f"({type(err).__name__}: {said[:120]})"), 1
    if PEER_LOST.search(str(err)):  # a collective whose other side is gone
        return (f"{who_left() or 'another process of this run'} stopped, so this one did too "
                f"(its own error is above; {type(err).__name__}: "
                f"{' '.join(str(err).split())[:120]})"), 1
    words = [a for a in argv[:2] if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] == ["finetune"] else words[:1])
    detail = " ".join(str(err).split())[:300]
    return (f"llmkit {command} failed unexpectedly: {type(err).__name__}: {detail} (a bug in "
            "llmkit: LLMKIT_DEBUG=1 shows the traceback; please report it)"), 1
