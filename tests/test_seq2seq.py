"""Translation and summarization: features, the run directory in plain transformers, metrics
equal to sacrebleu's CLI and rouge-score, predict / eval / generate on seq2seq runs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.tasks import get_task
from llmkit.tasks.seq2seq import SummarizeData, TranslateData
from tests.conftest import count_calls, save_tiny_seq2seq, toy_pairs, two_ranks_and_one

TRANSLATE = ["finetune", "translate", "--source-lang", "en", "--target-lang", "es",
             "--epochs", "2", "--batch-size", "8", "--max-new-tokens", "12", "--lr", "1e-3"]


def rows(pairs: list[tuple[str, str]]):
    from datasets import Dataset

    return Dataset.from_dict({"translation": [{"en": a, "es": b} for a, b in pairs]})


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def references(path: Path, lang: str = "es") -> list[str]:
    return [json.loads(line)["translation"][lang] for line in lines(path)]


@pytest.fixture(scope="module")
def marian_run(tiny_seq2seq, toy_translation, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("marian-run") / "run"
    result = CliRunner().invoke(app, [*TRANSLATE, "--model", str(tiny_seq2seq("marian")),
                                      "--train", str(toy_translation["train"]),
                                      "--validation", str(toy_translation["validation"]),
                                      "--num-beams", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_t5_gets_its_prefix_unless_one_is_given(tiny_seq2seq):
    from transformers import AutoConfig

    from llmkit.tasks.seq2seq import source_prefix

    t5, marian = (AutoConfig.from_pretrained(tiny_seq2seq(f)) for f in ("t5", "marian"))
    cfg = TranslateData(source_lang="en", target_lang="ro")
    assert source_prefix("translate", cfg, t5) == "translate English to Romanian: "
    assert source_prefix("summarize", cfg, t5) == "summarize: "
    assert source_prefix("translate", cfg, marian) == ""
    assert source_prefix("summarize", SummarizeData(source_prefix=">> "), t5) == ">> "
    assert source_prefix("summarize", SummarizeData(source_prefix=""), t5) == ""


def test_labels_are_masked_and_long_targets_counted(tiny_seq2seq, caplog):
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_seq2seq("marian")
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    task = get_task("translate")
    cfg = TranslateData(source_lang="en", target_lang="es", max_target_length=4)
    with caplog.at_level(logging.INFO, logger="llmkit"):
        features = task.featurize(rows([("the dog", "el perro"),
                                        ("the old man eats bread", "el viejo hombre come pan")]),
                                  tokenizer, config, cfg)
    assert "1 of 2 targets are longer than --max-target-length 4" in caplog.text
    assert len(features["labels"][1]) == 4 and features["labels"][1][-1] == tokenizer.eos_token_id
    assert features["labels"][0] == tokenizer(text_target="el perro")["input_ids"]
    assert features["reference"][1] == "el viejo hombre come pan"  # scored untruncated
    batch = task.collator(tokenizer)([features[0], features[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    short = len(features["labels"][0])
    assert batch["labels"][0, short:].tolist() == [-100] * (4 - short)
    assert batch["input_ids"][0, -1].item() == tokenizer.pad_token_id


def test_features_are_cached_and_workers_give_the_same(tiny_seq2seq, toy_translation,
                                                       monkeypatch):
    """Features in datasets' Arrow cache: a second featurize of the same file reads it back
    (no tokenizer call); two tokenizing processes give the same features and row numbers."""
    from transformers import AutoConfig, AutoTokenizer

    from llmkit.data.read import load_split

    folder = tiny_seq2seq("marian")
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    calls = count_calls(type(tokenizer), monkeypatch)
    found = []
    for workers in (1, 1, 2):
        before = len(calls)
        cfg = TranslateData(source_lang="en", target_lang="es", preprocessing_workers=workers)
        split = load_split(str(toy_translation["train"]), "train", None, "--train")
        found.append(get_task("translate").featurize(split, tokenizer, config, cfg))
        if len(found) == 2:
            assert len(calls) == before  # the rerun read datasets' cache file
    assert calls and found[0]["row"] == list(range(len(found[0])))
    for key in ("input_ids", "labels", "row", "reference"):
        assert found[0][key] == found[1][key] == found[2][key]


@pytest.mark.parametrize("family", ["marian", "t5", "bart"])
def test_eval_step_loss_is_the_models_own(family, tiny_seq2seq, monkeypatch):
    """Per-example sums over tokens from eval_step, pooled, give the loss the model computes
    from the same labels (its own decoder-input shift included); in row slices whose logits
    fit LOGITS_BUDGET (each with its rows of the encoder outputs) nothing changes."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = tiny_seq2seq(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    model.generation_config.max_new_tokens = 3
    task = get_task("translate")
    features = task.featurize(rows(toy_pairs(5, seed=2)), tokenizer, model.config,
                              TranslateData(source_lang="en", target_lang="es"))
    batch = task.collator(tokenizer)([features[i] for i in range(len(features))])
    # padded sources and targets of different lengths
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()
    teacher: list[int] = []  # rows of each teacher-forced forward (generate steps one token)
    model.register_forward_pre_hook(
        lambda _, args, kwargs: teacher.extend(
            [len(ids)] if (ids := kwargs.get("decoder_input_ids")) is not None
            and ids.shape[1] > 1 else []), with_kwargs=True)
    with torch.inference_mode():
        out = task.eval_step(model, batch)
        expected = model(**batch).loss
        width = batch["labels"].shape[1]
        monkeypatch.setattr("llmkit.tasks.task.LOGITS_BUDGET", 2 * width * model.config.vocab_size)
        sliced = task.eval_step(model, batch)
    assert teacher == [5, 2, 2, 1]  # the whole batch, then slices of 2 rows within the budget
    assert out["loss_count"].tolist() == (batch["labels"] != -100).sum(-1).tolist()
    pooled = out["loss_sum"].sum() / out["loss_count"].sum()
    assert pooled.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["generated"].shape == (len(features), 4)
    assert sliced["loss_count"].tolist() == out["loss_count"].tolist()
    assert torch.allclose(sliced["loss_sum"], out["loss_sum"], rtol=1e-5)
    assert sliced["generated"].tolist() == out["generated"].tolist()


def test_missing_language_and_empty_rows(tiny_seq2seq):
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_seq2seq("marian")
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    task = get_task("translate")
    with pytest.raises(LlmkitError, match="--target-lang fr is not in the data; the languages "
                       "there are en, es"):
        task.featurize(rows([("a", "b")]), tokenizer, config,
                       TranslateData(source_lang="en", target_lang="fr"))
    data = rows([("the dog", "el perro"), ("the cat", " "), ("", "el")])
    with pytest.raises(LlmkitError, match="2 of 3 rows have an empty source or target; .* "
                       "data.empty_rows=skip to leave them out \\(first: .*'the cat'"):
        task.featurize(data, tokenizer, config, TranslateData(source_lang="en", target_lang="es"))
    kept = task.featurize(data, tokenizer, config, TranslateData(source_lang="en", target_lang="es",
                                                              empty_rows="skip"))
    assert kept["row"] == [0] and kept["reference"] == ["el perro"]
    with pytest.raises(LlmkitError, match="translate needs --source-lang and --target-lang"):
        task.columns(TranslateData(), True)


def test_translate_run_directory_generates_the_same_in_plain_transformers(marian_run,
                                                                          toy_translation):
    metrics = json.loads((marian_run / "metrics.json").read_text())
    final = metrics["final"]
    assert metrics["metric_for_best"] == "bleu"
    assert {"eval_loss", "perplexity", "bleu", "chrf", "bleu_signature"} <= set(final)
    assert final["eval_samples"] == 12 and "tok:13a" in final["bleu_signature"]
    generation = json.loads((marian_run / "generation_config.json").read_text())
    assert generation["num_beams"] == 2 and generation["max_new_tokens"] == 12
    predicted = lines(marian_run / "predictions.txt")
    assert len(predicted) == 12
    sources = [json.loads(line)["translation"]["en"] for line in lines(toy_translation[
        "validation"])]
    code = f"""
import json, sys
sys.modules["llmkit"] = None
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(marian_run)!r})
model = AutoModelForSeq2SeqLM.from_pretrained({str(marian_run)!r}).eval()
batch = tok({sources!r}, return_tensors="pt", padding=True)
out = model.generate(**batch)
print(json.dumps([t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]))
"""
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert json.loads(plain.stdout.splitlines()[-1]) == predicted


def test_run_metrics_equal_sacrebleu_cli(marian_run, toy_translation, tmp_path):
    refs = tmp_path / "refs.txt"
    refs.write_text("\n".join(references(toy_translation["validation"])) + "\n",
                    encoding="utf-8")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(refs), "-i",
                          str(marian_run / "predictions.txt"), "-m", "bleu", "chrf", "-b",
                          "-w", "4"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    final = json.loads((marian_run / "metrics.json").read_text())["final"]
    printed = cli.stdout.replace("[", "").replace("]", "").replace(",", "").split()
    assert printed == [f"{final['bleu']:.4f}", f"{final['chrf']:.4f}"]


def test_eval_predict_and_generate_on_a_translate_run(marian_run, toy_translation):
    runner = CliRunner()
    final = json.loads((marian_run / "metrics.json").read_text())["final"]
    scored = runner.invoke(app, ["eval", "-m", "chrf", "-m", "eval_loss", "--model",
                                 str(marian_run), "--data", str(toy_translation["validation"]),
                                 "--json"])
    assert scored.exit_code == 0, scored.output
    scores = {s["metric"]: s for s in json.loads(scored.stdout)["scores"]}
    values = {name: s["value"] for name, s in scores.items()}
    assert values["chrf"] == pytest.approx(final["chrf"], abs=1e-9)
    assert scores["chrf"]["signature"].startswith("nrefs:1|case:mixed")
    assert values["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    predicted = lines(marian_run / "predictions.txt")
    shown = runner.invoke(app, ["predict", "--model", str(marian_run), "--input",
                                str(toy_translation["validation"])])
    assert shown.exit_code == 0, shown.output
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["translation"] for r in records] == predicted
    source = json.loads(lines(toy_translation["validation"])[0])["translation"]["en"]
    generated = runner.invoke(app, ["generate", "--model", str(marian_run), "--prompt", source,
                                    "--max-new-tokens", "12"])  # the run's 2 beams
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.strip() == predicted[0]


def test_summarize_t5_rouge_equals_rouge_score(tiny_seq2seq, tmp_path):
    from rouge_score import rouge_scorer

    from llmkit.scoring.metrics import split_sentences

    docs = [{"document": f"{en}. {es}. the end.", "summary": en} for en, es in toy_pairs(48, 3)]
    for name, part in (("train", docs[:36]), ("dev", docs[36:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "finetune", "summarize", "--model", str(tiny_seq2seq("t5")), "--train",
        str(tmp_path / "train.jsonl"), "--validation", str(tmp_path / "dev.jsonl"),
        "--text-column", "document", "--epochs", "1", "--max-new-tokens", "8",
        "--output", str(out)])
    assert result.exit_code == 0, result.output
    final = json.loads((out / "metrics.json").read_text())["final"]
    predicted = lines(out / "predictions.txt")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      use_stemmer=True)
    scores = [scorer.score(split_sentences(d["summary"]), split_sentences(p))
              for d, p in zip(docs[36:], predicted, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert final[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores)
                                           / len(scores), abs=1e-9)
    generated = CliRunner().invoke(app, ["generate", "--model", str(out), "--prompt",
                                          docs[36]["document"], "--max-new-tokens", "8"])
    assert generated.exit_code == 0, generated.output  # with the "summarize: " prefix
    assert generated.stdout.strip() == predicted[0]
    from transformers import AutoConfig

    from llmkit.inference.generate import run_prefix

    assert run_prefix(str(out), AutoConfig.from_pretrained(out)) == "summarize: "


def test_bart_reads_a_column_per_language(tiny_seq2seq, tmp_path):
    import csv

    path = tmp_path / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["en", "es"])
        writer.writerows(toy_pairs(40, 4))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*TRANSLATE, "--model", str(tiny_seq2seq("bart")),
                                      "--train", str(path), "--translation-column", "",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["eval_samples"] == 4 and "chrf" in final


@pytest.mark.parametrize(("family", "task", "fits"), [
    ("bert", "translate", "classify, qa"), ("gpt2", "summarize", "classify, qa, generate"),
    ("marian", "generate", "summarize, translate")])
def test_wrong_model_for_the_task(family, task, fits, tiny_seq2seq, tiny_bert, tiny_gpt2,
                                  toy_translation, tmp_path):
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2}.get(family) or tiny_seq2seq(family)
    columns = {"translate": ["--source-lang", "en", "--target-lang", "es"],
               "summarize": ["--text-column", "translation", "--summary-column", "translation"],
               "generate": ["--text-column", "translation"]}[task]
    result = CliRunner().invoke(app, ["finetune", task, "--model", str(model), "--train",
                                      str(toy_translation["train"]), *columns,
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert f"it fits: {fits}" in str(result.exception)


def test_the_loop_trains_as_seq2seq_trainer_on_the_same_batches(toy_translation, tmp_path):
    """Dropout off and Seq2SeqTrainer given llmkit's batches in llmkit's order: after 2 epochs
    (warm-up and linear schedule, AdamW's decay groups, clipping, an evaluation and a
    checkpoint between the epochs) both models give the same validation loss."""
    import torch
    import torch.nn.functional as F
    from datasets import load_dataset
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from llmkit.data.batches import LengthGroupedBatches
    from llmkit.data.features import lengths
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    model = save_tiny_seq2seq(tmp_path / "bart", "bart", dropout=0.0)
    data = TranslateData(source_lang="en", target_lang="es")
    out = finetune(load_config("translate", None, {
        "model": str(model), "output": str(tmp_path / "run"),
        "data.train": str(toy_translation["train"]),
        "data.validation": str(toy_translation["validation"]), "data.source_lang": "en",
        "data.target_lang": "es", "data.max_new_tokens": 2, "train.epochs": 2,
        "train.batch_size": 8, "train.learning_rate": 1e-3, "train.warmup_ratio": 0.1,
        "train.weight_decay": 0.01, "train.seed": 3, "train.group_by_length": False}))
    expected = json.loads((out / "metrics.json").read_text())["history"][-1]["eval_loss"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSeq2SeqLM.from_pretrained(model)
    task = get_task("translate")
    train, valid = (task.featurize(load_dataset("json", data_files=str(toy_translation[s]),
                                                split="train"), tokenizer, net.config, data)
                    .select_columns(["input_ids", "attention_mask", "labels"])
                    for s in ("train", "validation"))
    batches = LengthGroupedBatches(lengths(train), 8, seed=3, group=False)
    order = []
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        order += [i for batch in batches for i in batch]

    class InOrder(Seq2SeqTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    collate = DataCollatorForSeq2Seq(tokenizer, model=net)
    InOrder(model=net, train_dataset=train.select(order), data_collator=collate,
            args=Seq2SeqTrainingArguments(
                output_dir=str(tmp_path / "trainer"), num_train_epochs=1, learning_rate=1e-3,
                per_device_train_batch_size=8, warmup_steps=0.1, weight_decay=0.01,
                save_strategy="no", report_to=[], disable_tqdm=True)).train()
    batch = collate([valid[i] for i in range(len(valid))])
    with torch.inference_mode():
        logits = net.eval()(**batch).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # ~30 s of two gloo processes; CPU time the default tier keeps
def test_two_processes_match_one_with_accumulation(toy_translation, tmp_path):
    """Batches of 16 each run in 2 sorted micro-batches (synced after the second) on each of
    2 ranks, as 1 process accumulating 2 batches."""
    model = save_tiny_seq2seq(tmp_path / "marian", "marian", dropout=0.0)  # draws differ per rank
    args = [*TRANSLATE, "--model", str(model), "--train",
            str(toy_translation["train"]), "--validation", str(toy_translation["validation"]),
            "--batch-size", "16", "--eval-batch-size", "5", "-s", "train.seed=3"]
    two, one = two_ranks_and_one(args, tmp_path)
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["step"] == b["step"] and a["eval_samples"] == b["eval_samples"] == 12
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-4)
    predicted = [lines(tmp_path / d / "predictions.txt") for d in ("two", "one")]
    assert len(predicted[0]) == 12 and predicted[0] == predicted[1]


def test_multilingual_codes_set_tokenizer_languages_and_forced_bos(tiny_seq2seq):
    """mBART/NLLB style: codes like es_XX are tokenizer tokens and find the data key es."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llmkit.tasks.seq2seq import language_key

    folder = tiny_seq2seq("marian")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["en_XX", "es_XX"]})
    tokenizer.src_lang, tokenizer.tgt_lang = "??", "??"  # what mBART's tokenizer carries
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    cfg = TranslateData(source_lang="en_XX", target_lang="es_XX", num_beams=3, max_new_tokens=7)
    get_task("translate").prepare(model, tokenizer, cfg)
    assert (tokenizer.src_lang, tokenizer.tgt_lang) == ("en_XX", "es_XX")
    generation = model.generation_config
    assert generation.forced_bos_token_id == tokenizer.convert_tokens_to_ids("es_XX")
    assert (generation.num_beams, generation.max_new_tokens) == (3, 7)
    assert language_key("en_XX", ["en", "es"], "source") == "en"
    plain = AutoTokenizer.from_pretrained(folder)  # no src_lang: nothing forced
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    get_task("translate").prepare(model, plain, cfg)
    assert model.generation_config.forced_bos_token_id is None


def test_micro_batches_give_the_gradient_of_the_whole_batch(tiny_seq2seq):
    """A batch run as 4 length-sorted micro-batches, each loss weighted by its share of the
    target tokens, gives the loss and the gradients of the same rows padded into one batch."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llmkit.data.batches import MicroBatches
    from llmkit.data.features import by_length
    from llmkit.tasks.task import forward_backward

    folder = tiny_seq2seq("marian")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()  # no dropout: same function
    task = get_task("translate")
    features = task.featurize(rows(toy_pairs(16, seed=3)), tokenizer, model.config,
                              TranslateData(source_lang="en", target_lang="es"))
    batch = [features[i] for i in by_length(features)]
    grads = []
    for collated in (task.collator(tokenizer)(batch), MicroBatches(task.collator(tokenizer), 4)(
            batch)):
        model.zero_grad()
        loss = forward_backward(Accelerator(cpu=True), model, collated, task)[0]
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}))
    micro = MicroBatches(task.collator(tokenizer), 4)(batch)["micro_batches"]
    assert len({p["labels"].shape[1] for p in micro}) > 1  # the parts padded differently
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_grouped_batches_of_16_run_in_two_micro_batches_and_resume_exactly(
        tiny_seq2seq, toy_translation, tmp_path, monkeypatch):
    """translate groups inside each batch: 64 rows in batches of 16 are 4 optimizer steps an
    epoch of at most 2 sorted micro-batches each (none over half the batch at the data's longest
    row); a run cut mid-epoch resumes to the same weights."""
    import functools

    import torch
    from safetensors.torch import load_file
    from transformers import MarianMTModel

    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config
    from tests.conftest import cut_after_checkpoint

    def config(out: Path):
        return load_config("translate", None, {
            "model": str(tiny_seq2seq("marian")), "output": str(out),
            "data.train": str(toy_translation["train"]),
            "data.validation": str(toy_translation["validation"]), "data.source_lang": "en",
            "data.target_lang": "es", "data.max_new_tokens": 4, "train.batch_size": 16,
            "train.epochs": 2, "train.save_steps": 3, "train.learning_rate": 1e-3})

    forward, rows = MarianMTModel.forward, []

    @functools.wraps(forward)  # generate reads the signature
    def counted(self, **inputs):
        if self.training:
            rows.append(len(inputs["input_ids"]))
        return forward(self, **inputs)

    monkeypatch.setattr(MarianMTModel, "forward", counted)
    steady = finetune(config(tmp_path / "steady"))
    monkeypatch.setattr(MarianMTModel, "forward", forward)
    # 2 epochs x 4 steps x 16 rows, some batches in 2 micro-batches
    assert sum(rows) == 128 and 8 < len(rows) <= 16, rows
    history = json.loads((steady / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history] == [4, 8]
    cut = config(tmp_path / "cut")
    cut_after_checkpoint(cut, 3, monkeypatch)
    finetune(cut, resume=True)
    a, b = (load_file(d / "model.safetensors") for d in (steady, tmp_path / "cut"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_pairs_without_the_target_language_are_counted_with_the_first(tiny_seq2seq, tmp_path):
    """JSON Lines where some pairs lack `es` (datasets reads the key as missing): one line with
    how many, the first of them and what to do, not KeyError: 'es'."""
    from transformers import AutoConfig, AutoTokenizer

    from llmkit.data.read import load_split

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": f"dog {i}", **(
        {"es": f"perro {i}"} if i % 3 else {})}}) + "\n" for i in range(6)))
    folder = tiny_seq2seq("marian")
    tokenizer, config = AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder)
    with pytest.raises(LlmkitError, match=r"2 of 6 rows have an empty source or target; fix the "
                       r"data or pass -s data.empty_rows=skip .*\(first: .*'dog 0'"):
        get_task("translate").featurize(load_split(str(path), "train", None, "--train"),
                                        tokenizer, config,
                                        TranslateData(source_lang="en", target_lang="es"))


def test_summarize_takes_the_first_columns_as_run_summarization_does(caplog):
    """transformers' xsum fixture (document, summary, id) trains as is; columns named neither
    text nor summary are the first two text columns; columns named on purpose stay."""
    from datasets import Dataset

    from llmkit.tasks.seq2seq_settings import detect

    xsum = Dataset.from_dict({"document": ["a long text"], "summary": ["short"], "id": ["1"]})
    with caplog.at_level(logging.INFO, logger="llmkit"):
        found = detect("summarize", xsum, SummarizeData())
    assert (found.text_column, found.summary_column) == ("document", "summary")
    assert "document column: document, summary column: summary" in caplog.text
    cnn = Dataset.from_dict({"id": ["1"], "article": ["a long text"], "highlights": ["short"]})
    found = detect("summarize", cnn, SummarizeData())
    assert (found.text_column, found.summary_column) == ("article", "highlights")
    mine = SummarizeData(text_column="body", summary_column="highlights")
    assert detect("summarize", cnn, mine) is mine  # the check of columns names 'body'
    assert detect("summarize", cnn, SummarizeData(text_column="article")).summary_column == \
        "highlights"
    assert detect("translate", xsum, TranslateData()) == TranslateData()
