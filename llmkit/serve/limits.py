"""What one server accepts and how it batches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how it batches."""

    max_batch_size: int = 16  # requests (prompts or texts) per forward / generate call
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_concurrent: int = 64  # requests in flight at once; 429 beyond
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 1024  # new tokens one request may ask for
    max_n: int = 8  # completions one request may ask for
    max_inputs: int = 64  # texts in one /predict request
