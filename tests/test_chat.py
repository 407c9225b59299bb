"""Conversations for `finetune generate`: chat templates, assistant-only loss (two templates),
packing, evaluation on assistant tokens, `generate --chat`, pipeline chat, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from llmkit.tasks.chat import encode, end_of_turn, pack_whole
from llmkit.tasks.task import IGNORE

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
         "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
TALK = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of france ?"},
        {"role": "assistant", "content": "paris is the capital of france ."},
        {"role": "user", "content": "and the film ?"},
        {"role": "assistant", "content": "a gripping , funny and moving film"}]


@pytest.fixture(scope="module")
def chat_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 whose tokenizer has ChatML's markers as special tokens and ChatML
    as its template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import bpe_tokenizer

    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.model_max_length = 128
    folder = tmp_path_factory.mktemp("chat-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                               n_positions=128, bos_token_id=tokenizer.eos_token_id,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # ranks agree
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chats")
    files = {}
    for split, rows in (("train", 48), ("validation", 8)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"messages": TALK}) + "\n"
                                        for _ in range(rows)))
    return files


def labelled(tokenizer, messages) -> list[str]:
    """The decoded runs of tokens that carry a loss."""
    ids, labels = encode(tokenizer, messages)
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize(("template", "turns"), [
    (CHATML, ["paris is the capital of france .<|im_end|>\n",
              "a gripping , funny and moving film<|im_end|>\n"]),
    (PLAIN, [" paris is the capital of france .\n\n",  # BPE joins the space before "p"aris
             "a gripping , funny and moving film\n\n"])])  # but has no "Ġa" to join
def test_the_loss_covers_every_assistant_turn_and_nothing_else(chat_gpt2: Path, template: str,
                                                               turns: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)
    tokenizer.chat_template = template
    assert labelled(tokenizer, TALK) == turns  # no role header, no user or system text


def test_end_of_turn_is_the_template_marker(chat_gpt2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)
    assert end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.chat_template = PLAIN  # ends with text, not a token of its own
    assert end_of_turn(tokenizer) is None


def test_packing_places_conversations_whole_and_restarts_positions() -> None:
    from datasets import Dataset

    encoded = [([1] * 5, [IGNORE] * 5), ([2] * 3, [2] * 3), ([3] * 4, [3] * 4),
               ([4] * 2, [IGNORE, 4])]
    rows = Dataset.from_dict({"ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded]})
    packed = pack_whole(rows, 8, separate=True)[:]
    assert sorted(len(b) for b in packed["input_ids"]) == [6, 8]  # 5+3 (best fit), 4+2
    tokens = sorted(t for b in packed["input_ids"] for t in b)
    assert tokens == sorted(t for ids, _ in encoded for t in ids)  # every token, once
    for ids, positions in zip(packed["input_ids"], packed["position_ids"], strict=True):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert len(starts) == 2  # two conversations per block, each from position 0
        assert all(len(set(ids[a:b])) == 1 for a, b in zip(starts, [*starts[1:], len(ids)],
                                                                strict=True))
    blocks = zip(packed["input_ids"], packed["labels"], strict=True)
    pairs = [pair for ids, labels in blocks for pair in zip(ids, labels, strict=True)]
    assert all(label in (IGNORE, t) for t, label in pairs)  # labels beside their own ids
    assert sum(label != IGNORE for _, label in pairs) == 3 + 4 + 1
    joined = pack_whole(rows, 8, separate=False)[:]
    assert all(p == list(range(len(p))) for p in joined["position_ids"])
    assert all(m == [1] * len(m) for m in joined["attention_mask"])


def run_chat(model: Path, data: dict[str, Path], out: Path, **extra: object) -> Path:
    cfg = load_config("generate", {"model": str(model), "output": str(out),
                                   "data": {"train": str(data["train"]),
                                            "validation": str(data["validation"]),
                                            "block_size": 128, **extra},
                                   "train": {"epochs": 2, "batch_size": 4,
                                             "learning_rate": 3e-3}})
    return finetune(cfg)


def test_a_chat_run_learns_evaluates_and_chats(chat_gpt2: Path, chats: dict[str, Path],
                                               tmp_path: Path) -> None:
    from transformers import pipeline

    from llmkit.inference.predict import run_config, score

    run = run_chat(chat_gpt2, chats, tmp_path / "run")
    assert run_config(str(run)).data.messages_column == "messages"  # found, and saved
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics["final"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run)  # the template is saved with it
    per_talk = sum(label != IGNORE for label in encode(tokenizer, TALK)[1])
    assert final["eval_tokens"] == 8 * per_talk  # the assistant tokens, and only them
    assert metrics["history"][-1]["perplexity"] < metrics["history"][0]["perplexity"]
    again = score(str(run), str(chats["validation"]))  # llmkit eval -m perplexity's path
    assert again["perplexity"] == pytest.approx(final["perplexity"], rel=1e-4)
    chat = pipeline("text-generation", model=str(run))
    reply = chat([{"role": "user", "content": "what is the capital of france ?"}],
                 max_new_tokens=12, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # replies stop at the end of the turn
    assert end in json.loads((run / "generation_config.json").read_text())["eos_token_id"]
    from typer.testing import CliRunner

    from llmkit.cli import app

    one = CliRunner().invoke(app, ["generate", "--model", str(run), "--chat", "--system",
                                   "be brief", "-p", "what is the capital of france ?",
                                   "--max-new-tokens", "12"])
    assert one.exit_code == 0, one.output
    many = CliRunner().invoke(app, ["generate", "--model", str(run), "--chat", "--input",
                                    str(chats["validation"]), "--max-new-tokens", "4"])
    assert many.exit_code == 0, many.output
    records = [json.loads(line) for line in many.output.splitlines() if line.startswith("{")]
    assert len(records) == 8 and records[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_bad_conversations_are_one_line(chat_gpt2: Path, tiny_gpt2: Path, tmp_path: Path
                                        ) -> None:
    def rows(*items: object) -> dict[str, Path]:
        path = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.jsonl"
        path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in items))
        return {"train": path, "validation": path}

    with pytest.raises(LlmkitError, match="row 1: messages must be a list of"):
        run_chat(chat_gpt2, rows(TALK, "hello", TALK), tmp_path / "a")
    with pytest.raises(LlmkitError, match="row 0: unknown role 'bot'"):
        run_chat(chat_gpt2, rows([{"role": "bot", "content": "x"}]), tmp_path / "b")
    with pytest.raises(LlmkitError, match="1 of 2 conversations have no assistant turn "
                                          r"\(first: row 1\)"):
        run_chat(chat_gpt2, rows(TALK, TALK[:2]), tmp_path / "c")
    empty = [*TALK[:2], {"role": "assistant", "content": " "}]
    with pytest.raises(LlmkitError, match="1 of 2 conversations have no assistant turn "
                                          r"\(first: row 1\) to learn from: none, an empty"):
        run_chat(chat_gpt2, rows(TALK, empty), tmp_path / "c2")
    with pytest.raises(LlmkitError, match="1 of 2 conversations .* none within the first 50 "
                                          r"tokens \(--block-size\)"):
        run_chat(chat_gpt2, rows(TALK, [TALK[1], *TALK[1:]]), tmp_path / "c3", block_size=50)
    with pytest.raises(LlmkitError, match="the tokenizer has no chat template"):
        run_chat(tiny_gpt2, rows(TALK), tmp_path / "d")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content | nofilter }}{% endfor %}")
    with pytest.raises(LlmkitError, match="chat template"):
        run_chat(tiny_gpt2, rows(TALK), tmp_path / "e", chat_template=str(broken))


def test_unpacked_conversations_with_lora_score_the_same_tokens(
        chat_gpt2: Path, chats: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config("generate", {"model": str(chat_gpt2), "output": str(tmp_path / "run"),
                                   "data": {"train": str(chats["train"]),
                                            "validation": str(chats["validation"]),
                                            "messages_column": "messages", "packing": False},
                                   "train": {"epochs": 1, "batch_size": 4},
                                   "adapter": {"lora": True, "lora_r": 2}})
    run = finetune(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["eval_tokens"] == 8 * 39  # as packed: the assistant tokens
    assert (run / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # for the suite's time: the two-process loop is held by test_cli's
def test_two_processes_train_on_conversations_as_one(chat_gpt2: Path, chats: dict[str, Path],
                                                     tmp_path: Path) -> None:
    from tests.conftest import two_ranks_and_one

    common = ["finetune", "generate", "--model", str(chat_gpt2), "--train", str(chats["train"]),
              "--validation", str(chats["validation"]), "--block-size", "128", "--batch-size",
              "2", "--epochs", "1", "--lr", "3e-3"]
    m2, m1 = two_ranks_and_one(common, tmp_path)
    assert m2["final"]["eval_tokens"] == m1["final"]["eval_tokens"] == 8 * 39
    assert m2["final"]["perplexity"] == pytest.approx(m1["final"]["perplexity"], rel=1e-3)


def test_a_run_keeps_its_template_when_the_file_is_gone(chat_gpt2: Path) -> None:
    """Evaluating a chat run whose --chat-template file has moved since training uses the
    template saved with its tokenizer."""
    from transformers import AutoTokenizer

    from llmkit.tasks.chat import use_template

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)  # carries ChatML, as a run's does
    use_template(tokenizer, "/moved/chatml.jinja", required=True)
    assert tokenizer.chat_template == CHATML
    tokenizer.chat_template = None
    with pytest.raises(LlmkitError, match="--chat-template /moved/chatml.jinja: no such file"):
        use_template(tokenizer, "/moved/chatml.jinja", required=True)


def test_conversations_are_cached_and_skipped_rows_counted(
        chat_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Encoded conversations sit in datasets' Arrow cache: a second featurize reads them back
    (no tokenizer call), with the same blocks; empty_rows=skip leaves out and counts."""
    import logging

    from transformers import AutoConfig, AutoTokenizer

    from llmkit.data.read import load_split
    from llmkit.tasks import get_task
    from tests.conftest import count_calls

    path = tmp_path / "talks.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [TALK, TALK[:2]] * 6))
    tokenizer, config = AutoTokenizer.from_pretrained(chat_gpt2), AutoConfig.from_pretrained(
        chat_gpt2)
    cfg = load_config("generate", {"model": str(chat_gpt2), "output": "o",
                                   "data": {"train": str(path), "block_size": 128,
                                            "messages_column": "messages",
                                            "empty_rows": "skip"}}).data
    calls = count_calls(type(tokenizer), monkeypatch)
    found = []
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        for _ in range(2):
            before = len(calls)
            found.append(get_task("generate").featurize(
                load_split(str(path), "train", None, "--train"), tokenizer, config, cfg))
    assert calls and len(calls) == before  # the second read the cache
    assert found[0]["input_ids"] == found[1]["input_ids"]
    assert "leaving out 6 of 12 conversations without an assistant turn" in caplog.text
    assert sum(len(b) for b in found[0]["input_ids"]) == 6 * len(encode(tokenizer, TALK)[0])


def featurized(model: Path, rows: list[object], tmp_path: Path, **data: object) -> object:
    """generate's features of `rows` ({"messages": ...} objects or other records), as a run
    builds them: without --validation, so the rows go through the seeded split."""
    from transformers import AutoConfig, AutoTokenizer

    from llmkit.data.read import load_splits
    from llmkit.tasks import get_task

    path = tmp_path / f"rows{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(r if isinstance(r, dict) else {"messages": r}) + "\n"
                            for r in rows))
    cfg = load_config("generate", {"model": str(model), "output": "o",
                                   "data": {"train": str(path), "block_size": 128,
                                            "validation_fraction": 0.25, **data}}).data
    tokenizer, config = AutoTokenizer.from_pretrained(model), AutoConfig.from_pretrained(model)
    task = get_task("generate")
    return [task.featurize(task.usable(part, cfg, True), tokenizer, config, cfg)
            for part in load_splits(cfg, 42)]


@pytest.mark.parametrize(("bad", "said"), [
    ("hello", "row 7: messages must be a list of"),
    ([*TALK[:2], {"role": "assistant", "content": ""}],
     r"1 of \d conversations have no assistant turn \(first: row 7\)")],
    ids=["not a list", "empty reply"])
def test_a_bad_conversation_is_named_by_its_row_in_the_file(chat_gpt2: Path, tmp_path: Path,
                                                            bad: object, said: str) -> None:
    """Without --validation the rows are shuffled into two splits; the error names the file's
    row, wherever the split put it."""
    with pytest.raises(LlmkitError, match=said):
        featurized(chat_gpt2, [TALK] * 7 + [bad] + [TALK] * 4, tmp_path,
                   messages_column="messages")


def test_an_empty_reply_is_left_out_with_skip(chat_gpt2: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import logging

    empty = [*TALK[:2], {"role": "assistant", "content": ""}]
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        train, valid = featurized(chat_gpt2, [TALK, empty] * 4, tmp_path, packing=False,
                                  messages_column="messages", empty_rows="skip")
    assert len(train) + len(valid) == 4  # the 4 with a reply
    assert "conversations without an assistant turn" in caplog.text


def test_a_block_size_that_leaves_no_reply_is_refused_with_what_to_set(
        chat_gpt2: Path, tmp_path: Path) -> None:
    """Every conversation or prompt/completion row cut before its first reply token would
    train on nothing (a NaN blamed on the learning rate): one line, with the shortest prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)
    prompt = sum(label == IGNORE for label in encode(tokenizer, TALK[:3])[1])
    with pytest.raises(LlmkitError, match=f"--block-size 8 leaves no assistant token in any "
                       f"conversation: the shortest prompt before a first reply is {prompt} "
                       f"tokens; set --block-size above {prompt}"):
        featurized(chat_gpt2, [TALK] * 8, tmp_path, messages_column="messages", block_size=8,
                   empty_rows="skip")
    pairs = [{"prompt": "what is the capital of france ?", "completion": "paris"}] * 8
    words = len(tokenizer(pairs[0]["prompt"], add_special_tokens=False)["input_ids"])
    with pytest.raises(LlmkitError, match=f"--block-size 4 leaves no completion token in any "
                       f"row: the shortest prompt is {words} tokens; set --block-size above "
                       f"{words}"):
        featurized(chat_gpt2, pairs, tmp_path, prompt_column="prompt",
                   completion_column="completion", block_size=4)
    train, _ = featurized(chat_gpt2, pairs, tmp_path, prompt_column="prompt",
                          completion_column="completion", block_size=words + 1)
    assert all(labels[-1] != IGNORE for labels in train["labels"])
