"""`llmkit chat`: a conversation kept turn after turn and answered as `generate --chat` answers
the same conversation, /system and /reset, history cut to the context, the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app, main
from tests.test_chat import CHATML, chat_gpt2  # noqa: F401  (a fixture)

GREEDY = ["--max-new-tokens", "8"]


def generate_chat(model: Path, conversations: list[list[dict[str, str]]], tmp_path: Path,
                  *options: str) -> list[str]:
    """`llmkit generate --chat --input` on these conversations: the replies."""
    rows = tmp_path / "conversations.jsonl"
    rows.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    done = CliRunner().invoke(app, ["generate", "--model", str(model), "--chat", "--input",
                                    str(rows), *GREEDY, *options])
    assert done.exit_code == 0, done.output
    return [json.loads(line)["output"] for line in done.stdout.splitlines()]


def test_chat_keeps_the_conversation_and_answers_as_generate_chat(chat_gpt2: Path,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["chat", str(chat_gpt2), *GREEDY],
                              input="hello\n/system be brief\nhi\n/reset\n")
    assert done.exit_code == 0, done.output
    assert done.stderr == "(system message set)\n(a new conversation)\n"
    first = generate_chat(chat_gpt2, [[{"role": "user", "content": "hello"}]], tmp_path)[0]
    second = generate_chat(chat_gpt2, [[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first}, {"role": "user", "content": "hi"}]],
        tmp_path)[0]
    assert first and second != first  # the history and the system message reach the model
    assert done.stdout == f"{first}\n{second}\n"


def test_chat_through_a_pipe(chat_gpt2: Path, tmp_path: Path) -> None:  # noqa: F811
    """A real process reading stdin: replies on stdout, /exit leaves (the rest is unread)."""
    done = subprocess.run([sys.executable, "-m", "llmkit", "chat", str(chat_gpt2), *GREEDY],
                          input="hello\n/exit\nnever read\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    first = generate_chat(chat_gpt2, [[{"role": "user", "content": "hello"}]], tmp_path)[0]
    assert done.stdout == f"{first}\n"


def test_a_long_conversation_leaves_out_its_oldest_turns(chat_gpt2: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    from llmkit.inference.generate import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(chat_gpt2)
    config = type("Config", (), {"n_positions": 128})()
    model = type("Model", (), {"config": config})()
    long = "the quick brown fox jumps over the lazy dog " * 2
    talk = [{"role": "system", "content": "be brief"}]
    for turn in range(4):
        talk += [{"role": "user", "content": f"{turn} {long}"},
                 {"role": "assistant", "content": long}]
    talk.append({"role": "user", "content": "last"})
    text, dropped = chat_prompt(model, tokenizer, talk, 32)
    assert dropped > 0 and dropped % 2 == 0
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert text.endswith("<|im_start|>user\nlast<|im_end|>\n<|im_start|>assistant\n")
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 32 <= 128
    assert chat_prompt(model, tokenizer, talk[:3], 32) == (
        tokenizer.apply_chat_template(talk[:3], tokenize=False, add_generation_prompt=True), 0)
    done = CliRunner().invoke(app, ["chat", str(chat_gpt2), "--max-new-tokens", "4"],
                              input="".join(f"{turn} {long}\n" for turn in range(6)))
    assert done.exit_code == 0, done.output
    assert done.stderr.count("oldest turns are left out") == 1, done.stderr


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`llmkit ARGV` through the real entry point: exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *argv])
    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    try:
        main()
    except SystemExit as stop:
        return (stop.code if isinstance(stop.code, int) else 1), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_chat_refusals_and_a_template_file(tiny_gpt2: Path, tmp_path: Path, capsys,
                                           monkeypatch) -> None:
    cases = [(["chat", str(tiny_gpt2)], "the tokenizer has no chat template to render the "
              "conversations: give one with --chat-template FILE"),
             (["chat", str(tiny_gpt2), "--chat-template", "missing.jinja"],
              "--chat-template missing.jinja: no such file"),
             (["chat", str(tmp_path / "nowhere")], "no such checkpoint folder"),
             (["chat", str(tiny_gpt2), "--temperature", "0"], "--temperature must be above 0"),
             (["chat", str(tiny_gpt2), "--num-beams", "2"], "No such option: --num-beams"),
             (["generate", "-m", str(tiny_gpt2), "-p", "x", "--chat-template", "t.jinja"],
              "--chat-template is the template of a conversation: add --chat")]
    for argv, expected in cases:
        code, err = run_main(argv, capsys, monkeypatch)
        assert code != 0 and err.startswith("error: ") and expected in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    done = CliRunner().invoke(app, ["chat", str(tiny_gpt2), "--chat-template", str(template),
                                    *GREEDY], input="hello\n")
    assert done.exit_code == 0, done.output
    assert done.stdout == "".join(
        f"{r}\n" for r in generate_chat(tiny_gpt2, [[{"role": "user", "content": "hello"}]],
                                        tmp_path, "--chat-template", str(template)))
