"""`finetune --dry-run`: the run's preparation without training or writing, and its cost."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.run.finetune import finetune
from llmkit.run.preflight import plan
from llmkit.tasks import load_config

runner = CliRunner()


def test_dry_run_writes_nothing_and_counts_the_steps_the_run_takes(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", "classify", "--model", str(tiny_bert), "--train", str(toy["train"]),
            "--validation", str(toy["validation"]), "--output", str(out), "--epochs", "2",
            "--batch-size", "8", "--max-length", "16"]
    result = runner.invoke(app, [*args, "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out.exists()
    text = runner.invoke(app, [*args, "--dry-run"]).stdout
    assert "nothing trained, nothing written" in text and "peak memory" in text
    rows = len(toy["train"].read_text().splitlines()) - 1
    assert found["rows"]["train"] == rows and found["steps_per_epoch"] == -(-rows // 8)
    tokens = found["token_lengths"]["train"]["tokens"]
    assert tokens["max"] == 16 and 0 < tokens["at_cap"] < 1  # the toy's long rows are cut
    assert found["estimated_peak_memory_mb"] > found["memory_parts_mb"]["optimizer_states"] > 0
    assert found["trainable_parameters"] == found["total_parameters"]
    finetune(load_config("classify", None, {
        "model": str(tiny_bert), "output": str(out), "data.train": str(toy["train"]),
        "data.validation": str(toy["validation"]), "train.epochs": 2,
        "train.batch_size": 8, "data.max_length": 16}))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == found["total_steps"]


def test_checkpointing_and_adapters_shrink_the_estimate(tiny_gpt2: Path, tmp_path: Path
                                                        ) -> None:
    text = tmp_path / "train.txt"
    text.write_text("".join(f"line {i} of some text to pack into blocks\n" for i in range(300)))
    base = {"model": str(tiny_gpt2), "output": str(tmp_path / "o"), "data.train": str(text),
            "data.validation": str(text), "data.block_size": 64, "train.batch_size": 8}
    full = plan(load_config("generate", None, base))
    checkpointed = plan(load_config("generate", None, {**base,
                                                       "train.gradient_checkpointing": True}))
    adapter = plan(load_config("generate", None, {**base, "adapter.lora": True}), "measure")
    parts = [r["memory_parts_mb"] for r in (full, checkpointed, adapter)]
    assert parts[1]["activations"] < parts[0]["activations"]
    assert adapter["trainable_parameters"] < full["trainable_parameters"] / 2
    assert parts[2]["optimizer_states"] < parts[0]["optimizer_states"] / 2
    assert adapter["seconds_per_step"] > 0 and adapter["estimated_train_seconds"] > 0
    for found, part in zip((full, checkpointed, adapter), parts, strict=True):
        training = sum(v for k, v in part.items() if k != "evaluation_step")
        evaluating = training - part["gradients"] - part["activations"] - part[
            "backward_start"] + part["evaluation_step"]  # gradients are freed by then
        # the parts are rounded to 0.1 MB each
        assert abs(found["estimated_peak_memory_mb"] - max(training, evaluating)) < 0.5
        assert found["peak_phase"] == ("evaluation" if evaluating > training else "training")
    assert not (tmp_path / "o").exists()
