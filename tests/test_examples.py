"""What a newcomer runs first: the offline examples (examples/offline/make.py, then every
command of examples/README.md, with nothing downloaded), and a run's report on a terminal of
80 columns."""

from __future__ import annotations

import io
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from llmkit.cli import main

REPO = Path(__file__).resolve().parents[1]
OFFLINE = REPO / "examples" / "offline"
CHAT_INPUT = "hello\nwhat is the capital of france ?\n"


def commands() -> list[list[str]]:
    """The llmkit command lines of examples/README.md in order (continued lines joined,
    comments left out), without the leading `llmkit`."""
    text = (REPO / "examples" / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("llmkit "):
                found.append(shlex.split(line)[1:])
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/offline/make.py's models and data, written into a temporary folder."""
    out = tmp_path_factory.mktemp("offline")
    argv = sys.argv
    sys.argv = ["make.py", "--out", str(out)]
    try:
        runpy.run_path(str(OFFLINE / "make.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return out


def placed(argv: list[str], built: Path) -> list[str]:
    """A README command with the models where `built` has them and the checkout's data."""
    return [a.replace("examples/offline/models/", f"{built}/models/")
            .replace("examples/offline/data/", f"{OFFLINE}/data/") for a in argv]


def run(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> tuple[str, str]:
    """`llmkit ARGV` through the real entry point (stdin: a short conversation); its stdout
    and stderr, after checking that it succeeded."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_INPUT))
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    assert code == 0, (argv, err[-2000:])
    return out, err


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_offline_examples_build_and_every_command_runs(built: Path, tmp_path: Path,
                                                           capsys, monkeypatch) -> None:
    """The checkout's data is make.py's output; each finetune command of the README passes
    --dry-run, and each generate or chat command runs on the untrained checkpoint of the run
    it names."""
    written = sorted(p.relative_to(built) for p in (built / "data").rglob("*.*"))
    assert len(written) == 8
    for path in written:
        assert (built / path).read_bytes() == (OFFLINE / path).read_bytes(), path
    monkeypatch.chdir(tmp_path)
    models: dict[str, str] = {}  # a run's --output -> the checkpoint it starts from
    tasks = []
    for argv in map(lambda a: placed(a, built), commands()):
        if argv[0] == "finetune":
            models[option(argv, "--output")] = option(argv, "--model")
            tasks.append(argv[1] + (" chat" if "chat" in option(argv, "--train") else ""))
            out, _ = run([*argv, "--dry-run"], capsys, monkeypatch)
            assert "steps" in out, out
        else:
            tasks.append(argv[0])
            run([models.get(a, a) for a in argv], capsys, monkeypatch)  # random text
    assert tasks == ["generate", "generate", "generate chat", "chat", "translate", "generate",
                     "summarize", "generate"]


@pytest.mark.slow
def test_the_offline_examples_learn_as_written(built: Path, tmp_path: Path, capsys,
                                               monkeypatch) -> None:
    """Every command of examples/README.md as written (minutes): the runs learn their toy
    data, and the terminal shows one line per evaluation."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    said = {}
    for argv in map(lambda a: placed(a, built), commands()):
        out, err = run(argv, capsys, monkeypatch)
        said[" ".join(argv[:2])] = out
        if argv[0] == "finetune":
            metrics = json.loads((Path(option(argv, "--output")) / "metrics.json").read_text())
            evaluations = len(metrics["history"])
            assert len([line for line in err.splitlines() if line.startswith("eval step")]) \
                == evaluations, err
    final = {run: json.loads((tmp_path / "runs" / run / "metrics.json").read_text())["final"]
             for run in ("tiny-lm", "tiny-chat", "tiny-en-es", "tiny-summaries")}
    assert final["tiny-lm"]["perplexity"] < 4 and final["tiny-chat"]["perplexity"] < 4
    assert final["tiny-en-es"]["bleu"] > 10 and final["tiny-summaries"]["rougeL"] > 50
    assert "the capital of" in said["chat runs/tiny-chat"]


def test_a_run_on_an_80_column_terminal(monkeypatch) -> None:
    """A log file (not a terminal) 80 columns wide: the times of the progress bar whole (its
    figures give way), one line per evaluation, the table's title on a line of its own and
    the table whole, fewer evaluations shown rather than names cut."""
    from rich.console import Console

    from llmkit.cli import terminal

    file = io.StringIO()
    monkeypatch.setattr(terminal, "console", Console(file=file, width=80))
    shown = terminal.Terminal()
    shown.start(20000, 0, 10)
    shown.advance(12345, 12.35, {"loss": 0.693, "learning_rate": 1.7e-5,
                                 "samples_per_second": 1234.0, "rewards/accuracies": 0.625})
    history = [{"step": s, "epoch": s / 1000, "train_loss": 0.7, "eval_loss": 0.6931,
                "eval_samples": 48, "accuracy": 0.5, "macro_f1": 0.3333, "binary_f1": 0.0,
                "rolling_perplexity_per_document": 5.3006, "eval_seconds": 0.137,
                "save_seconds": 0.1} for s in range(1000, 31000, 1000)]
    for record in history[:2]:
        shown.evaluation(record)
    shown.advance(20000, 20.0, None)
    shown.stop()
    shown.summary(history, "checkpoint-30000")
    lines = file.getvalue().splitlines()
    assert lines[0] == ("eval step 1000  eval_loss 0.6931  accuracy 0.5000  macro_f1 0.3333  "
                        "binary_f1 0  rolling_perplexity_per_document 5.3006")  # one line
    bar = lines[2]
    assert bar.startswith("ep 20.00 ━━━━━━━━━━ 20000/20000 loss 0.6930") and "…" in bar
    assert bar.endswith(" 0:00") and len(bar) <= 80, bar
    assert lines[3] == "evaluations (kept: checkpoint-30000)"
    table = lines[4:]
    assert table[0].startswith("┏━") and table[0].endswith("┓")
    assert max(map(len, table)) <= 80 and "… " not in "".join(table)
    assert "rolling_perplexity_per_document" in "".join(table)
    assert table[1].split("┃")[-2].strip() == "30000"  # the latest evaluations
