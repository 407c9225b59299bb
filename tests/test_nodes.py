"""Two nodes simulated on one machine: two torchrun process trees joined by c10d rendezvous on
loopback (gloo), each with its own --output, as nodes with disks of their own.

The design they check (llmkit/run/launch.py): each node's first process writes complete
checkpoints on its own disk (DDP replicas are identical, so nothing is sent between nodes and
any node can resume, or become the main one: c10d ranks nodes in its own order, not by
--node-rank); the finished run (model, metrics, card) is written by the main process only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
STOP_AFTER = """\
import os, signal, time
from pathlib import Path
from llmkit.run import checkpoint
save = checkpoint.save_checkpoint
def save_then_stop(accelerator, out, state):
    path = save(accelerator, out, state)
    if state.global_step == int(os.environ["STOP_AT_STEP"]):
        Path(os.environ["STOP_MARK"]).write_text(f"{time.time()} {os.getpid()} "
                                                 f"{os.environ['RANK']}")
        # a node that hangs (or whose network went away), or that dies
        os.kill(os.getpid(), getattr(signal, os.environ.get("STOP_SIGNAL", "SIGSTOP")))
    return path
checkpoint.save_checkpoint = save_then_stop
from llmkit.cli import main
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(rank: int, port: int, args: list[str], out: Path, log: Path,
               script: str = "-m llmkit", env: dict[str, str] | None = None) -> subprocess.Popen:
    """One "node": torchrun with one process, joining the other at 127.0.0.1:PORT."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "--node-rank", str(rank), *script.split(), *args,
               "--output", str(out)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**CPU, **(env or {})}, start_new_session=True)


def two_nodes(args: list[str], outs: tuple[Path, Path], logs: Path) -> list[str]:
    """Run both nodes to the end; their logs."""
    port = free_port()
    nodes = [start_node(r, port, args, outs[r], logs / f"node{r}.log") for r in (0, 1)]
    codes = [node.wait(timeout=300) for node in nodes]
    said = [(logs / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n".join(s[-3000:] for s in said)
    return said


def main_node(outs: tuple[Path, Path]) -> tuple[Path, Path]:
    """(the node that wrote the finished run, the other): exactly one of them did."""
    done = [o for o in outs if (o / "metrics.json").is_file()]
    assert len(done) == 1, [sorted(p.name for p in o.iterdir()) for o in outs]
    return done[0], next(o for o in outs if o != done[0])


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].allclose(b[key], rtol=1e-4, atol=1e-5), key


@pytest.fixture(scope="module")
def run_args(tmp_path_factory: pytest.TempPathFactory, toy: dict[str, Path]) -> list[str]:
    from tests.conftest import save_tiny_bert

    model = save_tiny_bert(tmp_path_factory.mktemp("nodes-bert"), dropout=0.0)
    return ["finetune", "classify", "--model", str(model), "--train", str(toy["train"]),
            "--validation", str(toy["validation"]), "--batch-size", "8", "--epochs", "2",
            "--lr", "3e-3", "--keep-checkpoints"]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, run_args: list[str]) -> Path:
    """The reference: one process with gradient accumulation 2, the same global batches as 2
    ranks on one node (test_cli's slow 2-rank test holds that the two are equal)."""
    from llmkit.run.finetune import finetune
    from llmkit.tasks import load_config

    given = dict(zip(run_args[2:-1:2], run_args[3::2], strict=False))  # the --key value pairs
    return finetune(load_config("classify", None, {
        "model": given["--model"], "data.train": given["--train"],
        "data.validation": given["--validation"], "train.batch_size": 8, "train.epochs": 2,
        "train.learning_rate": 3e-3, "train.gradient_accumulation_steps": 2,
        "output": str(tmp_path_factory.mktemp("one-node") / "run")}))


def test_two_nodes_with_disks_of_their_own_train_as_one_node(
        tmp_path: Path, run_args: list[str], one_node: Path) -> None:
    import json

    outs = (tmp_path / "disk0" / "run", tmp_path / "disk1" / "run")
    two_nodes(run_args, outs, tmp_path)
    main, other = main_node(outs)
    assert json.loads((main / "metrics.json").read_text())["run"]["num_processes"] == 2
    assert_same_weights(weights(main), weights(one_node))
    # the other node's disk: the settings and complete checkpoints, no finished run
    assert (other / "config.yaml").is_file() and not (other / "model.safetensors").exists()
    names = sorted(p.name for p in (main / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (other / "checkpoints").iterdir()) == [
        "checkpoint-12", "checkpoint-6"]
    for name in names:
        here, there = main / "checkpoints" / name, other / "checkpoints" / name
        assert {"llmkit_state.json", "optimizer.bin", "scheduler.bin"} <= {
            p.name for p in there.iterdir()}
        assert_same_weights(weights(here), weights(there))


def test_processes_with_different_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process gathers every other's settings and versions (as the two-node run below):
    the keys that differ are named; --output alone may differ."""
    from dataclasses import replace
    from types import SimpleNamespace

    import accelerate.utils

    from llmkit.errors import LlmkitError
    from llmkit.run.launch import same_settings
    from llmkit.tasks import load_config

    cfg = load_config("classify", None, {"model": "m", "data.train": "t.tsv", "output": "a"})
    acc = SimpleNamespace(num_processes=2)
    seen: list = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: seen.extend(mine) or [
        mine[0], {**mine[0], "train.seed": 7, "version of torch": "1.0"}])
    with pytest.raises(LlmkitError, match=r"different settings: train.seed \(42 on rank 0, 7 on "
                                          r"rank 1\), version of torch \("):
        same_settings(acc, cfg)  # type: ignore[arg-type]
    assert "output" not in seen[0] and "version of llmkit" in seen[0]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda mine: [mine[0], mine[0]])
    same_settings(acc, replace(cfg, output="b"))  # type: ignore[arg-type]


@pytest.mark.slow
def test_nodes_started_with_different_settings_are_refused(tmp_path: Path,
                                                           run_args: list[str]) -> None:
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    nodes = [start_node(0, port, run_args, tmp_path / "a", logs[0]),
             start_node(1, port, [*run_args, "--lr", "1e-3"], tmp_path / "b", logs[1])]
    assert [node.wait(timeout=300) for node in nodes] == [1, 1]
    for log in logs:
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1, log.read_text()[-3000:]
        assert "different settings: train.learning_rate (0.003 on rank 0, 0.001 on rank 1)" \
            in errors[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_timed_out_collective_is_one_line() -> None:
    from llmkit.errors import one_line

    err = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] "
                       "Timed out waiting 5000ms for recv operation to complete")
    line, code = one_line(err, ["finetune", "classify"])
    assert code == 1 and "did not answer within --collective-timeout" in line
    assert "--resume" in line and "(RuntimeError: Timed out waiting 5000ms for recv" in line


@pytest.mark.slow
def test_a_node_that_hangs_stops_the_other_and_both_resume_exactly(
        tmp_path: Path, run_args: list[str], one_node: Path) -> None:
    """Node b stops dead after its checkpoint at step 6; node a waits --collective-timeout
    seconds in its next collective (30: on this loaded machine the main process works alone
    for more than a few seconds, tokenizing or saving), then exits with one line; both
    restarted with --resume (each from its own disk) end at the weights of an uninterrupted
    run."""
    outs = (tmp_path / "disk-a" / "run", tmp_path / "disk-b" / "run")
    args, port, mark = [*run_args, "--collective-timeout", "30"], free_port(), tmp_path / "mark"
    (tmp_path / "stop_after.py").write_text(STOP_AFTER)
    a = start_node(0, port, args, outs[0], tmp_path / "a.log")
    b = start_node(1, port, args, outs[1], tmp_path / "b.log", str(tmp_path / "stop_after.py"),
                   {"STOP_AT_STEP": "6", "STOP_MARK": str(mark)})
    try:
        assert a.wait(timeout=300) == 1
        stopped_for = time.time() - float(mark.read_text().split()[0])
        hung_rank = mark.read_text().split()[2]
    finally:
        os.killpg(b.pid, signal.SIGKILL)  # the hung node: its launcher, and its worker, which
        if mark.is_file():  # torchrun started in a session of its own
            os.kill(int(mark.read_text().split()[1]), signal.SIGKILL)
        b.wait()
        if a.poll() is None:  # its worker stops by itself after the collective timeout
            a.kill()
    assert stopped_for < 30 + 30, stopped_for  # the timeout, and torchrun's teardown
    said = (tmp_path / "a.log").read_text()
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer within --collective-timeout" in errors[0], said
    assert f"rank {hung_rank} (on {socket.gethostname()}) did not answer" in errors[0]
    for out in outs:  # every node's last checkpoint is whole
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-6"]
        assert (out / "checkpoints" / "checkpoint-6" / "llmkit_state.json").is_file()
    said = two_nodes([*args, "--resume"], outs, tmp_path)
    assert "resuming at step 6" in said[0] + said[1]
    assert_same_weights(weights(main_node(outs)[0]), weights(one_node))


@pytest.mark.slow
def test_nodes_on_a_shared_disk_write_each_file_once(tmp_path: Path, run_args: list[str],
                                                     one_node: Path) -> None:
    """Both nodes given the same --output: the main process writes it alone (every process
    its own random state)."""
    out = tmp_path / "shared"
    two_nodes(run_args, (out, out), tmp_path)
    assert_same_weights(weights(out), weights(one_node))
    for name in ("checkpoint-6", "checkpoint-12"):
        assert {p.name for p in (out / "checkpoints" / name).iterdir()} == {
            "llmkit_state.json", "model.safetensors", "optimizer.bin", "scheduler.bin",
            "random_states_0.pkl", "random_states_1.pkl"}


CRASH_ONCE = """\
import os
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    from llmkit.run import checkpoint
    save = checkpoint.save_checkpoint
    def save_then_crash(accelerator, out, state):
        path = save(accelerator, out, state)
        if state.global_step == 6:
            os._exit(3)  # a process lost on the first attempt only
        return path
    checkpoint.save_checkpoint = save_then_crash
"""


@pytest.mark.slow
def test_a_restart_by_torchrun_continues_from_the_newest_checkpoint(
        tmp_path: Path, run_args: list[str], one_node: Path) -> None:
    """llmkit launch --max-restarts 1: rank 1 dies after its checkpoint at step 6; torchrun
    starts both again, they resume at step 6 by themselves and end at the uninterrupted run's
    weights."""
    (tmp_path / "sitecustomize.py").write_text(CRASH_ONCE)
    out = tmp_path / "run"
    said = subprocess.run([sys.executable, "-m", "llmkit", "launch", "--procs-per-node", "2",
                           "--max-restarts", "1", *run_args, "--output", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**CPU, "PYTHONPATH": str(tmp_path)})
    assert said.returncode == 0, said.stderr[-3000:]
    assert "llmkit launch: local rank 1 failed (exit code 3); torchrun starts every process " \
        "again" in said.stderr and "resuming at step 6" in said.stderr
    assert "restart 1 of this run (torchrun --max-restarts)" in said.stderr
    assert_same_weights(weights(out), weights(one_node))


@pytest.mark.slow
def test_two_nodes_train_a_language_model_as_one_node(tmp_path: Path, tiny_gpt2: Path) -> None:
    """finetune generate (packed blocks) on two nodes with disks of their own ends at the
    weights of two processes on one node."""
    words = "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun".split()
    lines = [" ".join(words[i % 7:] + words[:i % 7]) for i in range(60)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:48]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(lines[48:]) + "\n")
    args = ["finetune", "generate", "--model", str(tiny_gpt2), "--train",
            str(tmp_path / "train.txt"), "--validation", str(tmp_path / "valid.txt"),
            "--block-size", "16", "--batch-size", "2", "--epochs", "2", "--lr", "3e-3"]
    outs = (tmp_path / "disk0" / "run", tmp_path / "disk1" / "run")
    two_nodes(args, outs, tmp_path)
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "llmkit", *args, "--output",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=300,
                         env=CPU)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(weights(main_node(outs)[0]), weights(tmp_path / "one"))


@pytest.mark.slow
def test_a_node_that_dies_is_named_by_the_other(tmp_path: Path, run_args: list[str]) -> None:
    """Node b's process is killed after its checkpoint at step 6: node a stops at once with
    one line naming the rank that left; both disks keep checkpoint-6 whole."""
    outs = (tmp_path / "disk-a" / "run", tmp_path / "disk-b" / "run")
    port, mark = free_port(), tmp_path / "mark"
    (tmp_path / "stop_after.py").write_text(STOP_AFTER)
    a = start_node(0, port, run_args, outs[0], tmp_path / "a.log")
    b = start_node(1, port, run_args, outs[1], tmp_path / "b.log", str(tmp_path / "stop_after.py"),
                   {"STOP_AT_STEP": "6", "STOP_MARK": str(mark), "STOP_SIGNAL": "SIGKILL"})
    assert [a.wait(timeout=300), b.wait(timeout=300)] == [1, 1]
    stopped_for = time.time() - float(mark.read_text().split()[0])
    said = (tmp_path / "a.log").read_text()
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said[-3000:]
    assert f"rank {mark.read_text().split()[2]} (on {socket.gethostname()}) stopped" \
        in errors[0], said[-3000:]
    assert stopped_for < 60, stopped_for
    for out in outs:
        assert (out / "checkpoints" / "checkpoint-6" / "llmkit_state.json").is_file()
