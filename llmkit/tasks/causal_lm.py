"""Causal language modelling: packed blocks of documents, or prompt/completion pairs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llmkit.config.schema import BadRows, DataConfig, setting
from llmkit.errors import LlmkitError
from llmkit.tasks.task import IGNORE, Task, capped, perplexity, sliced_losses

if TYPE_CHECKING:

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("llmkit")


SampleBy = Literal["document", "paragraph", "line"]  # how a .txt file splits into rows


@dataclass(frozen=True)
class CausalData(DataConfig):
    """Text packed into blocks, or prompt/completion pairs."""

    text_column: str = setting("text", "Column with the text (a .txt file's is 'text').")
    sample_by: SampleBy = setting("paragraph", "How a .txt file splits into documents: "
                                  "document (the whole file), paragraph (blank lines) or line.")
    block_size: int = setting(1024, "Tokens per packed block (clamped to the model's context).",
                              minimum=1)
    separate_documents: bool = setting(False, "Keep attention and positions inside each "
                                       "document of a block.")
    prompt_column: str | None = setting(None, "Prompt column of prompt/completion rows (no "
                                        "loss on prompts).")
    completion_column: str | None = setting(None, "Completion column of prompt/completion rows.")
    empty_rows: BadRows = setting("fail", "fail or skip rows with an empty completion, and "
                                  "conversations without an assistant turn.")
    messages_column: str | None = setting(None, "Column of conversations (lists of {role, "
                                          "content}); a 'messages' column is found by itself.")
    chat_template: str | None = setting(None, "Jinja chat template file (replaces the "
                                        "tokenizer's; saved with the run).")
    packing: bool = setting(True, "Conversations: place them whole into --block-size blocks; "
                            "off: one per row, batches padded.")
EXAMPLES = """\
llmkit finetune generate --model gpt2 --train corpus.txt --block-size 512 \\
    --output runs/gpt
llmkit finetune generate --model gpt2 --train pairs.jsonl \\
    --prompt-column prompt --completion-column completion --output runs/gpt-sft
llmkit finetune generate --model ./qwen --train chats.jsonl --lora --output runs/chat"""


def columns(data: CausalData, labelled: bool) -> list[str]:
    if data.messages_column:
        return [data.messages_column]
    if data.prompt_column or data.completion_column:
        if not (data.prompt_column and data.completion_column):
            raise LlmkitError("prompt/completion data needs both --prompt-column and "
                              "--completion-column")
        return [data.prompt_column, data.completion_column]
    return [data.text_column]


def clean(rows: Dataset, data: CausalData, labelled: bool) -> Dataset:
    from llmkit.data.read import check_text, empty_rows

    if data.messages_column:
        return rows  # each conversation is checked when it is encoded
    check_text(rows, columns(data, labelled))
    if data.completion_column:
        return empty_rows(rows, [data.completion_column], data.empty_rows, "completion")
    return rows  # empty documents (blank lines) hold nothing to learn: left out when packing


def detect(rows: Dataset, data: CausalData) -> CausalData:
    """Conversations in a 'messages' column, when no text, prompt or messages column is set
    and the text column is absent."""
    from dataclasses import replace

    if (data.messages_column or data.prompt_column or data.text_column in rows.column_names
            or "messages" not in rows.column_names):
        return data
    log.info("training on the conversations in column 'messages' (--messages-column)")
    return replace(data, messages_column="messages")


def model_kwargs(train: Dataset, valid: Dataset, data: CausalData) -> dict[str, Any]:
    from llmkit.tasks.chat import check_template_file

    check_template_file(data.chat_template)
    return {}


def prepare(model: Any, tokenizer: PreTrainedTokenizerBase, data: CausalData) -> None:
    """The chat template (saved with the tokenizer), and generation that stops at the end of an
    assistant turn (saved in generation_config.json, so pipeline() stops there too)."""
    from llmkit.tasks.chat import stop_at_turn_end, use_template

    use_template(tokenizer, data.chat_template, required=bool(data.messages_column))
    if data.messages_column:
        stop_at_turn_end(model, tokenizer)


def block_size(data: CausalData, config: PretrainedConfig) -> int:
    """The block size, clamped to the model's context."""
    return capped(data.block_size, "--block-size", config, data=data)


def pack(tokens: Dataset, size: int, eos: int, separate: bool) -> Dataset:
    """Documents (the `ids` column) joined with EOS and cut into full blocks; only the last
    partial block is dropped. With `separate`, position ids restart at every document (and
    block) start, which keeps attention inside documents (transformers reads packed sequences
    from them). Built as Arrow arrays from the tokenized Arrow column: 4 bytes a token, never a
    Python list per token."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    column = tokens.with_format("arrow")["ids"]
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64) + 1  # each with its EOS
    ends = np.cumsum(lengths)
    ids = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    at = 0
    for chunk in column.chunks:  # a cache file's record batches: small temporaries each
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        counts = pc.list_value_length(chunk).to_numpy()
        part = np.full(len(values) + len(counts), eos, dtype=np.int32)
        text = np.ones(len(part), dtype=bool)
        text[np.cumsum(counts + 1) - 1] = False
        part[text] = values
        ids[at:at + len(part)] = part
        at += len(part)
    blocks = len(ids) // size
    if blocks == 0:
        raise LlmkitError(f"the text holds {len(ids)} tokens: fewer than one block of "
                          f"{size}; lower --block-size")
    ids = ids[: blocks * size]
    block_ids = pa.FixedSizeListArray.from_arrays(  # over the numpy buffer, not a copy
        pa.Array.from_buffers(pa.int32(), len(ids), [None, pa.py_buffer(ids)]), size)
    features = {"input_ids": block_ids, "labels": block_ids}
    if separate:
        starts = np.zeros(len(ids) + size, dtype=bool)
        starts[np.concatenate([[0], ends[:-1]])] = True
        starts = starts[: len(ids)]
        starts[::size] = True
        index = np.arange(len(ids), dtype=np.int32)
        positions = index - np.maximum.accumulate(np.where(starts, index, 0))
        features["position_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(positions), size)
    from datasets.fingerprint import Hasher

    # a fingerprint of the inputs: without one datasets hashes every block (memory and time)
    return Dataset(pa.table(features), fingerprint=Hasher.hash(
        (tokens._fingerprint, size, eos, separate, "pack")))


def featurize(rows: Dataset, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
              data: CausalData) -> Dataset:
    """Documents packed into blocks, conversations, or prompt/completion pairs; each text
    ends with the tokenizer's end-of-sequence token."""
    if tokenizer.eos_token_id is None:
        raise LlmkitError("the tokenizer has no end-of-sequence token, which ends every document "
                          "and reply of a language model: give a causal model's tokenizer "
                          "(--tokenizer)")
    size = block_size(data, config)
    if data.messages_column:
        from llmkit.data.features import workers
        from llmkit.tasks.chat import conversations, one_per_row, pack_whole

        encoded = conversations(rows, data.messages_column, tokenizer, size,
                                data.empty_rows == "skip", workers(data))
        if data.packing:
            return pack_whole(encoded, size, data.separate_documents)
        return one_per_row(encoded)
    if data.prompt_column and data.completion_column:
        return pairs(rows, tokenizer, data, size)
    column = data.text_column

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:  # empty documents left out
        texts = [t for t in batch[column] if t and t.strip()]
        return {"ids": tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []}

    from datasets import Features, Sequence, Value

    from llmkit.data.features import fingerprint, workers

    tokens = rows.map(encode, batched=True, remove_columns=rows.column_names,
                      features=Features({"ids": Sequence(Value("int32"))}),
                      num_proc=workers(data), desc="tokenizing",
                      new_fingerprint=fingerprint(rows, tokenizer, "causal", column))
    if len(tokens) == 0:
        raise LlmkitError(f"no documents: every {data.text_column!r} row is empty after "
                          f"splitting the text by {data.sample_by} (--sample-by)")
    return pack(tokens, size, tokenizer.eos_token_id, data.separate_documents)


def pairs(rows: Dataset, tokenizer: PreTrainedTokenizerBase, data: CausalData, size: int
          ) -> Dataset:
    """Prompt + completion + EOS, truncated to the block size; the loss covers only the
    completion (and EOS). A block size that every prompt fills is refused."""
    prompt, completion = str(data.prompt_column), str(data.completion_column)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        prompts = tokenizer(batch[prompt], add_special_tokens=False)["input_ids"]
        completions = tokenizer(batch[completion], add_special_tokens=False)["input_ids"]
        ids, labels = [], []
        for p, c in zip(prompts, completions, strict=True):
            ids.append([*p, *c, tokenizer.eos_token_id][:size])
            labels.append(([IGNORE] * len(p) + [*c, tokenizer.eos_token_id])[:size])
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "labels": labels, "prompt_tokens": [len(p) for p in prompts]}

    encoded = rows.map(encode, batched=True, remove_columns=rows.column_names,
                       desc="tokenizing")
    check_room(encoded.with_format("arrow")["prompt_tokens"].to_numpy(), size)
    return encoded.remove_columns(["prompt_tokens"])


def check_room(prompts: np.ndarray, size: int) -> None:
    """Prompts of `prompts` tokens leave a completion token in a block of `size` tokens: in
    none is one line with what to set (the loss would be 0/0, a NaN); in some, a warning."""
    full = int((prompts >= size).sum())
    if full == len(prompts) and full:
        raise LlmkitError(f"--block-size {size} leaves no completion token in any row: the "
                          f"shortest prompt is {int(prompts.min())} tokens; set --block-size "
                          f"above {int(prompts.min())} (the longest prompt is "
                          f"{int(prompts.max())} tokens)")
    if full:
        log.warning("%d of %d rows have no completion token within --block-size %d: their "
                    "prompts fill it, and they teach nothing", full, len(prompts), size)


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    """Right padding (labels with -100) for pairs; packed blocks need none. No KV cache while
    training: it costs memory, and transformers skips packed-sequence masking when it is on."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, Any] = {}
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", IGNORE),
                          ("position_ids", 0)):
            if key in features[0]:
                batch[key] = torch.tensor([list(f[key]) + [fill] * (longest - len(f[key]))
                                           for f in features])
        batch["use_cache"] = False
        return batch

    return collate


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch
    import torch.nn.functional as F

    # position t is scored on token t+1: the labels move left rather than the logits, which
    # stay one contiguous [batch, length, vocab] tensor (no copy); without `labels` the model
    # does not compute a mean loss of its own. Rows go through in slices whose logits fit
    # LOGITS_BUDGET.
    following = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return sliced_losses(lambda rows: model(**{k: v[rows] if isinstance(v, torch.Tensor) else v
                                               for k, v in inputs.items()}).logits,
                         following, model.config)


def score(gathered: dict[str, np.ndarray], features: Dataset, data: CausalData,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return perplexity(gathered)


def present(gathered: dict[str, np.ndarray], features: Dataset, data: CausalData,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    raise LlmkitError("a language model has no labels to predict: use llmkit generate")
GENERATE = Task(
    name="generate",
    summary="causal language modelling with a decoder (GPT-2 style)",
    settings=CausalData,
    examples=EXAMPLES,
    auto_model="AutoModelForCausalLM",
    metrics=("perplexity",),
    columns=columns,
    model_kwargs=model_kwargs,
    featurize=featurize,
    collator=collator,
    eval_step=eval_step,
    score=score,
    present=present,
    prepare=prepare,
    clean=clean,
    detect=detect,
)
