"""Trials in parallel (`--trials-in-parallel N`): N worker processes, each one more sweep of the
same study on the same storage (`python -m llmkit.sweep`), so that no trial runs twice and the
count holds across them. A worker sees one GPU (CUDA_VISIBLE_DEVICES), or, on a machine without
one, a share of the CPU cores (its torch threads). Their log lines come back here, named."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError

log = logging.getLogger("llmkit")
WORKER = "LLMKIT_SWEEP_WORKER"  # a worker's number, in its environment; kept with its trials
LINE = "[llmkit] %(levelname)s: %(message)s"  # how a worker writes its log lines
READ = re.compile(r"\[llmkit\] (INFO|WARNING|ERROR|CRITICAL): (.*)")


def devices(asked: int) -> list[str] | None:
    """The GPU each of `asked` workers sees (an entry of CUDA_VISIBLE_DEVICES), None on a
    machine without a GPU; more workers than GPUs is refused."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return None
    if asked > count:
        raise LlmkitError(f"--trials-in-parallel {asked}: this machine has {count} "
                          f"GPU{'s' if count > 1 else ''}, one trial per GPU: give at most "
                          f"{count}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    return ids[:asked]


def threads(workers: int) -> int:
    """Each worker's torch threads: its share of this process's cores (no more than
    OMP_NUM_THREADS where that is set)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    share = max(1, cores // workers)
    given = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(given)) if given.isdigit() and int(given) > 0 else share


def start(number: int, gpu: str | None, share: int, spec: dict[str, Any]) -> subprocess.Popen:
    """One worker: the same sweep, on its GPU (or its share of the cores)."""
    env = {**os.environ, WORKER: str(number), "OMP_NUM_THREADS": str(share),
           "MKL_NUM_THREADS": str(share), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return subprocess.Popen([sys.executable, "-m", "llmkit.sweep", json.dumps(spec, default=str)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")


class Worker(threading.Thread):
    """One worker process and the thread that follows it: all its output to its file, its log
    lines to this process's log under its name, then how it ended (`stopped`: its last line
    where it failed, which it writes at CRITICAL)."""

    def __init__(self, process: subprocess.Popen, name: str, kept: Path):
        super().__init__(daemon=True)
        self.process, self.name, self.kept = process, name, kept
        self.stopped: str | None = None

    def run(self) -> None:
        last = ""
        with self.kept.open("w", encoding="utf-8") as file:
            for line in self.process.stdout or ():
                file.write(line)
                file.flush()
                found = READ.fullmatch(line.rstrip("\n"))
                if found and found[1] == "CRITICAL":
                    last = found[2]
                elif found:
                    log.log(getattr(logging, found[1]), "%s: %s", self.name, found[2])
        code = self.process.wait()
        if code:
            self.stopped = last or (f"killed by signal {-code}" if code < 0
                                    else f"exit code {code}")
            log.error("%s stopped: %s (its output: %s)", self.name, self.stopped, self.kept)


def run_workers(spec: dict[str, Any], gpus: list[str] | None, workers: int, out: Path) -> None:
    """`workers` processes on the study of `spec` (sweep's arguments), until each is done; one
    that fails says so on its own line and the others go on. Stopped together (Ctrl-C)."""
    share = threads(workers)
    if gpus:
        log.info("%d trials at once, one per GPU (%s); %d torch threads each", workers,
                 ", ".join(gpus), share)
    else:
        log.info("%d trials at once on the CPU (no GPU here), %d torch thread%s each", workers,
                 share, "s" if share > 1 else "")
    followed: list[Worker] = []
    try:
        for i in range(workers):
            name = f"worker {i}" + (f" (GPU {gpus[i]})" if gpus else "")
            followed.append(Worker(start(i, gpus[i] if gpus else None, share, spec), name,
                                   out / f"worker-{i}.log"))
            followed[-1].start()
        for worker in followed:
            worker.join()
    finally:
        for worker in followed:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in followed:
            worker.process.wait()
    if followed and all(w.stopped for w in followed):
        raise LlmkitError(f"every worker stopped; {followed[0].name}: {followed[0].stopped}")
