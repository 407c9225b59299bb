"""Seeing and sharing a run: trackers (TensorBoard read back), the curves picture, the model
card and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.errors import LlmkitError
from llmkit.run.finetune import finetune
from llmkit.tasks import load_config


def settings(tiny_bert: Path, toy: dict[str, Path], out: Path, **extra: object) -> dict:
    return {"model": str(tiny_bert), "output": str(out), "data.train": str(toy["train"]),
            "data.validation": str(toy["validation"]), "train.batch_size": 8,
            "train.epochs": 2, "train.logging_steps": 2, **extra}


@pytest.fixture(scope="module")
def tracked(tiny_bert: Path, toy: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Path:
    out = tmp_path_factory.mktemp("share") / "run"
    return finetune(load_config("classify", None, settings(
        tiny_bert, toy, out, **{"train.report_to": ["tensorboard"]})))


def test_tensorboard_holds_the_losses_and_metrics_against_steps(tracked: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tracked / "tensorboard").rglob("events.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/samples_per_second", "eval/eval_loss",
            "eval/accuracy"} <= tags
    metrics = json.loads((tracked / "metrics.json").read_text())
    accuracy = [(e.step, e.value) for e in events.Scalars("eval/accuracy")]
    assert accuracy == [(r["step"], pytest.approx(r["accuracy"])) for r in metrics["history"]]
    logged = [json.loads(x) for x in (tracked / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if "learning_rate" in r]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in losses]


@pytest.mark.parametrize(("names", "message"), [
    (["nonsense"], "--report-to nonsense: no such tracker; use tensorboard, wandb, mlflow, "
                   "trackio, all or none"),
    (["wandb"], "--report-to wandb: its package is not installed: pip install wandb"),
])
def test_trackers_that_cannot_log_are_one_line(names: list[str], message: str, tiny_bert: Path,
                                               toy: dict[str, Path], tmp_path: Path) -> None:
    import importlib.util

    if names == ["wandb"] and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(LlmkitError, match=message.replace("(", r"\(")):
        finetune(load_config("classify", None, settings(
            tiny_bert, toy, tmp_path / "o", **{"train.report_to": names})))


def test_the_model_card_is_read_by_huggingface_hub(tracked: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(tracked / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert "llmkit" in card.data.tags and card.data.base_model is None  # a local folder
    final = json.loads((tracked / "metrics.json").read_text())["final"]
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert scores["accuracy"] == pytest.approx(final["accuracy"], abs=1e-4)
    assert scores["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-4)
    assert "## Evaluation" in card.text and "llmkit finetune classify --recipe" in card.text


def test_the_manifest_names_versions_data_and_times(tracked: Path, toy: dict[str, Path]
                                                    ) -> None:
    import hashlib

    made = json.loads((tracked / "manifest.json").read_text())
    assert {"torch", "transformers", "accelerate", "datasets", "python"} <= set(made["versions"])
    assert made["data"][str(toy["train"])] == hashlib.sha256(toy["train"].read_bytes()
                                                            ).hexdigest()
    assert made["seed"] == 42 and made["processes"] == 1
    assert made["started"] < made["ended"]


def test_curves_are_drawn_and_runs_compared(tracked: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from llmkit.cli import app

    assert Image.open(tracked / "curves.png").size[0] > 800
    result = CliRunner().invoke(app, ["plot", str(tracked), str(tracked), "-o",
                                      str(tmp_path / "both.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "both.png").size[0] > 800
    with pytest.raises(LlmkitError, match="is not a finished run"):
        from llmkit.run.card import draw

        draw([tmp_path], tmp_path / "x.png")


@pytest.mark.parametrize(("env", "message"), [
    ({"HF_HUB_OFFLINE": "1"}, "cannot reach the Hugging Face Hub"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_token", "HF_HUB_OFFLINE": "0"},
     "push to me/run failed (ConnectError"),
])
def test_push_without_the_hub_is_one_line(tracked: Path, env: dict[str, str], message: str
                                          ) -> None:
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "llmkit", "push", str(tracked), "--repo-id",
                             "me/run"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_test_file_is_predicted_and_scored_after_training(tiny_bert: Path,
                                                            toy: dict[str, Path],
                                                            tmp_path: Path) -> None:
    from llmkit.inference.predict import predict, score

    out = finetune(load_config("classify", None, settings(
        tiny_bert, toy, tmp_path / "run", **{"data.test": str(toy["validation"]),
                                             "train.epochs": 1})))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(
        score(str(out), str(toy["validation"]))["accuracy"])
    written = [json.loads(x) for x in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert written == predict(str(out), str(toy["validation"]))
    with pytest.raises(LlmkitError, match="--test nowhere/test.tsv: no such file"):
        finetune(load_config("classify", None, settings(
            tiny_bert, toy, tmp_path / "other", **{"data.test": "nowhere/test.tsv"})))
    assert not (tmp_path / "other").exists()  # refused before any work
