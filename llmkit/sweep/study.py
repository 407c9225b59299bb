"""The study: Optuna's, stored (SQLite by default; any RDB URL or a journal file), resumable and
shared by several `llmkit sweep` processes; each trial an ordinary llmkit run directory."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmkit.config.recipes import read_recipe
from llmkit.errors import LlmkitError
from llmkit.run.checkpoint import checkpoints, remove_checkpoints
from llmkit.run.loop import lower_is_better
from llmkit.run.report import Reporter
from llmkit.run.start import missing_sources
from llmkit.sweep.space import Param, read_space
from llmkit.sweep.strategy import TrialReporter, pruner_of, sampler_of
from llmkit.sweep.workers import WORKER, devices, run_workers
from llmkit.tasks import get_task, load_config
from llmkit.tasks.task import Task

log = logging.getLogger("llmkit")
HEARTBEAT = 10  # seconds between a running trial's signs of life in the storage
GRACE = 30  # a running trial silent this long died with its process: failed, then run again
POLL = 2  # seconds between looks at the last trials, which other processes run
PRUNED_MARK = "PRUNED"  # in the folder of a trial the pruner stopped
STUDY_FILE = "study.db"  # the default storage, in the sweep's folder


def storage_of(url: str) -> Any:
    """An RDB URL (sqlite:///..., postgresql://..., mysql://...) or a journal file (.log), with
    heartbeats: a trial whose process died is failed and run again."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    try:
        if "://" not in url:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url))
        return RDBStorage(url, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                          heartbeat_stale_trial_callback=retry)
    except (ImportError, ValueError, OSError, SQLAlchemyError) as err:
        raise LlmkitError(f"--storage {url} cannot be opened: {' '.join(str(err).split())[:200]}"
                          ) from None


def quiet_optuna() -> None:
    """Optuna's info lines and experimental warnings off (a failed trial's traceback among
    them): llmkit says one line per trial."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Surplus(LlmkitError):
    """A trial started while other processes took the study to its count: not run."""


def open_study(storage: str, name: str, metric: str, prune: str, definition: dict[str, Any],
               out: Path, seed: int = 42, trials: int = 20) -> Any:
    """The study, created or loaded; one made with other settings is refused, not mixed, and a
    new one is refused an output folder that holds another study's trials. Its sampler is
    seeded (see `sampler_of`)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    pruner = pruner_of(prune, trials)
    for attempt in (1, 2):  # processes starting together race to create the tables
        try:
            study = optuna.create_study(
                storage=storage_of(storage), study_name=name, pruner=pruner, load_if_exists=True,
                direction="minimize" if lower_is_better(metric) else "maximize")
            break
        except (LlmkitError, SQLAlchemyError):
            if attempt == 2:
                raise
            time.sleep(2)
    saved = study.user_attrs.get("definition")
    if saved is None and any(out.glob("trial-*")):
        raise LlmkitError(f"{out} holds the trial folders of another study; choose another "
                          "--output")
    study.sampler = sampler_of(seed, len(study.trials))
    if saved is None:
        study.set_user_attr("definition", definition)
    elif saved != definition:
        changed = sorted(k for k in definition.keys() | saved.keys()
                         if definition.get(k) != saved.get(k))
        raise LlmkitError(f"study {name!r} in {storage} was made with other settings "
                          f"({', '.join(changed)}); choose another --output")
    return study


def tally(study: Any) -> tuple[int, int, int]:
    """Trials that count (finished; a failed one that is run again does not), running, and
    waiting to run (a retry)."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return done, running, sum(t.state == TrialState.WAITING for t in trials)


def objective(task: Task, raw: dict[str, Any], overrides: list[str], space: list[Param],
              out: Path, metric: str, trials: int, watch: Callable[[], Reporter]
              ) -> Callable[[Any], float]:
    """One trial: its settings drawn, an ordinary run in OUTPUT/trial-NNN (a retried trial
    resumes in the folder of the one that died), its metric at the kept checkpoint."""
    from llmkit.run.finetune import finetune

    def run(trial: Any) -> float:
        import optuna

        first = retried(trial)
        if first is None and counted_before(trial) >= trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study has its {trials} trials")
        values = {p.path: p.suggest(trial) for p in space}
        folder = out / f"trial-{trial.number if first is None else first:03d}"
        trial.set_user_attr("dir", folder.name)
        if WORKER in os.environ:  # one of --trials-in-parallel's processes
            trial.set_user_attr("worker", int(os.environ[WORKER]))
            log.info("%s: started", folder.name)
        cfg = load_config(task.name, raw, {**values, "output": str(folder)}, overrides)
        try:
            done = finetune(cfg, resume=bool(checkpoints(folder)), group=trial.study.study_name,
                            reporter=TrialReporter(trial, metric, watch(),
                                                   cfg.train.batch_size))
        except optuna.TrialPruned as pruned:
            (folder / PRUNED_MARK).write_text(f"{pruned}\n", encoding="utf-8")
            remove_checkpoints(folder)  # it will not be resumed: its weights are not kept
            raise
        except (LlmkitError, RuntimeError) as err:  # kept in the summary; the sweep goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {' '.join(str(err).split())}")
            raise
        return float(read_final(done)[metric])

    return run


def counted_before(trial: Any) -> int:
    """Trials numbered below this one that count towards the study's total (Optuna numbers
    trials one at a time across processes, so this decides who runs the last ones)."""
    from optuna.trial import TrialState

    earlier = [t for t in trial.study.get_trials(deepcopy=False)
               if t.number < trial.number and not t.user_attrs.get("surplus")]
    again = {t.system_attrs.get("failed_trial") for t in earlier}
    return sum(t.state != TrialState.WAITING and not (t.state == TrialState.FAIL
                                                      and t.number in again) for t in earlier)


def retried(trial: Any) -> int | None:
    """The number of the trial that died and this one runs again (None for a new trial)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs.get("failed_trial")


def finished_values(study: Any) -> list[float]:
    """The metric of every trial that completed."""
    from optuna.trial import TrialState

    return [t.value for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE and t.value is not None]


def say(trial: Any) -> None:
    """One log line for a trial this process finished."""
    if trial.user_attrs.get("surplus"):
        return
    where = trial.user_attrs.get("dir", f"trial {trial.number}")
    if trial.value is not None:
        log.info("%s: %s %.4f", where, trial.state.name.lower(), trial.value)
    else:
        log.warning("%s: %s%s", where, trial.state.name.lower(),
                    f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else "")


def read_final(run: Path) -> dict[str, Any]:
    import json

    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))["final"]


def sweep(task_name: str, output: str | Path, params: list[str] | None = None,
          trials: int | None = None, recipe: str | dict[str, Any] | None = None,
          overrides: list[str] | None = None, storage: str | None = None,
          study_name: str | None = None, metric: str | None = None, prune: str | None = None,
          watch: Callable[[], Reporter] = Reporter, trials_in_parallel: int = 1) -> Any:
    """Search `params` over `trials` runs of `task_name` (a recipe's `sweep:` section supplies
    what is not given); returns the Optuna study. `watch` makes each trial's reporter;
    `trials_in_parallel` > 1 runs the trials in that many worker processes (one per GPU)."""
    quiet_optuna()
    task, out = get_task(task_name), Path(output)
    raw = read_recipe(recipe) if isinstance(recipe, str) else dict(recipe or {})
    plan = raw.pop("sweep", None) or {}
    if not isinstance(plan, dict):
        raise LlmkitError("the recipe's sweep: section must be a mapping (params, trials, ...)")
    params = params or [f"{k}={v}" for k, v in (plan.get("params") or {}).items()]
    space, overrides = read_space(params, task), list(overrides or [])
    base = check_trials(task, raw, overrides, space, out)
    metric = metric or plan.get("metric") or base.train.metric_for_best or task.default_metric
    if metric not in ("eval_loss", *task.metrics):
        raise LlmkitError(f"--metric {metric}: {task.name} reports "
                          f"{', '.join(('eval_loss', *task.metrics))}")
    trials = int(trials or plan.get("trials") or 20)
    gpus = devices(trials_in_parallel) if trials_in_parallel > 1 else None
    out.mkdir(parents=True, exist_ok=True)
    definition = {"task": task.name, "params": sorted(params), "metric": metric,
                  "overrides": sorted(overrides)}
    url, prune = storage or f"sqlite:///{out / STUDY_FILE}", prune or plan.get("prune") or "none"
    study = open_study(url, study_name or out.name, metric, prune, definition, out,
                       base.train.seed, trials)
    if trials_in_parallel > 1:  # each worker: this sweep on the study, one trial at a time
        spec = {"task_name": task.name, "output": str(out), "params": params, "trials": trials,
                "recipe": recipe, "overrides": overrides, "storage": url,
                "study_name": study.study_name, "metric": metric, "prune": prune}
        run_workers(spec, gpus, min(trials_in_parallel, trials), out)
    else:
        run_trials(study, trials, objective(task, raw, overrides, space, out, metric, trials,
                                            watch), heartbeat="://" in url)
    return study


def check_trials(task: Task, raw: dict[str, Any], overrides: list[str], space: list[Param],
                 out: Path) -> Any:
    """Every searched value checked as a setting (type and range) before anything runs; the
    config of a trial without them."""
    given = {text.partition("=")[0].strip() for text in overrides}
    clash = [p.path for p in space if p.path in given]
    if clash:
        raise LlmkitError(f"{clash[0]} is both searched (--param) and set (-s): drop one")
    for param in space:
        for value in param.extremes():
            load_config(task.name, raw, {param.path: value, "output": str(out / "trial")},
                        overrides)
    base = load_config(task.name, raw, {"output": str(out / "trial")}, overrides)
    missing = missing_sources(base)
    if missing:  # not a study whose every trial fails
        raise LlmkitError("; ".join(missing))
    return base


def run_trials(study: Any, trials: int, run: Callable[[Any], float], heartbeat: bool) -> None:
    """Trials until `trials` count, shared with any other process on the same storage; a
    failed trial is kept (its error in the summary), but the first three all failing stop.
    Without heartbeats (a journal file) a trial whose process died is not detected: the
    sweep ends when the others are done or running."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    while True:
        fail_stale_trials(study)
        done, running, waiting = tally(study)
        if done >= trials:
            return
        if done + running >= trials and not waiting:  # others finish the last ones
            if not heartbeat:
                return
            time.sleep(POLL)
            continue
        study.optimize(run, n_trials=1, catch=(LlmkitError, RuntimeError),
                       callbacks=[lambda _, trial: say(trial)])
        finished = [t for t in study.get_trials(deepcopy=False)
                    if t.state.is_finished() and not t.user_attrs.get("surplus")]
        if len(finished) >= min(3, trials) and all(t.state == TrialState.FAIL
                                                   for t in finished):
            error = finished[0].user_attrs.get("error") or "see the log above"
            raise LlmkitError(f"the first {len(finished)} trials failed; the first: {error}")
