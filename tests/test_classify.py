"""classify end to end on a tiny random BERT: train, save, load without llmkit, resume, predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.inference.predict import predict
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from llmkit.tasks.classify import ClassifyData


def config(model: Path, data: dict[str, Path], out: Path, **train: object):
    options = {"model": str(model), "output": str(out), "data.train": str(data["train"]),
               "data.validation": str(data["validation"]), "train.batch_size": 8,
               "train.learning_rate": 3e-3, "train.epochs": 3,
               **{f"train.{k}": v for k, v in train.items()}}
    return load_config("classify", None, options)


@pytest.fixture(scope="module")
def run(tiny_bert: Path, toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune(config(tiny_bert, toy, tmp_path_factory.mktemp("runs") / "toy"))


def test_run_directory_describes_itself(run: Path) -> None:
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "config.yaml", "metrics.json",
            "train_log.jsonl"} <= names
    assert "checkpoints" not in names  # a finished run keeps its model, not optimizer states
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1.0, 2.0, 3.0]
    assert metrics["final"]["eval_samples"] == 30
    assert metrics["final"]["accuracy"] == max(r["accuracy"] for r in metrics["history"])
    assert metrics["run"]["num_processes"] == 1 and metrics["run"]["global_batch_size"] == 8
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "learning_rate" in r] == list(range(10, 37, 10))


PIPELINE = """
import json, sys
sys.modules["llmkit"] = None  # prove the run directory needs no llmkit
from transformers import pipeline
clf = pipeline("text-classification", model=sys.argv[1])
print(json.dumps(clf(sys.argv[2:])))
"""


def test_loads_in_plain_transformers_pipeline(run: Path, toy: dict[str, Path]) -> None:
    ours = predict(str(run), str(toy["validation"]))
    texts = [r["text"] for r in ours]
    out = subprocess.run([sys.executable, "-c", PIPELINE, str(run), *texts],
                         capture_output=True, text=True, check=True).stdout
    theirs = json.loads(out)
    assert [r["label"] for r in theirs] == [r["label"] for r in ours]  # names, not LABEL_0
    assert {r["label"] for r in theirs} <= {"good", "bad"}
    for a, b in zip(theirs, ours, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_predict_returns_label_names_in_input_order(run: Path, toy: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    records = predict(str(run), str(toy["validation"]), str(out), batch_size=4)
    texts = [line.split("\t")[0] for line in toy["validation"].read_text().splitlines()[1:]]
    labels = [line.split("\t")[1] for line in toy["validation"].read_text().splitlines()[1:]]
    assert [r["text"] for r in records] == texts
    correct = sum(r["label"] == gold for r, gold in zip(records, labels, strict=True))
    metrics = json.loads((run / "metrics.json").read_text())
    assert correct / len(labels) == pytest.approx(metrics["final"]["accuracy"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert all(0.5 <= r["score"] <= 1.0 for r in records)


def test_finished_run_is_not_overwritten(run: Path, tiny_bert: Path, toy: dict[str, Path]
                                         ) -> None:
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(LlmkitError, match="holds a finished run; pass --overwrite"):
        finetune(load_config("classify", str(run / "config.yaml")))
    with pytest.raises(LlmkitError, match="no checkpoint"):
        finetune(load_config("classify", str(run / "config.yaml")), resume=True)
    assert (run / "model.safetensors").read_bytes() == before


class Stop(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tiny_bert: Path, toy: dict[str, Path],
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from llmkit.run import checkpoint

    steady = finetune(config(tiny_bert, toy, tmp_path / "steady", save_steps=5, epochs=2,
                               logging_steps=1))
    save = checkpoint.save_checkpoint

    def save_then_die(accelerator, out, state):  # the process is killed right after step 7
        path = save(accelerator, out, state)
        if state.global_step == 10:
            (out / "checkpoints" / ".tmp-checkpoint-11").mkdir()  # a save cut off halfway
            raise Stop
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    cut = config(tiny_bert, toy, tmp_path / "cut", save_steps=5, epochs=2,
                               logging_steps=1)
    with pytest.raises(Stop):
        finetune(cut)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "cut")] == ["checkpoint-5",
                                                                           "checkpoint-10"]
    with pytest.raises(LlmkitError, match="unfinished run with checkpoints; pass --resume"):
        finetune(cut)
    finetune(cut, resume=True)
    a = load_file(steady / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    history = [json.loads((d / "metrics.json").read_text())["history"]
               for d in (steady, tmp_path / "cut")]
    assert [r["accuracy"] for r in history[0]] == [r["accuracy"] for r in history[1]]
    # the same batches in the same order, step by step (a resumed epoch must not replay epoch 0)
    losses = [[json.loads(line)["loss"] for line in (d / "train_log.jsonl").read_text().splitlines()
               if "learning_rate" in json.loads(line)] for d in (steady, tmp_path / "cut")]
    assert len(losses[0]) == 24
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_from_a_named_checkpoint(tiny_bert: Path, toy: dict[str, Path], tmp_path: Path
                                        ) -> None:
    with pytest.raises(LlmkitError, match="is not an llmkit checkpoint"):
        finetune(config(tiny_bert, toy, tmp_path / "x"), resume_from=str(tmp_path))


def test_unseen_validation_label_is_named(tiny_bert: Path, toy: dict[str, Path],
                                          tmp_path: Path) -> None:
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tlabel\nthe film is great\tgood\nthe plot is dull\tterrible\n")
    with pytest.raises(LlmkitError, match="validation labels never seen in training: terrible"):
        finetune(config(tiny_bert, {**toy, "validation": dev}, tmp_path / "o"))


def test_wrong_task_model_pairing(tmp_path: Path, tiny_bert: Path, toy: dict[str, Path]
                                  ) -> None:
    import shutil

    from transformers import MarianConfig, MarianMTModel

    marian = tmp_path / "marian"
    MarianMTModel(MarianConfig(vocab_size=200, pad_token_id=0, decoder_start_token_id=0,
                               eos_token_id=1, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=32, decoder_ffn_dim=32)).save_pretrained(marian)
    with pytest.raises(LlmkitError, match="is a marian checkpoint, which has no classify head"):
        finetune(config(marian, toy, tmp_path / "o"))
    shutil.copy(tiny_bert / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_bert / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match="has no tokenizer files"):
        finetune(config(tmp_path, toy, tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmkitError, match="not a model checkpoint: it has no config.json"):
        finetune(config(tmp_path / "empty", toy, tmp_path / "o2"))


def test_eval_steps_and_early_stopping(tiny_bert: Path, toy: dict[str, Path], tmp_path: Path
                                       ) -> None:
    # With a learning rate of 0 nothing improves: patience 2 stops after the third evaluation.
    out = finetune(config(tiny_bert, toy, tmp_path / "es", learning_rate=0.0, eval_steps=4,
                          early_stopping_patience=2, metric_for_best="eval_loss"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [4, 8, 12]
    assert metrics["final"]["step"] == 4 and metrics["metric_for_best"] == "eval_loss"


def test_eval_model_mode_reproduces_the_run_metrics(run: Path, toy: dict[str, Path]) -> None:
    from llmkit.inference.scores import score_model

    metrics = json.loads((run / "metrics.json").read_text())["final"]
    accuracy, f1 = score_model(["accuracy", "macro_f1"], str(run), str(toy["validation"]), None,
                               "validation", {})
    assert accuracy.value == metrics["accuracy"] and f1.value == metrics["macro_f1"]
    assert accuracy.settings["eval_samples"] == 30
    with pytest.raises(LlmkitError, match="'perplexity' does not fit a classify model; its "
                                          "metrics are eval_loss, accuracy"):
        score_model(["perplexity"], str(run), str(toy["validation"]), None, "validation", {})


def test_bf16_checkpoint_trains_with_fp32_weights(toy: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 keeps a bf16 checkpoint in bf16; the optimizer needs fp32 weights."""
    from safetensors import safe_open
    from transformers import AutoModel

    from llmkit.models import load_model
    from llmkit.tasks import get_task
    from tests.conftest import save_tiny_bert

    folder = save_tiny_bert(tmp_path / "bert")
    AutoModel.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    model, _ = load_model(get_task("classify"), str(folder), ClassifyData(), num_labels=2)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = finetune(load_config("classify", None, {
        "model": str(folder), "output": str(tmp_path / "run"), "data.train": str(toy["train"]),
        "train.epochs": 1}))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_positive_label_is_explicit_and_recorded() -> None:
    from llmkit.tasks.classify import ClassifyData, positive_id

    assert positive_id(ClassifyData(), {0: "equivalent", 1: "not_equivalent"}) == 1
    assert positive_id(ClassifyData(), {0: "negative", 1: "positive"}) == 1
    assert positive_id(ClassifyData(), {0: "pos", 1: "zzz"}) == 0  # named pos, not second
    mrpc = ClassifyData(positive_label="equivalent")
    assert positive_id(mrpc, {0: "equivalent", 1: "not_equivalent"}) == 0
    with pytest.raises(LlmkitError, match="'yes' is not a label; the labels are a, b"):
        positive_id(ClassifyData(positive_label="yes"), {0: "a", 1: "b"})


def test_max_length_past_the_model_positions_is_capped(tiny_bert: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """128 positions, --max-length 1000, texts of ~300 tokens: capped with one warning, not an
    IndexError in the middle of the first epoch."""
    rows = tmp_path / "long.tsv"
    words = "the film is good and the cast is great " * 40
    rows.write_text("text\tlabel\n" + "".join(f"{words}{i}\t{'ab'[i % 2]}\n" for i in range(20)))
    cfg = load_config("classify", None, {"model": str(tiny_bert), "output": str(tmp_path / "o"),
                                         "data.train": str(rows), "data.max_length": 1000,
                                         "train.epochs": 1, "train.batch_size": 4})
    finetune(cfg)
    assert caplog.text.count("--max-length 1000 is more than the model's context of 128 "
                             "tokens; using 128") == 1


@pytest.mark.parametrize(("names", "found"), [
    (["sentence1", "sentence2", "label", "idx"], ("sentence1", "sentence2")),  # MRPC, RTE
    (["premise", "hypothesis", "label"], ("premise", "hypothesis")),  # MNLI
    (["question", "sentence", "label"], ("question", "sentence")),  # QNLI
    (["question1", "question2", "label"], ("question1", "question2")),  # QQP
    (["sentence", "label", "idx"], ("sentence", None)),  # SST-2, CoLA
    (["review", "label"], ("review", None)),  # as run_glue.py: the first columns
    (["label", "headline", "body"], ("headline", "body")),
    (["text", "label", "other"], ("text", None)),  # the default is there: nothing to find
])
def test_text_columns_are_found_as_run_glue_finds_them(names: list[str],
                                                       found: tuple[str, str | None]) -> None:
    from datasets import Dataset

    from llmkit.tasks.classify import detect

    rows = Dataset.from_dict({n: ["a"] for n in names})
    cfg = detect(rows, ClassifyData())
    assert (cfg.text_column, cfg.text_pair_column) == found
    mine = ClassifyData(text_column="review")
    assert detect(rows, mine) is mine  # a column named on purpose is never replaced


def test_a_pair_file_trains_without_column_options(tiny_bert: Path, tmp_path: Path) -> None:
    from llmkit.inference.predict import run_config

    rows = tmp_path / "pairs.tsv"
    rows.write_text("sentence1\tsentence2\tlabel\n" + "".join(
        f"the film is {w}\tthe cast is {w}\t{int(w == 'good')}\n" for w in ["good", "bad"] * 12))
    run = finetune(load_config("classify", None, {
        "model": str(tiny_bert), "output": str(tmp_path / "run"), "data.train": str(rows),
        "train.epochs": 1, "train.batch_size": 8}))
    saved = run_config(str(run))
    assert (saved.data.text_column, saved.data.text_pair_column) == ("sentence1", "sentence2")
    assert len(predict(str(run), str(rows))) == 24


def test_max_steps_and_warmup_steps_as_trainer_reads_them(tiny_bert: Path, toy: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """12 steps an epoch, --max-steps 17: the run stops inside its second epoch, evaluates and
    keeps its model there; --warmup-steps 2 overrides the ratio; the linear decay ends at 17."""
    out = finetune(config(tiny_bert, toy, tmp_path / "run", max_steps=17, warmup_steps=2,
                          warmup_ratio=0.5, logging_steps=1, learning_rate=1e-3))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [12, 17]
    lrs = {r["step"]: r["learning_rate"] for r in map(json.loads, (
        out / "train_log.jsonl").read_text().splitlines()) if "learning_rate" in r}
    assert sorted(lrs) == list(range(1, 18))
    assert lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3 * 7 / 15) and lrs[17] == 0.0


def test_glue_tsv_finds_its_label_and_text_pair_or_names_the_options(tmp_path: Path) -> None:
    """MRPC's own TSV (Quality, #1 ID, #2 ID, #1 String, #2 String): the label is Quality and
    the pair the two strings, not 'Quality' and '#1 ID' as texts; without any label column
    the refusal names --label-column."""
    from llmkit.data.read import load_split
    from llmkit.tasks.classify import detect

    path = tmp_path / "msr_paraphrase_train.txt"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                    "1\t702876\t702977\tAmrozi accused his brother .\tHe accused his brother .\n"
                    "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tIt sold the chain .\n")
    rows = load_split(str(path), "train", None, "--train", fmt="tsv")
    cfg = detect(rows, ClassifyData())
    assert (cfg.label_column, cfg.text_column, cfg.text_pair_column) == (
        "Quality", "#1 String", "#2 String")
    with pytest.raises(LlmkitError, match="no label column 'label'; the columns are 'review', "
                       "'stars': name it with --label-column"):
        detect(rows.select_columns(["#1 String", "#2 ID"]).rename_columns(
            {"#1 String": "review", "#2 ID": "stars"}), ClassifyData())


def test_label_cells_pandas_reads_as_missing_are_missing_labels(tmp_path: Path) -> None:
    """A CSV whose label cells are 'NaN', 'NA', 'null' or empty (pandas' missing values, as
    to_csv writes a missing label): the empty-label rule applies instead of a class 'NaN'."""
    import pandas as pd

    from llmkit.data.read import load_split
    from llmkit.tasks.classify import clean

    labels = ["pos", "neg", None, "NaN", "NA", "null", "pos", "neg"]
    pd.DataFrame({"text": [f"film {i}" for i in range(8)], "label": labels}).to_csv(
        tmp_path / "d.csv", index=False)
    rows = load_split(str(tmp_path / "d.csv"), "train", None, "--train")
    with pytest.raises(LlmkitError, match="4 of 8 rows have an empty text or label"):
        clean(rows, ClassifyData(), True)
    kept = clean(rows, ClassifyData(empty_rows="skip"), True)
    assert kept["label"] == ["pos", "neg", "pos", "neg"]


def test_collapsed_predictions_are_a_share_far_above_the_labels_share() -> None:
    from transformers import PretrainedConfig

    from llmkit.tasks.classify import collapsed

    config = PretrainedConfig(id2label={0: "neg", 1: "pos"})
    said = "'neg' is 99% of the predictions and 50% of the labels"
    assert collapsed([0] * 99 + [1], [0] * 50 + [1] * 50, config) == {"collapsed": said}
    assert collapsed([0] * 89 + [1] * 11, [0] * 50 + [1] * 50, config) == {}  # not over 90%
    assert collapsed([0] * 95 + [1] * 5, [0] * 70 + [1] * 30, config) == {}  # under 1.5x 70%


def test_a_run_that_predicts_one_label_ends_with_a_warning(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An untrained head (learning rate 0) answers one label for every balanced row: said at
    the end, and in metrics.json; the run is not failed."""
    import logging

    with caplog.at_level(logging.WARNING, logger="llmkit"):
        out = finetune(config(tiny_bert, toy, tmp_path / "run", learning_rate=0.0, epochs=1,
                                 max_steps=2))
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["collapsed"].endswith("is 100% of the predictions and 50% of the labels")
    warned = [r.getMessage() for r in caplog.records if "predicts one label" in r.getMessage()]
    assert warned == [f"the kept evaluation (step {final['step']}) predicts one label for most "
                      f"rows: {final['collapsed']}; the model has barely learned (train longer, "
                      "or try another learning rate)"]


def test_micro_batches_give_the_gradient_of_the_whole_batch(tiny_bert: Path,
                                                             toy: dict[str, Path]) -> None:
    """A classifier's batch as 4 length-sorted micro-batches, each loss weighted by its share of
    the rows, gives the loss and gradients of the batch padded at once (what grouping inside
    each batch would train on: benchmarks/RESULTS.md, LoRA on banking77)."""
    from accelerate import Accelerator
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmkit.data.batches import MicroBatches
    from llmkit.data.features import by_length
    from llmkit.tasks import get_task
    from llmkit.tasks.task import forward_backward

    task = get_task("classify")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(  # eval(): no dropout
        tiny_bert, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}).eval()
    rows = load_dataset("csv", data_files=str(toy["train"]), delimiter="\t", split="train")
    features = task.featurize(rows.select(range(16)), tokenizer, model.config, ClassifyData())
    batch = [features[i] for i in by_length(features)]
    micro = MicroBatches(task.collator(tokenizer), 4)(batch)
    assert len({p["input_ids"].shape[1] for p in micro["micro_batches"]}) > 1
    grads = []
    for collated in (task.collator(tokenizer)(batch), micro):
        model.zero_grad()
        loss = forward_backward(Accelerator(cpu=True), model, collated, task)[0]
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
