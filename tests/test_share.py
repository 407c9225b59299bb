"""Seeing and sharing a run: trackers (TensorBoard read back), the curves picture, the model
card and the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def test_the_model_card_is_read_by_huggingface_hub(tracked: Path, tiny_bert: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(tracked / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert "llmkit" in card.data.tags
    assert card.data.base_model == tiny_bert.name  # a local folder: its name, not its path
    assert card.data.license == "unknown" and card.data.language is None  # its base has no card
    assert "## Intended use" in card.text and str(tiny_bert) not in card.text.split("## Data")[0]
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


def test_a_base_model_s_card_gives_license_and_language(tiny_bert: Path, tmp_path: Path
                                                        ) -> None:
    import shutil

    from llmkit.run.card import base_card

    base = tmp_path / "minilm"
    shutil.copytree(tiny_bert, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# minilm\n")
    assert base_card(str(base)) == {"license": "apache-2.0", "language": "en"}
    assert base_card(str(tiny_bert)) == {} == base_card("nobody/nothing")  # none at hand


def figure_of(runs: list[Path], output: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The matplotlib figure `llmkit plot` draws."""
    from matplotlib.figure import Figure

    from llmkit.run.card import draw

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self) or save(
        self, *a, **k))
    draw(runs, output)
    return drawn[0]


def fake_run(folder: Path, logged: list[dict], history: list[dict]) -> Path:
    """A finished run's metrics.json and training log, written by hand."""
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "final": history[-1], "metric_for_best": "perplexity", "history": history, "run": {}}))
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    return folder


def test_a_short_run_draws_no_empty_panel_and_a_wide_one_a_log_axis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One logged point: no learning-rate panel, and each legend entry has a mark to show;
    perplexity from 300 to 5 on a log axis; every y axis labelled."""
    short = fake_run(tmp_path / "short", [{"step": 2, "learning_rate": 1e-3, "loss": 5.7}],
                     [{"step": 3, "eval_loss": 5.68, "perplexity": 294.4}])
    figure = figure_of([short], tmp_path / "short.png", monkeypatch)
    axes = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["loss", "perplexity"]
    handles, labels = axes[0].get_legend_handles_labels()
    assert labels == ["training", "validation"]
    assert all(h.get_marker() not in ("None", "", None) for h in handles)  # a lone point shows
    wide = fake_run(tmp_path / "wide", [{"step": s, "learning_rate": 1e-3 / s, "loss": 6 / s}
                                        for s in (2, 4, 6, 8)],
                    [{"step": s, "eval_loss": 5.7 / s, "perplexity": 300 / s ** 2}
                     for s in (2, 8)])
    axes = {ax.get_title(): ax for ax in figure_of([wide], tmp_path / "w.png", monkeypatch).axes}
    assert axes["perplexity"].get_yscale() == "log"
    assert axes["perplexity"].get_ylabel() == "perplexity (log scale)"
    assert axes["loss"].get_yscale() == "linear" and axes["loss"].get_ylabel() == "cross-entropy"
    assert axes["learning rate"].get_ylabel() == "learning rate"


def test_push_dry_run_lists_the_commit_and_checks_the_card_offline(
        tracked: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi
    from typer.testing import CliRunner

    from llmkit.cli import app
    from llmkit.cli.runs import size

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network call")

    for name in ("create_repo", "upload_folder", "whoami"):
        monkeypatch.setattr(HfApi, name, no_network)
    result = CliRunner().invoke(app, ["push", str(tracked), "--repo-id", "me/run", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"would push {tracked} to me/run: one commit of ")
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in lines if
              line.startswith("  ")}
    assert {"README.md", "config.json", "model.safetensors", "metrics.json", "curves.png",
            "manifest.json"} <= set(listed)
    assert not any(n.startswith(("tensorboard", "checkpoints")) for n in listed)
    assert listed["README.md"] == size((tracked / "README.md").stat().st_size)
    assert "license unknown" in result.output and "pipeline_tag text-classification" in \
        result.output and lines[-1] == "nothing was uploaded (--dry-run)"
    refused = CliRunner().invoke(app, ["push", str(tracked), "--repo-id", str(tracked),
                                       "--dry-run"])
    assert refused.exit_code == 1 and "is a local path: give the Hub repository as " \
        "USER/NAME" in str(refused.exception)


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
