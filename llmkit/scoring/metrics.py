"""Pure, offline metric functions: lists in, numbers out; sacrebleu and rouge-score called
with their own definitions."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import LlmkitError

SACREBLEU = ("bleu", "chrf", "ter")
LABELS = ("accuracy", "f1", "precision", "recall", "exact_match")
BUILTIN = (*SACREBLEU, "rouge", *LABELS, "squad", "squad_v2")  # llmkit eval on files
# a language model's metrics: `perplexity` as training evaluates (text packed into blocks), and
# each document scored on its own in rolling windows, as lm-evaluation-harness does
ROLLING = ("rolling_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _check(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no references to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _check(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


AVERAGES = ("macro", "micro", "weighted", "binary")  # scikit-learn's `average`


def _measure(kind: str, tp: int, fp: int, fn: int) -> float:
    """Precision, recall or F1 of counts; 0 where undefined (scikit-learn's zero_division)."""
    if kind == "precision":
        return tp / (tp + fp) if tp + fp else 0.0
    if kind == "recall":
        return tp / (tp + fn) if tp + fn else 0.0
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def label_measure(kind: str, predictions: Sequence[Hashable], references: Sequence[Hashable],
                  average: str = "macro", positive: Hashable = 1,
                  labels: Iterable[Hashable] | None = None) -> float:
    """Precision, recall or F1 (`kind`) as scikit-learn defines them: `macro` (the mean over
    every label seen in either list), `weighted` (that mean weighted by each label's count in
    the references), `micro` (from the counts summed over labels: accuracy, for single-label
    data), or `binary` for the `positive` label, which must be one of `labels` (default: the
    labels seen)."""
    _check(predictions, references)
    seen = set(references) | set(predictions)
    if average not in AVERAGES:
        raise ValueError(f"unknown average {average!r}: use {', '.join(AVERAGES)}")
    if average == "binary":
        known = set(labels) if labels is not None else seen
        if positive not in known:
            raise ValueError(f"the positive label {positive!r} is not one of the labels: "
                             f"{', '.join(sorted(map(str, known))[:20])}")
        seen = {positive}
    right = Counter(r for p, r in zip(predictions, references, strict=True) if p == r)
    predicted, true = Counter(predictions), Counter(references)
    counts = [(right[lab], predicted[lab] - right[lab], true[lab] - right[lab])
              for lab in sorted(seen, key=repr)]  # true and false positives, false negatives
    if average == "micro":
        return _measure(kind, *(sum(c[i] for c in counts) for i in range(3)))
    if average == "weighted":  # a label's weight: its support, tp + fn
        return sum(_measure(kind, *c) * (c[0] + c[2]) for c in counts) / len(references)
    return sum(_measure(kind, *c) for c in counts) / len(counts)


def f1(predictions: Sequence[Hashable], references: Sequence[Hashable], average: str = "macro",
       positive: Hashable = 1, labels: Iterable[Hashable] | None = None) -> float:
    """F1 as scikit-learn's f1_score (see `label_measure`)."""
    return label_measure("f1", predictions, references, average, positive, labels)


# SQuAD, as the official v1.1 and v2.0 evaluation scripts define it.

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, fold white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, v2: bool = False) -> float:
    """Token-overlap F1. v2.0 scores an empty answer 1 against an empty gold, else 0;
    v1.1 scores any pair without common tokens 0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if v2 and (not pred or not ref):
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: dict[str, str], golds: dict[str, list[str]], v2: bool = False,
          missing_zero: bool = False) -> dict[str, float]:
    """Exact match and F1 (0-100), the max over gold answers per question; an unanswerable
    question has the gold [""] (v2). v2 adds HasAns_/NoAns_ breakdowns. A question without a
    prediction is an error, or scores 0 with `missing_zero` (as the official v1.1 script does).
    Keys as the official scripts name them (`exact`, `HasAns_exact`, ...) and `exact_match`."""
    missing = [qid for qid in golds if qid not in predictions]
    if missing and not missing_zero:
        raise ValueError(f"no prediction for {len(missing)} of {len(golds)} questions "
                         f"(first: {missing[0]}); --missing zero scores them 0 as the "
                         "official v1.1 script does")
    if not v2 and any(not answers for answers in golds.values()):
        raise ValueError(f"{sum(not a for a in golds.values())} questions have no answer "
                         "(SQuAD 2.0 data), which the v1.1 rules cannot score: use squad_v2")
    exact, f1s = dict.fromkeys(missing, 0.0), dict.fromkeys(missing, 0.0)
    for qid, answers in golds.items():
        if qid in missing:
            continue
        # v2.0 drops golds that normalise to nothing; no gold left means unanswerable
        answers = ([a for a in answers if normalize_answer(a)] if v2 else answers) or [""]
        exact[qid] = max(squad_exact(predictions[qid], a) for a in answers)
        f1s[qid] = max(squad_f1(predictions[qid], a, v2) for a in answers)

    def mean(values: Iterable[float], ids: list[str]) -> float:
        return 100.0 * sum(values) / len(ids) if ids else 0.0

    everything = list(golds)
    result = {"exact_match": mean(exact.values(), everything),
              "exact": mean(exact.values(), everything),
              "f1": mean(f1s.values(), everything), "total": float(len(everything))}
    if v2:
        for name, ids in (("HasAns", [q for q in everything if golds[q]]),
                          ("NoAns", [q for q in everything if not golds[q]])):
            result.update({f"{name}_exact": mean((exact[q] for q in ids), ids),
                           f"{name}_exact_match": mean((exact[q] for q in ids), ids),
                           f"{name}_f1": mean((f1s[q] for q in ids), ids),
                           f"{name}_total": float(len(ids))})
    if missing:
        result["missing"] = float(len(missing))
    return result


@dataclass(frozen=True)
class Score:
    """One metric's result: the headline value, its parts, and how it was computed."""

    metric: str
    value: float
    signature: str
    details: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    decimals: int = 1  # printed by default: 1 on a 0-100 scale (as sacrebleu), 4 on 0-1
    name: str | None = None  # the reference tool's own name of the metric (sacrebleu: chrF2++)


def sacrebleu_metric(name: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A sacrebleu metric object with the CLI's options (its defaults where not given), and
    those options. Sentence-level BLEU uses effective order, as `sacrebleu -sl` does."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    def given(key: str, default: Any) -> Any:
        value = options.get(key)
        return default if value is None else value

    if name == "bleu":
        kwargs = {"lowercase": given("lowercase", False), "tokenize": options.get("tokenize"),
                  "smooth_method": given("smooth_method", "exp"),
                  "smooth_value": options.get("smooth_value"),
                  "max_ngram_order": given("max_ngram_order", 4),
                  "effective_order": bool(options.get("sentence_level"))}
        return BLEU(**kwargs), kwargs
    if name == "chrf":
        kwargs = {"char_order": given("chrf_char_order", 6),
                  "word_order": given("chrf_word_order", 0), "beta": given("chrf_beta", 2),
                  "lowercase": given("chrf_lowercase", False),
                  "whitespace": given("chrf_whitespace", False),
                  "eps_smoothing": given("chrf_eps_smoothing", False)}
        return CHRF(**kwargs), kwargs
    # sacrebleu's TER ignores case unless asked
    kwargs = {key: given(f"ter_{key}", False)
              for key in ("normalized", "no_punct", "asian_support", "case_sensitive")}
    return TER(**kwargs), kwargs


def sacrebleu_score(name: str, hypotheses: list[str], references: list[list[str]],
                    options: dict[str, Any]) -> Score:
    """The corpus score, named and signed as sacrebleu names and signs it (`chrF1++`); with
    `sentence_level`, each line's score as well (`sentences`, as `sacrebleu -sl` prints them,
    with their own signature: BLEU's has `eff:yes`)."""
    scorer, kwargs = sacrebleu_metric(name, options | {"sentence_level": False})
    samples = options.get("bootstrap_samples", 0) if options.get("confidence") else 0
    # sacrebleu's own bootstrap: seeded by SACREBLEU_SEED (default 12345), so repeatable
    result = scorer.corpus_score(hypotheses, references, n_bootstrap=max(samples, 1))
    details: dict[str, Any] = {}
    if samples > 1:
        details = {"confidence_mean": result._mean, "confidence_interval": result._ci,
                   "bootstrap_samples": samples}
    if name == "bleu":
        details |= {"bp": result.bp, "sys_len": result.sys_len, "ref_len": result.ref_len,
                   **{f"precision_{n + 1}": p for n, p in enumerate(result.precisions)}}
    if options.get("sentence_level"):
        by_line, _ = sacrebleu_metric(name, options)
        details["sentences"] = [by_line.sentence_score(h, list(refs)).score
                                for h, *refs in zip(hypotheses, *references, strict=True)]
        details["sentence_signature"] = str(by_line.get_signature())
    return Score(name, float(result.score), str(scorer.get_signature()), details, kwargs,
                 name=result.name)


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum (which reads sentences from newlines). The rule:
    a sentence ends at white space after `.`, `!` or `?`, so "Dr. No" and "the U.S. Army" are
    split too; nltk's splitter (what rouge-score's `split_summaries` uses) needs data that is
    not there offline. Text already on several lines is taken as split."""
    if "\n" in text.strip():
        return text.strip()
    return "\n".join(s for s in SENTENCE_END.split(text.strip()) if s)


ROUGE_SEED = 12345  # the bootstrap's resamples, as sacrebleu's default SACREBLEU_SEED


def rouge_scores(predictions: list[str], references: list[str] | list[list[str]],
                 stemmer: bool = True, aggregate: str = "mean") -> list[Score]:
    """ROUGE-1/2/L/Lsum F-measure (x100) from `rouge_score` itself, with Porter stemming unless
    told not to: the mean over predictions, or (`bootstrap`) the median of rouge-score's
    BootstrapAggregator (1,000 resamples, seeded) with its 95% interval, as rouge-score's CLI and
    the evaluate library report. With several reference lists (one per reference set), each
    prediction scores the best of its references, as rouge-score's `score_multi` does."""
    from importlib.metadata import version

    import numpy as np
    from rouge_score import rouge_scorer, scoring

    sets = references if references and isinstance(references[0], list) else [references]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=stemmer)
    totals = dict.fromkeys(types, 0.0)
    bootstrap = scoring.BootstrapAggregator()
    for i, prediction in enumerate(predictions):
        targets = [split_sentences(str(refs[i])) for refs in sets]
        scores = scorer.score_multi(targets, split_sentences(prediction))
        bootstrap.add_scores(scores)
        for key in types:
            totals[key] += scores[key].fmeasure
    signature = f"rouge-score {version('rouge-score')}"
    settings = {"use_stemmer": stemmer, "lsum_sentences": "split after . ! ?",
                "aggregate": aggregate, "references": len(sets)}
    if aggregate == "mean":
        return [Score(key, 100.0 * total / len(predictions), signature, {}, settings)
                for key, total in totals.items()]
    state = np.random.get_state()  # rouge-score resamples with numpy's global generator
    np.random.seed(ROUGE_SEED)
    try:
        result = bootstrap.aggregate()
    finally:
        np.random.set_state(state)
    return [Score(key, 100.0 * result[key].mid.fmeasure, signature,
                  {"low": 100.0 * result[key].low.fmeasure,
                   "high": 100.0 * result[key].high.fmeasure, "bootstrap_samples": 1000},
                  settings | {"seed": ROUGE_SEED}) for key in types]


def perplexity_of(mean_loss: float) -> float:
    """exp of a mean negative log-likelihood (nats), infinite where exp overflows."""
    import math

    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def label_score(name: str, predictions: list[str], references: list[str],
                options: dict[str, Any]) -> Score:
    """Accuracy, F1, precision or recall of lines against one reference each, as a Score."""
    if name in ("f1", "precision", "recall"):
        average = options.get("average") or "macro"
        positive = options.get("positive") or "1"
        try:
            value = label_measure(name, predictions, references, average, positive)
        except ValueError as err:
            raise LlmkitError(f"-m {name} --average {average} --positive {positive}: {err}"
                              ) from err
        settings = {"average": average} | ({"positive": positive} if average == "binary" else {})
        return Score(name, value, f"scikit-learn's {name}, average={average}", {}, settings,
                     decimals=4)
    return Score(name, accuracy(predictions, references), "llmkit", {},
                 {"compare": "whole lines, trailing white space dropped"}, decimals=4)
