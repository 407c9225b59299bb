"""Preference pairs in TRL's formats, found by their columns: `prompt`, `chosen` and `rejected`
as text (standard) or as conversations (conversational), or `chosen` and `rejected` alone, the
prompt being the start they share (implicit prompt). Tokenized once, for DPO and reward models:
conversations through the chat template exactly as `finetune generate` renders them
(`chat.render`), text as `finetune generate` tokenizes prompt/completion pairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config.schema import BadRows, DataConfig, setting
from llmkit.errors import LlmkitError
from llmkit.tasks.task import IGNORE, sliced_losses, token_losses

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
KEYS = ("input_ids", "rejected_ids", "prompt_length", "bad", "same", "cuts")  # `encode`'s


@dataclass(frozen=True)
class PairData(DataConfig):
    """Preference pairs: a prompt, the preferred reply and the dispreferred one."""

    prompt_column: str | None = setting(
        "prompt", "Prompt column (text, or a conversation ending with the user's turn); when "
        "the rows have no 'prompt' column, the prompt is the start chosen and rejected share.")
    chosen_column: str = setting("chosen", "The preferred reply: text, or assistant messages.")
    rejected_column: str = setting("rejected", "The dispreferred reply, as --chosen-column.")
    max_length: int = setting(1024, "Tokens of prompt + reply at most: a longer reply is cut "
                              "at its end (counted in the log).", minimum=2)
    max_prompt_length: int | None = setting(None, "Tokens of prompt at most: a longer prompt "
                                            "keeps its last N tokens (counted in the log); "
                                            "default: half of --max-length.", minimum=1)
    chat_template: str | None = setting(None, "Jinja chat template file for conversations "
                                        "(replaces the tokenizer's; saved with the run).")
    empty_rows: BadRows = setting("fail", "fail or skip pairs with an empty reply or whose "
                                  "chosen reply equals the rejected one.")

    def problems(self) -> list[str]:
        if self.max_prompt_length and self.max_prompt_length >= self.max_length:
            return [f"data.max_prompt_length {self.max_prompt_length} leaves no room for the "
                    f"reply in data.max_length {self.max_length}: make it smaller"]
        return []


def prompt_limit(data: PairData) -> int:
    """Prompt tokens kept at most: --max-prompt-length, else half of --max-length; below
    --max-length either way (which the model's context may have lowered)."""
    return min(data.max_prompt_length or data.max_length // 2, data.max_length - 1)


def columns(data: PairData, labelled: bool) -> list[str]:
    return [c for c in (data.prompt_column, data.chosen_column, data.rejected_column) if c]


def detect(rows: Dataset, data: PairData) -> PairData:
    """No 'prompt' column: the prompt is the start chosen and rejected share (said in the log)."""
    from dataclasses import replace

    if data.prompt_column != "prompt" or "prompt" in rows.column_names:
        return data
    log.info("no 'prompt' column: the prompt is the start the chosen and rejected replies "
             "share (implicit prompt)")
    return replace(data, prompt_column=None)


def is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def clean(rows: Dataset, data: PairData, labelled: bool) -> Dataset:
    """The three columns hold text, or conversations, all alike."""
    kinds = {c: is_conversation(rows[0][c]) if len(rows) else False for c in columns(data, True)}
    if len(set(kinds.values())) > 1:
        raise LlmkitError("the pair columns mix text and conversations ("
                          + ", ".join(f"{c}: {'messages' if v else 'text'}"
                                      for c, v in kinds.items())
                          + "); give all as text or all as lists of {role, content} messages")
    if not any(kinds.values()):
        from llmkit.data.read import check_text

        check_text(rows, columns(data, True))
    return rows


def shared_start(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """An implicit prompt: the messages both conversations start with, or the text both start
    with up to the last whitespace before they part (the replies keep that whitespace, so no
    word is split between prompt and reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        n = max((chosen.rfind(space, 0, n) for space in " \n\t"), default=-1)
        n = max(n, 0)
    return chosen[:n], chosen[n:], rejected[n:]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def conversation_ids(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, Any]],
                     chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], row: int
                     ) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids of a conversational pair: the prompt rendered with
    the generation prompt after it, each reply as the whole conversation, rendered by the chat
    template as `finetune generate` renders it; the replies start where the renderings part
    (TRL's rule: some templates render a prompt alone differently)."""
    from llmkit.tasks.chat import check, render

    for messages in (prompt, chosen, rejected):
        check(messages, row)
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[-1]["role"] != "assistant":
            last = reply[-1]["role"] if reply else "nothing"
            raise LlmkitError(f"row {row}: the {name} conversation ends with {last}, not an "
                              "assistant turn: a reply to learn from is the assistant's")

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    p = ids(render(tokenizer, prompt, prompt=True))
    c, r = ids(render(tokenizer, [*prompt, *chosen])), ids(render(tokenizer, [*prompt, *rejected]))
    n = min(common_prefix(p, c), common_prefix(p, r))
    return p[:n], c[n:], r[n:]


def text_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str
             ) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected token ids of a text pair, tokenized apart (as `finetune
    generate` tokenizes prompt/completion pairs, and as generation meets a prompt), each reply
    ending with the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LlmkitError("the tokenizer has no end-of-sequence token, which ends every reply: "
                          "give a causal model's tokenizer (--tokenizer)")
    encoded = tokenizer([prompt, chosen, rejected], add_special_tokens=False)["input_ids"]
    return list(encoded[0]), [*encoded[1], eos], [*encoded[2], eos]


def empty(reply: Any) -> bool:
    if reply is None:
        return True
    if isinstance(reply, str):
        return not reply.strip()
    return not any(m.get("role") == "assistant" and str(m.get("content", "")).strip()
                   for m in reply)


def encode(rows: Dataset, tokenizer: PreTrainedTokenizerBase, data: PairData,
           workers: int | None = None) -> Dataset:
    """Each pair as `input_ids` (prompt + chosen), `rejected_ids` (prompt + rejected) and
    `prompt_length`, int32 in datasets' Arrow cache: a prompt over --max-prompt-length keeps its
    last tokens, a pair over --max-length loses its reply's end (counted); pairs with an empty
    or no different reply are refused, or left out with -s data.empty_rows=skip (counted)."""
    from datasets import Features, Sequence, Value

    from llmkit.data.features import fingerprint
    from llmkit.tasks.chat import file_rows

    limit, numbers = prompt_limit(data), file_rows(rows)  # errors name the file's rows
    conversational = bool(len(rows)) and is_conversation(rows[0][data.chosen_column])
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("the tokenizer has no chat template to render the conversations: "
                          "give one with --chat-template FILE (a Jinja template)")

    def encode_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in KEYS}
        prompts = batch[data.prompt_column] if data.prompt_column else [None] * len(indices)
        for row, prompt, chosen, rejected in zip(indices, prompts, batch[data.chosen_column],
                                                 batch[data.rejected_column], strict=True):
            same = chosen == rejected
            bad = not same and (empty(chosen) or empty(rejected))
            if prompt is None and not (same or bad):
                prompt, chosen, rejected = shared_start(chosen, rejected)
                bad = empty(chosen) or empty(rejected)
            p, c, r = ([], [], []) if bad or same else (
                conversation_ids(tokenizer, prompt or [], chosen, rejected, int(numbers[row]))
                if conversational else text_ids(tokenizer, prompt or "", chosen, rejected))
            cuts = int(len(p) > limit)
            p = p[len(p) - limit:] if cuts else p
            cuts += 2 * int(len(p) + max(len(c), len(r)) > data.max_length)
            c, r = [*p, *c][:data.max_length], [*p, *r][:data.max_length]
            same = same or c == r  # replies that part only past --max-length: equal as cut
            for key, value in zip(KEYS, (c, r, len(p), bad, same, cuts), strict=True):
                out[key].append(value)
        return out

    tokens = Sequence(Value("int32"))
    encoded = rows.map(encode_batch, batched=True, with_indices=True, num_proc=workers,
                       remove_columns=rows.column_names, desc="tokenizing pairs",
                       features=Features({"input_ids": tokens, "rejected_ids": tokens,
                                          "prompt_length": Value("int32"),
                                          "bad": Value("bool"), "same": Value("bool"),
                                          "cuts": Value("int8")}),
                       new_fingerprint=fingerprint(rows, tokenizer, "pairs", columns(data, True),
                                                   data.max_length, limit,
                                                   str(tokenizer.chat_template)))
    return usable(encoded, data)


def usable(encoded: Dataset, data: PairData) -> Dataset:
    """Encoded pairs less those with an empty reply or equal replies (refused, or with
    -s data.empty_rows=skip left out and counted); prompts and pairs cut, counted in the log."""
    import numpy as np

    flags = encoded.with_format("numpy", columns=["bad", "same", "cuts"])[:]
    refused = flags["bad"] | flags["same"]
    for mask, what in ((flags["bad"], "an empty reply"),
                       (flags["same"], "a chosen reply equal to the rejected one, as "
                                       "given or once cut to --max-length,")):
        if mask.any() and (data.empty_rows == "fail" or refused.all()):
            raise LlmkitError(f"{int(mask.sum())} of {len(encoded)} pairs have {what} (first: "
                              f"row {int(np.argmax(mask))}): nothing to learn from; fix the "
                              "data or pass -s data.empty_rows=skip to leave them out")
    if refused.any():
        log.warning("leaving out %d of %d pairs with an empty reply or equal replies",
                    int(refused.sum()), len(encoded))
        encoded = encoded.select(np.flatnonzero(~refused))
    kept = flags["cuts"][~refused]
    for bit, what in ((1, f"prompts are longer than --max-prompt-length "
                          f"{prompt_limit(data)} tokens: they keep their last tokens"),
                      (2, f"pairs are longer than --max-length {data.max_length} tokens: "
                          "their replies are cut there")):
        if (kept & bit).any():
            log.warning("%d of %d %s", int((kept & bit).astype(bool).sum()), len(kept), what)
    return encoded.remove_columns(["bad", "same", "cuts"])


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A batch of pairs as one batch of rows, the chosen sequences first, then the rejected,
    right-padded to one length; labels are the reply tokens (IGNORE on the prompt and the
    padding); `ref_logps` where the features hold precomputed ones."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [list(f["input_ids"]) for f in features] + [list(f["rejected_ids"])
                                                                for f in features]
        prompts = [int(f["prompt_length"]) for f in features] * 2
        longest = max(map(len, sequences))
        batch: dict[str, Any] = {
            "input_ids": torch.tensor([s + [pad] * (longest - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s))
                                            for s in sequences]),
            "labels": torch.tensor([[IGNORE] * p + s[p:] + [IGNORE] * (longest - len(s))
                                    for s, p in zip(sequences, prompts, strict=True)])}
        if "ref_chosen_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features]
                                              + [f["ref_rejected_logps"] for f in features])
        return batch

    return collate


def log_probs(model: Any, batch: dict[str, torch.Tensor], sliced: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its reply tokens, and their count. `sliced`:
    through rows whose logits fit LOGITS_BUDGET (evaluation)."""
    import torch
    import torch.nn.functional as F

    following = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if sliced:
        losses = sliced_losses(lambda rows: model(**{k: v[rows] for k, v in inputs.items()},
                                                  use_cache=False).logits,
                               following, model.config)
    else:
        losses = token_losses(model(**inputs, use_cache=False).logits, following)
    return -losses["loss_sum"], losses["loss_count"].to(torch.float32)
