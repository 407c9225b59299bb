"""Runs that go wrong: a diverging loss, damaged checkpoints, a full disk. Nothing is lost, and
the run says in one line what happened and what to do."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.run import checkpoint
from llmkit.run.finetune import finetune
from llmkit.run.loop import divergence, is_better
from tests.conftest import cut_after_checkpoint
from tests.test_classify import config


def nan_losses(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """The training loss of these forward passes (counted from 1) is NaN."""
    from transformers import BertForSequenceClassification

    original = BertForSequenceClassification.forward
    seen = [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            seen[0] += 1
            if seen[0] in calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)


def finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(folder).values())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tiny_bert, toy, tmp_path / "run", save_steps=5, epochs=2, logging_steps=4)
    nan_losses(monkeypatch, {7})
    with pytest.raises(LlmkitError, match=r"became NaN or infinite at step 7: training stopped.*"
                       r"checkpoint-5, is kept \(--resume continues"):
        finetune(cfg)
    out = tmp_path / "run"
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-5"]
    assert finite(out / "checkpoints" / "checkpoint-5" / "model.safetensors")
    monkeypatch.undo()
    finetune(cfg, resume=True)
    assert finite(out / "model.safetensors")
    assert json.loads((out / "metrics.json").read_text())["run"]["skipped_steps"] == 0


def test_skip_leaves_out_nonfinite_steps_up_to_a_limit(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    nan_losses(monkeypatch, {3, 8})
    out = finetune(config(tiny_bert, toy, tmp_path / "skip", epochs=1, on_nonfinite="skip",
                          max_grad_norm=0.0))
    assert json.loads((out / "metrics.json").read_text())["run"]["skipped_steps"] == 2
    assert finite(out / "model.safetensors")
    nan_losses(monkeypatch, {3, 8})
    with pytest.raises(LlmkitError, match="more than 1 steps had a non-finite gradient norm at "
                       "step 8"):
        finetune(config(tiny_bert, toy, tmp_path / "limit", epochs=1, on_nonfinite="skip",
                        max_nonfinite_steps=1))


def test_a_nan_evaluation_is_never_best() -> None:
    assert not is_better(math.nan, None, "accuracy")
    assert not is_better(math.nan, 0.5, "eval_loss")
    assert not is_better(math.inf, None, "perplexity")
    assert is_better(0.4, 0.5, "eval_loss") and is_better(0.6, 0.5, "accuracy")


def damage(checkpoint_dir: Path, how: str) -> None:
    if how == "truncated weights":
        weights = checkpoint_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "truncated optimizer":
        states = checkpoint_dir / "optimizer.bin"
        states.write_bytes(states.read_bytes()[:-100])
    else:  # a torn state file
        state = checkpoint_dir / checkpoint.STATE_FILE
        state.write_text(state.read_text()[:40])


@pytest.mark.parametrize("how", ["truncated weights", "truncated optimizer", "torn state"])
def test_resume_falls_back_from_a_damaged_checkpoint(
        how: str, tiny_bert: Path, toy: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The newest checkpoint is damaged: --resume says so and continues from the one before,
    to the same weights as a run never interrupted; a torn last log line is dropped."""
    from safetensors.torch import load_file

    steady = finetune(config(tiny_bert, toy, tmp_path / "steady", save_steps=4, epochs=1,
                             eval_steps=0, logging_steps=1))
    cut = config(tiny_bert, toy, tmp_path / "cut", save_steps=4, epochs=1, logging_steps=1)
    cut_after_checkpoint(cut, 8, monkeypatch)
    out = tmp_path / "cut"
    damage(out / "checkpoints" / "checkpoint-8", how)
    with (out / "train_log.jsonl").open("a") as log:
        log.write('{"step": 9, "lo')  # killed mid-write
    finetune(cut, resume=True)
    assert "checkpoint-8 is damaged" in caplog.text and "trying the one before it" in caplog.text
    a, b = (load_file(d / "model.safetensors") for d in (steady, out))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text()
             .splitlines() if "learning_rate" in line]
    assert steps == list(range(1, 13))


def test_resume_from_a_damaged_named_checkpoint_is_one_line(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    named = tmp_path / "checkpoint-3"
    named.mkdir()
    (named / checkpoint.STATE_FILE).write_text("{}")  # and no weights
    with pytest.raises(LlmkitError, match=r"no complete checkpoint to resume from .*"
                       r"checkpoint-3 is damaged\); start again"):
        finetune(config(tiny_bert, toy, tmp_path / "run"), resume_from=str(named))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of a chosen size (root only: skipped elsewhere); yields a resize function."""
    import os
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
                                            str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")

    def resize(size: int) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
        return folder

    yield resize
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_a_full_disk_keeps_earlier_checkpoints_and_resume_is_exact(
        small_disk, tiny_bert: Path, toy: dict[str, Path], tmp_path: Path) -> None:
    import errno

    from safetensors.torch import load_file

    from llmkit.errors import one_line

    steady = finetune(config(tiny_bert, toy, tmp_path / "steady", save_steps=4, epochs=1,
                             logging_steps=1, eval_steps=0))
    model = (steady / "model.safetensors").stat().st_size
    # room for the run's small files and one checkpoint (weights + Adam's two moments), not two
    disk = small_disk(4 * model + 256 * 1024)
    cut = config(tiny_bert, toy, disk / "run", save_steps=4, epochs=1, logging_steps=1)
    with pytest.raises(Exception) as failed:
        finetune(cut)
    line, code = one_line(failed.value, ["finetune", "classify"])
    assert code == 1 and "No space left on device" in line and "--resume continues" in line
    assert [p.name for p in checkpoint.checkpoints(disk / "run")] == ["checkpoint-4"]
    assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))  # the cut save is gone
    assert failed.type is OSError and failed.value.errno == errno.ENOSPC
    small_disk(64 * model)  # space freed
    finetune(cut, resume=True)
    a, b = (load_file(d / "model.safetensors") for d in (steady, disk / "run"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(("limit", "best", "kept"), [
    (2, "checkpoint-10", ["checkpoint-10", "checkpoint-25"]),
    (2, "checkpoint-25", ["checkpoint-20", "checkpoint-25"]),
    (3, "checkpoint-5", ["checkpoint-5", "checkpoint-20", "checkpoint-25"]),
    (1, "checkpoint-5", ["checkpoint-5", "checkpoint-25"]),  # the newest stays: resume
    (1, None, ["checkpoint-25"]),
    (0, "checkpoint-5", [f"checkpoint-{s}" for s in (5, 10, 15, 20, 25)]),
])
def test_save_total_limit_keeps_the_newest_and_the_best(tmp_path: Path, limit: int,
                                                        best: str | None, kept: list[str]
                                                        ) -> None:
    from llmkit.run import checkpoint

    for step in (5, 10, 15, 20, 25):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.prune(tmp_path, best, limit)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == kept


def test_a_finished_run_keeps_its_checkpoints_when_asked(tiny_bert: Path, toy: dict[str, Path],
                                                         tmp_path: Path) -> None:
    from llmkit.run import checkpoint
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    out = finetune(load_config("classify", None, {
        "model": str(tiny_bert), "output": str(tmp_path / "run"), "data.train": str(toy["train"]),
        "data.validation": str(toy["validation"]), "train.batch_size": 8, "train.epochs": 2,
        "train.save_steps": 2, "train.save_total_limit": 3, "train.keep_checkpoints": True}))
    best = json.loads((out / "metrics.json").read_text())["final"]["step"]
    kept = [p.name for p in checkpoint.checkpoints(out)]
    assert len(kept) <= 3 and f"checkpoint-{best}" in kept


def test_fsdp2_units_leave_out_a_block_that_holds_the_embeddings() -> None:
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from llmkit.run.launch import fsdp_units

    def units(model, given=None, version=2):
        plugin = SimpleNamespace(fsdp_version=version, transformer_cls_names_to_wrap=given)
        fsdp_units(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
        return plugin.transformer_cls_names_to_wrap

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=37))
    assert units(bert) == ["BertLayer"]  # Accelerate would shard the word embeddings twice
    assert units(bert, ["BertEmbeddings", "BertLayer"]) == ["BertEmbeddings", "BertLayer"]
    assert units(bert, version=1) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2))
    assert units(gpt2) is None  # its blocks hold no embeddings: Accelerate's own choice stands
    assert fsdp_units(SimpleNamespace(state=SimpleNamespace()), gpt2) is None  # no FSDP


def test_a_sharded_gradient_norm_is_judged_whole(tmp_path: Path) -> None:
    from llmkit.config.schema import TrainConfig

    class Sharded:  # FSDP2's clipper returns a DTensor: each process holds a piece
        def full_tensor(self) -> torch.Tensor:
            return torch.tensor(float("inf"))

    guard = checkpoint.Guard(TrainConfig(), checkpoint.RunState(), tmp_path)
    guard.note(torch.tensor(1.0), 2)
    guard.note(Sharded(), 3)  # type: ignore[arg-type]
    assert guard.first is not None and int(guard.first) == 3
    skipping = checkpoint.Guard(TrainConfig(on_nonfinite="skip"), checkpoint.RunState(), tmp_path)
    assert skipping.skip(Sharded(), 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(("losses", "start", "chance", "tripped"), [
    ([0.69, 0.52, 0.9, 0.48, 1.3, 0.61], 0.7, math.log(2), False),  # noisy but fine
    ([0.02, 0.001, 0.3], 0.69, None, False),  # overfits from a tiny loss: still below the start
    ([0.69, 3.1e4, 2.7e4], 0.69, math.log(2), True),  # classify at lr 1e4, no clipping
    ([3.1e4, 7.6e4, 2.7e4], 0.69, math.log(2), True),  # diverged before the first evaluation
    ([0.05, 0.6], None, math.log(2), False),  # 12x the first, but no worse than guessing
    ([0.69, 1.3e5], None, None, True),  # LoRA at lr 1e6, resumed from a state without a start
    ([4.0], 4.1, None, False)])
def test_divergence_is_ten_times_the_start_and_worse_than_untrained(
        losses: list[float], start: float | None, chance: float | None, tripped: bool) -> None:
    found = divergence([{"eval_loss": x} for x in losses], start, chance)
    assert (found is not None) == tripped
    if found:
        assert found["last_eval_loss"] == losses[-1] and found["first_eval_loss"] == losses[0]


def test_a_diverging_run_says_so_and_stops_when_asked(
        tiny_bert: Path, toy: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Classify at lr 1e4 without clipping: the loss stays finite, so only the divergence check
    tells; with on_divergence=stop the run ends at the first such evaluation, its best
    checkpoint kept."""
    import logging

    from llmkit.run import loop

    huge = {"learning_rate": 1e4, "max_grad_norm": 0.0, "max_steps": 2, "epochs": 1}
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        out = finetune(config(tiny_bert, toy, tmp_path / "warn", **huge))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diverged"] is True
    assert metrics["divergence"]["last_eval_loss"] == metrics["history"][-1]["eval_loss"]
    assert metrics["divergence"]["start_loss"] == pytest.approx(math.log(2), abs=0.1)
    assert "the run diverged: the eval loss rose to" in caplog.text
    real = loop.evaluate
    calls = [0]

    def rising(parts):  # fine at the first evaluation, 100 times worse from the second
        calls[0] += 1
        found = real(parts)
        return {**found, "eval_loss": found["eval_loss"] * (1 if calls[0] == 1 else 100)}

    monkeypatch.setattr(loop, "evaluate", rising)
    stopped = tmp_path / "stop"
    with pytest.raises(LlmkitError, match=r"the run diverged at step 4: the eval loss rose to .* "
                       r"training stopped .*best checkpoint is kept \(--resume-from "
                       r"\S+checkpoint-2 "):
        finetune(config(tiny_bert, toy, stopped, learning_rate=3e-3, max_steps=4, eval_steps=2,
                        on_divergence="stop"))
    assert [p.name for p in checkpoint.checkpoints(stopped)] == ["checkpoint-2"]
    assert not (stopped / "metrics.json").exists()
