"""Tokens as they come: a transformers streamer that tells each row's text to its request (in
the model's thread), and the request's side that turns that text into the deltas it sends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from transformers.generation.streamers import BaseStreamer

Sink = Callable[[int, str], None]


class RowStreamer(BaseStreamer):
    """Hands each row of a batched `generate` its decoded text after every new token; rows of
    requests that do not stream (no sink) cost nothing."""

    def __init__(self, tokenizer: Any, sinks: list[tuple[Sink | None, int]], ends: set[int]):
        self.tokenizer, self.sinks, self.ends = tokenizer, sinks, ends
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.done = [sink is None for sink, _ in sinks]
        self.prompt = True

    def put(self, value: Any) -> None:
        if self.prompt:  # the first call carries the prompts (or the decoder's start token)
            self.prompt = False
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.ends:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            sink, choice = self.sinks[row]
            assert sink is not None
            sink(choice, self.tokenizer.decode(self.ids[row], skip_special_tokens=True))

    def end(self) -> None:
        """Nothing to flush: the request sends what is left from the finished record."""


class Stream:
    """One streaming request's choices: text from the model's thread arrives on the event loop
    and leaves as deltas that never have to be taken back (a possible stop string or a
    half-decoded character waits for the next token)."""

    def __init__(self, choices: int, stop: tuple[str, ...]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.sent = [""] * choices
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def sink(self, choice: int, text: str) -> None:
        """Called in the model's thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, text))

    def delta(self, choice: int, text: str, final: bool = False) -> str:
        """What of `text` (the choice's text so far) is new and safe to send."""
        from llmkit.inference.generate import cut

        shown = text if final else cut(text, self.stop)
        if not final:
            shown = shown[:len(shown) - self.hold] if self.hold else shown
            shown = shown.rstrip("\ufffd")  # a character whose bytes are not all here yet
        sent = self.sent[choice]
        if len(shown) <= len(sent) or not shown.startswith(sent):
            return ""
        self.sent[choice] = shown
        return shown[len(sent):]
