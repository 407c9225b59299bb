"""Before any work: what a run may start from (its checkpoint, or nothing) and whether its
output folder may be written; every problem with the paths found at once, before torch loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.errors import LlmkitError
from llmkit.run.checkpoint import FINISHED_MARK, STATE_FILE, checkpoints

if TYPE_CHECKING:
    from llmkit.config.schema import RunConfig


def resume_point(out: Path, resume: bool, resume_from: str | None, overwrite: bool = False
                 ) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run."""
    if (resume or resume_from) and overwrite:
        raise LlmkitError("--resume and --overwrite contradict each other: choose one")
    if resume_from:
        path = Path(resume_from)
        if not (path / STATE_FILE).is_file():
            raise LlmkitError(f"--resume-from {resume_from} is not an llmkit checkpoint "
                              f"(no {STATE_FILE}); checkpoints live in OUTPUT/checkpoints/")
        return path
    if not resume:
        return None
    found = checkpoints(out)
    if not found:
        raise LlmkitError(f"--resume: no checkpoint in {out / 'checkpoints'}; "
                          "start without --resume")
    return found[-1]


def check_start(cfg: RunConfig, resume: bool, resume_from: str | None, overwrite: bool
                ) -> tuple[Path | None, bool]:
    """What can be refused before torch is even imported, every problem in one line: the
    model's source, the data files, the resume point and the output folder. Returns the
    checkpoint to continue from and whether the folder must be emptied."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0") and not resume_from \
            and checkpoints(Path(cfg.output)):
        resume, overwrite = True, False  # started again by torchrun --max-restarts: continue
    problems = missing_sources(cfg)
    try:
        start = resume_point(Path(cfg.output), resume, resume_from, overwrite)
        wipe = check_output(Path(cfg.output), start is not None, overwrite)
    except LlmkitError as err:
        problems.append(str(err))
    if problems:
        raise LlmkitError("; ".join(problems))
    return start, wipe


def missing_sources(cfg: RunConfig) -> list[str]:
    """The model's source and the data files that are not there, a line each (no import of
    torch: a sweep checks them before its first trial)."""
    from llmkit.hub import check_model_source, looks_like_path

    problems = [f"{option} {given}: no such file" for option, given in (
        ("--train", cfg.data.train), ("--validation", cfg.data.validation),
        ("--test", cfg.data.test))  # --test found now, not after training
        if given and looks_like_path(given) and not any(c in given for c in "*?[")
        and not Path(given).expanduser().exists()]
    try:
        check_model_source(cfg.model)
    except LlmkitError as err:
        problems.insert(0, str(err))
    return problems


def check_output(out: Path, resuming: bool, overwrite: bool) -> bool:
    """Refuse to mix runs; returns whether the folder must be emptied (--overwrite)."""
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"--output {out} is a file; give a folder for the run")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if existing != out and not existing.is_dir():
        raise LlmkitError(f"--output {out}: {existing} is a file, not a folder; choose another "
                          "--output")
    if not os.access(existing, os.W_OK):
        raise LlmkitError(f"--output {out}: {existing} is not writable; choose another --output")
    if resuming or not out.exists() or not any(out.iterdir()):
        return False
    is_run = (out / "config.yaml").is_file()
    if overwrite:
        if not is_run:
            raise LlmkitError(f"--output {out} is not empty and is not an llmkit run; "
                              "refusing to delete it: choose another --output")
        return True
    if (out / FINISHED_MARK).is_file():
        raise LlmkitError(f"--output {out} holds a finished run; pass --overwrite to replace it "
                          "or choose another --output")
    if checkpoints(out):
        raise LlmkitError(f"--output {out} holds an unfinished run with checkpoints; pass "
                          "--resume to continue it or --overwrite to start again")
    if is_run:
        return True  # a run that stopped before its first checkpoint: nothing to lose
    raise LlmkitError(f"--output {out} is not empty; pass --overwrite to replace what is there "
                      "or choose another --output")
