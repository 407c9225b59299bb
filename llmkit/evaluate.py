"""`llmkit eval` on files: the numbers of the reference tools (sacrebleu, rouge-score, the
official SQuAD scripts), offline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from llmkit import metrics
from llmkit.config import setting
from llmkit.errors import LlmkitError
from llmkit.metrics import SACREBLEU, Score, rouge_scores, sacrebleu_metric, sacrebleu_score

LABELS = ("accuracy", "f1", "exact_match")
ROLLING = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # lm-evaluation-harness's
DECIMALS = {"byte_perplexity": 4, "bits_per_byte": 4, "eval_tokens": 0}
ROLLING_SIGNATURE = ("each document from its first token, windows of {window} tokens moved "
                     "{stride}")


EXAMPLES = """\
llmkit eval --metric bleu --metric chrf --predictions hyp.txt \\
    --references ref.txt
llmkit eval -m bleu -p hyp.txt -r ref1.txt -r ref2.txt --tokenize intl
llmkit eval -m squad_v2 -p predictions.json -r dev-v2.0.json
llmkit eval -m accuracy -m macro_f1 --model runs/sst2 --data dev.tsv
llmkit eval -m perplexity --model runs/gpt --data valid.txt"""


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
BUILTIN = (*SACREBLEU, "rouge", *LABELS, "squad", "squad_v2")


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


def label_score(name: str, predictions: list[str], references: list[str],
                options: dict[str, Any]) -> Score:
    if name == "f1":
        average = options.get("average", "macro")
        positive = options.get("positive", "1")
        try:
            value = metrics.f1(predictions, references, average, positive)
        except ValueError as err:
            raise LlmkitError(f"-m f1 --average {average} --positive {positive}: {err}") from err
        return Score(name, value, "llmkit", {}, {"average": average, "positive": positive},
                     decimals=4)
    return Score(name, metrics.accuracy(predictions, references), "llmkit", {},
                 {"compare": "whole lines, trailing white space dropped"}, decimals=4)


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


def paired_bootstrap(name: str, system: list[str], baseline: list[str],
                     references: list[list[str]], options: dict[str, Any]) -> dict[str, float]:
    """Paired bootstrap resampling against a baseline system, as `sacrebleu --paired-bs` (and
    Moses) do it; the same resamples and p-value rule for the label metrics."""
    import numpy as np
    from sacrebleu.significance import PairedTest, _compute_p_value

    samples = options.get("bootstrap_samples", 1000)
    if name in SACREBLEU:
        metric, _ = sacrebleu_metric(name, options)
        _, scores = PairedTest([("baseline", baseline), ("system", system)], {name: metric},
                               references, test_type="bs", n_samples=samples)()
        base, result = next(v for k, v in scores.items() if k != "System")
        assert not isinstance(base, str) and not isinstance(result, str)
        return {"baseline": base.score, "p_value": float(result.p_value or 0.0),
                "bootstrap_samples": samples}
    refs = references[0]

    def value(hyps: list[str], rows: Any = None) -> float:
        picked = range(len(refs)) if rows is None else rows
        return label_score(name, [hyps[i] for i in picked], [refs[i] for i in picked],
                           options).value

    seed = os.environ.get("SACREBLEU_SEED", "12345")
    rng = np.random.default_rng(None if seed.lower() == "none" else int(seed))
    rows = rng.choice(len(refs), size=(samples, len(refs)), replace=True)
    diffs = np.array([abs(value(system, r) - value(baseline, r)) for r in rows])
    p_value = _compute_p_value(diffs - diffs.mean(), abs(value(system) - value(baseline)))
    return {"baseline": value(baseline), "p_value": float(p_value), "bootstrap_samples": samples}


def check_metrics(names: list[str]) -> None:
    """Built-in names pass; others need the `evaluate` library and its metric code, which comes
    from the Hub (or its cache)."""
    import importlib.util

    from llmkit.hub import hub_offline

    unknown = [n for n in names if n not in BUILTIN]
    if not unknown:
        return
    model_only = [n for n in unknown if n in ("perplexity", *ROLLING)]
    if model_only:
        raise LlmkitError(f"-m {model_only[0]} scores a model, not files: give --model RUN (or "
                          "a checkpoint with --task generate) and --data FILE")
    listed = f"the built-in metrics are {', '.join(BUILTIN)}"
    if importlib.util.find_spec("evaluate") is None:
        raise LlmkitError(f"unknown metric {', '.join(map(repr, unknown))}; {listed} (other "
                          "names are looked up with the evaluate library: pip install evaluate)")
    if hub_offline() and not all(catalogue_cached(n) for n in unknown):
        raise LlmkitError(f"metric {', '.join(map(repr, unknown))} is not built in, and the "
                          "evaluate library fetches its code from the Hugging Face Hub, which "
                          f"this machine cannot reach (nor is it cached); {listed}")


def catalogue_cached(name: str) -> bool:
    from huggingface_hub.constants import HF_HOME

    folder = Path(os.environ.get("HF_MODULES_CACHE", Path(HF_HOME) / "modules"))
    return any((folder / "evaluate_modules" / "metrics").glob(f"*--{name}"))


def catalogue_scores(name: str, predictions: list[str], references: list[str]) -> list[Score]:
    """A metric from the evaluate library's catalogue; numbers as it returns them."""
    import evaluate

    module = evaluate.load(name)
    result = module.compute(predictions=predictions, references=references)
    return [Score(key, float(value), f"evaluate {name}") for key, value in result.items()
            if isinstance(value, (int, float))]


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
    baseline = None
    if options.get("baseline"):
        baseline = read_lines(options["baseline"], "--baseline")
        if len(baseline) != len(hypotheses):
            raise LlmkitError(f"--baseline {options['baseline']} has {len(baseline)} lines but "
                              f"--predictions has {len(hypotheses)}")
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


def score_model(names: list[str], model: str, data: str | None, task: str | None, split: str,
                columns: dict[str, Any], base_model: str | None = None,
                stride: int | None = None) -> list[Score]:
    """Predict with a model on labelled rows, then report the requested metrics of its task.
    Perplexity in sliding windows where --stride or a per-word/byte metric asks for it."""
    from llmkit.predict import rolling_score, run_config, score

    if data is None:
        raise LlmkitError("--model needs --data: the labelled rows to score it on")
    if stride is not None or set(names) & set(ROLLING):
        other = [n for n in names if n not in ("perplexity", "eval_tokens", *ROLLING)]
        if other:
            raise LlmkitError(f"-m {other[0]} does not come with --stride: score it in a "
                              "separate llmkit eval")
        result = rolling_score(model, data, task, split, stride, columns=columns,
                               base_model=base_model)
        return [Score(n, float(result[n]), ROLLING_SIGNATURE.format(**result), {},
                      {"data": data, "eval_tokens": result["eval_tokens"]},
                      decimals=DECIMALS.get(n, 2)) for n in dict.fromkeys([*names, "eval_tokens"])]
    result = score(model, data, task, split, columns=columns, base_model=base_model)
    values = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if "perplexity" in names and "eval_tokens" in values:  # the count it is the mean over
        names = list(dict.fromkeys([*names, "eval_tokens"]))
    missing = [n for n in names if n not in values]
    if missing:
        name = task or getattr(run_config(model), "task", "this")
        raise LlmkitError(f"metric {', '.join(map(repr, missing))} does not fit a {name} model; "
                          f"its metrics are {', '.join(k for k in values if k != 'eval_samples')}")
    settings = {"data": data, "eval_samples": result["eval_samples"]}
    fractions = ("accuracy", "macro_f1", "binary_f1", "eval_loss")  # 0-1 scale: 4 decimals
    # sacrebleu's signature where the task scored with it (translate), else llmkit's own
    return [Score(n, float(values[n]), str(result.get(f"{n}_signature", "llmkit")), {}, settings,
                  decimals=4 if n in fractions else DECIMALS.get(n, 1)) for n in names]


def report(names: list[str], predictions: str | None, references: list[str] | None,
           model: str | None, data: str | None, task: str | None, split: str,
           columns: dict[str, Any], options: dict[str, Any], width: int | None, as_json: bool,
           output: Path | None, base_model: str | None = None) -> None:
    """`llmkit eval`: score files (or a model on data), print a table or one JSON object, and
    write the JSON to `output` if asked."""
    from dataclasses import asdict

    from llmkit.data import check_output_file

    if output is not None:
        check_output_file(output)
    from sacrebleu.metrics import BLEU

    tokenizers = list(BLEU.TOKENIZERS)
    if options.get("tokenize") not in (None, *tokenizers):
        raise LlmkitError(f"--tokenize {options['tokenize']}: sacrebleu's tokenizers are "
                          f"{', '.join(tokenizers)}")
    if model is not None:
        scores = score_model(names, model, data, task, split, columns, base_model,
                             options.get("stride"))
        payload: dict[str, Any] = {"model": model, "data": data}
    elif predictions is None or not references:
        raise LlmkitError("give --predictions and --references, or --model and --data")
    elif options.get("stride"):
        raise LlmkitError("--stride scores a language model (--model and --data), not files")
    else:
        scores = score_files(names, predictions, references, options)
        payload = {"predictions": predictions, "references": references}
    payload["scores"] = [asdict(s) for s in scores]
    text = json.dumps(payload, ensure_ascii=False, default=float)
    if output:
        output.write_text(json.dumps(payload, indent=1, ensure_ascii=False, default=float)
                          + "\n", encoding="utf-8")
    if as_json:
        print(text)
        return
    show(scores, width)


def show(scores: list[Score], width: int | None) -> None:
    """The scores as a table, then any per-line scores (--sentence-level)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", "signature")
    table.columns[2].overflow = "fold"
    for score in scores:
        places = score.decimals if width is None else width
        value = f"{score.value:.{places}f}"
        if "p_value" in score.details:
            value += (f" (baseline {score.details['baseline']:.{places}f}, "
                      f"p = {score.details['p_value']:.4f})")
        if "confidence_interval" in score.details:
            value += (f" (μ = {score.details['confidence_mean']:.{places}f} ± "
                      f"{score.details['confidence_interval']:.{places}f})")
        if "low" in score.details:
            value += f" ({score.details['low']:.{places}f}-{score.details['high']:.{places}f})"
        table.add_row(score.metric, value, score.signature)
    Console().print(table)
    for score in scores:
        for line, value in enumerate(score.details.get("sentences", []), 1):
            print(f"{score.metric}\t{line}\t{value:.{score.decimals if width is None else width}f}")
