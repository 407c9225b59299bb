"""Reward models as TRL's RewardTrainer trains them: a one-output head scores each whole sequence;
a pair's loss is -log sigmoid(r_chosen - r_rejected - margin) + center_rewards_coefficient *
(r_chosen + r_rejected)^2. TRL's three pair formats (pairs.py), each side tokenized as TRL does."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmkit.config.schema import setting
from llmkit.errors import LlmkitError
from llmkit.tasks import pairs
from llmkit.tasks.task import Task, capped

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
Frame = tuple[int, int, bool]  # special tokens before and after a text; an EOS is appended
PAIR_KEYS = ("input_ids", "rejected_ids", "margin", "bad", "same", "cuts")


@dataclass(frozen=True)
class RewardData(pairs.PairData):
    """Preference pairs, the reward loss, and the texts `llmkit predict` scores."""

    max_prompt_length: int | None = setting(
        None, "A pair longer than --max-length keeps the last N tokens of its prompt (the start "
        "both replies share; default: half of --max-length), then its replies are cut at their "
        "end (counted in the log).", minimum=1)
    margin_column: str | None = setting(None, "Column of numbers the chosen score must beat "
                                        "the rejected one by (TRL's margin).")
    center_rewards_coefficient: float = setting(
        0.0, "Weight of the pairs' mean squared score sum in the loss, which keeps scores near "
        "0 (TRL's; its docs suggest 0.01); 0 = off.", minimum=0.0)
    text_column: str = setting("text", "llmkit predict: the column to score, text (scored as "
                               "prompt + reply) or conversations (lists of messages).")


EXAMPLES = """\
llmkit finetune reward --model bert-base-uncased --train pairs.jsonl --output runs/rm
llmkit finetune reward --model ./qwen --train chats.jsonl --lora --output runs/rm-lora"""


def columns(data: RewardData, labelled: bool) -> list[str]:
    if not labelled:
        return [data.text_column]
    return pairs.columns(data, True) + ([data.margin_column] if data.margin_column else [])


def clean(rows: Dataset, data: RewardData, labelled: bool) -> Dataset:
    """Pairs as pairs.clean checks them, with numbers as margins; rows to score hold text (every
    row: each gets a score, in order) or conversations (checked as they are encoded)."""
    from llmkit.data.read import check_text

    column = data.margin_column if labelled else data.text_column
    if labelled:
        rows = pairs.clean(rows, data, True)
    elif not (len(rows) and pairs.is_conversation(rows[0][column])):
        check_text(rows, [data.text_column])
    kind = str(getattr(rows.features[column], "dtype", "other")) if column else ""
    if labelled and column and not kind.startswith(("int", "uint", "float", "double")):
        raise LlmkitError(f"column {column!r} holds {kind} values, not numbers (first row: "
                          f"{str(rows[0][column])[:60]!r}); margins are numbers")
    missing = [i for i, v in enumerate(rows[column]) if v is None] if column else []
    if missing:
        raise LlmkitError(f"{len(missing)} of {len(rows)} rows have no {column!r} value "
                          f"(first: row {missing[0]}); fill them in or remove them")
    return rows


def model_kwargs(train: Dataset, valid: Dataset, data: RewardData) -> dict[str, Any]:
    """One output, a regression score (pipeline("text-classification") gives it raw)."""
    from llmkit.tasks.chat import check_template_file

    check_template_file(data.chat_template)
    return {"num_labels": 1, "problem_type": "regression"}


def prepare(model: Any, tokenizer: PreTrainedTokenizerBase, data: RewardData) -> None:
    from llmkit.tasks.chat import use_template

    use_template(tokenizer, data.chat_template, required=False)


def frame_of(tokenizer: PreTrainedTokenizerBase) -> Frame:
    """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP], a BOS),
    and whether an EOS goes after it as TRL appends one (not where the tokenizer puts one)."""
    probe = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    head = next((i for i in range(len(probe)) if probe[i:i + len(bare)] == bare), 0)
    tail = probe[head + len(bare):]
    appended = tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in tail
    return head, len(tail) + int(appended), appended


def sequence(tokenizer: PreTrainedTokenizerBase, frame: Frame, text: Any, row: int) -> list[int]:
    """One side as TRL's RewardTrainer tokenizes it: text with the special tokens and the EOS,
    a conversation as the chat template renders it."""
    from llmkit.tasks.chat import check, render

    if pairs.is_conversation(text):
        check(text, row)
        return list(tokenizer(render(tokenizer, text), add_special_tokens=False)["input_ids"])
    eos = str(tokenizer.eos_token)
    return list(tokenizer(text + eos if frame[2] and not text.endswith(eos) else text)
                ["input_ids"])


def fit(chosen: list[int], rejected: list[int], frame: Frame, data: RewardData
        ) -> tuple[list[int], list[int], int]:
    """A pair within --max-length: over it, the start both share (after the leading special
    tokens) keeps its last --max-prompt-length tokens, then a side still over loses the end of
    its reply (not the closing special tokens); and the cuts (pairs.usable's bits)."""
    if max(len(chosen), len(rejected)) <= data.max_length:
        return chosen, rejected, 0
    head, tail, _ = frame
    shared = min(pairs.common_prefix(chosen, rejected), len(chosen) - tail,
                 len(rejected) - tail)
    drop = max(0, shared - head - pairs.prompt_limit(data))
    cuts, out = int(drop > 0), []
    for ids in (chosen, rejected):
        ids = ids[:head] + ids[head + drop:]
        if len(ids) > data.max_length:
            cuts |= 2
            ids = ids[:data.max_length - tail] + ids[len(ids) - tail:]
        out.append(ids)
    return out[0], out[1], cuts


def pair(tokenizer: PreTrainedTokenizerBase, data: RewardData, frame: Frame, row: int,
         prompt: Any, chosen: Any, rejected: Any, margin: float) -> tuple[Any, ...]:
    """A pair's PAIR_KEYS: its two sequences (cut to fit), margin, and flags for pairs.usable."""
    same = chosen == rejected
    if prompt is None and not same and None not in (chosen, rejected):
        prompt, chosen, rejected = pairs.shared_start(chosen, rejected)
    bad = not same and any(v is None or pairs.empty(v) for v in (chosen, rejected))
    if bad or same:
        return [], [], float(margin), bad, same, 0
    if pairs.is_conversation(chosen):
        p, c, r = pairs.conversation_ids(tokenizer, prompt or [], chosen, rejected, row)
        c, r = [*p, *c], [*p, *r]
    else:
        c, r = (sequence(tokenizer, frame, (prompt or "") + reply, row)
                for reply in (chosen, rejected))
    c, r, cuts = fit(c, r, frame, data)
    return c, r, float(margin), bad, same, cuts


def text(tokenizer: PreTrainedTokenizerBase, data: RewardData, frame: Frame, row: int,
         value: Any) -> tuple[list[int], bool]:
    """A row to score; over --max-length it keeps its leading special tokens and its end (the
    reply), and says it was cut."""
    ids = sequence(tokenizer, frame, value, row)
    if len(ids) <= data.max_length:
        return ids, False
    return ids[:frame[0]] + ids[len(ids) - data.max_length + frame[0]:], True


def featurize(rows: Dataset, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
              data: RewardData) -> Dataset:
    """Pairs (rows with the chosen and rejected columns) as `input_ids` (prompt + chosen),
    `rejected_ids`, `margin` and, when on, `center`; else rows to score as `input_ids`."""
    from datasets import Features, Sequence, Value

    from llmkit.data.features import fingerprint, workers
    from llmkit.tasks.chat import file_rows, use_template

    data = replace(data, max_length=capped(data.max_length, "--max-length", config, tokenizer,
                                           data))
    paired = {data.chosen_column, data.rejected_column} <= set(rows.column_names)
    names = ([data.prompt_column, data.chosen_column, data.rejected_column, data.margin_column]
             if paired else [data.text_column])
    frame: Frame = (0, 0, False)
    if len(rows) and pairs.is_conversation(rows[0][names[1 if paired else 0]]):
        use_template(tokenizer, None, required=True)
    else:
        frame = frame_of(tokenizer)
    keys, one = (PAIR_KEYS, pair) if paired else (("input_ids", "cuts"), text)

    numbers = file_rows(rows)  # errors name the file's row, not the shuffled split's

    def encode_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        given = [batch[c] if c else [(None, None, None, 0.0)[i]] * len(indices)
                 for i, c in enumerate(names)]  # no prompt column: implicit; no margins: 0
        found = [one(tokenizer, data, frame, int(numbers[row]), *values)
                 for row, values in zip(indices, zip(*given, strict=True), strict=True)]
        return {k: list(v) for k, v in zip(keys, zip(*found, strict=True), strict=True)}

    tokens = Sequence(Value("int32"))
    types = {"input_ids": tokens, "rejected_ids": tokens, "margin": Value("float32"),
             "bad": Value("bool"), "same": Value("bool"), "cuts": Value("int8")}
    encoded = rows.map(encode_batch, batched=True, with_indices=True, num_proc=workers(data),
                       remove_columns=rows.column_names, desc="tokenizing",
                       features=Features({k: types[k] for k in keys}),
                       new_fingerprint=fingerprint(rows, tokenizer, "reward", names,
                                                   data.max_length, pairs.prompt_limit(data),
                                                   str(tokenizer.chat_template)))
    return kept(encoded, data, paired)


def kept(encoded: Dataset, data: RewardData, paired: bool) -> Dataset:
    """Pairs as pairs.usable keeps them, with their centring weight; rows to score, all."""
    if paired:
        encoded = pairs.usable(encoded, data)
        weight = data.center_rewards_coefficient
        return encoded.add_column("center", [weight] * len(encoded)) if weight else encoded
    if cut := int(sum(encoded["cuts"])):
        log.warning("%d of %d rows are longer than --max-length %d tokens: they keep their "
                    "end", cut, len(encoded), data.max_length)
    return encoded.remove_columns(["cuts"])


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    """Rows right-padded; pairs as TRL's DataCollatorForPreference puts them (the chosen rows,
    then the rejected), with each pair's `margin` (and `center`)."""
    import torch

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [f["input_ids"] for f in features] + [f["rejected_ids"] for f in features
                                                     if "rejected_ids" in f]
        batch = dict(tokenizer.pad({"input_ids": rows}, padding_side="right",
                                   return_tensors="pt"))
        for key in ("margin", "center"):
            if key in features[0]:
                batch[key] = torch.tensor([float(f[key]) for f in features])
        return batch

    return collate


def scores(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits.squeeze(-1).float()


def pair_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each pair's loss (their mean is TRL's loss), and the chosen and rejected scores."""
    import torch.nn.functional as F

    chosen, rejected = scores(model, batch).chunk(2)
    loss = -F.logsigmoid(chosen - rejected - batch["margin"])
    if "center" in batch:
        loss = loss + batch["center"] * (chosen + rejected) ** 2
    return loss, chosen, rejected


def figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's figures of pairs: accuracy (the share whose chosen reply scores above the rejected
    one), mean margin, and the scores' mean, least and greatest."""
    import torch

    joined = torch.cat([chosen, rejected])
    return {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean(),
            "mean_reward": joined.mean(), "min_reward": joined.min(), "max_reward": joined.max()}


def objective(model: Any, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of a batch of pairs (their mean), and TRL's figures of it."""
    loss, chosen, rejected = pair_losses(model, batch)
    return loss.mean(), figures(chosen.detach(), rejected.detach())


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    if "margin" not in batch:  # rows to score
        return {"score": scores(model, batch)}
    loss, chosen, rejected = pair_losses(model, batch)
    return {"loss_sum": loss, "loss_count": torch.ones_like(loss), "chosen": chosen,
            "rejected": rejected}


def score(gathered: dict[str, np.ndarray], features: Dataset, data: RewardData,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Accuracy, mean margin and mean score over every pair (TRL's are means of batch means)."""
    import torch

    found = figures(torch.from_numpy(gathered["chosen"]), torch.from_numpy(gathered["rejected"]))
    return {k: float(found[k]) for k in ("accuracy", "margin", "mean_reward")}


def present(gathered: dict[str, np.ndarray], features: Dataset, data: RewardData,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    return [{"score": round(float(s), 6)} for s in gathered["score"]]


REWARD = Task(
    name="reward",
    summary="a reward model: one score per text, learned from preference pairs",
    settings=RewardData, examples=EXAMPLES, auto_model="AutoModelForSequenceClassification",
    metrics=("accuracy", "margin"), columns=columns, model_kwargs=model_kwargs,
    featurize=featurize, collator=collator, eval_step=eval_step, score=score, present=present,
    prepare=prepare, clean=clean, detect=pairs.detect, loss=objective, rows_per_sample=2,
    dropout=False)
