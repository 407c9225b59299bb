"""Greedy generations of an exported causal LM (no KV cache: the whole sequence goes through
the graph at every step) or encoder-decoder (with its cache) beside the PyTorch model's, for the
export's check: both decoded by transformers' `generate`, the export's as `llmkit generate
--model DIR` runs it (inference.ort.OrtCausalLM, OrtSeq2SeqLM)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch

from llmkit.inference.ort import OrtGenerator

PROMPT_TOKENS = 24  # prompts are cut to their first tokens: the check is of the decoder


@dataclass
class Generations:
    """Greedy generations of both models on the same prompts."""

    prompts: int
    differ: int
    torch_tokens_per_second: float
    onnx_tokens_per_second: float


def prompt_ids(texts: list[str], tokenizer: Any, count: int) -> list[list[int]]:
    """Token ids of the first `count` non-empty texts, cut to PROMPT_TOKENS."""
    found = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:PROMPT_TOKENS] if text and text.strip() else []
        if ids:
            found.append(ids)
        if len(found) == count:
            break
    return found


def conversation_prompts(conversations: list[Any], tokenizer: Any, count: int
                         ) -> list[list[int]]:
    """Token ids of the first `count` conversations' turns before their first assistant turn,
    in the chat template with the generation prompt after them, cut to their last
    PROMPT_TOKENS (the generation prompt kept)."""
    from llmkit.tasks.chat import render

    found: list[list[int]] = []
    if not getattr(tokenizer, "chat_template", None):
        return found
    for messages in conversations:
        turns = list(itertools.takewhile(lambda m: m.get("role") != "assistant",
                                         messages or []))
        if turns:
            text = render(tokenizer, turns, prompt=True)
            found.append(tokenizer(text, add_special_tokens=False)["input_ids"][-PROMPT_TOKENS:])
        if len(found) == count:
            break
    return found


def padded(prompts: list[list[int]], pad: int, left: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts, padded on the left (a decoder's) or on the right (an encoder's)."""
    longest = max(len(p) for p in prompts)
    ids = [[pad] * (longest - len(p)) + p if left else p + [pad] * (longest - len(p))
           for p in prompts]
    masks = [[0] * (longest - len(p)) + [1] * len(p) if left
             else [1] * len(p) + [0] * (longest - len(p)) for p in prompts]
    return torch.tensor(ids), torch.tensor(masks)


def up_to_end(rows: torch.Tensor, eos: int | None) -> list[list[int]]:
    """New tokens of each row up to and including its first end of sequence."""
    found = []
    for row in rows.tolist():
        found.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
    return found


def greedy(net: Any, ids: torch.Tensor, mask: torch.Tensor, pad: int, eos: int | None,
           new_tokens: int) -> list[list[int]]:
    """transformers' greedy search; finished rows continue with padding. An encoder-decoder's
    new tokens follow its decoder start."""
    from transformers import GenerationConfig

    settings = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                                pad_token_id=pad, eos_token_id=eos)
    with torch.inference_mode():
        out = net.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    return up_to_end(out[:, 1 if net.config.is_encoder_decoder else ids.shape[1]:], eos)


def compare_generations(net: Any, exported: OrtGenerator, tokenizer: Any,
                        prompts: list[list[int]], new_tokens: int) -> Generations:
    """Greedy generations of both models on `prompts`, and their speed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    ids, mask = padded(prompts, pad, left=not net.config.is_encoder_decoder)
    start = time.perf_counter()
    ours = greedy(net, ids, mask, pad, eos, new_tokens)
    middle = time.perf_counter()
    theirs = greedy(exported, ids, mask, pad, eos, new_tokens)
    end = time.perf_counter()
    made = sum(len(r) for r in ours)
    return Generations(prompts=len(prompts), differ=sum(a != b for a, b in zip(ours, theirs,
                                                                               strict=True)),
                       torch_tokens_per_second=round(made / max(middle - start, 1e-9), 1),
                       onnx_tokens_per_second=round(sum(len(r) for r in theirs) /
                                                    max(end - middle, 1e-9), 1))
