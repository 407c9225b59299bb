"""llmkit finetune reward: the loss, its gradients and the figures equal TRL's RewardTrainer on
the same rows; the three pair formats; cuts that keep the special tokens; runs on BERT and GPT-2
that learn a toy preference and load in plain transformers; predict and eval; --lora; bad input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_bad_input import run_main
from tests.test_chat import chat_gpt2  # noqa: F401  (a fixture)

PAIRS = [{"prompt": "the film is", "chosen": " a gripping , funny film .", "rejected": " dull ."},
         {"prompt": "the plot", "chosen": " moves fast .",
          "rejected": " drags on and on and on ."},
         {"prompt": "paris is", "chosen": " the capital of france .", "rejected": " a film ."}]
CHATS = [{"prompt": [{"role": "user", "content": r["prompt"]}],
          "chosen": [{"role": "assistant", "content": r["chosen"]}],
          "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"],
             "margin": m} for r, m in zip(PAIRS, (0.5, 0.0, 2.0), strict=True)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def theirs(folder: Path, rows: list[dict[str, Any]], out: Path, **args: Any) -> tuple[Any, ...]:
    """TRL's RewardTrainer on `rows` in one batch: its model after one backward, the batch,
    the loss and its logged figures."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1),
        args=RewardConfig(output_dir=str(out), use_cpu=True, report_to=[],
                          per_device_train_batch_size=len(rows), **args),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(folder))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return trainer.model, batch, loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(folder: Path, rows: list[dict[str, Any]], **data: Any) -> tuple[Any, Any]:
    """llmkit's model (loaded as a run loads it) and its batch of `rows`."""
    from datasets import Dataset

    from llmkit.models import load_model
    from llmkit.tasks import get_task, load_config, pairs

    task = get_task("reward")
    cfg = load_config("reward", None, {"model": str(folder), "output": "unused",
                                       "data.train": "unused",
                                       **{f"data.{k}": v for k, v in data.items()}})
    found = Dataset.from_list(rows)
    settings = pairs.detect(found, cfg.data)
    model, tokenizer = load_model(task, str(folder), settings,
                                  **task.model_kwargs(found, found, settings))
    features = task.featurize(task.usable(found, settings, True), tokenizer, model.config,
                              settings)
    return model, task.collator(tokenizer)([features[i] for i in range(len(features))])


@pytest.fixture(scope="module")
def quiet_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("quiet-bert"), dropout=0.0)


@pytest.mark.parametrize("rows", ["standard", "conversational", "implicit+margin+center",
                                  "bert"])
def test_loss_gradients_and_figures_equal_trl_rewardtrainer(
        rows: str, chat_gpt2: Path, quiet_bert: Path, tmp_path: Path) -> None:  # noqa: F811
    """Dropout off, the same rows in one batch: TRL's tokens, loss, gradients and figures.
    TRL tokenizes text rows only with a tokenizer that has an EOS token (it appends one with
    str.endswith(eos_token): a TypeError for BERT's), so the BERT rows go to it tokenized the
    way its tokenize_fn does (tokenizer(prompt + reply)), which it takes as they are."""
    from llmkit.tasks.reward import objective

    folder, given, args, data = chat_gpt2, PAIRS, {}, {}
    if rows == "conversational":
        given = CHATS
    elif rows == "implicit+margin+center":
        given, args = IMPLICIT, {"center_rewards_coefficient": 0.01}
        data = {"center_rewards_coefficient": 0.01, "margin_column": "margin"}
    elif rows == "bert":
        from transformers import AutoTokenizer

        folder, tokenizer = quiet_bert, AutoTokenizer.from_pretrained(quiet_bert)
        given = [{f"{side}_ids": tokenizer(r["prompt"] + r[side])["input_ids"]
                  for side in ("chosen", "rejected")} for r in PAIRS]
    trl_model, batch, expected, metrics = theirs(folder, given, tmp_path, **args)
    model, mine = ours(folder, PAIRS if rows == "bert" else given, **data)
    assert torch.equal(mine["input_ids"], batch["input_ids"])
    assert torch.equal(mine["attention_mask"], batch["attention_mask"])
    model.load_state_dict(trl_model.state_dict())
    model.train()
    value, figures = objective(model, mine)
    value.backward()
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    for name in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert figures[name].item() == pytest.approx(metrics[name], abs=1e-5), name
    reference = grads(trl_model)
    assert set(grads(model)) == set(reference)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4)


def test_cuts_keep_the_special_tokens_and_the_prompts_end(tiny_bert: Path) -> None:
    """A pair over --max-length keeps [CLS], its prompt's last --max-prompt-length tokens, the
    start of each reply and [SEP]; a pair that fits is left whole."""
    from transformers import AutoTokenizer

    from llmkit.tasks.reward import RewardData, fit, frame_of

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    frame = frame_of(tokenizer)
    assert frame == (1, 1, False)  # [CLS] before, [SEP] after, no EOS to add
    prompt = "the quick brown fox jumps over the lazy dog"
    chosen, rejected = (tokenizer(prompt + reply)["input_ids"]
                        for reply in (" great good superb fine", " awful"))
    shared = len(tokenizer(prompt)["input_ids"]) - 1  # [CLS] + prompt
    data = RewardData(max_length=8, max_prompt_length=3)
    c, r, cuts = fit(chosen, rejected, frame, data)
    assert cuts == 3 and len(c) == 8 and len(r) == 6
    assert c[0] == r[0] == tokenizer.cls_token_id and c[-1] == r[-1] == tokenizer.sep_token_id
    assert c[1:4] == chosen[shared - 3:shared] and c[4:7] == chosen[shared:shared + 3]
    assert r[1:] == rejected[shared - 3:]  # fits once its prompt is cut
    assert fit(chosen, rejected, frame, RewardData(max_length=64)) == (chosen, rejected, 0)


def toy_pairs(count: int, seed: int) -> list[dict[str, Any]]:
    """A learnable preference: the chosen reply says a good word, the rejected one a bad one."""
    import random

    rng = random.Random(seed)
    fillers = ["the film is", "the cast is", "the plot is", "one of the best", "what a"]
    good, bad = ["great", "good", "superb", "wonderful"], ["bad", "awful", "poor", "dull"]
    rows = []
    for _ in range(count):
        middle = " ".join(rng.choices(fillers, k=rng.randint(0, 2)))
        rows.append({"prompt": rng.choice(fillers), "chosen": f" {middle} {rng.choice(good)}",
                     "rejected": f" {middle} {rng.choice(bad)}"})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("toy-pairs")
    texts = [{"text": "the film is great"}, {"text": "the film is awful"},
             {"text": "what a superb"}, {"text": "what a poor"}]
    return {"train": write_jsonl(folder / "train.jsonl", toy_pairs(64, 0)),
            "validation": write_jsonl(folder / "dev.jsonl", toy_pairs(32, 1)),
            "texts": write_jsonl(folder / "texts.jsonl", texts)}


def train(model: Path, toy: dict[str, Path], out: Path, **options: Any) -> Path:
    """A short run; the kept checkpoint is the one of least eval_loss: on a toy preference the
    accuracy (the default metric) reaches 1.0 at the first evaluation, while the scores are
    still close, and a tie keeps the first."""
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    return finetune(load_config("reward", None, {
        "model": str(model), "output": str(out), "data.train": str(toy["train"]),
        "data.validation": str(toy["validation"]), "train.batch_size": 8,
        "train.learning_rate": 5e-3, "train.epochs": 2, "train.metric_for_best": "eval_loss",
        **options}))


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tiny_gpt2: Path, toy: dict[str, Path],
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reward-runs")
    return {"bert": train(tiny_bert, toy, out / "bert", **{"train.learning_rate": 1e-2}),
            "gpt2": train(tiny_gpt2, toy, out / "gpt2")}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_run_learns_and_loads_in_plain_transformers(family: str, runs: dict[str, Path],
                                                      toy: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run = runs[family]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] >= 0.9 and metrics["final"]["margin"] > 0.5
    assert metrics["final"]["eval_samples"] == 32
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "learning_rate" in r]
    assert {"accuracy", "margin", "mean_reward"} <= set(steps[0])
    assert steps[0]["samples"] == 80  # pairs, not rows: 10 batches of 8
    model = AutoModelForSequenceClassification.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    rows = toy_pairs(8, 2)
    texts = [r["prompt"] + r[side] + (tokenizer.eos_token or "") for side in
             ("chosen", "rejected") for r in rows]
    with torch.no_grad():
        found = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits[:, 0]
    assert bool((found[:8] > found[8:]).all())
    scorer = pipeline("text-classification", model=str(run))  # raw scores: a regression head
    piped = [r["score"] for r in scorer(texts[:2] + texts[8:10])]
    assert piped == pytest.approx(found[[0, 1, 8, 9]].tolist(), abs=1e-5)


def test_predict_writes_scores_and_eval_scores_pairs(runs: dict[str, Path], toy: dict[str, Path],
                                                     tmp_path: Path, capsys,
                                                     monkeypatch) -> None:
    from llmkit.inference.predict import score

    out = tmp_path / "scores.jsonl"
    code, err = run_main(["predict", "--model", str(runs["gpt2"]), "--input", str(toy["texts"]),
                          "--output", str(out)], capsys, monkeypatch)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records][:2] == ["the film is great", "the film is awful"]
    assert records[0]["score"] > records[1]["score"] and records[2]["score"] > records[3]["score"]
    final = json.loads((runs["gpt2"] / "metrics.json").read_text())["final"]
    found = score(str(runs["gpt2"]), str(toy["validation"]))
    assert found["accuracy"] == final["accuracy"]
    assert found["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-6)


def test_conversations_and_lora(chat_gpt2: Path, tmp_path: Path) -> None:  # noqa: F811
    """Conversational pairs through the chat template under --lora (peft SEQ_CLS: the score
    head trains in full); predict scores a messages column through the same template."""
    from llmkit.inference.predict import predict

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in toy_pairs(48, 3)]
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows[:32]),
            "validation": write_jsonl(tmp_path / "dev.jsonl", rows[32:])}
    run = train(chat_gpt2, data, tmp_path / "run", **{"adapter.lora": True,
                                                      "adapter.lora_r": 4})
    assert (run / "adapter_config.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["final"]["accuracy"] >= 0.75
    talks = [{"messages": r["prompt"] + r[side]} for r in rows[32:36]
             for side in ("chosen", "rejected")]
    found = predict(str(run), str(write_jsonl(tmp_path / "talks.jsonl", talks)),
                    columns={"text_column": "messages"})
    assert [r["messages"] for r in found] == [t["messages"] for t in talks]
    assert sum(a["score"] > b["score"] for a, b in zip(found[::2], found[1::2], strict=True)) >= 3


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad-pairs")
    one = PAIRS[0]
    files = {"norejected": [{"prompt": "a", "chosen": "b"}] * 4,
             "same": [one, {**one, "rejected": one["chosen"]}] * 2,
             "empty": [one, {**one, "chosen": "  "}] * 2,
             "chats": CHATS * 2,
             "margins": [{**one, "margin": "big"}] * 4}
    return {k: str(write_jsonl(folder / f"{k}.jsonl", v)) for k, v in files.items()}


@pytest.mark.parametrize(("name", "expected"), [
    ("norejected", "--train: no column 'rejected'; the columns are 'prompt', 'chosen'"),
    ("same", "pairs have a chosen reply equal to the rejected one, as given or once cut to "
             "--max-length, (first: row "),
    ("empty", "pairs have an empty reply (first: row 1): nothing to learn from; fix the data "
              "or pass -s data.empty_rows=skip"),
    ("chats", "the tokenizer has no chat template to render the conversations: give one with "
              "--chat-template FILE"),
    ("margins", "column 'margin' holds string values, not numbers"),
])
def test_bad_input_is_one_line(name: str, expected: str, bad: dict[str, str], tiny_gpt2: Path,
                               tmp_path: Path, capsys, monkeypatch) -> None:
    margins = ["--margin-column", "margin"] if name == "margins" else []
    code, err = run_main(["finetune", "reward", "--model", str(tiny_gpt2), "--train", bad[name],
                          "--output", str(tmp_path / "o"), *margins], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err and "unexpected" not in err, err
    assert expected in err, err


def test_predict_needs_the_text_column(runs: dict[str, Path], toy: dict[str, Path], capsys,
                                       monkeypatch) -> None:
    code, err = run_main(["predict", "--model", str(runs["bert"]), "--input",
                          str(toy["validation"])], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err, err
    assert "--input: no column 'text'; the columns are 'prompt', 'chosen', 'rejected'" in err


@pytest.mark.parametrize("command", [["generate", "--model", "{run}", "-p", "the film"],
                                     ["serve", "{run}"]])
def test_a_gpt2_reward_model_does_not_generate(command: list[str], runs: dict[str, Path],
                                               capsys, monkeypatch) -> None:
    """Its language-model head is gone: generating or serving completions would answer from
    random weights."""
    code, err = run_main([a.format(run=runs["gpt2"]) for a in command], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err, err
    assert ("is a GPT2ForSequenceClassification: it cannot generate text" in err
            if command[0] == "generate" else "is a reward model" in err), err
