"""What a sweep found: a row per trial, the best one (linked as OUTPUT/best), the parameters'
importances, and Optuna's pictures (`sweep.png`: the metric over trials; `sweep-params.png`:
against each parameter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError


def rows(study: Any) -> list[dict[str, Any]]:
    """One record per trial: number, folder, state, the metric, the settings, seconds, error,
    and the worker that ran it (--trials-in-parallel; else None)."""
    found = []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("surplus"):  # started after the count was reached: not run
            continue
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        found.append({"trial": trial.number, "dir": trial.user_attrs.get("dir", ""),
                      "state": trial.state.name.lower(), "value": trial.value,
                      "params": dict(trial.params), "seconds": seconds,
                      "error": trial.user_attrs.get("error"),
                      "worker": trial.user_attrs.get("worker")})
    return found


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances where two or more trials completed with different
    settings; else none."""
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or len({repr(sorted(t.params.items())) for t in complete}) < 2:
        return {}
    import warnings

    with warnings.catch_warnings():  # "importances will be equal" where trials tie
        warnings.simplefilter("ignore", UserWarning)
        return dict(optuna.importance.get_param_importances(study))


def summarize(study: Any, output: Path) -> dict[str, Any]:
    """The summary, with the best trial linked as OUTPUT/best and the pictures drawn."""
    from optuna.trial import TrialState

    output.mkdir(parents=True, exist_ok=True)
    definition = study.user_attrs.get("definition", {})
    summary: dict[str, Any] = {"study": study.study_name, "metric": definition.get("metric"),
                               "direction": study.direction.name.lower(),
                               "trials": rows(study), "best": None, "importances": {}}
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        summary["best"] = {"trial": best.number, "dir": best.user_attrs.get("dir", ""),
                           "value": best.value, "params": dict(best.params)}
        link(output / "best", summary["best"]["dir"])
        summary["importances"] = importances(study)
    summary["pictures"] = draw(study, output)
    return summary


def link(path: Path, target: str) -> None:
    """OUTPUT/best -> trial-NNN (a symbolic link; a file naming it where links are refused)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    try:
        path.symlink_to(target, target_is_directory=True)
    except OSError:
        path.write_text(target + "\n", encoding="utf-8")


def draw(study: Any, output: Path) -> list[str]:
    """Optuna's matplotlib plots of the study, as PNG files; none before a trial finished."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    from llmkit.sweep.study import finished_values

    if not finished_values(study):
        return []
    drawn = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in (("sweep.png", plots.plot_optimization_history),
                           ("sweep-params.png", plots.plot_slice)):
            axes = plot(study)
            figure: Any = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(output / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            drawn.append(name)
    return drawn


def load(output: str | Path, storage: str | None = None, study_name: str | None = None) -> Any:
    """The study of an earlier `llmkit sweep --output OUTPUT`, for `--show`."""
    import optuna

    from llmkit.sweep.study import STUDY_FILE, quiet_optuna, storage_of

    quiet_optuna()
    out = Path(output)
    url = storage or f"sqlite:///{out / STUDY_FILE}"
    if storage is None and not (out / STUDY_FILE).is_file():
        raise LlmkitError(f"{out} holds no sweep (no study.db); give the --output of a sweep, "
                          "or its --storage")
    try:
        return optuna.load_study(study_name=study_name or out.name, storage=storage_of(url))
    except KeyError:
        raise LlmkitError(f"no study {study_name or out.name!r} in {url}; give --study-name"
                          ) from None
