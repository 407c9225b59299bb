"""Setting up a run before any work: the launcher's processes, Accelerate, the run directory.

Many nodes: torchrun (or Accelerate) starts the processes; every node runs the same command but
for --output. Checked at start: every process holds the same settings and versions. Disks:
when a node cannot see the main process's run directory (node-local disks), its first process
writes complete checkpoints of its own there (DDP replicas are identical: no state is sent
between nodes, and any node can be the main one after a restart); on a shared disk only the
main process writes. The final model, metrics and card are written by the main process only.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DataLoaderConfiguration,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
)

from llmkit.config.recipes import dump_config, flatten
from llmkit.config.schema import RunConfig
from llmkit.errors import PEERS, LlmkitError
from llmkit.run import checkpoint as ckpt
from llmkit.run.start import check_start

log = logging.getLogger("llmkit")


def gpu_shortage(launched: int) -> str | None:
    """What to change when the launcher started more processes on this machine than it has
    GPUs: Accelerate gives process i GPU i, and the extra ones would fail with "invalid device
    ordinal", a traceback per rank. None when it fits (or the launch asked for the CPU)."""
    here = int(os.environ.get("LOCAL_WORLD_SIZE", launched))  # processes on this machine
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if here < 2 or not 0 < gpus < here or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return None
    return (f"the launcher started {here} processes on this machine, which has {gpus} "
            f"GPU{'s' if gpus > 1 else ''}: start one process per GPU (--nproc_per_node {gpus}), "
            f"or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train {here} processes on the CPU")


def start_run(cfg: RunConfig, resume: bool, resume_from: str | None, overwrite: bool
              ) -> tuple[Accelerator, Path | None, bool]:
    """Check the run directory before any work, then set up the processes; returns the
    accelerator, the checkpoint to resume from, and whether a finished run is to be replaced
    (by `open_output`, once the inputs have loaded)."""
    start, wipe = check_start(cfg, resume, resume_from, overwrite)
    if start is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        log.warning("restart %s of this run (torchrun --max-restarts): continuing from its "
                    "newest checkpoint", os.environ["TORCHELASTIC_RESTART_COUNT"])
    return start_accelerator(cfg), start, wipe


def open_output(accelerator: Accelerator, cfg: RunConfig, start: Path | None, wipe: bool
                ) -> None:
    """The run directory, written once the data and the model have loaded: input that cannot be
    trained on leaves no folder behind, and an --overwrite of a finished run keeps it."""
    out = Path(cfg.output)
    if accelerator.is_main_process:
        if wipe:
            ckpt.clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        saved = out / "config.yaml"
        if start and saved.is_file():
            warn_config_changes(saved, cfg)
        dump_config(cfg, saved)
    find_local_disk(accelerator, out)
    if ckpt.keeps_files(accelerator) and not accelerator.is_main_process:
        if wipe:  # this node's own copy of the run
            ckpt.clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()


def find_local_disk(accelerator: Accelerator, out: Path) -> None:
    """Whether this node sees the main process's run directory: the main process writes a file
    of a name never used before (an NFS client has no stale entry for it), each node's first
    process looks for it. A node that does not see it keeps checkpoints of its own
    (Accelerate's save_on_each_node); a shared disk is written by the main process alone."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    token = [secrets.token_hex(8) if accelerator.is_main_process else ""]
    broadcast_object_list(token)
    probe = out / f".node-probe-{token[0]}"
    if accelerator.is_main_process:
        probe.write_text(token[0], encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        accelerator.project_configuration.save_on_each_node = not probe.is_file()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()


def start_accelerator(cfg: RunConfig) -> Accelerator:
    """Accelerate over the processes the launcher started (one, or many on CPUs over gloo)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    problem = gpu_shortage(launched)
    if problem:
        raise LlmkitError(problem)
    # Accelerate keeps settings such as mixed precision in a process-wide singleton; a second
    # run in the same Python process (the API, a notebook) must start from a clean one. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state()
    try:
        # Accelerate runs several CPU processes (over gloo) only when told it is on CPU.
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                  log_with=trackers(cfg.train.report_to) or None,
                                  project_config=ProjectConfiguration(
                                      project_dir=cfg.output,
                                      logging_dir=str(Path(cfg.output) / "tensorboard")),
                                  gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                                  cpu=launched > 1 and not torch.accelerator.is_available(),
                                  dataloader_config=DataLoaderConfiguration(non_blocking=True),
                                  kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(
                                      seconds=cfg.train.collective_timeout))])
    except ValueError as err:
        if "precision" in str(err):
            raise LlmkitError(f"train.mixed_precision {cfg.train.mixed_precision}: {err}"
                              ) from err
        empty = sorted(k for k in ("OMP_NUM_THREADS", "LOCAL_RANK", "RANK", "WORLD_SIZE")
                       if os.environ.get(k) == "")
        raise LlmkitError(f"Accelerate could not start: {err}" + (
            f" (set or unset {', '.join(empty)}: it is empty)" if empty else "")) from err
    if accelerator.num_processes != launched:
        raise LlmkitError(f"the launcher started {launched} processes but Accelerate joined "
                          f"{accelerator.num_processes}; each would train alone and they would "
                          "overwrite each other's files")
    same_settings(accelerator, cfg)
    heartbeat(accelerator)
    return accelerator


def heartbeat(accelerator: Accelerator, every: float = 0.5) -> None:
    """Each process counts up a number of its own in the launcher's store twice a second (a
    daemon thread); when a collective fails, the processes whose number stood still are the
    ones that left, and the error line names them (errors.PEERS). On one node torchrun names
    the process that failed itself (and stops the others at once): nothing to do there."""
    world = accelerator.num_processes
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world or "MASTER_ADDR" not in os.environ:
        return
    import socket
    import threading
    import time

    from torch.distributed import TCPStore

    def client() -> TCPStore:
        return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                        is_master=False, timeout=timedelta(seconds=10))

    rank, store = accelerator.process_index, client()
    store.set(f"llmkit/host/{rank}", socket.gethostname())

    def beat() -> None:
        while True:
            try:
                store.add(f"llmkit/alive/{rank}", 1)
            except Exception:  # the store left with its node: nothing more to say
                return
            time.sleep(every)

    def who_left() -> str:
        ask, others = client(), [r for r in range(world) if r != rank]
        before = [ask.add(f"llmkit/alive/{r}", 0) for r in others]
        time.sleep(every * 3)
        gone = [r for r, b in zip(others, before, strict=True)
                if ask.add(f"llmkit/alive/{r}", 0) == b]
        return " and ".join(f"rank {r} (on {ask.get(f'llmkit/host/{r}').decode()})"
                            for r in gone[:3])

    threading.Thread(target=beat, name="llmkit-heartbeat", daemon=True).start()
    PEERS.append(who_left)


def same_settings(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Every process must run the same settings and versions (only --output may differ, a
    node-local disk each): nodes started apart would train apart or wait in a collective."""
    if accelerator.num_processes == 1:
        return
    from importlib.metadata import PackageNotFoundError, version

    from accelerate.utils import gather_object

    mine = {k: v for k, v in flatten(asdict(cfg)).items() if k != "output"}
    for package in ("llmkit", "torch", "transformers", "accelerate"):
        try:
            mine[f"version of {package}"] = version(package)
        except PackageNotFoundError:
            mine[f"version of {package}"] = "?"
    every = gather_object([mine])
    first: dict[str, int] = {}  # setting -> the first rank that differs from rank 0
    for rank, other in enumerate(every):
        for k in sorted(every[0].keys() | other.keys()):
            if every[0].get(k) != other.get(k):
                first.setdefault(k, rank)
    if first:
        differ = sorted(first)
        shown = ", ".join(f"{k} ({every[0].get(k)!r} on rank 0, {every[first[k]].get(k)!r} on "
                          f"rank {first[k]})" for k in differ[:4])
        raise LlmkitError(f"the processes of this run were started with different settings: "
                          f"{shown}{' ...' if len(differ) > 4 else ''}; start every node with "
                          "the same command (only --output may differ)")


def warn_config_changes(saved: Path, cfg: RunConfig) -> None:
    import yaml

    # compared as YAML reads them back: a tuple setting is saved as a list
    before = flatten(yaml.safe_load(saved.read_text(encoding="utf-8")))
    now = flatten(yaml.safe_load(yaml.safe_dump(asdict(cfg))))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        log.warning("resuming with settings that differ from the interrupted run: %s",
                    ", ".join(changed))


def fsdp_units(accelerator: Accelerator, model: Any) -> None:
    """Accelerate's FSDP2 makes the transformer blocks units (the model's _no_split_modules),
    then the input embeddings one more: where the blocks name a module holding the embeddings
    (BERT's BertEmbeddings) their weight is sharded twice and torch fails deep inside. Such a
    block is left out of the units; an explicit --fsdp_transformer_layer_cls_to_wrap is kept."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 \
            or plugin.transformer_cls_names_to_wrap:
        return
    embeddings = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules()
               if any(child is embeddings for child in m.modules())}
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    if holders & set(blocks):
        plugin.transformer_cls_names_to_wrap = [b for b in blocks if b not in holders]


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# W&B's and Trackio's project, MLflow's experiment (unless MLFLOW_EXPERIMENT_NAME says
# another); TensorBoard's events go to the run's tensorboard/llmkit/.
PROJECT = "llmkit"


def trackers(names: tuple[str, ...]) -> list[str]:
    """The trackers --report-to names, each installed (Accelerate skips a missing one
    silently); `all`: those installed."""
    from accelerate.tracking import get_available_trackers

    asked = [n.lower() for n in names if n.lower() != "none"]
    unknown = [n for n in asked if n not in (*TRACKERS, "all")]
    if unknown:
        raise LlmkitError(f"--report-to {unknown[0]}: no such tracker; use "
                          f"{', '.join(TRACKERS)}, all or none")
    installed = {str(t) for t in get_available_trackers()} & set(TRACKERS)
    if "all" in asked:
        return sorted(installed)
    missing = [n for n in asked if n not in installed]
    if missing:
        raise LlmkitError(f"--report-to {missing[0]}: its package is not installed: "
                          f"pip install {missing[0]}")
    return list(dict.fromkeys(asked))


def start_trackers(accelerator: Accelerator, cfg: RunConfig, group: str | None = None
                   ) -> None:
    """Trackers get the resolved config as hyper-parameters (scalars: lists as text); a run of
    a `group` (a sweep's trial: its study) is filed under it (see `grouped`)."""
    if accelerator.log_with:
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                  for k, v in flatten(asdict(cfg)).items()}
        accelerator.init_trackers(PROJECT, config=values, init_kwargs=grouped(
            group, f"{group}/{Path(cfg.output).name}") if group else None)


def grouped(group: str, name: str) -> dict[str, dict[str, Any]]:
    """Each tracker's init arguments that file a run under its group: W&B's and Trackio's
    group, MLflow's tag (its experiment is the project); the run named `name`. TensorBoard's
    logs are in the run's own folder already."""
    return {"wandb": {"group": group, "name": name}, "trackio": {"group": group, "name": name},
            "mlflow": {"run_name": name, "tags": {"group": group}}}


def sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: weights held in shards across processes."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
