"""`llmkit eval` on files: equal to the reference tools to every printed digit."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.scoring.files import score_files
from llmkit.scoring.metrics import normalize_answer, squad
from tests.conftest import EXAMPLES, needs_shared
from tests.test_generate import TEXT as LM_TEXT  # the language-model corpus

runner = CliRunner()


def perturb(line: str, rng: random.Random) -> str:
    words = line.split()
    for _ in range(rng.randint(0, 3)):
        i = rng.randrange(len(words))
        choice = rng.random()
        if choice < 0.3:
            del words[i]
        elif choice < 0.6:
            words[i] = words[i].upper()
        else:
            words.insert(i, rng.choice(["très", "the", ",", "ok!", "naïve"]))
        if not words:
            words = ["empty"]
    return " ".join(words)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference, a second reference and a hypothesis, built from the shipped sample texts."""
    texts = [line.split("\t")[0] for path in ("train.tsv", "dev.tsv")
             for line in (EXAMPLES / "sentiment" / path).read_text().splitlines()[1:]]
    folder = tmp_path_factory.mktemp("system")
    files = {}
    for name, seed in (("ref", None), ("ref2", 1), ("hyp", 2)):
        rng = random.Random(seed)
        lines = texts if seed is None else [perturb(t, rng) for t in texts]
        files[name] = folder / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def sacrebleu_cli(hyp: Path, refs: list[Path], *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "sacrebleu", *map(str, refs), "-i", str(hyp),
                          "-b", "-w", "4", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout) if out.stdout.startswith("[") else [out.stdout.strip()]


@pytest.mark.parametrize("args", [
    {"metric": "bleu"},
    {"metric": "bleu", "tokenize": "intl"},
    {"metric": "bleu", "tokenize": "char"},
    {"metric": "bleu", "tokenize": "none", "lowercase": True},
    {"metric": "chrf"},
    {"metric": "chrf", "chrf_word_order": 2},
    {"metric": "ter"},
    {"metric": "ter", "ter_case_sensitive": True},
    {"metric": "chrf", "chrf_lowercase": True},
    {"metric": "bleu", "smooth_method": "floor", "smooth_value": 0.3},
    {"metric": "bleu", "smooth_method": "add-k"},
    {"metric": "bleu", "smooth_method": "none"},
    {"metric": "chrf", "chrf_char_order": 4, "chrf_beta": 1, "chrf_whitespace": True},
    {"metric": "chrf", "chrf_eps_smoothing": True},
    {"metric": "ter", "ter_normalized": True, "ter_no_punct": True},
    {"metric": "ter", "ter_asian_support": True},
])
@pytest.mark.parametrize("nrefs", [1, 2])
def test_sacrebleu_metrics_equal_its_cli(system: dict[str, Path], args: dict, nrefs: int
                                         ) -> None:
    refs = [system["ref"], system["ref2"]][:nrefs]
    cli = ["-m", args["metric"]]
    if "tokenize" in args:
        cli += ["--tokenize", args["tokenize"]]
    if args.get("lowercase"):
        cli += ["-lc"]
    for key, value in args.items():  # the options named as sacrebleu's CLI names them
        if key not in ("metric", "tokenize", "lowercase"):
            flag = "--" + key.replace("_", "-")
            cli += [flag] if value is True else [flag, str(value)]
    [score] = score_files([args["metric"]], str(system["hyp"]), [str(r) for r in refs], args)
    assert f"{score.value:.4f}" == str(sacrebleu_cli(system["hyp"], refs, *cli)[0])
    assert f"nrefs:{nrefs}" in score.signature


def test_max_ngram_order_equals_sacrebleu_bleu(system: dict[str, Path]) -> None:
    from sacrebleu.metrics import BLEU  # the CLI has no flag for it: its Python API

    hyps = system["hyp"].read_text().splitlines()
    refs = system["ref"].read_text().splitlines()
    [score] = score_files(["bleu"], str(system["hyp"]), [str(system["ref"])],
                          {"max_ngram_order": 2})
    assert score.value == BLEU(max_ngram_order=2).corpus_score(hyps, [refs]).score
    assert "precision_3" not in score.details


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter"])
def test_sentence_level_scores_equal_sacrebleu_sl(system: dict[str, Path], metric: str) -> None:
    refs = [system["ref"], system["ref2"]]
    [score] = score_files([metric], str(system["hyp"]), [str(r) for r in refs],
                          {"sentence_level": True})
    lines = subprocess.run([sys.executable, "-m", "sacrebleu", *map(str, refs), "-i",
                            str(system["hyp"]), "-m", metric, "-sl", "-b", "-w", "4"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert [f"{v:.4f}" for v in score.details["sentences"]] == lines
    # the corpus score stays sacrebleu's corpus score (no effective order)
    assert f"{score.value:.4f}" == str(sacrebleu_cli(system["hyp"], refs, "-m", metric)[0])


def test_bootstrap_confidence_equals_sacrebleu_and_repeats(system: dict[str, Path]) -> None:
    options = {"confidence": True, "bootstrap_samples": 200}
    first = score_files(["bleu", "chrf"], str(system["hyp"]), [str(system["ref"])], options)
    again = score_files(["bleu", "chrf"], str(system["hyp"]), [str(system["ref"])], options)
    assert [s.details for s in first] == [s.details for s in again]
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(system["ref"]), "-i",
                          str(system["hyp"]), "-m", "bleu", "chrf", "-w", "4", "--confidence",
                          "--confidence-n", "200"], capture_output=True, text=True, check=True)
    for score, reference in zip(first, json.loads(out.stdout), strict=True):
        mean, half = score.details["confidence_mean"], score.details["confidence_interval"]
        assert f"{mean:.4f}" == f"{reference['confidence_mean']:.4f}"
        assert f"{half:.4f}" == f"{reference['confidence_var']:.4f}"
        assert mean - half <= score.value <= mean + half


def test_paired_bootstrap_equals_sacrebleu_paired_bs(system: dict[str, Path]) -> None:
    import re

    options = {"baseline": str(system["ref2"]), "bootstrap_samples": 200}
    bleu, chrf = score_files(["bleu", "chrf"], str(system["hyp"]), [str(system["ref"])], options)
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(system["ref"]), "-i",
                          str(system["ref2"]), str(system["hyp"]), "-m", "bleu", "chrf",
                          "--paired-bs", "--paired-bs-n", "200", "-w", "4", "-f", "text"],
                         capture_output=True, text=True, check=True).stdout
    p_values = [float(p) for p in re.findall(r"p = ([0-9.]+)", out)]
    assert [round(bleu.details["p_value"], 4), round(chrf.details["p_value"], 4)] == p_values
    assert f"{bleu.details['baseline']:.4f}" in out and f"{bleu.value:.4f}" in out
    assert bleu.signature in out and "bs:200|seed:12345" in bleu.signature  # sacrebleu's


def test_paired_bootstrap_for_labels_is_seeded(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    gold = [rng.choice("ab") for _ in range(300)]
    good = [g if rng.random() < 0.9 else "b" for g in gold]
    weak = [g if rng.random() < 0.6 else "a" for g in gold]
    close = [("a" if g == "b" else "b") if i == 0 else g for i, g in enumerate(good)]
    for name, lines in (("gold", gold), ("good", good), ("weak", weak), ("close", close)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    options = {"baseline": str(tmp_path / "weak.txt"), "bootstrap_samples": 300}
    args = (["accuracy"], str(tmp_path / "good.txt"), [str(tmp_path / "gold.txt")], options)
    [first], [again] = score_files(*args), score_files(*args)
    assert first.details == again.details
    assert first.details["p_value"] < 0.01  # 90% vs 60% accurate on 300 rows
    near = {**options, "baseline": str(tmp_path / "close.txt")}  # one row differs
    [tie] = score_files(["accuracy"], str(tmp_path / "good.txt"), [str(tmp_path / "gold.txt")],
                        near)
    assert tie.details["p_value"] > 0.05


def test_bible_copy_baseline_equals_sacrebleu(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in
            needs_shared("bible-en-es", "old-testament.jsonl").read_text().splitlines()[:3000]]
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("".join(r["translation"]["en"] + "\n" for r in rows), encoding="utf-8")
    ref.write_text("".join(r["translation"]["es"] + "\n" for r in rows), encoding="utf-8")
    scores = score_files(["bleu", "chrf"], str(hyp), [str(ref)])
    expected = sacrebleu_cli(hyp, [ref], "-m", "bleu", "chrf")
    assert [f"{s.value:.4f}" for s in scores] == [str(e) for e in expected]


def test_rouge_equals_rouge_score_called_directly(system: dict[str, Path]) -> None:
    from rouge_score import rouge_scorer

    hyps = system["hyp"].read_text().splitlines()
    refs = system["ref"].read_text().splitlines()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {k: 100 * sum(scorer.score(r, h)[k].fmeasure for h, r in zip(hyps, refs,
                                                                             strict=True))
                / len(hyps) for k in ("rouge1", "rouge2", "rougeL")}
    got = {s.metric: s.value for s in score_files(["rouge"], str(system["hyp"]),
                                                  [str(system["ref"])])}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9)
    # one sentence per line: Lsum equals L
    assert got["rougeLsum"] == pytest.approx(got["rougeL"], abs=1e-9)


def test_rouge_without_stemmer_and_bootstrap_equal_rouge_score(system: dict[str, Path]
                                                               ) -> None:
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    from llmkit.scoring.metrics import ROUGE_SEED

    hyps = system["hyp"].read_text().splitlines()
    refs = system["ref"].read_text().splitlines()
    types = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for h, r in zip(hyps, refs, strict=True):
        aggregator.add_scores(scorer.score(r, h))
    np.random.seed(ROUGE_SEED)
    expected = aggregator.aggregate()
    options = {"no_stemmer": True, "aggregate": "bootstrap"}
    got = {s.metric: s for s in score_files(["rouge"], str(system["hyp"]), [str(system["ref"])],
                                            options)}
    for key in types:
        assert got[key].value == pytest.approx(100 * expected[key].mid.fmeasure, abs=1e-9)
        assert got[key].details["low"] == pytest.approx(100 * expected[key].low.fmeasure)
        assert got[key].details["high"] == pytest.approx(100 * expected[key].high.fmeasure)
    again = score_files(["rouge"], str(system["hyp"]), [str(system["ref"])], options)
    assert [s.details for s in again] == [s.details for s in got.values()]  # seeded
    stemmed = {s.metric: s.value for s in score_files(["rouge"], str(system["hyp"]),
                                                      [str(system["ref"])])}
    assert stemmed["rouge1"] != got["rouge1"].value


def test_rouge_lsum_splits_sentences() -> None:
    from rouge_score import rouge_scorer

    from llmkit.scoring.metrics import rouge_scores, split_sentences

    hyp, ref = "The cat sat. It was happy! Then it left.", "A cat sat down. Then it left happy."
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = scorer.score("A cat sat down.\nThen it left happy.",
                            "The cat sat.\nIt was happy!\nThen it left.")["rougeLsum"].fmeasure
    assert split_sentences(hyp) == "The cat sat.\nIt was happy!\nThen it left."
    lsum = next(s for s in rouge_scores([hyp], [ref]) if s.metric == "rougeLsum")
    assert lsum.value == pytest.approx(100 * expected)


def test_squad_normalisation_and_scores_by_hand() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    golds = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Paris"],
             "q3": ["in the year 1887"]}
    preds = {"q1": "the denver broncos.", "q2": "Paris, France", "q3": "1887"}
    result = squad(preds, golds)
    # q1 exact (normalised); q2 F1 = 2*(1/2*1)/(1/2+1) = 2/3; q3 F1: pred [1887], gold
    # [in, year, 1887] -> p=1, r=1/3 -> 0.5
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.5) / 3)


def test_squad_v2_unanswerable() -> None:
    golds = {"a": ["Paris"], "b": [], "c": [], "d": ["1887"]}
    preds = {"a": "Paris", "b": "", "c": "London", "d": ""}
    result = squad(preds, golds, v2=True)
    assert result["exact_match"] == pytest.approx(50.0)  # a and b right
    assert result["HasAns_exact_match"] == pytest.approx(50.0)
    assert result["NoAns_exact_match"] == pytest.approx(50.0)
    assert result["HasAns_total"] == 2 and result["NoAns_total"] == 2
    with pytest.raises(ValueError, match="no prediction for 1 of 4"):
        squad({"a": "x", "b": "", "c": ""}, golds, v2=True)


def test_squad_from_official_json(tmp_path: Path) -> None:
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "?", "answers": [{"text": "Paris", "answer_start": 0}],
         "is_impossible": False},
        {"id": "2", "question": "?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(data))
    (tmp_path / "pred.json").write_text(json.dumps({"1": "paris", "2": ""}))
    [score] = score_files(["squad_v2"], str(tmp_path / "pred.json"), [str(tmp_path / "dev.json")])
    assert score.value == 100.0 and score.details["NoAns_total"] == 1


def test_classification_metrics_on_lines(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("pos\nneg\nneg \npos\n")
    (tmp_path / "r.txt").write_text("pos\nneg\npos\npos\n")
    acc, f1 = score_files(["accuracy", "f1"], str(tmp_path / "p.txt"), [str(tmp_path / "r.txt")])
    assert acc.value == 0.75 and f1.value == pytest.approx((0.8 + 2 / 3) / 2)


def test_bad_input(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.txt").write_text("x\n")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    with pytest.raises(LlmkitError, match="has 2 lines but --references .* has 1"):
        score_files(["bleu"], a, [b])
    with pytest.raises(LlmkitError, match="metric 'blue'.*the built-in metrics are bleu, chrf"):
        score_files(["blue"], a, [a])
    with pytest.raises(LlmkitError, match="is empty"):
        score_files(["bleu"], str(tmp_path / "e.txt"), [a])
    with pytest.raises(LlmkitError, match=r"latin1.txt is not UTF-8 text: byte offset 6"):
        score_files(["bleu"], a, [str(tmp_path / "latin1.txt")])


def test_cli_eval_json_and_output(system: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["eval", "-m", "bleu", "-m", "chrf", "-p", str(system["hyp"]),
                                 "-r", str(system["ref"]), "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["metric"] for s in payload["scores"]] == ["bleu", "chrf"]
    assert payload["scores"][0]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert json.loads(out.read_text()) == payload
    table = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(system["hyp"]), "-r",
                                str(system["ref"])])
    assert f"{payload['scores'][0]['value']:.1f}" in table.output


def test_catalogue_metric_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    import importlib.util

    from llmkit import hub

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "evaluate" else real(name, *a))
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    (tmp_path / "p.txt").write_text("x\n")
    with pytest.raises(LlmkitError, match="'meteor' is not built in.*cannot reach"):
        score_files(["meteor"], str(tmp_path / "p.txt"), [str(tmp_path / "p.txt")])


def test_label_f1_equals_scikit_learn(tmp_path: Path) -> None:
    from sklearn.metrics import f1_score

    from llmkit.scoring.metrics import f1

    rng = random.Random(3)
    refs = [rng.choice(["pos", "neg", "mixed"]) for _ in range(200)]
    preds = [r if rng.random() < 0.6 else rng.choice(["pos", "neg", "mixed"]) for r in refs]
    for average in ("macro", "micro"):
        assert f1(preds, refs, average) == pytest.approx(f1_score(refs, preds, average=average))
    binary_refs = ["neg" if r == "mixed" else r for r in refs]
    binary_preds = ["neg" if p == "mixed" else p for p in preds]
    assert f1(binary_preds, binary_refs, "binary", "pos") == pytest.approx(
        f1_score(binary_refs, binary_preds, average="binary", pos_label="pos"))
    (tmp_path / "p.txt").write_text("\n".join(binary_preds) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(binary_refs) + "\n")
    with pytest.raises(LlmkitError, match="positive label '1' is not one of the labels: neg, pos"):
        score_files(["f1"], str(tmp_path / "p.txt"), [str(tmp_path / "r.txt")],
                    {"average": "binary"})


def test_rouge_with_several_references_takes_the_best(system: dict[str, Path]) -> None:
    from rouge_score import rouge_scorer

    hyps = system["hyp"].read_text().splitlines()
    refs = [system[k].read_text().splitlines() for k in ("ref", "ref2")]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    expected = {k: 100 * sum(scorer.score_multi([a, b], h)[k].fmeasure
                             for h, a, b in zip(hyps, *refs, strict=True)) / len(hyps)
                for k in ("rouge1", "rougeL")}
    got = {s.metric: s.value for s in score_files(
        ["rouge"], str(system["hyp"]), [str(system["ref"]), str(system["ref2"])])}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9)
    one = {s.metric: s.value for s in score_files(["rouge"], str(system["hyp"]),
                                                  [str(system["ref"])])}
    assert got["rouge1"] > one["rouge1"]  # the second reference can only help
    with pytest.raises(LlmkitError, match="-m accuracy compares each line with one reference"):
        score_files(["accuracy"], str(system["hyp"]), [str(system["ref"]), str(system["ref2"])])


def official_v1(dataset: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """The official SQuAD v1.1 evaluate() loop: a missing prediction scores 0."""
    from llmkit.scoring.metrics import squad_exact, squad_f1

    exact = f1 = 0.0
    for qid, golds in dataset.items():
        if qid in predictions:
            exact += max(squad_exact(predictions[qid], g) for g in golds)
            f1 += max(squad_f1(predictions[qid], g) for g in golds)
    return {"exact_match": 100 * exact / len(dataset), "f1": 100 * f1 / len(dataset)}


def test_squad_missing_zero_and_v2_data_under_v1_rules() -> None:
    golds = {"a": ["Paris"], "b": ["the 1887 fair"], "c": ["Denver"]}
    preds = {"a": "paris", "b": "1887"}
    result = squad(preds, golds, missing_zero=True)
    expected = official_v1(golds, preds)
    assert result["exact_match"] == result["exact"] == pytest.approx(expected["exact_match"])
    assert result["f1"] == pytest.approx(expected["f1"]) and result["missing"] == 1
    with pytest.raises(ValueError, match="no prediction for 1 of 3 .*--missing zero"):
        squad(preds, golds)
    with pytest.raises(ValueError, match="1 questions have no answer .*use squad_v2"):
        squad({"a": "x", "b": ""}, {"a": ["x"], "b": []})
    v2 = squad({"a": "x", "b": ""}, {"a": ["x"], "b": []}, v2=True)
    assert v2["HasAns_exact"] == v2["HasAns_exact_match"] == 100.0


def test_cli_prints_label_metrics_with_four_decimals_and_chrf_confidence_json(
        system: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("pos\nneg\nneg\npos\npos\npos\npos\npos\n")
    (tmp_path / "r.txt").write_text("pos\nneg\npos\npos\npos\npos\npos\npos\n")
    table = runner.invoke(app, ["eval", "-m", "accuracy", "-p", str(tmp_path / "p.txt"), "-r",
                                str(tmp_path / "r.txt")])
    assert "0.8750" in table.output
    result = runner.invoke(app, ["eval", "-m", "chrf", "--confidence", "--json",
                                 "--bootstrap-samples", "50", "-p", str(system["hyp"]),
                                 "-r", str(system["ref"])])
    assert result.exit_code == 0, result.output
    details = json.loads(result.stdout)["scores"][0]["details"]
    assert details["confidence_interval"] > 0


def test_cli_sentence_level_lines_and_its_limits(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("the cat sat on the mat\nhello there\n")
    (tmp_path / "r.txt").write_text("the cat sat on a mat\nhello there friend\n")
    files = ["-p", str(tmp_path / "h.txt"), "-r", str(tmp_path / "r.txt")]
    result = runner.invoke(app, ["eval", "-m", "bleu", "-sl", "--smooth-method", "floor", *files])
    assert result.exit_code == 0, result.output
    per_line = [line.split("\t") for line in result.output.splitlines() if "\t" in line]
    assert [row[:2] for row in per_line] == [["bleu", "1"], ["bleu", "2"]]
    refused = runner.invoke(app, ["eval", "-m", "bleu", "-sl", "--confidence", *files])
    assert refused.exit_code == 1 and "--sentence-level" in str(refused.exception)
    refused = runner.invoke(app, ["eval", "-m", "rouge", "-sl", *files])
    assert refused.exit_code == 1 and "BLEU, chrF and TER" in str(refused.exception)
    refused = runner.invoke(app, ["eval", "-m", "bleu", "--stride", "8", *files])
    assert refused.exit_code == 1 and "--stride scores a language model" in str(
        refused.exception)


def labels_files(tmp_path: Path, binary: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Gold labels, a system's and a weaker baseline's, written one per line."""
    rng = random.Random(5)
    names = ["pos", "neg"] if binary else ["pos", "neg", "mixed", "other"]
    gold = [rng.choice(names[:3] if len(names) > 2 else names) for _ in range(120)]
    good = [g if rng.random() < 0.8 else rng.choice(names) for g in gold]
    weak = [g if rng.random() < 0.5 else rng.choice(names) for g in gold]
    for name, lines in (("gold", gold), ("good", good), ("weak", weak)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return gold, good, weak


@pytest.mark.parametrize("average", ["binary", "macro", "micro", "weighted"])
def test_precision_recall_f1_lines_equal_scikit_learn(tmp_path: Path, average: str) -> None:
    from sklearn import metrics

    gold, good, _ = labels_files(tmp_path, binary=average == "binary")
    result = runner.invoke(app, ["eval", "-m", "precision", "-m", "recall", "-m", "f1",
                                 "--average", average, "--positive", "pos", "-p",
                                 str(tmp_path / "good.txt"), "-r", str(tmp_path / "gold.txt"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    found = {s["metric"]: s for s in json.loads(result.stdout)["scores"]}
    options = {"pos_label": "pos"} if average == "binary" else {}
    for name, reference in (("precision", metrics.precision_score),
                            ("recall", metrics.recall_score), ("f1", metrics.f1_score)):
        expected = reference(gold, good, average=average, zero_division=0, **options)
        assert f"{found[name]['value']:.12f}" == f"{expected:.12f}"
        assert found[name]["settings"]["average"] == average


def test_tokenizers_that_need_an_extra_or_a_download_say_what(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import socket

    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))

    def offline(*args: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    (tmp_path / "h.txt").write_text("a b c\n")
    files = ["-p", str(tmp_path / "h.txt"), "-r", str(tmp_path / "h.txt")]
    for name, model in (("flores101", "sacrebleu_tokenizer_spm.model"),
                        ("spm", "sacrebleu_tokenizer_spm.model"),
                        ("flores200", "flores200sacrebleuspm")):
        result = runner.invoke(app, ["eval", "-m", "bleu", "--tokenize", name, *files])
        assert result.exit_code == 1
        message = str(result.exception)
        assert f"place it at {tmp_path / 'models' / model}" in message
        assert "this machine is offline" in message and "\n" not in message
    for name, extra in (("ja-mecab", "ja"), ("ko-mecab", "ko")):
        if importlib.util.find_spec("MeCab" if extra == "ja" else "mecab_ko"):
            continue  # the extra is installed here
        result = runner.invoke(app, ["eval", "-m", "bleu", "--tokenize", name, *files])
        assert result.exit_code == 1
        assert f"pip install 'sacrebleu[{extra}]'" in str(result.exception)


def test_spm_model_placed_where_told_scores_as_sacrebleu(
        system: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file the flores101 message names, placed there (a small SentencePiece model of our
    own standing in for sacrebleu's), gives sacrebleu's own BLEU."""
    import os

    import sentencepiece as spm
    from sacrebleu.tokenizers import tokenizer_spm

    (tmp_path / "models").mkdir()
    lines = iter(system["ref"].read_text().splitlines())
    prefix = tmp_path / "models" / "sacrebleu_tokenizer_spm"  # where the error says
    spm.SentencePieceTrainer.train(sentence_iterator=lines, vocab_size=200, minloglevel=2,
                                   model_prefix=str(prefix))
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    [score] = score_files(["bleu"], str(system["hyp"]), [str(system["ref"])],
                          {"tokenize": "flores101"})
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(system["ref"]), "-i",
                          str(system["hyp"]), "-m", "bleu", "-tok", "flores101", "-w", "4"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "SACREBLEU": str(tmp_path)})
    expected = json.loads(out.stdout)
    assert round(score.value, 4) == expected["score"]
    assert score.signature == expected["signature"] and "tok:flores101" in score.signature


def test_names_and_signatures_as_sacrebleu_writes_them(system: dict[str, Path]) -> None:
    hyp, ref = system["hyp"], system["ref"]
    for beta in (1, 2, 3):
        options = {"chrf_beta": beta, "chrf_word_order": 2}
        [score] = score_files(["chrf"], str(hyp), [str(ref)], options)
        expected = json.loads(subprocess.run(
            [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "chrf",
             "--chrf-beta", str(beta), "--chrf-word-order", "2", "-w", "4"],
            capture_output=True, text=True, check=True).stdout)
        assert (score.name, score.signature) == (expected["name"], expected["signature"])
        assert score.name == f"chrF{beta}++"
    result = runner.invoke(app, ["eval", "-m", "bleu", "-sl", "-p", str(hyp), "-r", str(ref)])
    assert result.exit_code == 0, result.output
    by_line = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m",
                              "bleu", "-sl", "-f", "text"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0].split(" = ")[0]
    assert "eff:yes" in by_line and f"bleu by line: {by_line}" in result.output
    [score] = score_files(["bleu"], str(hyp), [str(ref)], {"sentence_level": True})
    assert "eff:no" in score.signature and f"BLEU|{score.details['sentence_signature']}" == by_line


def test_paired_ar_equals_sacrebleu_paired_ar(system: dict[str, Path]) -> None:
    import re

    options = {"baseline": str(system["ref2"]), "paired_ar": True, "paired_ar_n": 300}
    scores = score_files(["bleu", "chrf", "ter"], str(system["hyp"]), [str(system["ref"])],
                         options)
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(system["ref"]), "-i",
                          str(system["ref2"]), str(system["hyp"]), "-m", "bleu", "chrf", "ter",
                          "--paired-ar", "--paired-ar-n", "300", "-w", "4", "-f", "text"],
                         capture_output=True, text=True, check=True).stdout
    assert [round(s.details["p_value"], 4) for s in scores] == [
        float(p) for p in re.findall(r"p = ([0-9.]+)", out)]
    for score in scores:
        assert f" - {score.name}" in out and score.signature in out
        assert "ar:300|seed:12345" in score.signature and score.details["ar_trials"] == 300


def test_paired_ar_for_labels_is_seeded_and_needs_a_baseline(tmp_path: Path) -> None:
    gold, good, _ = labels_files(tmp_path)
    args = (["accuracy", "f1"], str(tmp_path / "good.txt"), [str(tmp_path / "gold.txt")])
    options = {"baseline": str(tmp_path / "weak.txt"), "paired_ar": True, "paired_ar_n": 200}
    first, again = score_files(*args, options), score_files(*args, options)
    assert [s.details for s in first] == [s.details for s in again]
    assert all(s.details["p_value"] < 0.01 for s in first)  # 80% vs 50% right on 120 lines
    assert first[0].signature.endswith("|ar:200|seed:12345")
    # as accurate, right and wrong on other lines: no difference to find
    right = [i for i, (g, r) in enumerate(zip(good, gold, strict=True)) if g == r][:6]
    wrong = [i for i, (g, r) in enumerate(zip(good, gold, strict=True)) if g != r][:6]
    other = [gold[i] if i in wrong else "other" if i in right else g for i, g in enumerate(good)]
    (tmp_path / "other.txt").write_text("\n".join(other) + "\n")
    [tie] = score_files(["accuracy"], *args[1:],
                        {**options, "baseline": str(tmp_path / "other.txt")})
    assert tie.details["baseline"] == tie.value and tie.details["p_value"] > 0.5
    with pytest.raises(LlmkitError, match="--paired-ar tests the difference to a baseline"):
        score_files(*args, {"paired_ar": True})


def lm_scores(model: Path, data: Path, *args: str) -> dict[str, dict]:
    result = runner.invoke(app, ["eval", "--model", str(model), "--task", "generate", "--data",
                                 str(data), "--json", *args])
    assert result.exit_code == 0, result.output
    return {s["metric"]: s for s in json.loads(result.stdout)["scores"]}


def test_each_perplexity_has_one_value_alone_or_beside_the_others(tiny_gpt2: Path,
                                                                  tmp_path: Path) -> None:
    """`perplexity` is training's (packed blocks), `rolling_perplexity` each document's own
    (lm-evaluation-harness's windows): neither changes with what else is asked."""
    (tmp_path / "valid.txt").write_text(LM_TEXT)
    data = tmp_path / "valid.txt"
    names = ("perplexity", "rolling_perplexity", "word_perplexity", "eval_tokens")
    alone = {n: lm_scores(tiny_gpt2, data, "-m", n)[n]["value"] for n in names}
    together = lm_scores(tiny_gpt2, data, *(x for n in names for x in ("-m", n)), "-m",
                         "bits_per_byte")
    assert {n: together[n]["value"] for n in names} == alone
    assert alone["perplexity"] != alone["rolling_perplexity"]
    assert together["perplexity"]["signature"].startswith("as training evaluates")
    assert together["rolling_perplexity"]["signature"].startswith("each document on its own")
    assert together["rolling_perplexity"]["details"]["tokens"] != alone["eval_tokens"]
    strided = lm_scores(tiny_gpt2, data, "-m", "perplexity", "-m", "rolling_perplexity",
                        "--stride", "8")
    assert strided["perplexity"]["value"] == alone["perplexity"]
    assert strided["rolling_perplexity"]["settings"]["stride"] == 8
    refused = runner.invoke(app, ["eval", "--model", str(tiny_gpt2), "--task", "generate",
                                  "--data", str(data), "-m", "perplexity", "--stride", "8"])
    assert refused.exit_code == 1 and "ask -m rolling_perplexity" in str(refused.exception)


def test_sample_by_document_scores_a_file_as_one_stream(tiny_gpt2: Path, tmp_path: Path
                                                        ) -> None:
    """--sample-by document: the whole file is one document, scored token by token (--stride
    1) with up to the 64 positions of context, after the EOS prefix."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "valid.txt").write_text(LM_TEXT)
    data = tmp_path / "valid.txt"
    found = {how: lm_scores(tiny_gpt2, data, "-m", "rolling_perplexity", "--sample-by", how,
                            *(["--stride", "1"] if how == "document" else []))[
                                "rolling_perplexity"] for how in ("document", "paragraph", "line")}
    assert [found[h]["details"]["documents"] for h in found] == [
        1, len(LM_TEXT.split("\n\n")), len([x for x in LM_TEXT.splitlines() if x])]
    assert found["document"]["settings"]["sample_by"] == "document"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = [tokenizer.eos_token_id, *tokenizer(LM_TEXT, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 64 and found["document"]["details"]["tokens"] == len(ids) - 1
    windows = [ids[max(0, end - 64):end] for end in range(1, len(ids))]  # one per target
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([w + [0] * (64 - len(w)) for w in windows]),
                       attention_mask=torch.tensor([[1] * len(w) + [0] * (64 - len(w))
                                                    for w in windows])).logits
    last = logits[range(len(windows)), [len(w) - 1 for w in windows]].double()
    total = float(torch.log_softmax(last, -1)[range(len(windows)), ids[1:]].sum())
    assert found["document"]["value"] == pytest.approx(math.exp(-total / (len(ids) - 1)),
                                                       rel=1e-5)
    block = lm_scores(tiny_gpt2, data, "-m", "perplexity", "--sample-by", "document")
    assert math.isfinite(block["perplexity"]["value"])
    refused = runner.invoke(app, ["eval", "-m", "accuracy", "--model", str(tiny_gpt2),
                                  "--task", "classify", "--data", str(data), "--sample-by",
                                  "line"])
    assert refused.exit_code == 1 and "--sample-by does not apply to a classify model" in str(
        refused.exception)
    refused = runner.invoke(app, ["eval", "-m", "bleu", "-p", str(data), "-r", str(data),
                                  "--sample-by", "line"])
    assert refused.exit_code == 1 and "--sample-by scores a language model" in str(
        refused.exception)


def test_a_checkpoint_s_perplexity_needs_no_task_and_prints_as_training_does(
        tiny_gpt2: Path, tmp_path: Path) -> None:
    """A language-model metric names the task of a checkpoint that is not a run directory;
    the table and the JSON give training's log's 4 decimals (report.format_value)."""
    from llmkit.run.report import format_value

    (tmp_path / "valid.txt").write_text(LM_TEXT)
    result = runner.invoke(app, ["eval", "-m", "perplexity", "--model", str(tiny_gpt2),
                                 "--data", str(tmp_path / "valid.txt"), "-o",
                                 str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    perplexity, tokens = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert perplexity["decimals"] == 4 and tokens["decimals"] == 0
    assert f" {format_value(perplexity['value'])} " in result.output
