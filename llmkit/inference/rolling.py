"""A language model's perplexity of whole documents in sliding windows (lm-evaluation-harness's
rolling log-likelihood, transformers' strided perplexity)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.data.read import check_columns, load_split
from llmkit.errors import LlmkitError
from llmkit.inference.predict import prepare
from llmkit.scoring.metrics import perplexity_of
from llmkit.tasks.task import IGNORE, sliced_losses

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from transformers import PreTrainedTokenizerBase


def windows(ids: list[int], length: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """Sliding windows over one document's tokens `ids` (their first, the prefix token, is
    context only): each window is at most `length` input tokens and their next tokens as
    targets, the targets already scored masked, so every token is scored once, with up to
    `length` tokens of context. `stride` = `length` is lm-evaluation-harness's rolling
    loglikelihood (disjoint windows); a shorter one is the sliding window of transformers'
    perplexity guide."""
    done = 0  # targets are ids[1:], scored up to index `done`
    while done < len(ids) - 1:
        end = min(done + stride, len(ids) - 1)
        start = max(0, end - length)
        targets = ids[start + 1:end + 1]
        yield ids[start:end], [IGNORE] * (done - start) + targets[done - start:]
        done = end


def rolling(model: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str], length: int,
            stride: int, batch_size: int) -> dict[str, Any]:
    """Perplexity of whole documents, each scored from its first token (after the BOS, or EOS,
    token as lm-evaluation-harness prefixes it) in `windows`; with lm-evaluation-harness's word
    perplexity, byte perplexity and bits per byte (words: `re.split(r"\\s+", text)`; bytes:
    UTF-8)."""
    import math
    import re
    from functools import partial

    import torch

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
        tokenizer.eos_token_id
    texts = [t for t in texts if t and t.strip()]  # blank lines or paragraphs: no document
    if not texts:
        raise LlmkitError("--data holds no text to score")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = sorted((w for ids in encoded for w in windows([prefix, *ids], length, stride)),
                  key=lambda w: -len(w[0]))
    device = model.device  # a transformers model's, or an export's (the CPU)
    total = 0.0

    def logits(inputs: torch.Tensor, mask: torch.Tensor, rows: slice) -> torch.Tensor:
        return model(input_ids=inputs[rows], attention_mask=mask[rows], use_cache=False).logits

    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            longest = len(batch[0][0])
            inputs = torch.tensor([x + [prefix] * (longest - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [IGNORE] * (longest - len(y)) for _, y in batch])
            mask = (torch.arange(longest) < torch.tensor([[len(x)] for x, _ in batch])).long()
            inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
            losses = sliced_losses(partial(logits, inputs, mask), labels, model.config)
            total += float(losses["loss_sum"].double().sum())
    tokens = sum(len(ids) for ids in encoded)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    size = sum(len(t.encode("utf-8")) for t in texts)
    return {"rolling_perplexity": perplexity_of(total / tokens),
            "word_perplexity": perplexity_of(total / words),
            "byte_perplexity": perplexity_of(total / size),
            "bits_per_byte": total / size / math.log(2),
            "tokens": tokens, "words": words, "bytes": size, "documents": len(texts),
            "windows": len(rows)}


def rolling_score(model: str, source: str, task_name: str | None, split: str, stride: int | None,
                  batch_size: int = 64, columns: dict[str, Any] | None = None,
                  base_model: str | None = None) -> dict[str, Any]:
    """A language model's perplexity of each document of `source` (a .txt file split by the
    settings' `sample_by`) in sliding windows of its block size moved `stride` tokens (default:
    the block size), with word and byte perplexity and bits per byte (`rolling`)."""
    from llmkit.tasks.causal_lm import block_size

    task, data, net, tokenizer = prepare(model, task_name, columns, base_model)
    asked = "rolling_perplexity, word_perplexity, byte_perplexity, bits_per_byte and --stride"
    if task.name != "generate":
        raise LlmkitError(f"{model} is a {task.name} model: {asked} score plain text with a "
                          "language model (a generate run, or --task generate)")
    chat = getattr(data, "messages_column", None)
    shaped = chat or getattr(data, "prompt_column", None)
    if shaped:
        rows = "conversations" if chat else "prompts and completions"
        raise LlmkitError(f"{model} was trained on {rows} (column {shaped!r}): {asked} score "
                          "plain text; -m perplexity scores its rows as training evaluates them")
    length = block_size(data, net.config)  # type: ignore[arg-type]
    if stride is not None and stride > length:
        raise LlmkitError(f"--stride {stride} is longer than the window ({length} tokens, "
                          "--block-size clamped to the model's context): at most that")
    rows = load_split(source, split, data.dataset_config, "--data",
                      getattr(data, "sample_by", "line"))
    column = getattr(data, "text_column", "text")
    check_columns(rows, [column], "--data")
    from llmkit.models import inference_device

    net.to(inference_device()).eval()
    result = rolling(net, tokenizer, rows[column], length, stride or length, batch_size)
    return {**result, "window": length, "stride": stride or length,
            "sample_by": getattr(data, "sample_by", "line")}
