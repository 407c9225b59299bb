"""Conversations for causal language models: rows of `messages` rendered with the tokenizer's
chat template, the loss on the assistant turns only, packed whole into blocks."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.tasks.task import IGNORE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
ROLES = ("system", "user", "assistant", "tool")
SENTINEL = "\x00llmkit\x00"  # a reply no template changes, to find what ends a turn


def use_template(tokenizer: PreTrainedTokenizerBase, template: str | None,
                 required: bool) -> None:
    """The run's chat template: a --chat-template file replaces the tokenizer's own (and is
    saved with it); none at all is one line when conversations need one. A run directory's
    tokenizer carries the template already, so a file moved since training is not needed
    (training refuses a missing file before this: see causal_lm.model_kwargs)."""
    if template and Path(template).is_file():
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8")
    elif template and not getattr(tokenizer, "chat_template", None):
        raise LlmkitError(f"--chat-template {template}: no such file")
    if required and not getattr(tokenizer, "chat_template", None):
        raise LlmkitError("the tokenizer has no chat template to render the conversations: "
                          "give one with --chat-template FILE (a Jinja template)")


def check_template_file(template: str | None) -> None:
    """A --chat-template file that is not there: one line, before the model loads."""
    if template and not Path(template).is_file():
        raise LlmkitError(f"--chat-template {template}: no such file")


def stop_at_turn_end(model: Any, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation that stops at the end of an assistant turn too (saved in
    generation_config.json, so pipeline() stops there as well)."""
    turn_end = end_of_turn(tokenizer)
    eos = model.generation_config.eos_token_id
    ends = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if turn_end is not None and turn_end not in ends:
        model.generation_config.eos_token_id = [*ends, turn_end]


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
           prompt: bool = False) -> str:
    """The template's text of `messages` (with the generation prompt after them if asked)."""
    from jinja2 import TemplateError

    if not messages and not prompt:
        return ""
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=prompt))
    except TemplateError as err:
        raise LlmkitError(f"the chat template failed to render a conversation: "
                          f"{str(err).splitlines()[0]}") from err


def check(messages: Any, row: int) -> None:
    """A conversation is a list of {role, content} objects with known roles."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise LlmkitError(f"row {row}: messages must be a list of {{\"role\": ..., \"content\": "
                          f"...}} objects with text content, got {str(messages)[:80]}")
    unknown = sorted({m["role"] for m in messages} - set(ROLES))
    if unknown:
        raise LlmkitError(f"row {row}: unknown role {unknown[0]!r}; the roles are "
                          f"{', '.join(ROLES)}")


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                    text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text`: each from the end of the generation
    prompt that opens it (role header excluded) to the end of the turn (its end-of-turn marker
    included), found by rendering the conversation turn by turn."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:k], True), render(tokenizer,
                                                                         messages[:k + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise LlmkitError("the chat template does not render a conversation as its turns "
                              "one after another, so the assistant turns cannot be found; use "
                              "a template with {% generation %} markers or another template")
        spans.append((len(before), len(through)))
    return spans


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]
           ) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the assistant tokens, IGNORE elsewhere."""
    template = str(tokenizer.chat_template or "")
    if "generation %}" in template:  # the template marks the assistant tokens itself
        out: Any = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"],
                                                         strict=True)]
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # a token that reaches into a turn belongs to it: BPE joins the space after a role header
    # to the first word of the reply
    labels = [t if any(start < b and end > a for a, b in spans) else IGNORE
              for t, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return list(enc["input_ids"]), labels


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends an assistant turn in the template (ChatML's <|im_end|>), when it is
    one token of the vocabulary: generation stops there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = render(tokenizer, [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": SENTINEL}])
    tail = text.split(SENTINEL, 1)[-1].strip()
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return ids[0] if ids and tokenizer.convert_ids_to_tokens(ids[0]) == tail.split()[0] \
        and ids[0] != tokenizer.unk_token_id else None


def conversations(rows: Any, column: str, tokenizer: PreTrainedTokenizerBase, size: int,
                  skip_empty: bool, workers: int | None = None) -> Any:
    """Every conversation encoded (`ids`, `labels`, int32, in datasets' Arrow cache: a rerun
    reads them back), cut to `size` tokens (counted in the log); those without an assistant
    turn refused or, with `skip_empty`, left out (counted). Rows are named by their number in
    the file (see file_rows)."""
    import pyarrow.compute as pc
    from datasets import Features, Sequence, Value

    from llmkit.data.features import fingerprint

    numbers = file_rows(rows)

    def encode_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"ids": [], "labels": [], "empty": [], "reply": [],
                                     "length": []}
        for row, messages in zip(indices, batch[column], strict=True):
            check(messages, int(numbers[row]))
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            empty = not replies or not all(r.strip() for r in replies)  # an empty reply
            # would teach end-of-turn markers alone
            ids, labels = ([], []) if empty else encode(tokenizer, messages)
            reply = next((i for i, t in enumerate(labels) if t != IGNORE), len(ids))
            for key, value in (("ids", ids[:size]), ("labels", labels[:size]), ("empty", empty),
                               ("reply", reply), ("length", len(ids))):
                out[key].append(value)
        return out

    tokens, number = Sequence(Value("int32")), Value("int32")
    encoded = rows.map(encode_batch, batched=True, with_indices=True,
                       remove_columns=rows.column_names, num_proc=workers, desc="tokenizing",
                       features=Features({"ids": tokens, "labels": tokens, "empty": Value("bool"),
                                          "reply": number, "length": number}),
                       new_fingerprint=fingerprint(rows, tokenizer, "chat/2", column, size,
                                                   str(tokenizer.chat_template)))
    flags = encoded.with_format("arrow")
    encoded = usable(encoded, size, skip_empty, numbers)
    cut = pc.sum(pc.greater(flags["length"], size)).as_py() or 0
    if cut:
        log.warning("%d of %d conversations are longer than --block-size %d tokens: cut there",
                    cut, len(flags), size)
    return encoded.remove_columns(["empty", "reply", "length"])


def file_rows(rows: Any) -> Any:
    """Each row's number in the file(s) it was read from: a held-out split (no --validation)
    and --max-train-samples keep it in datasets' indices mapping, so an error names the row
    of the file, not its place in the shuffled split."""
    import numpy as np

    mapping = rows._indices  # datasets' own record of select / train_test_split
    if mapping is None:
        return np.arange(len(rows))
    return mapping.column("indices").to_numpy()


def usable(encoded: Any, size: int, skip_empty: bool, numbers: Any) -> Any:
    """The conversations with an assistant token in their block. A block size that leaves none
    in any conversation is refused with what to set; conversations without one (no reply, an
    empty reply, or none within the block) are refused with their count and first row, or,
    with `skip_empty`, left out (counted)."""
    import numpy as np

    flags = encoded.with_format("arrow")
    empty = flags["empty"].to_numpy(zero_copy_only=False)
    reply = flags["reply"].to_numpy()
    outside = ~empty & (reply >= size)
    if outside.any() and outside.sum() == (~empty).sum():
        shortest, longest = int(reply[~empty].min()), int(flags["length"].to_numpy().max())
        raise LlmkitError(f"--block-size {size} leaves no assistant token in any conversation: "
                          f"the shortest prompt before a first reply is {shortest} tokens; set "
                          f"--block-size above {shortest} (the longest conversation is "
                          f"{longest} tokens)")
    silent = empty | outside
    if silent.any() and (not skip_empty or silent.all()):
        raise LlmkitError(f"{int(silent.sum())} of {len(silent)} conversations have no "
                          f"assistant turn (first: row {int(numbers[np.argmax(silent)])}) to "
                          "learn from: none, an empty reply, or none within the first "
                          f"{size} tokens (--block-size); fix the data or pass "
                          "-s data.empty_rows=skip to leave them out")
    if silent.any():
        log.warning("leaving out %d of %d conversations without an assistant turn",
                    int(silent.sum()), len(silent))
        return encoded.select(np.flatnonzero(~silent))
    return encoded


def one_per_row(encoded: Any) -> Any:
    """Conversations as rows of their own (no packing): ids, labels and an attention mask."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    table = encoded.with_format("arrow")[:]
    ids = table["ids"].combine_chunks()
    mask = pa.ListArray.from_arrays(ids.offsets, pa.array(np.ones(len(ids.values), np.int8)))
    return Dataset(pa.table({"input_ids": ids, "labels": table["labels"], "attention_mask": mask}),
                   fingerprint=Hasher.hash((encoded._fingerprint, "one per row")))


def pack_whole(encoded: Any, size: int, separate: bool) -> Any:
    """Conversations (`ids`, `labels` of a dataset) placed whole into blocks of at most `size`
    tokens (best fit, longest first); with `separate`, positions restart at each conversation.
    Built as Arrow arrays: 4 bytes a token."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    table = encoded.with_format("arrow")[:]
    lengths = pc.list_value_length(table["ids"]).to_numpy()
    room: list[tuple[int, int]] = []  # (tokens left, block) sorted
    blocks: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[i])
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            blocks.append([i])
            left, chosen = size - need, len(blocks) - 1
        else:
            left, chosen = room.pop(at)
            blocks[chosen].append(i)
            left -= need
        bisect.insort(room, (left, chosen))
    order = np.array([i for block in blocks for i in block], dtype=np.int64)
    sizes = lengths[order]
    block_sizes = np.array([int(lengths[b].sum()) for b in blocks], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int32))
    ids, labels = (pc.list_flatten(table[key].take(order)).combine_chunks()
                   for key in ("ids", "labels"))
    starts = np.repeat(np.cumsum(sizes) - sizes if separate
                       else np.cumsum(block_sizes) - block_sizes,
                       sizes if separate else block_sizes)
    positions = np.arange(len(ids), dtype=np.int64) - starts
    features = {"input_ids": ids, "labels": labels, "position_ids": pa.array(
        positions.astype(np.int32)), "attention_mask": pa.array(np.ones(len(ids), np.int8))}
    return Dataset(pa.table({k: pa.ListArray.from_arrays(offsets, v)
                             for k, v in features.items()}),
                   fingerprint=Hasher.hash((encoded._fingerprint, size, separate, "pack")))
