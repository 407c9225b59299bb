"""Tokens as they come: a transformers streamer that follows each row of a batched `generate`
(telling its text to its request, in the model's thread, and seeing where it ended), a
stopping criterion that ends the rows of requests whose client left, and the request's side
that turns text into the deltas it sends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

Sink = Callable[[int, str], None]


class RowStreamer(BaseStreamer):
    """Follows every row of a batched `generate`: rows of streaming requests (a sink) hear
    their decoded text after every new token; every row's end is noted for its finish reason
    (a row that does not stream costs a list append per token)."""

    def __init__(self, tokenizer: Any, sinks: list[tuple[Sink | None, int]], ends: set[int]):
        self.tokenizer, self.sinks, self.ends = tokenizer, sinks, ends
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.ended = [False] * len(sinks)
        self.prompt = True

    def put(self, value: Any) -> None:
        if self.prompt:  # the first call carries the prompts (or the decoder's start token)
            self.prompt = False
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row]:
                continue
            if token in self.ends:
                self.ended[row] = True
                continue
            self.ids[row].append(token)
            sink, choice = self.sinks[row]
            if sink is not None:
                sink(choice, self.tokenizer.decode(self.ids[row], skip_special_tokens=True))

    def end(self) -> None:
        """Nothing to flush: the request sends what is left from the finished record."""

    def reasons(self, stop: tuple[str, ...]) -> list[str]:
        """Each row's OpenAI finish reason: "stop" where an end token or a stop string ended
        it, "length" where it ran until generate's token limit (or the model's context)."""
        def stopped(row: int) -> bool:
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            return self.ended[row] or any(s in text for s in stop)

        return ["stop" if stopped(row) else "length" for row in range(len(self.ids))]


class Abandoned(StoppingCriteria):
    """Rows whose request was given up (`left` set: its client went away) finish at the next
    token step, and `generate` returns once every row has finished; `stopped` notes each such
    row's tokens at that point."""

    def __init__(self, left: list[threading.Event]):
        self.left, self.steps = left, 0
        self.stopped: dict[int, int] = {}

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.steps += 1
        done = [event.is_set() for event in self.left]
        for row in (r for r, flag in enumerate(done) if flag):
            self.stopped.setdefault(row, self.steps)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Stream:
    """One streaming request's choices: text from the model's thread arrives on the event loop
    and leaves as deltas that never have to be taken back (a possible stop string or a
    half-decoded character waits for the next token)."""

    def __init__(self, choices: int, stop: tuple[str, ...]):
        self.loop = asyncio.get_running_loop()
        # a choice's text so far; None once the request's job is done (nothing more comes)
        self.queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
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
