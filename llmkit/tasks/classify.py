"""Text classification (single texts or pairs) with a sequence-classification head."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmkit.config.schema import BadRows, DataConfig, setting
from llmkit.errors import LlmkitError
from llmkit.scoring import metrics
from llmkit.tasks.task import Task, capped

log = logging.getLogger("llmkit")

if TYPE_CHECKING:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ClassifyData(DataConfig):
    """Which columns hold the texts and labels, and how long an input may be."""

    text_column: str = setting("text", "Column with the text.")
    text_pair_column: str | None = setting(None, "Second text column, for sentence pairs.")
    label_column: str = setting("label", "Column with the label (integers or strings).")
    max_length: int = setting(256, "Truncate inputs to this many tokens; batches are padded "
                              "only to their longest row.", minimum=1)
    positive_label: str | None = setting(None, "Two labels: the one binary_f1 is the F1 of "
                                         "(default: a label named 1, true, yes, positive or "
                                         "pos, else the second in id order).")
    empty_rows: BadRows = setting("fail", "fail or skip rows with an empty text or label.")


POSITIVE_NAMES = ("1", "true", "yes", "positive", "pos")


def positive_id(data: ClassifyData, id2label: dict[int, str]) -> int:
    """The id of the positive label of two-label data (see ClassifyData.positive_label)."""
    names = {str(name).lower(): i for i, name in id2label.items()}
    if data.positive_label is not None:
        if data.positive_label.lower() not in names:
            raise LlmkitError(f"data.positive_label {data.positive_label!r} is not a label; the "
                              f"labels are {', '.join(map(str, id2label.values()))}")
        return names[data.positive_label.lower()]
    return next((names[n] for n in POSITIVE_NAMES if n in names), 1)


EXAMPLES = """\
llmkit finetune classify --model bert-base-uncased --train train.csv \\
    --validation dev.csv --output runs/sst2
llmkit finetune classify --recipe classify-sst2 -s train.learning_rate=3e-5
llmkit finetune classify --model ./minilm --train pairs.tsv \\
    --text-column s1 --text-pair-column s2 --epochs 2 --output runs/pairs"""


def columns(data: ClassifyData, labelled: bool) -> list[str]:
    texts = [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])
    return texts + ([data.label_column] if labelled else [])


# the text columns of GLUE-style data, as run_glue.py reads them (and MRPC's own TSV): pairs
# first, then one text
PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
         ("question1", "question2"), ("#1 String", "#2 String"), ("sentence", None))
# the label column of GLUE's files besides `label`: MNLI's TSV, MRPC's, QQP's
LABELS = ("label", "labels", "gold_label", "Quality", "is_duplicate")
# what pandas reads as a missing value in a CSV cell (its default na_values)
MISSING = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                     "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                     "nan", "null"})


def texts_of(rows: Dataset, exclude: tuple[str, ...]) -> list[str]:
    """Columns that may hold texts: strings, not an id, not one of `exclude`."""
    return [n for n in rows.column_names
            if n not in exclude and n.lower() not in ("id", "idx", "index")
            and not n.lower().endswith((" id", "_id"))
            and getattr(rows.features[n], "dtype", None) in ("string", "large_string")]


def detect(rows: Dataset, data: ClassifyData) -> ClassifyData:
    """With the default label column absent: GLUE's label names (MRPC's Quality, MNLI's
    gold_label ...), else refused naming the options. With the default text column absent:
    GLUE's text column names, else (as run_glue.py) the first one or two text columns that
    are not the label or an id. Said in the log."""
    from dataclasses import replace

    names = rows.column_names
    if data.label_column == "label" and "label" not in names:
        label = next((n for n in LABELS if n in names), None)
        if label is None:
            raise LlmkitError(f"--train: no label column 'label'; the columns are "
                              f"{', '.join(map(repr, names))}: name it with --label-column "
                              "(and the texts with --text-column / --text-pair-column)")
        log.info("label column: %s (--label-column)", label)
        data = replace(data, label_column=label)
    if data.text_column != "text" or "text" in names or data.text_pair_column:
        return data
    found = next(((a, b) for a, b in PAIRS if a in names and (b is None or b in names)), None)
    if found is None:
        others = texts_of(rows, (data.label_column,))
        found = (others[0], others[1] if len(others) > 1 else None) if others else None
    if found is None:
        return data
    log.info("text column%s: %s (--text-column%s)", "s" if found[1] else "",
             " and ".join(c for c in found if c), " / --text-pair-column" if found[1] else "")
    return replace(data, text_column=found[0], text_pair_column=found[1])


def missing_labels(rows: Dataset, label: str) -> Dataset:
    """Label cells pandas reads as missing ('NaN', 'NA', 'null', '', a float NaN) are missing
    labels, not classes of their own (the empty-label rule applies); said in the log."""
    import math
    from collections import Counter

    dtype = getattr(rows.features[label], "dtype", None)
    if dtype not in ("string", "large_string", "float32", "float64"):
        return rows
    found = Counter(str(v) for v in rows[label] if (v in MISSING if isinstance(v, str) else
                                                    isinstance(v, float) and math.isnan(v)))
    if not found:
        return rows
    log.warning("%d labels read as missing, as pandas reads them: %s", sum(found.values()),
                ", ".join(f"{v!r} ({n})" for v, n in found.most_common(5)))
    return rows.map(lambda batch: {label: [
        None if (v in MISSING if isinstance(v, str) else isinstance(v, float) and math.isnan(v))
        else v for v in batch[label]]}, batched=True, desc="labels")


def clean(rows: Dataset, data: ClassifyData, labelled: bool) -> Dataset:
    from llmkit.data.read import check_text, empty_rows

    texts = columns(data, False)
    check_text(rows, texts)
    if not labelled:  # every row gets a prediction, in order: none can be left out
        missing = [i for i, row in enumerate(zip(*(rows[c] for c in texts), strict=True))
                   if any(v is None for v in row)]
        if missing:
            raise LlmkitError(f"{len(missing)} of {len(rows)} rows have no text (first: row "
                              f"{missing[0] + 1}); fill them in or remove them")
        return rows
    rows = missing_labels(rows, data.label_column)
    return empty_rows(rows, [*texts, data.label_column], data.empty_rows, "text or label")


def label_names(rows: Dataset, column: str) -> list[str]:
    """Names in id order: a ClassLabel's own names, else the sorted distinct values."""
    feature = rows.features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = rows.unique(column)
    if any(v is None for v in values):
        raise LlmkitError(f"column {column!r} has rows with no label")
    return [str(v) for v in sorted(values)]


def model_kwargs(train: Dataset, valid: Dataset, data: ClassifyData) -> dict[str, Any]:
    names = label_names(train, data.label_column)
    unseen = sorted(set(label_names(valid, data.label_column)) - set(names))
    if unseen:
        raise LlmkitError(f"validation labels never seen in training: {', '.join(unseen[:10])}"
                          f"{' ...' if len(unseen) > 10 else ''}; the training labels are "
                          f"{', '.join(names[:20])}")
    if len(names) < 2:
        raise LlmkitError(f"the training rows hold one label ({names[0]}); a classifier needs two")
    if data.positive_label is not None:
        if len(names) != 2:
            raise LlmkitError(f"data.positive_label is for two-label data; these rows hold "
                              f"{len(names)} labels")
        positive_id(data, dict(enumerate(names)))  # a name that is not a label: say so now
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


def featurize(rows: Dataset, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
              data: ClassifyData) -> Dataset:
    labelled = data.label_column in rows.column_names
    class_label = labelled and hasattr(rows.features[data.label_column], "names")
    label2id = {str(k): int(v) for k, v in (config.label2id or {}).items()}
    longest = capped(data.max_length, "--max-length", config, tokenizer, data)
    if labelled and not class_label:
        unknown = sorted({str(v) for v in rows.unique(data.label_column)} - set(label2id))
        if unknown:
            raise LlmkitError(f"labels the model does not know: {', '.join(unknown[:10])}; its "
                              f"labels are {', '.join(list(label2id)[:20])}")

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        features = dict(tokenizer(batch[data.text_column], pairs, truncation=True,
                                  max_length=longest))
        if labelled:
            labels = batch[data.label_column]
            features["labels"] = labels if class_label else [label2id[str(v)] for v in labels]
        return features

    from llmkit.data.features import workers

    return rows.map(encode, batched=True, remove_columns=rows.column_names,
                    num_proc=workers(data), desc="tokenizing")


def collator(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def eval_step(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch
    import torch.nn.functional as F

    logits = model(**batch).logits.float()
    gathered = {"logits": logits}
    if "labels" in batch:
        gathered["labels"] = batch["labels"]
        gathered["loss_sum"] = F.cross_entropy(logits, batch["labels"], reduction="none")
        gathered["loss_count"] = torch.ones_like(gathered["loss_sum"])
    return gathered


def score(gathered: dict[str, np.ndarray], features: Dataset, data: ClassifyData,
          config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    predictions = gathered["logits"].argmax(-1).tolist()
    references = gathered["labels"].tolist()
    result: dict[str, Any] = {"accuracy": metrics.accuracy(predictions, references),
                              "macro_f1": metrics.f1(predictions, references, "macro")}
    if config.num_labels == 2:
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        positive = positive_id(data, id2label)
        result["binary_f1"] = metrics.f1(predictions, references, "binary", positive, (0, 1))
        result["binary_f1_positive"] = id2label.get(positive, str(positive))
    return {**result, **collapsed(predictions, references, config)}


def collapsed(predictions: list[int], references: list[int], config: PretrainedConfig
              ) -> dict[str, str]:
    """The label the predictions collapsed onto, if any: over 90% of them and over 1.5x its
    share of the labels. Said at the end of a run whose kept evaluation shows it (a warning:
    such a model is usually undertrained, not broken), and kept in metrics.json."""
    from collections import Counter

    if not predictions:
        return {}
    label, count = Counter(predictions).most_common(1)[0]
    share, truth = count / len(predictions), references.count(label) / max(len(references), 1)
    if share <= 0.9 or share <= 1.5 * truth:
        return {}
    name = {int(k): str(v) for k, v in (config.id2label or {}).items()}.get(label, str(label))
    return {"collapsed": f"{name!r} is {share:.0%} of the predictions and {truth:.0%} of the "
                         "labels"}


def present(gathered: dict[str, np.ndarray], features: Dataset, data: ClassifyData,
            config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    import torch

    probs = torch.from_numpy(gathered["logits"]).softmax(-1)
    best, ids = probs.max(-1)
    id2label: dict[int, str] = {int(k): v for k, v in (config.id2label or {}).items()}
    return [{"label": id2label[int(i)], "score": round(float(p), 6)}
            for p, i in zip(best, ids, strict=True)]


CLASSIFY = Task(
    name="classify",
    summary="text classification with an encoder (single texts or pairs)",
    settings=ClassifyData,
    examples=EXAMPLES,
    auto_model="AutoModelForSequenceClassification",
    metrics=("accuracy", "macro_f1", "binary_f1"),
    # random batches, each run as micro-batches sorted by length: batches of one length band
    # cost a LoRA run on banking77 (77 intents) 5 points (benchmarks/RESULTS.md, lora.py)
    group_inside=True,
    columns=columns,
    model_kwargs=model_kwargs,
    featurize=featurize,
    collator=collator,
    eval_step=eval_step,
    score=score,
    present=present,
    clean=clean,
    detect=detect,
)
