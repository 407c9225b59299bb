"""llmkit finetune dpo: the losses, their gradients and the log-probabilities equal TRL's on the
same rows; the three data formats; the reference model's three forms; runs that load in plain
transformers; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_chat import CHATML, chat_gpt2  # noqa: F401  (a fixture)

PAIRS = [{"prompt": "the film is", "chosen": " a gripping , funny film .",
          "rejected": " dull ."},
         {"prompt": "the plot", "chosen": " moves fast .",
          "rejected": " drags on and on and on ."},
         {"prompt": "paris is", "chosen": " the capital of france .",
          "rejected": " a film ."}]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_pairs(count: int) -> list[dict[str, Any]]:
    """A learnable preference: the chosen reply says 'good', the rejected one 'bad'."""
    words = ["film", "plot", "song", "book", "show", "cast"]
    return [{"prompt": f"the {words[i % 6]} {i} is", "chosen": " good and fine .",
             "rejected": " bad and poor ."} for i in range(count)]


def ours(folder: Path, loss: str, rows: list[dict[str, Any]]) -> tuple[Any, Any, dict]:
    """llmkit's model, its collated batch of `rows` and the setup of its loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit.tasks import get_task, load_config
    from llmkit.tasks.reference import attach

    cfg = load_config("dpo", None, {"model": str(folder), "output": "unused",
                                    "data.train": "unused", "data.loss": loss})
    task = get_task("dpo")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    features = task.featurize(Dataset.from_list(rows), tokenizer, model.config, cfg.data)
    assert not task.dropout  # as TRL: build turns it off
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    attach(model, tokenizer, cfg.data, cfg, torch.device("cpu"), (features, features))
    return model, task.collator(tokenizer)([features[i] for i in range(len(features))]), cfg


def grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same_step(model: Any, batch: dict[str, Any], reference: Any, loss: torch.Tensor,
              metrics: dict[str, float], names: tuple[str, ...]) -> None:
    """llmkit's objective on `batch`: the loss, the named figures and every gradient equal the
    reference trainer's (whose loss has had its backward) to 1e-5."""
    from llmkit.tasks.preference import objective

    model.train()
    value, figures = objective(model, batch)
    value.backward()
    assert value.item() == pytest.approx(loss.item(), abs=1e-5)
    for name in names:
        assert figures[name].item() == pytest.approx(metrics[name], abs=1e-5), name
    theirs = grads(reference)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, theirs[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpotrainer(tiny_gpt2: Path, tmp_path: Path, loss: str) -> None:
    """TRL's DPOTrainer (a frozen copy as reference, dropout off) and llmkit, on the same rows in
    one batch: the same tokens and reply masks, loss, gradients and log-probabilities."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                         args=DPOConfig(output_dir=str(tmp_path), loss_type=[loss], beta=0.1,
                                        per_device_train_batch_size=len(PAIRS), report_to=[],
                                        use_cpu=True, max_length=64, bf16=False),
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, batch)
    expected.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}


    model, mine, _ = ours(tiny_gpt2, loss, PAIRS)
    width = batch["input_ids"].shape[1]
    assert torch.equal(mine["input_ids"][:, :width] * mine["attention_mask"][:, :width],
                       batch["input_ids"] * batch["attention_mask"])
    assert torch.equal((mine["labels"][:, :width] != -100).long(), batch["completion_mask"])
    same_step(model, mine, trainer.model, expected, metrics,
              ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins"))


def test_simpo_equals_trl_cpotrainer_on_the_same_tokens(tiny_gpt2: Path, tmp_path: Path) -> None:
    """SimPO is TRL's CPOTrainer with loss_type simpo and cpo_alpha 0: on CPOTrainer's own
    batch (its tokenization adds a BOS to prompts), llmkit's loss, gradients and length-normalised
    log-probabilities equal its own."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer


    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.pad_token = tokenizer.eos_token
    trainer = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                         args=CPOConfig(output_dir=str(tmp_path), loss_type="simpo", cpo_alpha=0,
                                        beta=2.0, simpo_gamma=0.5, report_to=[], use_cpu=True,
                                        per_device_train_batch_size=len(PAIRS), max_length=64,
                                        bf16=False),
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    expected, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    expected.backward()
    joined = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id)

    model, _, cfg = ours(tiny_gpt2, "simpo", PAIRS)
    assert cfg.data.loss == "simpo"
    from dataclasses import replace

    from llmkit.tasks.reference import SETUPS

    SETUPS[model].settings = replace(cfg.data, beta=2.0, simpo_gamma=0.5)
    same_step(model, {"input_ids": joined["concatenated_input_ids"],
                      "attention_mask": joined["concatenated_attention_mask"],
                      "labels": joined["concatenated_labels"]}, trainer.model, expected, metrics,
              ("logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/margins"))


def test_the_three_formats_give_the_same_tokens(chat_gpt2: Path) -> None:  # noqa: F811
    """Standard text and its implicit-prompt form encode alike; a conversation's prompt is the
    chat template's rendering with the generation prompt, as `finetune generate` renders it, and
    its replies end with the template's end-of-turn marker."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmkit.tasks import pairs
    from llmkit.tasks.chat import render

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)
    data = pairs.PairData()
    standard = pairs.encode(Dataset.from_list(PAIRS), tokenizer, data)
    implicit = pairs.encode(Dataset.from_list([{"chosen": r["prompt"] + r["chosen"],
                                                "rejected": r["prompt"] + r["rejected"]}
                                               for r in PAIRS]),
                            tokenizer, pairs.PairData(prompt_column=None))
    assert standard.to_list() == implicit.to_list()
    conversation = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                    for r in PAIRS]
    chats = pairs.encode(Dataset.from_list(conversation), tokenizer, data)
    first = chats[0]
    prompt = tokenizer.decode(first["input_ids"][:first["prompt_length"]])
    assert prompt == render(tokenizer, conversation[0]["prompt"], prompt=True)
    assert tokenizer.decode(first["input_ids"]) == render(
        tokenizer, conversation[0]["prompt"] + conversation[0]["chosen"])
    assert tokenizer.decode(first["rejected_ids"][first["prompt_length"]:]).endswith(
        "<|im_end|>\n")


def test_limits_cut_prompts_from_the_left_and_replies_at_the_end(tiny_gpt2: Path,
                                                                 caplog) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmkit.tasks import pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    full = pairs.encode(Dataset.from_list(PAIRS[:1]), tokenizer, pairs.PairData())[0]
    cut = pairs.encode(Dataset.from_list(PAIRS[:1]), tokenizer,
                       pairs.PairData(max_prompt_length=2, max_length=5))[0]
    prompt = full["input_ids"][:full["prompt_length"]]
    assert cut["prompt_length"] == 2 and cut["input_ids"][:2] == prompt[-2:]
    assert cut["input_ids"] == full["input_ids"][len(prompt) - 2:][:5]
    assert "prompts are longer than --max-prompt-length 2" in caplog.text
    assert "pairs are longer than --max-length 5" in caplog.text


def dpo_config(model: Path, train: Path, out: Path, **settings: Any) -> Any:
    from llmkit.tasks import load_config

    return load_config("dpo", None, {"model": str(model), "output": str(out),
                                     "data.train": str(train), "train.epochs": 2,
                                     "data.validation": str(train.with_name("valid.jsonl")),
                                     "train.batch_size": 4, "train.learning_rate": 3e-3,
                                     "train.save_steps": 3, "train.logging_steps": 2,
                                     **settings})


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training pairs; pairs.jsonl's neighbour valid.jsonl holds 6 held-out ones."""
    folder = tmp_path_factory.mktemp("pairs")
    write_jsonl(folder / "valid.jsonl", toy_pairs(22)[16:])
    return write_jsonl(folder / "pairs.jsonl", toy_pairs(16))


@pytest.mark.parametrize(("loss", "reference"), [("sigmoid", "copy"), ("ipo", "precompute"),
                                                 ("simpo", "none"), ("sigmoid", "lora")])
def test_an_interrupted_run_resumes_to_the_same_weights(tiny_gpt2: Path, toy: Path,
                                                        tmp_path: Path, loss: str,
                                                        reference: str, monkeypatch) -> None:
    """Every loss and every form of the reference: a run cut after a checkpoint and resumed
    ends with the weights of one that was not, and it learned the preference."""
    from safetensors.torch import load_file

    from llmkit.run.finetune import finetune
    from tests.conftest import cut_after_checkpoint

    settings = {"data.loss": loss, "data.precompute_ref": reference == "precompute",
                "adapter.lora": reference == "lora"}
    steady = finetune(dpo_config(tiny_gpt2, toy, tmp_path / "steady", **settings))
    cut_after_checkpoint(dpo_config(tiny_gpt2, toy, tmp_path / "cut", **settings), 3,
                         monkeypatch)
    finetune(dpo_config(tiny_gpt2, toy, tmp_path / "cut", **settings), resume=True)
    weights = "adapter_model.safetensors" if reference == "lora" else "model.safetensors"
    a, b = (load_file(folder / weights) for folder in (steady, tmp_path / "cut"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    if reference == "lora":  # no dropout on the adapters either, as TRL
        assert json.loads((steady / "adapter_config.json").read_text())["lora_dropout"] == 0
    metrics = json.loads((steady / "metrics.json").read_text())
    assert metrics["metric_for_best"] == "rewards/accuracies"
    assert metrics["final"]["rewards/accuracies"] == 1.0
    tied = [r for r in metrics["history"] if r["rewards/accuracies"] == 1.0]
    assert metrics["final"] == min(tied, key=lambda r: r["eval_loss"])  # ties: the lower loss
    assert metrics["final"]["rewards/margins"] > 0
    logged = [json.loads(line) for line in (steady / "train_log.jsonl").read_text().splitlines()]
    first = next(r for r in logged if "learning_rate" in r)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(first)
    assert first["samples"] == 2 * 4  # pairs, not rows: 2 steps of 4


@pytest.fixture(scope="module")
def dpo_run(tiny_gpt2: Path, toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch DPO run (sigmoid loss, a frozen copy as the reference)."""
    from llmkit.run.finetune import finetune

    return finetune(dpo_config(tiny_gpt2, toy, tmp_path_factory.mktemp("dpo") / "run",
                               **{"train.epochs": 1}))


def test_a_precomputed_reference_trains_as_a_frozen_copy(tiny_gpt2: Path, toy: Path,
                                                         dpo_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from llmkit.run.finetune import finetune

    precomputed = finetune(dpo_config(tiny_gpt2, toy, tmp_path / "precomputed", **{
        "data.precompute_ref": True, "train.epochs": 1}))
    a, b = (load_file(run / "model.safetensors") for run in (dpo_run, precomputed))
    for key in a:  # the reference's batches are padded differently: float noise only
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_chat_dpo_run_loads_and_chats_in_plain_transformers(chat_gpt2: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    from transformers import pipeline

    from llmkit.run.finetune import finetune

    talks = [{"prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]}
             for r in toy_pairs(20)]
    write_jsonl(tmp_path / "valid.jsonl", talks[16:])
    chats = write_jsonl(tmp_path / "chats.jsonl", talks[:16])
    run = finetune(dpo_config(chat_gpt2, chats, tmp_path / "run", **{"train.epochs": 1}))
    chat = pipeline("text-generation", model=str(run))
    assert chat.tokenizer.convert_tokens_to_ids("<|im_end|>") in \
        chat.model.generation_config.eos_token_id
    reply = chat([{"role": "user", "content": "the film 3 is"}], max_new_tokens=4)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


@pytest.mark.slow  # for the suite's time: the two-process loop is held by test_cli's
def test_two_processes_train_dpo_as_one(tiny_gpt2: Path, toy: Path, tmp_path: Path) -> None:
    from tests.conftest import two_ranks_and_one

    m2, m1 = two_ranks_and_one(["finetune", "dpo", "--model", str(tiny_gpt2), "--train",
                                str(toy), "--validation", str(toy.with_name("valid.jsonl")),
                                "--batch-size", "2", "--epochs", "1", "--lr", "3e-3"], tmp_path)
    assert m2["final"]["eval_samples"] == m1["final"]["eval_samples"]
    for key in ("eval_loss", "rewards/margins", "logps/chosen"):
        assert m2["final"][key] == pytest.approx(m1["final"][key], rel=1e-3), key


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


BAD = {  # file name -> rows
    "good": [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 4,
    "nochosen": [{"prompt": "a", "rejected": " b"}] * 4,
    "same": [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 3
    + [{"prompt": "a", "chosen": " b", "rejected": " b"}],
    "emptyreply": [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 3
    + [{"prompt": "a", "chosen": " ", "rejected": " c"}],
    "lastuser": [{"prompt": user("a"), "chosen": assistant("b") + user("c"),
                  "rejected": assistant("d")}] * 4,
    "chats": [{"prompt": user("a"), "chosen": assistant("b"), "rejected": assistant("c")}] * 4,
    "mixed": [{"prompt": "a", "chosen": assistant("b"), "rejected": assistant("c")}] * 4,
    "null": [{"prompt": "a", "chosen": " b", "rejected": " c"}] * 3
    + [{"prompt": "a", "chosen": None, "rejected": " c"}],
}
DPO = ["finetune", "dpo", "--model", "{gpt2}", "--output", "{tmp}/run", "--validation", "{good}",
       "--train"]
BAD_CASES = [
    ([*DPO, "{nochosen}"], "--train: no column 'chosen'; the columns are 'prompt', 'rejected'"),
    ([*DPO, "{same}"], "1 of 4 pairs have a chosen reply equal to the rejected one, as given or "
                       "once cut to --max-length, (first: row 3)"),
    ([*DPO, "{emptyreply}"], "1 of 4 pairs have an empty reply (first: row 3)"),
    ([*DPO, "{null}"], "1 of 4 pairs have an empty reply (first: row 3)"),
    ([*DPO, "{lastuser}", "--chat-template", "{template}"],
     "row 0: the chosen conversation ends with user, not an assistant turn"),
    ([*DPO, "{chats}"], "no chat template to render the conversations: give one with "
                        "--chat-template"),
    ([*DPO, "{mixed}"], "the pair columns mix text and conversations"),
    ([*DPO, "{same}", "--loss", "kto"],
     "data.loss: expected 'sigmoid' | 'ipo' | 'simpo', got 'kto'"),
    ([*DPO, "{same}", "--beta", "0"], "data.beta must be above 0, got 0"),
    ([*DPO, "{same}", "--loss", "simpo", "--precompute-ref"],
     "the simpo loss uses no reference model, so there is nothing to precompute"),
    ([*DPO, "{same}", "--max-prompt-length", "64", "--max-length", "64"],
     "data.max_prompt_length 64 leaves no room for the reply"),
    ([*DPO, "{same}", "--test", "{same}"], "--test: a preference-tuned model's pairs"),
    ([*DPO[:3], "{bert}", *DPO[4:], "{same}"],
     "is a bert checkpoint, which has no dpo head in transformers"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_CASES,
                         ids=[c[1][:40] for c in BAD_CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv: list[str], expected: str,
                                                  tiny_gpt2: Path, tiny_bert: Path,
                                                  tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.test_bad_input import run_main

    files = {name: str(write_jsonl(tmp_path / f"{name}.jsonl", rows))
             for name, rows in BAD.items()}
    (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
    fill = {**files, "template": str(tmp_path / "chatml.jinja"), "gpt2": str(tiny_gpt2),
            "bert": str(tiny_bert), "tmp": str(tmp_path)}
    code, err = run_main([a.format(**fill) for a in argv], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err and "unexpected" not in err, err
    assert expected in " ".join(err.split()), err
    assert not (tmp_path / "run").exists()


def test_skip_leaves_out_bad_pairs_and_counts_them(tiny_gpt2: Path, caplog) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from llmkit.tasks import pairs

    rows = BAD["same"] + BAD["emptyreply"]
    kept = pairs.encode(Dataset.from_list(rows), AutoTokenizer.from_pretrained(tiny_gpt2),
                        pairs.PairData(empty_rows="skip"))
    assert len(kept) == 6
    assert "leaving out 2 of 8 pairs with an empty reply or equal replies" in caplog.text


def test_dpo_starts_from_an_sft_adapter_run(tiny_gpt2: Path, toy: Path, tmp_path: Path,
                                            capsys, monkeypatch) -> None:
    """An SFT LoRA run as --model: every weight trains on its merged model (peft loads it
    frozen); a new adapter on it is refused, since it would be saved against the bare base."""
    from safetensors.torch import load_file

    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config
    from tests.test_bad_input import run_main

    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"],
                                                     "completion": r["chosen"]}
                                                    for r in toy_pairs(16)])
    sft = finetune(load_config("generate", None, {
        "model": str(tiny_gpt2), "output": str(tmp_path / "sft"), "data.train": str(sft_rows),
        "data.prompt_column": "prompt", "data.completion_column": "completion",
        "train.epochs": 1, "adapter.lora": True}))
    code, err = run_main(["finetune", "dpo", "--model", str(sft), "--train", str(toy),
                          "--lora", "--output", str(tmp_path / "dpo-lora")], capsys, monkeypatch)
    assert code == 1 and "is a LoRA run: a new adapter on it" in err
    assert not (tmp_path / "dpo-lora").exists()
    run = finetune(dpo_config(sft, toy, tmp_path / "dpo", **{"train.epochs": 1}))
    assert "transformer.h.0.attn.c_attn.weight" in load_file(run / "model.safetensors")


def test_predict_and_eval_on_a_dpo_run_are_one_line(dpo_run: Path, toy: Path, capsys,
                                                    monkeypatch) -> None:
    from tests.test_bad_input import run_main

    for argv in (["predict", "--model", str(dpo_run), "--input", str(toy)],
                 ["eval", "--model", str(dpo_run), "--data", str(toy), "-m", "rewards/margins"]):
        code, err = run_main(argv, capsys, monkeypatch)
        assert code == 1 and "Traceback" not in err and "unexpected" not in err, err
        assert "measured against its reference model" in err, err
