"""`llmkit launch`: the torchrun command it builds, what it refuses before starting anything,
and torchrun's failure report folded into one line (the two-node runs are in test_nodes)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.cli.launch import fold

TRAIN = ["finetune", "classify", "--model", "m", "--train", "t.tsv", "--output", "o"]


def llmkit(args: list[str], capsys: pytest.CaptureFixture[str],
           monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["llmkit", *args])
    with pytest.raises(SystemExit) as done:
        main()
    said = capsys.readouterr()
    return int(done.value.code or 0), said.out, said.err


def test_the_command_for_one_node_and_for_one_of_two(capsys, monkeypatch) -> None:
    code, out, _ = llmkit(["launch", "--procs-per-node", "4", "--show", *TRAIN], capsys,
                          monkeypatch)
    assert code == 0 and out.split() == [
        "torchrun", "--standalone", "--nproc-per-node", "4", "--max-restarts", "0", "-m",
        "llmkit", *TRAIN]
    code, out, _ = llmkit(["launch", "--nodes", "2", "--node-rank", "1", "--master",
                           "10.0.0.1:29500", "--gpus-per-node", "8", "--max-restarts", "3",
                           "--show", *TRAIN, "--nodes", "7"], capsys, monkeypatch)
    assert code == 0 and out.split() == [
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun", "--nnodes", "2", "--node-rank", "1",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "10.0.0.1:29500", "--rdzv-id", "llmkit", "--rdzv-conf",
        "join_timeout=600", "--nproc-per-node", "8", "--max-restarts", "3", "-m", "llmkit",
        *TRAIN, "--nodes", "7"]  # after the command, options are the command's
    code, out, err = llmkit(["launch", "--nodes", "2", "--master", "[::1]:29500", "--show",
                             *TRAIN], capsys, monkeypatch)  # an IPv6 address, in brackets
    assert code == 0 and "--rdzv-endpoint '[::1]:29500'" in out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("args", "says"), [
    (["--nodes", "2", "--node-rank", "2", "--master", "127.0.0.1:29500"],
     "--node-rank 2 is outside --nodes 2: the nodes are numbered 0 to 1"),
    (["--nodes", "2"], "--nodes 2 needs --master HOST:PORT, the address of node 0"),
    (["--nodes", "2", "--master", "10.0.0.1"], "--master 10.0.0.1: expected HOST:PORT"),
    (["--nodes", "2", "--master", "10.0.0.1:99999"], "--master 10.0.0.1:99999: expected"),
    (["--nodes", "2", "--master", "no-such-host.invalid:29500"],
     "--master no-such-host.invalid:29500: no-such-host.invalid is not a known address here"),
    (["--nodes", "2", "--master", "192.0.2.1:29500"],  # TEST-NET: never this machine's
     "--master 192.0.2.1:29500 is not an address of this machine"),
    (["--nodes", "2", "--node-rank", "1", "--master", "127.0.0.1:{port}", "--rdzv-timeout", "1"],
     "cannot reach --master 127.0.0.1:{port} within 1 s (Connection refused): start node 0 "
     "first"),
])
def test_what_is_refused_before_anything_starts(args: list[str], says: str, capsys,
                                                 monkeypatch) -> None:
    port = str(closed_port())
    args, says = [a.replace("{port}", port) for a in args], says.replace("{port}", port)
    code, _, err = llmkit(["launch", *args, *TRAIN], capsys, monkeypatch)
    lines = err.splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and says in lines[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("command", "says"), [
    (["predict", "--model", "m"], "llmkit launch starts a training command"),
    ([], "llmkit launch starts a training command"),
    (["finetune", "clasify"], "unknown task 'clasify'"),
    (["finetune", "classify", "--doc-stride", "3"], "--doc-stride is an option of llmkit "
                                                    "finetune qa"),
])
def test_a_command_that_is_not_training_is_refused(command: list[str], says: str, capsys,
                                                   monkeypatch) -> None:
    code, _, err = llmkit(["launch", "--show", *command], capsys, monkeypatch)
    assert code == 1 and says in err.splitlines()[-1], err


REPORT = """\
*****************************************
Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, ...
*****************************************
error: [rank 1] --train t.tsv: no such file
W1203 12:07:13.761000 2453 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 2491 closing signal SIGTERM
E1203 12:07:13.763000 2453 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 2492) of binary: /usr/bin/python
worker output after a restart
E1203 12:07:13.763000 2453 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 2492) of binary: /usr/bin/python
Traceback (most recent call last):
  File "/x/worker.py", line 3, in <module>
ValueError: a worker's own traceback (LLMKIT_DEBUG=1) is kept
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
llmkit FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_12:07:13
  host      : node-b
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 2491)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_12:07:13
  host      : node-a
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 2492)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""  # noqa: E501 (torchrun's lines as it writes them)


def test_torchrun_s_report_folds_into_the_rank_that_failed_first() -> None:
    from llmkit.cli.launch import failure

    out = io.StringIO()
    first = fold(io.BytesIO(REPORT.encode()), out)
    assert first == {"host": "node-a", "rank": "1 (local_rank: 1)", "exitcode": "1 (pid: 2492)"}
    assert out.getvalue().splitlines() == [
        "error: [rank 1] --train t.tsv: no such file",
        "llmkit launch: local rank 1 failed (exit code 1); torchrun starts every process again "
        "(--max-restarts)", "worker output after a restart",
        "Traceback (most recent call last):", '  File "/x/worker.py", line 3, in <module>',
        "ValueError: a worker's own traceback (LLMKIT_DEBUG=1) is kept"]
    assert failure(first, 1).startswith("rank 1 (on node-a) failed first: it exited with code 1")
    assert "stopped by signal SIGKILL" in failure({"rank": "3", "exitcode": "-9"}, 1)
    assert "exit code 2" in failure({}, 2)


def test_a_real_launch_that_fails_says_so_once_per_rank_and_once_for_torchrun(
        tmp_path: Path) -> None:
    said = subprocess.run(
        [sys.executable, "-m", "llmkit", "launch", "--procs-per-node", "2", "finetune",
         "classify", "--model", str(tmp_path / "m"), "--train", str(tmp_path / "none.tsv"),
         "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": str(tmp_path)})
    errors = [line for line in said.stderr.splitlines() if line.startswith("error:")]
    assert said.returncode == 1 and "Traceback" not in said.stderr, said.stderr
    assert said.stdout.split()[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"] \
        or said.stderr.startswith("torchrun --standalone"), said.stderr
    assert errors[-1].startswith("error: rank ") and "failed first" in errors[-1], said.stderr
    assert any("[rank 0]" in line or "[rank 1]" in line for line in errors[:-1]), said.stderr


EXAMPLES = Path(__file__).parents[1] / "examples" / "multinode"


@pytest.mark.parametrize(("name", "expect"), [
    ("ddp", {"ACCELERATE_MIXED_PRECISION": "bf16"}),
    ("fsdp2", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
               "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
               "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}),
    ("deepspeed-zero2", {"ACCELERATE_USE_DEEPSPEED": "true",
                         "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    ("deepspeed-zero3", {"ACCELERATE_USE_DEEPSPEED": "true",
                         "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                         "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}),
])
def test_the_accelerate_config_examples_are_what_accelerate_launch_reads(name: str,
                                                                         expect: dict) -> None:
    """Each example goes through `accelerate launch`'s own parser and validation to the
    environment it would give the processes (the launch itself needs GPUs)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args([
        "--config_file", str(EXAMPLES / f"accelerate-{name}.yaml"), "-m", "llmkit", *TRAIN])
    args, config, _ = _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.main_process_ip,
            args.main_process_port) == (2, 16, "10.0.0.1", 29500)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    assert {k: env.get(k) for k in expect} == expect
    if name == "fsdp2":  # the plugin Accelerator would make of it
        from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

        with patch_environment(**env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def test_the_slurm_example_runs_llmkit_launch_with_what_slurm_gives(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """The sbatch script's `srun` line, with SLURM's variables for node 1 of 2, is a command
    llmkit launch accepts (shown, not started)."""
    script = (EXAMPLES / "slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "slurm.sbatch")]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # runs its command once
    (fake / "llmkit").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')  # shows its arguments
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_ID": "77", "MASTER_ADDR": "127.0.0.1"}
    said = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert said.returncode == 0, said.stderr
    args = said.stdout.split()
    assert args[:9] == ["launch", "--nodes", "2", "--node-rank", "1", "--master",
                        "127.0.0.1:29500", "--gpus-per-node", "8"]
    at = args.index("finetune")
    code, out, err = llmkit([*args[:at], "--show", *args[at:]], capsys, monkeypatch)
    assert code == 0 and "--rdzv-endpoint 127.0.0.1:29500" in out, err
    assert "finetune generate --recipe generate-gpt2 --output runs/slurm-77" in out


def test_an_accelerate_start_up_error_names_an_empty_variable(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Accelerate's ValueError for an empty OMP_NUM_THREADS (torchrun over gloo) is not blamed
    on train.mixed_precision; the empty variable is named."""
    import llmkit.run.launch as launch
    from llmkit.errors import LlmkitError
    from llmkit.tasks import load_config

    def refuse(**_: object) -> None:
        raise ValueError("invalid literal for int() with base 10: ''")

    monkeypatch.setattr(launch, "Accelerator", refuse)
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    cfg = load_config("classify", None, {"model": "m", "output": str(tmp_path / "o"),
                                         "data.train": "t.tsv"})
    with pytest.raises(LlmkitError) as found:
        launch.start_accelerator(cfg)
    assert "mixed_precision" not in str(found.value)
    assert str(found.value) == ("Accelerate could not start: invalid literal for int() with "
                                "base 10: '' (set or unset OMP_NUM_THREADS: it is empty)")
