"""Sequence to sequence (Marian, T5, BART, mBART): translation and summarization are one task
reading different columns, evaluated by generating and scoring with sacrebleu or rouge-score."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.scoring.metrics import rouge_scores, sacrebleu_score
from llmkit.tasks.seq2seq_settings import (
    Kind,
    Seq2SeqData,
    SummarizeData,
    TranslateData,
    detect,
    source_prefix,
)
from llmkit.tasks.task import IGNORE, Task, capped, perplexity, sliced_losses

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger("llmkit")


MODEL_KEYS = ("input_ids", "attention_mask", "labels")
TRANSLATE_EXAMPLES = """\
llmkit finetune translate --model Helsinki-NLP/opus-mt-en-ro \\
    --train wmt16 --dataset-config ro-en --source-lang en --target-lang ro \\
    --output runs/en-ro
llmkit finetune translate --model ./marian --train pairs.jsonl \\
    --source-lang en --target-lang es --num-beams 4 --output runs/en-es"""
SUMMARIZE_EXAMPLES = """\
llmkit finetune summarize --model t5-small --train xsum \\
    --text-column document --summary-column summary --max-eval-samples 500 \\
    --output runs/xsum"""


def clean(kind: Kind, rows: Dataset, data: Any, labelled: bool) -> Dataset:
    from llmkit.data.read import check_text

    if kind == "summarize" or not data.translation_column:  # {lang: text} pairs are checked
        check_text(rows, columns(kind, data, labelled))    # when their texts are taken
    return rows  # empty sources and targets: see featurize (empty_rows)


def columns(kind: Kind, data: Any, labelled: bool) -> list[str]:
    if kind == "summarize":
        return [data.text_column] + ([data.summary_column] if labelled else [])
    if not (data.source_lang and data.target_lang):
        raise LlmkitError("translate needs --source-lang and --target-lang (the language keys "
                          "of the data, e.g. en and ro)")
    if data.translation_column:
        return [data.translation_column]
    return [data.source_lang] + ([data.target_lang] if labelled else [])


def model_kwargs(train: Dataset, valid: Dataset, data: Any) -> dict[str, Any]:
    return {}



def prepare(kind: Kind, model: Any, tokenizer: PreTrainedTokenizerBase, data: Any) -> None:
    """Language codes for multilingual tokenizers, and the generation settings of evaluation
    (saved with the run as generation_config.json)."""
    generation = model.generation_config
    if kind == "translate" and hasattr(tokenizer, "src_lang"):  # mBART, NLLB, M2M100
        tokenizer.src_lang, tokenizer.tgt_lang = data.source_lang, data.target_lang
        target = tokenizer.convert_tokens_to_ids(str(data.target_lang))
        if target is not None and target != tokenizer.unk_token_id:
            generation.forced_bos_token_id = target
    generation.max_new_tokens = capped(data.max_new_tokens or data.max_target_length,
                                       "--max-new-tokens", model.config, tokenizer)
    generation.max_length = None
    if data.num_beams:
        generation.num_beams = data.num_beams
    prefix = source_prefix(kind, data, model.config)
    if prefix and data.source_prefix is None:
        log.info("%s checkpoint: sources get the prefix %r (set --source-prefix to change it)",
                 model.config.model_type, prefix)


def language_key(lang: str, present: list[str], side: str) -> str:
    """The data key of a language: the code itself, or its part before '_' (en_XX -> en)."""
    for key in (lang, lang.split("_")[0]):
        if key in present:
            return key
    raise LlmkitError(f"--{side}-lang {lang} is not in the data; the languages there are "
                      f"{', '.join(sorted(present)) or 'none'}")


def picker(kind: Kind, rows: Dataset, data: Any
           ) -> tuple[Callable[[dict[str, list[Any]]], tuple[list[str], list[str] | None]], bool]:
    """Where a batch's source and (when the rows have them) target texts are, and whether
    they have them: columns, or the language keys of {lang: text} pairs."""
    names = rows.column_names
    if kind == "summarize":
        text, summary = data.text_column, data.summary_column
        return lambda b: (b[text], b[summary] if summary in b else None), summary in names
    if not data.translation_column:
        source_lang, target_lang = data.source_lang, data.target_lang
        return (lambda b: (b[source_lang], b[target_lang] if target_lang in b else None),
                target_lang in names)
    column = data.translation_column
    pairs = rows.select(range(min(1000, len(rows))))[column]
    present = sorted({key for pair in pairs for key in pair if pair[key] is not None})
    source = language_key(str(data.source_lang), present, "source")
    try:
        target: str | None = language_key(str(data.target_lang), present, "target")
    except LlmkitError:
        if len(present) > 1:
            raise
        target = None  # unlabelled rows: source texts only
    # a pair without one of the languages counts as an empty text (data.empty_rows decides)
    return (lambda b: ([p.get(source) for p in b[column]],
                       [p.get(target) for p in b[column]] if target else None)), \
        target is not None


def encode(texts: list[str], tokenizer: PreTrainedTokenizerBase, limit: int, target: bool
           ) -> tuple[list[list[int]], list[bool]]:
    """Token ids truncated to `limit` (special tokens kept), and which were cut."""
    if not texts:  # a batch of empty rows only
        return [], []
    key = "text_target" if target else "text"
    ids = tokenizer(**{key: texts})["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long:
        cut = tokenizer(**{key: [texts[i] for i in long]}, truncation=True,
                        max_length=limit)["input_ids"]
        for i, row in zip(long, cut, strict=True):
            ids[i] = row
    cut = set(long)
    return ids, [i in cut for i in range(len(texts))]


def featurize(kind: Kind, rows: Dataset, tokenizer: PreTrainedTokenizerBase,
              config: PretrainedConfig, data: Any) -> Dataset:
    """Source ids (prefixed for T5) and label ids; labelled rows keep the reference text and
    every feature its row number, for scoring and for writing predictions in row order. In
    datasets' Arrow cache (int32), so a rerun or --resume reads them back."""
    from datasets import Features, Sequence, Value

    from llmkit.data.features import fingerprint, workers

    pick, labelled = picker(kind, rows, data)
    prefix = source_prefix(kind, data, config)
    longest = capped(data.max_length, "--max-length", config, tokenizer)
    limit = capped(data.max_target_length, "--max-target-length", config, tokenizer)
    ids = Sequence(Value("int32"))
    schema = {"input_ids": ids, "attention_mask": Sequence(Value("int8")), "row": Value("int64"),
              "cut_source": Value("bool")}
    if labelled:
        schema |= {"labels": ids, "reference": Value("string"), "cut_target": Value("bool")}

    def encode_batch(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, Any]:
        sources, targets = pick(batch)
        keep = [i for i, s in enumerate(sources) if s and s.strip()
                and (targets is None or (targets[i] and targets[i].strip()))]
        encoded, cut = encode([prefix + sources[i] for i in keep], tokenizer, longest, False)
        out: dict[str, Any] = {"input_ids": encoded, "attention_mask": [[1] * len(r) for r in
                                                                        encoded],
                               "row": [indices[i] for i in keep], "cut_source": cut}
        if labelled and targets is not None:
            out["reference"] = [targets[i] for i in keep]
            out["labels"], out["cut_target"] = encode(out["reference"], tokenizer, limit, True)
        return out

    settings = (kind, prefix, longest, limit, labelled, getattr(tokenizer, "src_lang", None),
                getattr(tokenizer, "tgt_lang", None), columns(kind, data, labelled))
    features = rows.map(encode_batch, batched=True, with_indices=True,
                        remove_columns=rows.column_names, features=Features(schema),
                        num_proc=workers(data), desc="tokenizing",
                        new_fingerprint=fingerprint(rows, tokenizer, "seq2seq", *settings))
    report(features, rows, data, longest, limit)
    return features.remove_columns([c for c in ("cut_source", "cut_target")
                                    if c in features.column_names])


def report(features: Dataset, rows: Dataset, data: Any, longest: int, limit: int) -> None:
    """Rows left out as empty (refused unless empty_rows is skip, with the first of them) and
    truncation, in the log."""
    import pyarrow.compute as pc

    total = len(rows)
    empty = total - len(features)
    if empty:
        if data.empty_rows == "fail" or not len(features):
            first = min(set(range(total)) - set(features["row"]))
            raise LlmkitError(f"{empty} of {total} rows have an empty source or target; "
                              "fix the data or pass -s data.empty_rows=skip to leave them out "
                              f"(first: {str(rows[first])[:100]})")
        log.warning("leaving out %d of %d rows with an empty source or target", empty, total)
    for column, what, cap, option in (("cut_source", "sources", longest, "--max-length"),
                                      ("cut_target", "targets", limit, "--max-target-length")):
        cut = (pc.sum(features.with_format("arrow")[column]).as_py() or 0
               if column in features.column_names else 0)
        if cut:
            log.info("%d of %d %s are longer than %s %d tokens: truncated", cut, len(features),
                     what, option, cap)


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The stock seq2seq collator: dynamic padding, labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    return lambda features: pad([{k: f[k] for k in MODEL_KEYS if k in f} for f in features])


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example loss (teacher forcing) when labelled, and generated ids padded to a fixed
    width (max_new_tokens + the decoder start), generated with the KV cache."""
    import torch.nn.functional as F

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # the encoder runs once; the loss and generate both read its outputs
    encoded = model.get_encoder()(**inputs)
    gathered: dict[str, torch.Tensor] = {}
    if "labels" in batch:
        # decoder inputs rather than labels: the model would compute a mean loss of its own.
        # Rows go through in slices whose logits fit LOGITS_BUDGET.
        labels = batch["labels"]
        shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        teacher = {"decoder_input_ids": shift(labels=labels)} if shift else {"labels": labels}
        gathered = sliced_losses(
            lambda rows: model(attention_mask=inputs["attention_mask"][rows],
                               encoder_outputs=type(encoded)(
                                   last_hidden_state=encoded.last_hidden_state[rows]),
                               **{k: v[rows] for k, v in teacher.items()}).logits,
            labels, model.config)
    generation = model.generation_config
    ids = model.generate(**inputs, encoder_outputs=encoded, generation_config=generation,
                         use_cache=True)
    width = generation.max_new_tokens + 1
    pad = generation.pad_token_id if generation.pad_token_id is not None \
        else model.config.pad_token_id
    gathered["generated"] = F.pad(ids[:, :width], (0, max(0, width - ids.shape[1])), value=pad)
    return gathered


def decode(gathered: dict[str, np.ndarray], features: Dataset,
           tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[int]]:
    """Generated texts and their row numbers, in row order."""
    texts = [t.strip() for t in tokenizer.batch_decode(gathered["generated"].tolist(),
                                                        skip_special_tokens=True)]
    rows = features["row"]
    order = sorted(range(len(texts)), key=rows.__getitem__)
    return [texts[i] for i in order], [rows[i] for i in order]


def score(kind: Kind, gathered: dict[str, np.ndarray], features: Dataset, data: Any,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """BLEU and chrF (sacrebleu, corpus level, its defaults) or ROUGE (rouge-score), on the
    full reference texts; perplexity of the references; predictions in row order."""
    predictions, rows = decode(gathered, features, tokenizer)
    by_row = dict(zip(features["row"], features["reference"], strict=True))
    references = [by_row[r] for r in rows]
    result = perplexity(gathered)  # of the references
    if kind == "translate":
        for name in ("bleu", "chrf"):
            found = sacrebleu_score(name, predictions, [references], {})
            result |= {name: found.value, f"{name}_signature": found.signature}
    else:
        result |= {s.metric: s.value for s in rouge_scores(predictions, references)}
    pad = tokenizer.pad_token_id
    result["generated_tokens"] = float((gathered["generated"][:, 1:] != pad).sum(-1).mean())
    return {**result, "predictions": predictions}


def present(kind: Kind, gathered: dict[str, np.ndarray], features: Dataset, data: Any,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    predictions, rows = decode(gathered, features, tokenizer)
    field = "translation" if kind == "translate" else "summary"
    return [{"id": row, field: text} for row, text in zip(rows, predictions, strict=True)]


def task(kind: Kind, summary: str, metrics: tuple[str, ...], settings: type[Seq2SeqData],
         examples: str) -> Task:
    return Task(name=kind, summary=summary, settings=settings, examples=examples,
                auto_model="AutoModelForSeq2SeqLM",
                metrics=(*metrics, "perplexity"), columns=partial(columns, kind),
                model_kwargs=model_kwargs, featurize=partial(featurize, kind),
                collator=collator, eval_step=eval_step, score=partial(score, kind),
                present=partial(present, kind), prepare=partial(prepare, kind),
                clean=partial(clean, kind), detect=partial(detect, kind), group_inside=True)
TRANSLATE = task("translate", "translation with a seq2seq model (Marian, T5, mBART); BLEU",
                 ("bleu", "chrf"), TranslateData, TRANSLATE_EXAMPLES)
SUMMARIZE = task("summarize", "summarization with a seq2seq model (T5, BART); ROUGE",
                 ("rougeL", "rouge1", "rouge2", "rougeLsum"), SummarizeData, SUMMARIZE_EXAMPLES)
