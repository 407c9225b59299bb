"""Scoring files as the reference tools do (sacrebleu, rouge-score, the official SQuAD
scripts), offline: `llmkit eval --predictions ... --references ...`."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from llmkit.config.schema import setting
from llmkit.errors import LlmkitError
from llmkit.scoring import metrics
from llmkit.scoring.catalogue import catalogue_scores, check_metrics
from llmkit.scoring.metrics import (
    BUILTIN,
    LABELS,
    SACREBLEU,
    Score,
    label_score,
    rouge_scores,
    sacrebleu_score,
)
from llmkit.scoring.significance import paired_bootstrap


@dataclass(frozen=True)
class ScoreOptions:
    """How `llmkit eval` scores files: the reference tools' options."""

    tokenize: str | None = setting(None, "BLEU tokenizer (sacrebleu's: 13a, intl, char, zh, "
                                   "none, ...).")
    lowercase: bool = setting(False, "Case-insensitive BLEU.", "-lc")
    smooth_method: Literal["exp", "floor", "add-k", "none"] = setting(
        "exp", "BLEU smoothing, as sacrebleu's --smooth-method.")
    smooth_value: float | None = setting(None, "Value for floor (default 0.1) or add-k "
                                         "(default 1) smoothing.", minimum=0.0)
    max_ngram_order: int = setting(4, "BLEU's largest n-gram.", minimum=1)
    chrf_char_order: int = setting(6, "chrF character n-gram order.", minimum=1)
    chrf_word_order: int = setting(0, "chrF word n-gram order; 2 = chrF++.", minimum=0)
    chrf_beta: int = setting(2, "chrF's recall weight beta.", minimum=0)
    chrf_whitespace: bool = setting(False, "chrF: keep white space in character n-grams.")
    chrf_eps_smoothing: bool = setting(False, "chrF: epsilon smoothing (chrF++.py, NLTK, "
                                       "Moses) instead of effective order.")
    chrf_lowercase: bool = setting(False, "Case-insensitive chrF.")
    ter_case_sensitive: bool = setting(False, "Case-sensitive TER (sacrebleu's TER ignores "
                                       "case by default).")
    ter_normalized: bool = setting(False, "TER: basic normalization and tokenization.")
    ter_no_punct: bool = setting(False, "TER: remove punctuation.")
    ter_asian_support: bool = setting(False, "TER: treat Asian characters specially.")
    sentence_level: bool = setting(False, "Also score each line on its own (sacrebleu -sl; "
                                   "sentence BLEU with effective order).", "-sl")
    stride: int | None = setting(None, "Perplexity of a --model: score each document in "
                                 "windows of the block size moved N tokens (transformers' "
                                 "sliding window); see -m word_perplexity.", minimum=1)
    no_stemmer: bool = setting(False, "ROUGE without Porter stemming (rouge-score's "
                               "use_stemmer=False).")
    aggregate: Literal["mean", "bootstrap"] = setting(
        "mean", "ROUGE over lines: the mean, or rouge-score's bootstrap median with its 95% "
        "interval (1,000 resamples, seeded).")
    confidence: bool = setting(False, "95% bootstrap interval for BLEU/chrF/TER (sacrebleu's, "
                               "seeded by SACREBLEU_SEED).")
    bootstrap_samples: int = setting(1000, "Resamples for --confidence and --baseline.",
                                     minimum=1)
    baseline: str | None = setting(None, "A baseline system's predictions: paired bootstrap "
                                   "p-value of the difference (as sacrebleu --paired-bs).")
    average: Literal["macro", "micro", "binary"] = setting("macro", "F1 average: macro, micro "
                                                           "or binary.")
    positive: str = setting("1", "Positive label for binary F1.")
    missing: Literal["fail", "zero"] = setting("fail", "SQuAD questions without a prediction: "
                                               "fail, or score 0 (the official v1.1 script).")
def read_text(path: str, option: str) -> str:
    """A whole UTF-8 file; a file that is not UTF-8 is named with the offending byte offset."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LlmkitError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise LlmkitError(f"{option} {path} is a folder; give a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LlmkitError(f"{option} {path} is not UTF-8 text: byte offset {err.start} "
                          f"({data[err.start:err.start + 1]!r}); convert it, e.g. with iconv"
                          ) from err


def read_lines(path: str, option: str) -> list[str]:
    """One segment per line, trailing white space dropped, as sacrebleu's CLI reads files."""
    text = read_text(path, option)
    if not text:
        raise LlmkitError(f"{option} {path} is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


def squad_golds(path: str) -> dict[str, list[str]]:
    """Question id -> gold answer texts, from the official nested SQuAD JSON or flat rows
    (`id`, `answers.text`) in JSON / JSON lines."""
    text = read_text(path, "--references")
    try:
        data = json.loads(text)
        rows = data["data"] if isinstance(data, dict) and "data" in data else data
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            rows = None
    golds: dict[str, list[str]] = {}
    for item in rows if isinstance(rows, list) else []:
        if not isinstance(item, dict):
            continue
        if "paragraphs" in item:
            for paragraph in item["paragraphs"]:
                for qa in paragraph["qas"]:
                    golds[qa["id"]] = [a["text"] for a in qa.get("answers", [])]
        elif "id" in item and "answers" in item:
            answers = item["answers"]
            golds[item["id"]] = list(answers["text"] if isinstance(answers, dict)
                                     else [a["text"] for a in answers])
    if not golds:
        raise LlmkitError(f"--references {path}: no SQuAD questions found (expected "
                          "data -> paragraphs -> qas, or rows with id and answers)")
    return golds


def squad_score(name: str, predictions_path: str, references_path: str, missing_zero: bool
                ) -> Score:
    try:
        predictions = json.loads(read_text(predictions_path, "--predictions"))
    except json.JSONDecodeError:
        predictions = None
    if not isinstance(predictions, dict):
        raise LlmkitError(f"--predictions {predictions_path}: expected a JSON object of "
                          "question id -> answer text (the official format)")
    try:
        result = metrics.squad(predictions, squad_golds(references_path), name == "squad_v2",
                               missing_zero)
    except ValueError as err:
        raise LlmkitError(f"-m {name}: {err}") from err
    signature = "official SQuAD v2.0 definitions" if name == "squad_v2" else \
        "official SQuAD v1.1 definitions"
    return Score(name, result["f1"], signature, result)


def score_files(names: list[str], predictions: str, references: list[str],
                options: dict[str, Any] | None = None) -> list[Score]:
    """Score a predictions file against one or more reference files with each metric."""
    options = options or {}
    check_metrics(names)
    if not references:
        raise LlmkitError("--references is required")
    squads = [n for n in names if n.startswith("squad")]
    if squads and len(references) > 1:
        raise LlmkitError(f"-m {squads[0]} reads one SQuAD data file (-r), got {len(references)}")
    scores = [squad_score(n, predictions, references[0], options.get("missing") == "zero")
              for n in squads]
    line_metrics = [n for n in names if not n.startswith("squad")]
    if not line_metrics:
        return scores
    hypotheses = read_lines(predictions, "--predictions")
    refs = [read_lines(path, "--references") for path in references]
    for path, lines in zip(references, refs, strict=True):
        if len(lines) != len(hypotheses):
            raise LlmkitError(f"--predictions {predictions} has {len(hypotheses)} lines but "
                              f"--references {path} has {len(lines)}; they must align line by line")
    single = [n for n in line_metrics if n in LABELS or n not in BUILTIN]
    if single and len(refs) > 1:
        raise LlmkitError(f"-m {single[0]} compares each line with one reference, got "
                          f"{len(refs)} reference files; BLEU, chrF, TER and ROUGE take several")
    baseline = read_baseline(options.get("baseline"), len(hypotheses))
    if options.get("sentence_level") and (baseline is not None or options.get("confidence")
                                          or set(line_metrics) - set(SACREBLEU)):
        raise LlmkitError("--sentence-level scores BLEU, chrF and TER line by line, without "
                          "--confidence or --baseline (as sacrebleu -sl)")
    for name in line_metrics:
        if baseline is not None and name != "rouge":
            score = (sacrebleu_score(name, hypotheses, refs, options) if name in SACREBLEU
                     else label_score(name, hypotheses, refs[0], options))
            scores.append(replace(score, details=score.details | paired_bootstrap(
                name, hypotheses, baseline, refs, options)))
        elif name in SACREBLEU:
            scores.append(sacrebleu_score(name, hypotheses, refs, options))
        elif name == "rouge":
            scores.extend(rouge_scores(hypotheses, refs, not options.get("no_stemmer"),
                                       options.get("aggregate") or "mean"))
        elif name not in BUILTIN:
            scores.extend(catalogue_scores(name, hypotheses, refs[0]))
        else:
            scores.append(label_score(name, hypotheses, refs[0], options))
    return scores


def read_baseline(path: str | None, lines: int) -> list[str] | None:
    """--baseline's lines, as many as the predictions'."""
    if not path:
        return None
    baseline = read_lines(path, "--baseline")
    if len(baseline) != lines:
        raise LlmkitError(f"--baseline {path} has {len(baseline)} lines but --predictions has "
                          f"{lines}")
    return baseline
