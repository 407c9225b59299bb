"""Extractive question answering (SQuAD 1.1 and 2.0): overlapping windows over long contexts,
answer spans from the fast tokenizer's offsets, best span across windows, official metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config.schema import BadRows, DataConfig, setting
from llmkit.errors import LlmkitError
from llmkit.scoring import metrics
from llmkit.tasks.task import Task, capped, warn_once

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("llmkit")
CANDIDATES = 20  # start and end candidates kept per window (the most --n-best can use)
BROKEN_TOKENIZERS = ("0.23.1", "0.23.2")  # huggingface/tokenizers#2091: no overflow windows
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions",
              "end_positions")


@dataclass(frozen=True)
class QAData(DataConfig):
    """Columns, windows over long contexts, and how answers are picked."""

    question_column: str = setting("question", "Column with the question.")
    context_column: str = setting("context", "Column with the context.")
    answers_column: str = setting("answers", "Column with the answers ({text: [...], "
                                  "answer_start: [...]}).")
    max_length: int = setting(256, "Tokens per window of question + context.", minimum=1)
    doc_stride: int = setting(128, "Tokens shared by neighbouring windows of a long context.",
                              minimum=1)
    version_2: bool | None = setting(None, "Unanswerable questions (SQuAD 2.0); detected from "
                                     "the data when not given.")
    n_best: int = setting(20, "Start and end candidates per window.", minimum=1,
                          maximum=CANDIDATES)
    max_answer_length: int = setting(30, "Longest answer, in tokens.", minimum=1)
    null_threshold: float = setting(0.0, "SQuAD 2.0: answer empty when the null score beats "
                                    "the best span by more than this.")
    bad_answers: BadRows = setting("fail", "fail or skip examples whose answer is not at "
                                   "answer_start.")


EXAMPLES = """\
llmkit finetune qa --model bert-base-uncased --train train-v2.0.json \\
    --validation dev-v2.0.json --max-length 384 --doc-stride 128 \\
    --output runs/squad2
llmkit finetune qa --recipe qa-squad --output runs/squad"""


def columns(data: QAData, labelled: bool) -> list[str]:
    return [data.question_column, data.context_column] + ([data.answers_column] if labelled else [])


def clean(rows: Dataset, data: QAData, labelled: bool) -> Dataset:
    from llmkit.data.read import check_text

    check_text(rows, [data.question_column, data.context_column])
    return rows  # answers are checked against the contexts when featurized (bad_answers)


def model_kwargs(train: Dataset, valid: Dataset, data: QAData) -> dict[str, Any]:
    """Whether the run answers SQuAD 2.0 style (empty answers allowed), saved in config.json
    so that prediction with the run directory knows it."""
    if data.version_2 is not None:
        return {"squad_v2": data.version_2}
    return {"squad_v2": any(not a["text"] for a in train[data.answers_column])}


def check_answers(rows: Dataset, data: QAData) -> Dataset:
    """Answers must occur at their answer_start; v2 data (empty answers) needs version_2."""
    a = data.answers_column
    no_context = sum(1 for c in rows[data.context_column] if not (c and c.strip()))
    if no_context:
        raise LlmkitError(f"{no_context} questions have an empty {data.context_column!r}")
    wrong = [i for i, (context, answers) in enumerate(zip(rows[data.context_column], rows[a],
                                                          strict=True))
             if any(context[s:s + len(t)] != t for t, s in zip(answers["text"],
                                                               answers["answer_start"],
                                                               strict=True))]
    if wrong and data.bad_answers == "fail":
        raise LlmkitError(f"{len(wrong)} of {len(rows)} examples have answer text that does not "
                          f"occur at answer_start in the context (first: row {wrong[0]}); fix "
                          "the data or pass -s data.bad_answers=skip to leave them out")
    if wrong:
        log.warning("leaving out %d of %d examples whose answer text is not at answer_start",
                    len(wrong), len(rows))
        rows = rows.select(sorted(set(range(len(rows))) - set(wrong)))
    unanswerable = sum(1 for answers in rows[a] if not answers["text"])
    if unanswerable and data.version_2 is False:
        raise LlmkitError(f"{unanswerable} questions have no answer (SQuAD 2.0 data) but "
                          "data.version_2 is false")
    return rows


def check_tokenizers() -> None:
    """tokenizers 0.23.1 and 0.23.2 stop tokenizing at max_length, so a long context yields one
    or two windows instead of all of them: most of the text would be silently left out."""
    import tokenizers

    if tokenizers.__version__ in BROKEN_TOKENIZERS:
        raise LlmkitError(f"tokenizers {tokenizers.__version__} drops the windows of long "
                          "contexts (huggingface/tokenizers#2091); install a fixed version: "
                          "pip install -U 'tokenizers!=0.23.1,!=0.23.2'")


def featurize(rows: Dataset, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
              data: QAData) -> Dataset:
    """Windows of question + context. Labelled rows get start/end positions (the CLS token
    when the answer is not inside the window) and keep what scoring needs."""
    if not getattr(tokenizer, "is_fast", False):
        raise LlmkitError("question answering needs a fast tokenizer (its offsets locate the "
                          "answers); this checkpoint only has a slow one")
    check_tokenizers()
    longest, stride = window(data, config, tokenizer)
    labelled = data.answers_column in rows.column_names
    if labelled:
        rows = check_answers(rows, data)
    pad_right = tokenizer.padding_side == "right"

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        questions = [q.lstrip() for q in batch[data.question_column]]
        enc = tokenizer(questions if pad_right else batch[data.context_column],
                        batch[data.context_column] if pad_right else questions,
                        truncation="only_second" if pad_right else "only_first",
                        max_length=longest, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        source = enc.pop("overflow_to_sample_mapping")
        context_side = 1 if pad_right else 0
        starts, ends, offsets = [], [], []
        for w, row in enumerate(source):
            sequence = enc.sequence_ids(w)
            offsets.append([o if sequence[k] == context_side else (-1, -1)
                            for k, o in enumerate(enc["offset_mapping"][w])])
            if labelled:
                s, e = locate(batch[data.answers_column][row], offsets[-1])
                starts.append(s)
                ends.append(e)
        features = {k: v for k, v in enc.items() if k != "offset_mapping"}
        features["offsets"] = offsets
        features["example_id"] = [str(batch["id"][r]) if "id" in batch else str(r)
                                  for r in source]
        features["context"] = [batch[data.context_column][r] for r in source]
        if labelled:
            features |= {"start_positions": starts, "end_positions": ends,
                         "gold": [batch[data.answers_column][r]["text"] for r in source]}
        return features

    if "id" not in rows.column_names:
        rows = rows.add_column("id", [str(i) for i in range(len(rows))])
    from llmkit.data.features import workers

    return rows.map(encode, batched=True, remove_columns=rows.column_names,
                    num_proc=workers(data), desc="tokenizing")


def window(data: QAData, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
           ) -> tuple[int, int]:
    """Tokens per window and the overlap of consecutive windows, within the model's context."""
    longest = capped(data.max_length, "--max-length", config, tokenizer, data)
    stride = data.doc_stride
    if stride >= longest and longest < data.max_length:  # the context is shorter than asked
        stride = longest // 2
        warn_once(config, "--doc-stride %d does not fit the model's context: using %d",
                  data.doc_stride, stride)
    if stride >= longest:
        raise LlmkitError(f"data.doc_stride ({stride}) must be smaller than "
                          f"data.max_length ({longest})")
    return longest, stride


def locate(answers: dict[str, list[Any]], offsets: list[Any]) -> tuple[int, int]:
    """Token start/end of the first answer inside this window; (0, 0), the CLS token, when
    there is no answer or it is not wholly inside."""
    if not answers["text"]:
        return 0, 0
    first = answers["answer_start"][0]
    last = first + len(answers["text"][0])
    inside = [k for k, (a, b) in enumerate(offsets) if a >= 0 and b > a]
    if not inside or offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
        return 0, 0
    start = next(k for k in inside if offsets[k][1] > first)
    end = next(k for k in reversed(inside) if offsets[k][0] < last)
    return start, end


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer)
    return lambda features: pad([{k: f[k] for k in MODEL_KEYS if k in f} for f in features])


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Top start and end candidates per window (fixed width, so batches of any length gather),
    the null score, and the loss when positions are given."""
    import torch
    import torch.nn.functional as F

    outputs = model(**batch)
    mask = batch["attention_mask"].bool()
    start = outputs.start_logits.float().masked_fill(~mask, -1e4)
    end = outputs.end_logits.float().masked_fill(~mask, -1e4)
    k = min(CANDIDATES, start.shape[1])
    width = CANDIDATES - k
    gathered = {}
    for name, logits in (("start", start), ("end", end)):
        values, index = logits.topk(k, dim=-1)
        gathered[f"{name}_values"] = F.pad(values, (0, width), value=-1e4)
        gathered[f"{name}_index"] = F.pad(index, (0, width), value=0)
    gathered["null"] = start[:, 0] + end[:, 0]
    if "start_positions" in batch:
        loss = (F.cross_entropy(start, batch["start_positions"], reduction="none")
                + F.cross_entropy(end, batch["end_positions"], reduction="none")) / 2
        gathered |= {"loss_sum": loss, "loss_count": torch.ones_like(loss)}
    return gathered


def answers(gathered: dict[str, np.ndarray], features: Dataset, data: QAData,
            version_2: bool) -> dict[str, str]:
    """Example id -> answer text: the best valid span across all its windows; for SQuAD 2.0
    the empty answer when the best null score beats it by more than data.null_threshold."""
    return {example: span["answer"] for example, span in
            spans(gathered, features, data, version_2).items()}


def spans(gathered: dict[str, np.ndarray], features: Dataset, data: QAData,
          version_2: bool) -> dict[str, dict[str, Any]]:
    """Example id -> the answer `answers` gives, its score (start + end logit; the empty answer's
    is the null score) and its character offsets in the context (-1, -1 when empty)."""
    best: dict[str, tuple[float, int, int]] = {}  # score, first and last character + 1
    null: dict[str, float] = {}
    contexts: dict[str, str] = {}
    for w, (example, context, offsets) in enumerate(zip(
            features["example_id"], features["context"], features["offsets"], strict=True)):
        null[example] = min(null.get(example, float("inf")), float(gathered["null"][w]))
        best.setdefault(example, (-float("inf"), -1, -1))
        contexts[example] = context
        for i in range(data.n_best):
            s, s_val = int(gathered["start_index"][w][i]), float(gathered["start_values"][w][i])
            for j in range(data.n_best):
                e, e_val = int(gathered["end_index"][w][j]), float(gathered["end_values"][w][j])
                if (s >= len(offsets) or e >= len(offsets) or offsets[s][0] < 0
                        or offsets[e][0] < 0 or e < s or e - s + 1 > data.max_answer_length):
                    continue
                if s_val + e_val > best[example][0]:
                    best[example] = (s_val + e_val, offsets[s][0], offsets[e][1])
    found = {}
    for example, (score, start, end) in best.items():
        empty = start < 0 or version_2 and null[example] - score > data.null_threshold
        found[example] = ({"answer": "", "score": null[example], "start": -1, "end": -1}
                          if empty else {"answer": contexts[example][start:end],
                                         "score": score, "start": start, "end": end})
    return found


def score(gathered: dict[str, np.ndarray], features: Dataset, data: QAData,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    golds = dict(zip(features["example_id"], features["gold"], strict=True))
    version_2 = data.version_2 if data.version_2 is not None else any(not g for g in
                                                                   golds.values())
    predicted = answers(gathered, features, data, version_2)
    # the loop writes the predictions of the best evaluation as predictions.json
    return {**metrics.squad(predicted, golds, version_2), "predictions": predicted}


def present(gathered: dict[str, np.ndarray], features: Dataset, data: QAData,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, scored: bool = False
            ) -> list[dict[str, Any]]:
    """Each example's answer; with `scored`, its score and offsets too (`spans`)."""
    version_2 = data.version_2 if data.version_2 is not None else getattr(config, "squad_v2",
                                                                       False)
    found = spans(gathered, features, data, bool(version_2))
    return [{"id": example, **(span if scored else {"answer": span["answer"]})}
            for example, span in found.items()]


QA = Task(
    name="qa",
    summary="extractive question answering (SQuAD 1.1 and 2.0) with an encoder",
    settings=QAData,
    examples=EXAMPLES,
    auto_model="AutoModelForQuestionAnswering",
    metrics=("f1", "exact_match", "exact", "HasAns_exact", "HasAns_f1",
             "NoAns_exact", "NoAns_f1"),
    columns=columns,
    model_kwargs=model_kwargs,
    featurize=featurize,
    collator=collator,
    eval_step=eval_step,
    score=score,
    present=present,
    clean=clean,
)
