"""The run directory: refusing to clobber finished work, atomic checkpoints, resume points."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from llmkit.config.schema import TrainConfig

log = logging.getLogger("llmkit")
STATE_FILE = "llmkit_state.json"
FINISHED_MARK = "metrics.json"  # written last: its presence means the run completed


@dataclass
class RunState:
    """Where the loop stands; saved inside every checkpoint so a resumed run continues exactly."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    best_metric: float | None = None
    best_checkpoint: str | None = None
    bad_evals: int = 0  # evaluations in a row without improvement, for early stopping
    skipped_steps: int = 0  # optimizer steps left out for a non-finite gradient norm
    start_loss: float | None = None  # the first step's training loss: the untrained model's
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder is a save that was cut off)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith("checkpoint-")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def clear_output(out: Path) -> None:
    shutil.rmtree(out)


def remove_checkpoints(out: Path) -> None:
    """A finished run keeps only its final model: optimizer states are several times its size."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def keeps_files(accelerator: Accelerator) -> bool:
    """The main process writes checkpoints; so does each node's first on a disk of its own."""
    return accelerator.is_main_process or (accelerator.is_local_main_process and bool(
        accelerator.project_configuration.save_on_each_node))


def save_checkpoint(accelerator: Accelerator, out: Path, state: RunState) -> Path:
    """Write model, optimizer, scheduler and RNG states; a checkpoint appears whole or not
    at all: its files reach the disk (fsync) before the folder takes its name, and a save
    that fails (a full disk) leaves nothing behind but the earlier checkpoints."""
    final = out / "checkpoints" / f"checkpoint-{state.global_step}"
    tmp = final.with_name(f".tmp-{final.name}")
    writer = keeps_files(accelerator)
    if writer and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # every rank writes its own RNG state
        accelerator.wait_for_everyone()
        if writer:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
            synced(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            synced(final.parent, files=False)
    except Exception as err:
        full = shutil.disk_usage(out).free < 4 << 20  # before the cut save is removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(err, tmp, full) from err
    accelerator.wait_for_everyone()
    return final


def save_failed(err: Exception, path: Path, full: bool) -> Exception:
    """The error of a failed save, with a full disk said as such where a library hides it
    (torch.save's "unexpected pos", safetensors' IoError)."""
    from llmkit.errors import DISK

    if full and not (isinstance(err, OSError) and err.errno in DISK):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return err  # anything else is not the disk's: it stays what it is


def synced(folder: Path, files: bool = True) -> None:
    """fsync the files in `folder`, then the folder itself (its entries)."""
    for path in folder.rglob("*") if files else ():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(accelerator: Accelerator, out: Path, start: Path, fallback: bool) -> RunState:
    """Load `start` into the prepared objects; with `fallback` (--resume), a damaged checkpoint
    (a truncated file, a torn state) is named and the one before it tried. Every process
    agrees on the checkpoint it continues from."""
    import torch
    from accelerate.utils import gather_object

    candidates = [start, *(p for p in reversed(checkpoints(out)) if p != start and fallback)]
    if fallback:  # nodes on disks of their own may have stopped between two renames
        names = gather_object([[p.name for p in candidates]])
        candidates = [p for p in candidates if all(p.name in other for other in names)]
    for path in candidates:
        problem = ""
        try:
            state = read_state(path, accelerator.process_index)
            accelerator.load_state(str(path))
        except Exception as err:  # whatever a damaged file raises
            problem = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        flags = accelerator.gather(torch.tensor([bool(problem)], device=accelerator.device))
        if not bool(flags.any()):
            return state
        log.warning("checkpoint %s is damaged (%s)%s", path, problem or "on another process",
                    "; trying the one before it" if path != candidates[-1] else "")
    raise LlmkitError(f"no complete checkpoint to resume from in {out / 'checkpoints'}"
                      f"{'' if fallback else f' ({start} is damaged)'}; start again with "
                      "--overwrite" + ("" if fallback else " or --resume from another one"))


def read_state(checkpoint: Path, rank: int) -> RunState:
    if not (checkpoint / f"random_states_{rank}.pkl").is_file():  # a node-local disk
        log.warning("%s holds no random state of rank %d (the run had fewer processes, or this "
                    "node another rank): dropout draws differ from an uninterrupted run",
                    checkpoint, rank)
    return RunState(**json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))


def prune(out: Path, best: str | None, limit: int) -> None:
    """Keep the newest `limit` checkpoints and the best one (0: keep all). The newest is always
    kept (--resume starts there), so a limit of 1 with an older best keeps two, as Trainer's."""
    names = [p.name for p in checkpoints(out)]
    keep = set(names[-limit:]) if limit else set(names)
    if best in names and best not in keep and limit > 1:
        keep.discard(names[-limit])  # the oldest of the newest makes room for the best
    for name in names:
        if name not in keep and name != best:
            shutil.rmtree(out / "checkpoints" / name)


NEVER = 2**62  # the step of a non-finite loss, while there has been none


def plain_tensor(value: Any) -> Any:
    """A sharded (FSDP2) gradient norm as the whole value every process agrees on."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class Guard:
    """Non-finite losses and gradient norms.

    With on_nonfinite=stop (the default), the first step that had one is noted on the device (no
    sync per step) and checked, with one collective, where the loop reports or saves: the run
    stops before a checkpoint or the final model could hold NaN weights. With skip, the
    optimizer step of a non-finite gradient norm (the same on every process) is skipped and
    counted, a sync per step; after `max_nonfinite_steps` skips the run stops."""

    def __init__(self, tc: TrainConfig, state: RunState, out: Path):
        self.tc, self.state, self.out = tc, state, out
        self.first: torch.Tensor | None = None
        # fp16's loss scaler overflows on purpose while it calibrates: its gradient norms say
        # nothing, and it skips those steps itself
        self.norms = tc.mixed_precision != "fp16"

    def note(self, value: torch.Tensor, step: int) -> None:
        import torch

        if self.tc.on_nonfinite == "skip":
            return  # the gradient norms decide (a loss is one process's; norms are shared)
        value = torch.as_tensor(plain_tensor(value)).detach()  # some clippers return a float
        if self.first is None:
            self.first = torch.full((), NEVER, dtype=torch.long, device=value.device)
        bad = ~torch.isfinite(value.to(self.first.device)) & (self.first == NEVER)
        self.first = torch.where(bad, step, self.first)

    def skip(self, norm: torch.Tensor, step: int) -> bool:
        """skip mode: whether this optimizer step must be left out."""
        import torch

        norm = plain_tensor(norm)
        if bool(torch.isfinite(torch.as_tensor(norm))):
            return False
        self.state.skipped_steps += 1
        log.warning("step %d: the gradient norm is %s; step skipped (%d so far)", step,
                    float(norm), self.state.skipped_steps)
        if self.state.skipped_steps > self.tc.max_nonfinite_steps:
            self.stop(step, f"more than {self.tc.max_nonfinite_steps} steps had a non-finite "
                            "gradient norm")
        return True

    def check(self, acc: Accelerator) -> None:
        if self.first is not None:
            first = int(acc.gather(self.first.reshape(1)).min())
            if first != NEVER:
                self.stop(first, "the training loss or gradient norm became NaN or infinite")

    def stop(self, step: int, what: str) -> None:
        kept = checkpoints(self.out)
        where = (f"the last checkpoint before it, {kept[-1]}, is kept (--resume continues from "
                 "it)" if kept else "no checkpoint had been saved yet")
        raise LlmkitError(f"{what} at step {step}: training stopped, and no weights from then on "
                          f"were saved; {where}. Try a lower --learning-rate, a warm-up "
                          "(--warmup-ratio 0.1) or fp32 (--mixed-precision no); "
                          "-s train.on_nonfinite=skip skips such steps")
