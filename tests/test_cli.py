"""The command line: through Typer's CliRunner and as real subprocesses (exit codes, one-line
errors, no tracebacks), plus a 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app, finetune_problem
from llmkit.tasks import task_names

runner = CliRunner()


def llmkit(*args: str, env: dict[str, str] | None = None, timeout: int = 300
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_help_lists_commands_and_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("finetune", "predict", "recipes"):
        assert command in result.output
    assert "--version" in result.output and "<bool>" not in result.output  # flags take no value
    result = runner.invoke(app, ["finetune", "--help"])
    assert result.exit_code == 0
    for task in task_names():
        assert task in result.output
    assert "--learning-rate" not in result.output  # options belong to each task's command
    narrow = runner.invoke(app, ["finetune", "--help"], terminal_width=80).output
    panel = narrow.split("Commands")[1].split("╰")[0].splitlines()[1:]
    assert len(panel) == len(task_names())  # one line per task at 80 columns


def test_each_task_help_shows_its_own_options_only() -> None:
    own = {"classify": "--text-pair-column", "qa": "--doc-stride", "translate": "--source-lang",
           "summarize": "--summary-column", "generate": "--block-size", "dpo": "--beta"}
    for task in task_names():
        result = runner.invoke(app, ["finetune", task, "--help"], terminal_width=80)
        assert result.exit_code == 0
        text = result.output
        assert "Examples" in text and f"llmkit finetune {task}" in text
        assert "--learning-rate" in text and "--train" in text and "--model" in text
        for other, option in own.items():
            assert (option in text) == (other == task), (task, option)
        assert "…" not in text and "<bool>" not in text  # nothing cut off at 80 columns
        assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize(("args", "expected"), [
    (["finetune", "classify", "--doc-stride", "3"],
     "--doc-stride is an option of llmkit finetune qa, not of classify"),
    (["finetune", "qa", "--text-column", "t"],
     "--text-column is an option of llmkit finetune classify and summarize and generate"),
    (["finetune", "classify", "--no-gradient-checkpointing"],
     "--no-gradient-checkpointing is the default already; to undo a recipe's value, use "
     "-s train.gradient_checkpointing=false"),
    (["finetune", "classify", "--group-by-length"],
     "use -s train.group_by_length=true"),
    (["finetune", "clasify"], "unknown task 'clasify'; the tasks are classify, qa"),
])
def test_finetune_problems_are_one_line(args: list[str], expected: str) -> None:
    assert expected in finetune_problem(args)


def test_aliases_and_flipped_flags_set_the_config(monkeypatch, tmp_path: Path) -> None:
    seen = {}
    monkeypatch.setattr("llmkit.cli.finetune.train", lambda cfg, *rest: seen.setdefault("cfg", cfg))
    result = runner.invoke(app, ["finetune", "translate", "--model", "m", "--train", "t.jsonl",
                                 "--output", "o", "--lr", "3e-4", "--max-source-length", "64",
                                 "--no-group-by-length", "--source-lang", "en",
                                 "--eval-max-samples", "5", "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.train.learning_rate == 3e-4 and cfg.data.max_length == 64
    assert cfg.train.group_by_length is False and cfg.train.gradient_checkpointing is True
    assert cfg.data.source_lang == "en" and cfg.data.max_eval_samples == 5


def test_recipes_list_show_copy(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0 and "classify-sst2" in listed.output
    shown = runner.invoke(app, ["recipes", "show", "classify-sst2"])
    assert shown.output.startswith("# llmkit finetune classify --recipe classify-sst2")
    copied = runner.invoke(app, ["recipes", "copy", "classify-sst2", str(tmp_path)])
    assert copied.exit_code == 0 and (tmp_path / "classify-sst2.yaml").read_text() == shown.output


def test_cli_finetune_and_predict(tiny_bert: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "classify", "--model", str(tiny_bert), "--train",
                                 str(toy["train"]), "--output", str(out), "--epochs", "1",
                                 "-s", "train.batch_size=16", "--validation-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["eval_samples"] == 24  # a quarter of 96 rows held out
    assert metrics["run"]["global_batch_size"] == 16
    preds = tmp_path / "p.jsonl"
    result = runner.invoke(app, ["predict", "--model", str(out), "--input",
                                 str(toy["validation"]), "--output", str(preds)])
    assert result.exit_code == 0 and "30 predictions written" in result.output
    assert len(preds.read_text().splitlines()) == 30


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize(("args", "expected"), [
    (["--train", "{toy}", "--text-column", "sentence"],
     "no column 'sentence'; the columns are 'text', 'label'"),
    (["--train", "nowhere/train.csv"], "--train nowhere/train.csv: no such file"),
    (["--train", "{toy}", "--model", "bert-base-uncased"],
     "the Hugging Face Hub cannot be reached"),
    (["--train", "{toy}", "-s", "train.epochs=two", "-s", "data.colum=x"],
     "train.epochs: expected int, got 'two'"),
    (["--train", "{toy}", "--resume"], "--resume: no checkpoint in"),
])
def test_bad_input_gives_one_line_and_exit_1(args: list[str], expected: str, tiny_bert: Path,
                                             toy: dict[str, Path], tmp_path: Path) -> None:
    base = ["finetune", "classify", "--model", str(tiny_bert), "--output", str(tmp_path / "o")]
    args = [a.replace("{toy}", str(toy["train"])) for a in args]
    # later --model wins, as with any option given twice
    result = llmkit(*base, *args, env={"HF_HUB_OFFLINE": "1"})
    assert expected in one_line_error(result)


def test_offline_hub_id_is_quick_and_clear_without_offline_env(tmp_path: Path,
                                                               toy: dict[str, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                             "HF_DATASETS_OFFLINE")}
    result = subprocess.run([sys.executable, "-m", "llmkit", "finetune", "classify", "--model",
                             "bert-base-uncased", "--train", str(toy["train"]), "--output",
                             str(tmp_path / "o")], capture_output=True, text=True, env=env,
                            timeout=120)
    line = one_line_error(result)
    assert "'bert-base-uncased'" in line and "point --model at a local folder" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = llmkit("finetune", "classify", "--model", "m", "--train", "x.csv", "--output",
                    str(tmp_path), "-s", "bogus=1", env={"LLMKIT_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_unknown_task(tmp_path: Path) -> None:
    assert "unknown task 'clasify'" in one_line_error(llmkit("finetune", "clasify"))


@pytest.mark.slow  # tests/test_nodes.py holds it in the default suite, over two nodes
def test_two_processes_match_one_process_with_accumulation(tmp_path: Path, toy: dict[str, Path]
                                                           ) -> None:
    """2 ranks x batch 8 see exactly the batches of 1 rank x batch 8 x accumulation 2."""
    from safetensors.torch import load_file

    from tests.conftest import save_tiny_bert, two_ranks_and_one

    model = save_tiny_bert(tmp_path / "bert", dropout=0.0)  # dropout draws differ per rank
    common = ["finetune", "classify", "--model", str(model), "--train", str(toy["train"]),
              "--validation", str(toy["validation"]), "--batch-size", "8", "--epochs", "2",
              "--lr", "3e-3"]
    m2, m1 = two_ranks_and_one(common, tmp_path)
    assert m2["run"]["global_batch_size"] == m1["run"]["global_batch_size"] == 16
    assert [r["step"] for r in m2["history"]] == [r["step"] for r in m1["history"]] == [6, 12]
    for a, b in zip(m2["history"], m1["history"], strict=True):
        assert a["eval_samples"] == b["eval_samples"] == 30  # each example counted once
        assert a["accuracy"] == b["accuracy"]
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
    w2, w1 = (load_file(tmp_path / d / "model.safetensors") for d in ("two", "one"))
    for key in w1:
        assert w2[key].allclose(w1[key], rtol=1e-4, atol=1e-5), key


def test_more_processes_than_gpus_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """`torchrun --nproc_per_node 2` on a 1-GPU machine: rank 1 would ask for a GPU that does not
    exist ("invalid device ordinal", a traceback per rank); llmkit says what to change first."""
    import torch

    from llmkit.errors import LlmkitError
    from llmkit.run.launch import gpu_shortage, start_run
    from llmkit.tasks import load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    (tmp_path / "t.tsv").write_text("text\tlabel\ngood\t1\n")
    cfg = load_config("classify", None, {"model": "m", "data.train": str(tmp_path / "t.tsv"),
                                         "output": str(tmp_path / "run")})
    with pytest.raises(LlmkitError, match=r"2 processes .* 1 GPU: .*--nproc_per_node 1.*"
                                          r"CUDA_VISIBLE_DEVICES="):
        start_run(cfg, resume=False, resume_from=None, overwrite=False)
    assert not (tmp_path / "run").exists()  # nothing written before the check
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu: no GPU asked for
    assert gpu_shortage(2) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # 2 nodes of 1 process each
    assert gpu_shortage(2) is None


def test_when_one_rank_fails_each_rank_says_one_line(tmp_path: Path, tiny_bert: Path,
                                                     toy: dict[str, Path]) -> None:
    """Rank 1 fails at its third batch: it names its error, rank 0 (waiting in a collective) says
    that another process stopped; no worker prints a traceback (torchrun's own report stays)."""
    script = tmp_path / "fail_rank_1.py"
    script.write_text(
        "import os, sys\nfrom llmkit.run import report\nadd, seen = report.Meter.add, [0]\n"
        "def failing(self, *a):\n    seen[0] += 1\n"
        "    if os.environ['RANK'] == '1' and seen[0] == 9:\n"
        "        raise RuntimeError('disk on fire')\n    return add(self, *a)\n"
        "report.Meter.add = failing\nfrom llmkit.cli import main\nmain()\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
         "finetune", "classify", "--model", str(tiny_bert), "--train", str(toy["train"]),
         "--output", str(tmp_path / "o"), "--batch-size", "4"], capture_output=True, text=True,
        timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 2, result.stderr
    assert "[rank 0] another process of this run stopped" in errors[0]
    assert "[rank 1] " in errors[1] and "RuntimeError: disk on fire" in errors[1]
    before_launcher = result.stderr.split("ChildFailedError")[0].rsplit("Traceback", 1)[0]
    assert "Traceback" not in before_launcher  # the only traceback is torchrun's own
