"""`llmkit launch`: the torchrun command for one node of a run on one or many machines, shown and
started, its launcher's report folded into one line.

No launcher of our own: torchrun (torch.distributed.run) starts the processes, its c10d
rendezvous joins the nodes, its --max-restarts restarts them (a restarted run continues from its
newest checkpoint by itself: run/launch.py). This module checks what can be checked before
anything starts (the node rank, the master's address from this machine) and keeps the terminal
readable: every rank's own `error: [rank N]` line passes, torchrun's traceback and failure report
become one line naming the rank that failed first.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Annotated

import typer

from llmkit.cli.options import finetune_problem, shown
from llmkit.errors import LlmkitError

EXAMPLES = """\
llmkit launch --procs-per-node 4 finetune classify --recipe r.yaml    # one machine, 4 GPUs
llmkit launch --nodes 2 --node-rank 0 --master 10.0.0.1:29500 finetune generate -r g.yaml
llmkit launch --nodes 2 --node-rank 1 --master 10.0.0.1:29500 finetune generate -r g.yaml
llmkit launch --nodes 2 --node-rank 0 --master 10.0.0.1:29500 --show finetune qa -r q.yaml"""

LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] (.*)$")  # torchrun's logger
FIELD = re.compile(r"^\s+(rank|host|exitcode)\s*: (.*?)\s*$")
FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def torchrun_command(nodes: int, node_rank: int, master: str | None, procs: int,
                     max_restarts: int, rdzv_timeout: int, command: list[str]) -> list[str]:
    """torchrun's arguments for this node: one node alone (--standalone) or the c10d rendezvous
    at the master's address, every node with the same run id."""
    where = ["--standalone"] if nodes == 1 else [
        "--nnodes", str(nodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", str(master), "--rdzv-id", "llmkit",
        "--rdzv-conf", f"join_timeout={rdzv_timeout}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node",
            str(procs), "--max-restarts", str(max_restarts), "-m", "llmkit", *command]


def check_launch(nodes: int, node_rank: int, master: str | None, command: list[str]
                 ) -> tuple[str, int] | None:
    """Refuse before starting anything: the master's (host, port), None on one node."""
    if not command or command[0] != "finetune":
        raise LlmkitError("llmkit launch starts a training command: llmkit launch [OPTIONS] "
                          "finetune TASK ... (see llmkit launch --help)")
    problem = finetune_problem(command)
    if problem:
        raise LlmkitError(problem)
    if node_rank >= nodes:
        raise LlmkitError(f"--node-rank {node_rank} is outside --nodes {nodes}: the nodes are "
                          f"numbered 0 to {nodes - 1}")
    if nodes == 1:
        return None
    if master is None:
        raise LlmkitError(f"--nodes {nodes} needs --master HOST:PORT, the address of node 0 "
                          "that every node can reach (e.g. --master 10.0.0.1:29500)")
    host, _, port = master.rpartition(":")
    host = host.strip("[]")  # [::1]:29500, an IPv6 address
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LlmkitError(f"--master {master}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    try:
        socket.getaddrinfo(host, int(port))
    except OSError as err:
        raise LlmkitError(f"--master {master}: {host} is not a known address here "
                          f"({err.strerror}); give node 0's address or name") from err
    return host, int(port)


def check_master(host: str, port: int, node_rank: int, timeout: float) -> None:
    """Node 0 hosts the rendezvous, so the master address must be one of its own; every other
    node waits (up to the rendezvous timeout) until it can reach it."""
    if node_rank == 0:
        try:
            with socket.create_server((host, 0)):
                return
        except OSError as err:
            raise LlmkitError(f"--master {host}:{port} is not an address of this machine "
                              f"({err.strerror}): node 0 runs on the machine the master address "
                              "names, and hosts the rendezvous there") from err
    deadline, said = time.monotonic() + timeout, ""
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout)).close()
            return
        except OSError as err:
            said = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            raise LlmkitError(f"cannot reach --master {host}:{port} within {timeout:g} s "
                              f"({said}): start node 0 first, and check the address and that "
                              "the port is open between the machines (--rdzv-timeout waits "
                              "longer)")
        time.sleep(1.0)


def fold(lines: IO[bytes], out: IO[str]) -> dict[str, str]:
    """Copy the processes' output, leaving out torchrun's own log lines, its traceback and its
    failure report; returns the report's first failure (rank, host, exitcode), {} if none."""
    held: list[str] = []  # a traceback, until its last line says whose it is
    first: dict[str, str] = {}
    state, failed = "copy", ""  # a process failed: a report follows, or torchrun restarts
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        logged = LOG_LINE.match(line)
        if state == "report":
            state = "root" if line.startswith("Root Cause") else state
        elif state == "root":
            field = FIELD.match(line)
            if field:
                first.setdefault(field[1], field[2])
            state = "copy" if line.startswith("=" * 20) else state
        elif held:
            held.append(line)
            if line and not line[0].isspace():  # the exception's own line ends a traceback
                if "ChildFailedError" in line:
                    state, failed = "report", ""
                else:
                    out.write("\n".join(held) + "\n")
                held = []
        elif line.startswith("Traceback (most recent call last)"):
            held = [line]
        elif logged:
            lost = FAILED.search(logged[1])
            failed = f"local rank {lost[2]} failed (exit code {lost[1]})" if lost else failed
        elif not (line.startswith("*" * 20) or line.startswith("Setting OMP_NUM_THREADS")):
            if failed:
                out.write(f"llmkit launch: {failed}; torchrun starts every process again "
                          "(--max-restarts)\n")
                failed = ""
            out.write(line + "\n")
        out.flush()
    return first


def failure(first: dict[str, str], code: int) -> str:
    """The one line for a run whose processes failed."""
    if not first:
        return f"torchrun stopped with exit code {code}; its processes' errors are above"
    rank = first.get("rank", "?").split(" ")[0]
    exit_code = first.get("exitcode", "?").split(" ")[0]
    how = f"was stopped by signal {signal.Signals(-int(exit_code)).name}" \
        if exit_code.lstrip("-").isdigit() and int(exit_code) < 0 \
        else f"exited with code {exit_code}"
    return (f"rank {rank} (on {first.get('host', '?')}) failed first: it {how} (its own error, "
            "if it could say one, is above), and torchrun stopped the others")


def launch(
    ctx: typer.Context,
    nodes: Annotated[int, typer.Option(help=shown("Machines in the run.", 1),
                                       show_default=False, min=1)] = 1,
    node_rank: Annotated[int, typer.Option(help=shown("This machine's number, 0 to --nodes - 1 "
                                           "(0 hosts the rendezvous).", 0), show_default=False,
                                           min=0)] = 0,
    master: Annotated[str | None, typer.Option(help="HOST:PORT of node 0, reachable from every "
                                               "node (needed with --nodes > 1).")] = None,
    procs_per_node: Annotated[int | None, typer.Option(
        "--procs-per-node", "--gpus-per-node", min=1,
        help="Processes on this machine (default: its GPUs, or 1 without).")] = None,
    max_restarts: Annotated[int, typer.Option(help=shown("Times torchrun restarts every process "
                            "after one fails; they continue from the newest checkpoint.", 0),
                            show_default=False, min=0)] = 0,
    rdzv_timeout: Annotated[int, typer.Option(help=shown("Seconds a node waits for the others "
                            "(and for the master to answer).", 600), show_default=False,
                            min=1)] = 600,
    show: Annotated[bool, typer.Option("--show", help="Print the torchrun command and start "
                                       "nothing.")] = False,
) -> None:
    """Start this node's processes of a training run with torchrun.

    The same command runs on every node; only --node-rank, and --output on node-local disks,
    differ."""
    command = list(ctx.args)
    where = check_launch(nodes, node_rank, master, command)
    if procs_per_node is None:
        import torch

        procs_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    argv = torchrun_command(nodes, node_rank, master, procs_per_node, max_restarts,
                            rdzv_timeout, command)
    # torchrun's processes share its rendezvous store by default, and a restarted process then
    # reads the dead ones' addresses from it (pytorch#135712): a store of their own per attempt
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if max_restarts else {}
    typer.echo(" ".join(shlex.quote(a) for a in [*(f"{k}={v}" for k, v in env.items()),
                                                 "torchrun", *argv[3:]]), err=not show)
    if show:
        return
    if where:
        check_master(*where, node_rank, rdzv_timeout)
    raise typer.Exit(run_torchrun(argv, env))


def run_torchrun(argv: list[str], env: dict[str, str]) -> int:
    """torchrun as a child: Ctrl-C reaches it with the terminal's process group, SIGTERM is
    passed on; its stderr is folded, its stdout (a dry run's JSON) passes untouched."""
    env = {**os.environ, **env}
    if sys.stderr.isatty():  # the processes write to a pipe: keep the terminal's width
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env)
    signal.signal(signal.SIGINT, lambda *_: None)  # the child stops its workers, then we end
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    assert child.stderr is not None
    first = fold(child.stderr, sys.stderr)
    code = child.wait()
    if code:
        raise LlmkitError(failure(first, code))
    return 0
