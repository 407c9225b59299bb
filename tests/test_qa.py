"""Extractive QA: windows and offsets, answer checks, post-processing, a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from llmkit.errors import LlmkitError
from llmkit.inference.predict import predict
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from llmkit.tasks.qa import CANDIDATES, QAData, answers, featurize

FILLER = "the quick brown fox jumps over the lazy dog . "
CONTEXT = FILLER * 6 + "paris is the capital of france . " + FILLER * 6 + "great good"


def squad_rows(context: str = CONTEXT, answer: str = "paris", question: str = "what is the "
               "capital of france ?") -> Dataset:
    start = context.index(answer)
    return Dataset.from_list([{"id": "q1", "question": question, "context": context,
                               "answers": {"text": [answer], "answer_start": [start]}}])


def tokenizer_of(model: Path):
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)


@pytest.mark.parametrize("answer", ["paris", "great good", "the quick"])
def test_long_contexts_become_windows_that_keep_the_span(tiny_bert: Path, answer: str) -> None:
    tokenizer, config = tokenizer_of(tiny_bert)
    cfg = QAData(max_length=48, doc_stride=16)
    features = featurize(squad_rows(answer=answer), tokenizer, config, cfg)
    assert len(features) > 2  # the context is far longer than one window
    found = 0
    for f in features:
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            assert e == 0
            continue
        found += 1
        assert f["context"][f["offsets"][s][0]:f["offsets"][e][1]] == answer
    assert found >= 1
    assert all(len(f["input_ids"]) <= 48 for f in features)


def test_answers_not_at_answer_start(tiny_bert: Path) -> None:
    tokenizer, config = tokenizer_of(tiny_bert)
    rows = Dataset.from_list([
        {"id": "a", "question": "q ?", "context": "paris is big",
         "answers": {"text": ["paris"], "answer_start": [0]}},
        {"id": "b", "question": "q ?", "context": "paris is big",
         "answers": {"text": ["london"], "answer_start": [0]}}])
    with pytest.raises(LlmkitError, match="1 of 2 examples have answer text that does not occur"):
        featurize(rows, tokenizer, config, QAData())
    kept = featurize(rows, tokenizer, config, QAData(bad_answers="skip"))
    assert set(kept["example_id"]) == {"a"}
    empty = Dataset.from_list([{"id": "c", "question": "q ?", "context": "paris",
                                "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(LlmkitError, match="no answer .* data.version_2 is false"):
        featurize(empty, tokenizer, config, QAData(version_2=False))
    blank = Dataset.from_list([{"id": "d", "question": "q ?", "context": "  ",
                                "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(LlmkitError, match="1 questions have an empty 'context'"):
        featurize(blank, tokenizer, config, QAData())


def window_outputs(starts: list[list[tuple[int, float]]], ends: list[list[tuple[int, float]]],
                   null: list[float]) -> dict[str, np.ndarray]:
    def pad(pairs: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
        pairs = pairs + [(0, -1e4)] * (CANDIDATES - len(pairs))
        return [p[0] for p in pairs], [p[1] for p in pairs]

    s, e = [pad(p) for p in starts], [pad(p) for p in ends]
    return {"start_index": np.array([x[0] for x in s]), "start_values": np.array([x[1] for x in s]),
            "end_index": np.array([x[0] for x in e]), "end_values": np.array([x[1] for x in e]),
            "null": np.array(null)}


def test_post_processing_best_span_across_windows_and_null_threshold() -> None:
    context = "alpha beta gamma delta"
    offsets = [[-1, -1], [0, 5], [6, 10], [11, 16], [17, 22]]
    features = Dataset.from_dict({"example_id": ["x", "x"], "context": [context] * 2,
                                  "offsets": [offsets, offsets]})
    gathered = window_outputs(
        starts=[[(1, 2.0), (3, 1.0)], [(2, 5.0), (0, 9.0)]],
        ends=[[(1, 2.0)], [(4, 4.0), (1, 8.0), (0, 9.0)]],
        null=[18.0, 12.0])
    cfg = QAData(n_best=3, max_answer_length=30)
    # window 2: start 2 (beta) + end 4 (delta) = 9 beats window 1's alpha = 4; CLS and end < start
    # are not answers
    assert answers(gathered, features, cfg, version_2=False) == {"x": "beta gamma delta"}
    assert answers(gathered, features, QAData(n_best=3, max_answer_length=2), False) == {
        "x": "alpha"}
    # v2: the smallest null score (12) minus the best span (9) = 3 > threshold 0 -> empty answer
    assert answers(gathered, features, cfg, version_2=True) == {"x": ""}
    assert answers(gathered, features, QAData(n_best=3, null_threshold=3.5), True) == {
        "x": "beta gamma delta"}


def write_squad(path: Path) -> Path:
    qas = [{"id": f"q{i}", "question": "what is the capital of france ?",
            "answers": [{"text": "paris", "answer_start": CONTEXT.index("paris")}],
            "is_impossible": False} for i in range(12)]
    qas += [{"id": f"n{i}", "question": "who loved every minute ?", "answers": [],
             "is_impossible": True} for i in range(4)]
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": qas}]}]}
    path.write_text(json.dumps(data))
    return path


AUTO = """
import sys, torch
sys.modules["llmkit"] = None
from transformers import AutoModelForQuestionAnswering, AutoTokenizer
model = AutoModelForQuestionAnswering.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
enc = tok("what is the capital of france ?", "paris is the capital of france .",
          return_tensors="pt")
with torch.inference_mode():
    out = model(**enc)
print(out.start_logits.shape[-1] == enc["input_ids"].shape[-1], int(out.start_logits.argmax()))
"""


def test_smoke_run_on_official_squad_json(tiny_bert: Path, tmp_path: Path) -> None:
    data = write_squad(tmp_path / "train.json")
    cfg = load_config("qa", None, {
        "model": str(tiny_bert), "output": str(tmp_path / "run"), "data.train": str(data),
        "data.validation": str(data), "data.max_length": 48, "data.doc_stride": 16,
        "train.epochs": 1, "train.batch_size": 8})
    out = finetune(cfg)
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    assert metrics["total"] == 16 and metrics["HasAns_total"] == 12 and metrics["NoAns_total"] == 4
    assert 0 <= metrics["f1"] <= 100 and metrics["eval_samples"] > 16  # windows, not examples
    assert json.loads((out / "config.json").read_text())["squad_v2"] is True  # for predict
    predictions = json.loads((out / "predictions.json").read_text())  # the official format
    assert sorted(predictions) == sorted([f"q{i}" for i in range(12)] + [f"n{i}" for i in range(4)])
    assert all(isinstance(v, str) for v in predictions.values())
    result = subprocess.run([sys.executable, "-c", AUTO, str(out)], capture_output=True,
                            text=True, check=True).stdout.split()
    assert result[0] == "True"
    from typer.testing import CliRunner

    from llmkit.cli import app

    cli = CliRunner().invoke(app, ["predict", "--model", str(out), "--question",
                                   "what is the capital ?", "--context", "paris is the capital ."])
    assert cli.exit_code == 0, cli.output
    [record] = [json.loads(line) for line in cli.stdout.splitlines()]
    assert record["question"] == "what is the capital ?" and isinstance(record["answer"], str)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "context": c}) + "\n" for q, c in
                            [("a ?", CONTEXT), ("b ?", "short context"), ("c ?", CONTEXT)]))
    records = predict(str(out), str(rows))
    assert [r["question"] for r in records] == ["a ?", "b ?", "c ?"]
    assert records[0]["answer"] in CONTEXT and records[1]["answer"] in "short context"


@pytest.mark.slow  # ~30 s of two gloo processes; CPU time the default tier keeps
def test_two_process_qa_run_matches_one_process(tmp_path: Path) -> None:
    """Windows gathered from two ranks come back in order: the same answers and scores."""
    from tests.conftest import save_tiny_bert, two_ranks_and_one

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    data = write_squad(tmp_path / "train.json")
    args = ["finetune", "qa", "--model", str(model), "--train", str(data), "--validation",
            str(data), "--max-length", "48", "--doc-stride", "16", "--batch-size", "4",
            "--eval-batch-size", "5", "--epochs", "1", "--lr", "1e-3"]
    m2, m1 = two_ranks_and_one(args, tmp_path)
    for key in ("eval_samples", "total", "exact_match", "f1"):
        assert m2["final"][key] == pytest.approx(m1["final"][key]), key
    assert (json.loads((tmp_path / "two" / "predictions.json").read_text())
            == json.loads((tmp_path / "one" / "predictions.json").read_text()))


LOOKUP_ANSWERS = ["paris", "lazy dog", "brown fox", "superb"]
LOOKUP_FILLERS = ["the", "plot", "is", "dull", "and", "acting", "worse", "one", "of", "best",
                  "movies", "year", "cast", "wonderful", "mess", "from", "start", "to", "end"]

ANSWER_IN_PLAIN_TRANSFORMERS = """
import json, sys, torch
sys.modules["llmkit"] = None
from transformers import AutoModelForQuestionAnswering, AutoTokenizer
model = AutoModelForQuestionAnswering.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
answers = []
for line in open(sys.argv[2]):
    row = json.loads(line)
    enc = tok(row["question"], row["context"], return_tensors="pt", return_offsets_mapping=True)
    offsets = enc.pop("offset_mapping")[0].tolist()
    outside = torch.tensor([s != 1 for s in enc.sequence_ids()])
    with torch.inference_mode():
        out = model(**enc)
    start = int(out.start_logits[0].masked_fill(outside, -1e9).argmax())
    end = start + int(out.end_logits[0, start:start + 10].masked_fill(outside[start:start + 10],
                                                                      -1e9).argmax())
    answers.append(row["context"][offsets[start][0]:offsets[end][1]])
print(json.dumps(answers))
"""


def write_lookup(path: Path, rows: int, seed: int) -> Path:
    """SQuAD-layout rows a tiny model can learn: one answer phrase among filler words."""
    import random

    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        answer = rng.choice(LOOKUP_ANSWERS)
        words = rng.choices(LOOKUP_FILLERS, k=rng.randint(4, 14))
        words.insert(rng.randint(0, len(words)), answer)
        context = " ".join(words)
        lines.append(json.dumps({"id": f"{seed}-{i}", "title": "t", "context": context,
                                 "question": "what is the capital ?", "answers": {
                                     "text": [answer], "answer_start": [context.index(answer)]}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trained_run_answers_in_plain_transformers(tmp_path: Path) -> None:
    """A tiny BERT learns the toy task; the run directory then extracts the gold answers of
    unseen rows with the Auto classes alone (no llmkit, no pipeline)."""
    from tests.conftest import save_tiny_bert

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    dev = write_lookup(tmp_path / "dev.jsonl", 40, seed=1)
    cfg = load_config("qa", None, {
        "model": str(model), "output": str(tmp_path / "run"),
        "data.train": str(write_lookup(tmp_path / "train.jsonl", 240, seed=0)),
        "data.validation": str(dev), "data.max_length": 48, "data.doc_stride": 16,
        "train.epochs": 6,
        "train.batch_size": 16, "train.learning_rate": 5e-3})
    out = finetune(cfg)
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["exact_match"] == 100.0 and final["f1"] == 100.0
    gold = [json.loads(line)["answers"]["text"][0] for line in dev.read_text().splitlines()]
    answered = subprocess.run([sys.executable, "-c", ANSWER_IN_PLAIN_TRANSFORMERS, str(out),
                               str(dev)], capture_output=True, text=True, check=True).stdout
    assert json.loads(answered) == gold
    assert json.loads((out / "predictions.json").read_text()) == {
        json.loads(line)["id"]: g for line, g in zip(dev.read_text().splitlines(), gold,
                                                     strict=True)}


def test_tokenizers_that_drop_windows_are_refused(tiny_bert: Path, monkeypatch) -> None:
    import tokenizers

    tokenizer, config = tokenizer_of(tiny_bert)
    monkeypatch.setattr(tokenizers, "__version__", "0.23.2")
    with pytest.raises(LlmkitError, match=r"tokenizers 0\.23\.2 drops the windows"):
        featurize(squad_rows(), tokenizer, config, QAData(max_length=48, doc_stride=16))


def test_spans_give_the_best_span_of_all_windows_its_score_and_offsets() -> None:
    """On crafted logits: the best start + end over an example's windows wins (here in its
    second window), with the context's characters as offsets; candidates on question tokens
    (offset -1), ending before they start or longer than max_answer_length are skipped; SQuAD
    2.0 answers empty (score: the lowest null score of its windows) when that beats the span
    by more than null_threshold."""
    from llmkit.tasks.qa import spans

    context = "Paris is the capital of France."
    # token offsets: 0 and 1 are the question's (-1), then words of the context
    words = [(-1, -1), (-1, -1), (0, 5), (6, 8), (9, 12), (13, 20), (21, 23), (24, 30)]
    features = Dataset.from_dict({"example_id": ["a", "a"], "context": [context] * 2,
                                  "offsets": [words, words]})

    def candidates(pairs: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([[i for i, _ in w] for w in pairs]),
                np.array([[v for _, v in w] for w in pairs], dtype=np.float32))

    starts = candidates([[(2, 3.0), (1, 9.0), (7, 1.0)], [(7, 4.0), (5, 2.5), (3, 0.5)]])
    ends = candidates([[(2, 2.0), (0, 9.0), (4, 1.0)], [(7, 3.5), (2, 8.0), (5, 1.0)]])
    gathered = {"start_index": starts[0], "start_values": starts[1], "end_index": ends[0],
                "end_values": ends[1], "null": np.array([6.0, 5.0], dtype=np.float32)}
    data = QAData(n_best=3)
    found = spans(gathered, features, data, version_2=False)["a"]
    # window 2: start 7 + end 7 = 7.5 beats window 1's 2 + 2 = 5.0; (1, 0) are the
    # question's, (7, 2) ends before it starts
    assert found == {"answer": "France", "score": 7.5, "start": 24, "end": 30}
    assert context[found["start"]:found["end"]] == found["answer"]
    short = spans(gathered, features, QAData(n_best=3, max_answer_length=1), False)["a"]
    assert short["answer"] == "France"  # one token: still 7..7
    assert spans(gathered, features, data, version_2=True)["a"]["answer"] == "France"
    gathered["null"] = np.array([9.0, 8.0], dtype=np.float32)  # 8 - 7.5 > 0: empty
    assert spans(gathered, features, data, version_2=True)["a"] == {
        "answer": "", "score": 8.0, "start": -1, "end": -1}
    assert spans(gathered, features, QAData(n_best=3, null_threshold=1.0), True)["a"][
        "answer"] == "France"
