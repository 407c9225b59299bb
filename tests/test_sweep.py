"""`llmkit sweep`: trials are ordinary run directories in a stored Optuna study that a second
command continues; pruned trials stop and say so; bad input is one line before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.sweep.study import sweep
from llmkit.sweep.summary import load, summarize
from tests.test_bad_input import run_main

optuna = pytest.importorskip("optuna")


def fixed(tiny_bert: Path, toy: dict[str, Path]) -> list[str]:
    return [f"model={tiny_bert}", f"data.train={toy['train']}",
            f"data.validation={toy['validation']}", "train.max_steps=2", "train.batch_size=16"]


def test_trials_are_runs_and_the_same_command_continues(tiny_bert: Path, toy: dict[str, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "s1"
    params = ["learning_rate=log:1e-4:1e-2", "lora_r=int:2:8"]
    overrides = [*fixed(tiny_bert, toy), "adapter.lora=true"]
    study = sweep("classify", out, params, 2, overrides=overrides)
    assert len(study.trials) == 2
    again = sweep("classify", out, params, 3, overrides=overrides)  # after a stop: one more
    assert [t.number for t in again.trials] == [0, 1, 2]
    for trial in again.trials:
        run = out / f"trial-{trial.number:03d}"
        final = json.loads((run / "metrics.json").read_text())["final"]
        assert trial.value == final["accuracy"]
        config = (run / "config.yaml").read_text()
        assert f"lora_r: {trial.params['adapter.lora_r']}" in config
    summary = summarize(load(out), out)
    assert {r["state"] for r in summary["trials"]} == {"complete"}
    assert (out / "best").resolve().name == summary["best"]["dir"]
    assert summary["best"]["value"] == max(t.value for t in again.trials)
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep-params.png").is_file()


def test_a_pruned_trial_stops_at_its_first_evaluation(tiny_bert: Path, toy: dict[str, Path],
                                                       tmp_path: Path, monkeypatch) -> None:
    # accuracy never reaches 2: the threshold pruner stops every trial it is asked about
    monkeypatch.setattr(optuna.pruners, "MedianPruner",
                        lambda **_: optuna.pruners.ThresholdPruner(lower=2.0))
    out = tmp_path / "s2"
    study = sweep("classify", out, ["learning_rate=float:1e-4:1e-3"], 1, prune="median",
                  overrides=[*fixed(tiny_bert, toy), "train.max_steps=4", "train.eval_steps=2"])
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    # stopped after the first evaluation, reported at the samples trained on (batch 16)
    assert list(trial.intermediate_values) == [32]
    assert "pruned at step 2 (32 samples)" in (out / "trial-000" / "PRUNED").read_text()
    assert not (out / "trial-000" / "metrics.json").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["-p", "learnig_rate=log:1e-5:1e-3"], "'learnig_rate' is not a setting of this task (did "
     "you mean learning_rate?)"),
    (["-p", "learning_rate=normal:0:1"], "the distribution is one of log, float, int, choice"),
    (["-p", "learning_rate=log:1e-3:1e-5"], "LOW must be below HIGH"),
    (["-p", "learning_rate=float:-1:1"], "train.learning_rate must be at least 0, got -1"),
    (["-p", "batch_size=choice:16"], "give two or more different choices"),
    (["-p", "learning_rate=log:1e-5:1e-3", "-s", "train.learning_rate=1e-4"],
     "train.learning_rate is both searched (--param) and set (-s): drop one"),
    (["-p", "learning_rate=log:1e-5:1e-3", "--metric", "bleu"], "--metric bleu: classify "
     "reports eval_loss, accuracy"),
    (["-p", "learning_rate=log:1e-5:1e-3", "--storage", "sqlite:////no/such/folder/s.db"],
     "--storage sqlite:////no/such/folder/s.db cannot be opened"),
    (["-p", "learning_rate=log:1e-5:1e-3", "--prune", "sometimes"], "--prune sometimes: choose"),
    (["-p", "learning_rate=log:1e-5:1e-3", "--validation", "nope.tsv"],
     "--validation nope.tsv: no such file"),
])
def test_bad_sweeps_are_one_line_before_any_trial(args: list[str], expected: str,
                                                  tiny_bert: Path, toy: dict[str, Path],
                                                  tmp_path: Path, capsys, monkeypatch) -> None:
    argv = ["sweep", "classify", "-m", str(tiny_bert), "--train", str(toy["train"]),
            "-o", str(tmp_path / "s"), *args]
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and expected in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("s/trial-*"))


def test_show_needs_a_sweep(tmp_path: Path, capsys, monkeypatch) -> None:
    code, err = run_main(["sweep", "--show", str(tmp_path)], capsys, monkeypatch)
    assert code == 1 and "holds no sweep (no study.db)" in err, err


def summary_of(*errors: str | None) -> dict:
    trials = [{"trial": i, "dir": f"trial-{i:03d}", "state": "fail" if e else "complete",
               "value": None if e else 0.5, "params": {"train.learning_rate": 1e-4},
               "seconds": 3.0, "error": e, "worker": None} for i, e in enumerate(errors)]
    return {"study": "s", "direction": "maximize", "metric": "accuracy", "trials": trials,
            "best": None, "importances": {}, "pictures": []}


def test_the_table_has_an_error_column_only_where_a_trial_failed(capsys, monkeypatch) -> None:
    from llmkit.cli.sweep import shown
    from llmkit.cli.terminal import console

    monkeypatch.setattr(console, "width", 80)  # the table is drawn on stderr
    shown(summary_of(None, None))
    header = capsys.readouterr().err.splitlines()[2]
    assert "learning_rate" in header and "error" not in header, header
    shown(summary_of(None, "LlmkitError: out of memory"))
    err = capsys.readouterr().err
    assert "error" in err.splitlines()[2] and "LlmkitError: out" in err, err


def test_a_recipe_s_sweep_section_supplies_the_search(tiny_bert: Path, toy: dict[str, Path],
                                                      tmp_path: Path) -> None:
    recipe = {"model": str(tiny_bert), "data": {"train": str(toy["train"]),
                                                "validation": str(toy["validation"])},
              "train": {"max_steps": 2},
              "sweep": {"params": {"batch_size": "choice:8,16"}, "trials": 1,
                        "metric": "eval_loss"}}
    study = sweep("classify", tmp_path / "s3", recipe=recipe)
    assert len(study.trials) == 1 and study.direction.name == "MINIMIZE"
    assert study.trials[0].params["train.batch_size"] in (8, 16)


def test_a_trial_past_the_count_ends_unrun(tmp_path: Path) -> None:
    """Processes sharing a study each start a trial when they see room; Optuna numbers trials
    one at a time, so the one numbered past the count ends without running (and is not
    counted), however the processes interleaved."""
    from llmkit.run.report import Reporter
    from llmkit.sweep.study import Surplus, objective, tally
    from llmkit.tasks import get_task

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    for value in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value))
    run = objective(get_task("classify"), {}, [], [], tmp_path, "accuracy", 2, Reporter)
    trial = study.ask()
    with pytest.raises(Surplus):
        run(trial)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert trial.number == 2 and study.trials[2].user_attrs["surplus"]
    assert tally(study) == (2, 0, 0)
    assert not list(tmp_path.glob("trial-*"))


@pytest.mark.slow  # 20-50 s of worker start-up (torch imported twice); the default suite holds
# the workers' plumbing (test_a_worker_that_fails_...) and the shared count (..._ends_unrun)
def test_trials_in_parallel_share_one_study(tiny_bert: Path, toy: dict[str, Path],
                                             tmp_path: Path, caplog, monkeypatch) -> None:
    """Two worker processes (on the CPU: a share of the cores each) on the one study: the
    count asked for, each trial run by one of them, every trial folder a finished run."""
    import logging
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the workers too
    out = tmp_path / "par"
    with caplog.at_level(logging.INFO, logger="llmkit"):
        study = sweep("classify", out, ["learning_rate=log:1e-4:1e-2"], 2,
                      overrides=fixed(tiny_bert, toy), trials_in_parallel=2)
    trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert re.search(r"2 trials at once on the CPU \(no GPU here\), \d+ torch threads? each",
                     caplog.text)
    # what each process says it ran, from its own output
    ran = [set(re.findall(r"(trial-\d+): complete", (out / f"worker-{i}.log").read_text()))
           for i in (0, 1)]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == {t.user_attrs["dir"] for t in trials}
    assert all(t.user_attrs["dir"] in ran[t.user_attrs["worker"]] for t in trials)
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001"]
    for trial in trials:
        run = out / trial.user_attrs["dir"]
        assert trial.value == json.loads((run / "metrics.json").read_text())["final"]["accuracy"]
        assert (run / "config.yaml").is_file() and (run / "README.md").is_file()
    summary = summarize(load(out), out)
    assert len(summary["trials"]) == 2 and {r["worker"] for r in summary["trials"]} <= {0, 1}


def test_workers_are_one_per_gpu_and_never_more(tiny_bert: Path, toy: dict[str, Path],
                                                tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    from llmkit.sweep.workers import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert devices(2) == ["3", "5"]  # the GPUs this process sees, one each
    argv = ["sweep", "classify", "-m", str(tiny_bert), "--train", str(toy["train"]),
            "-o", str(tmp_path / "s"), "-p", "learning_rate=log:1e-5:1e-3", "--trials", "4",
            "--trials-in-parallel", "3"]
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 1 and "--trials-in-parallel 3: this machine has 2 GPUs, one trial per GPU: " \
        "give at most 2" in err and "Traceback" not in err, err
    assert not (tmp_path / "s").exists()


def test_a_worker_that_fails_says_so_and_the_others_go_on(tmp_path: Path, caplog,
                                                          monkeypatch) -> None:
    import logging
    import subprocess
    import sys

    from llmkit.errors import LlmkitError
    from llmkit.sweep import workers

    scripts = ["print('[llmkit] CRITICAL: the storage went away'); raise SystemExit(1)",
               "import time; time.sleep(0.5); print('[llmkit] INFO: trial-000: complete 0.5')"]

    def start(number: int, gpu: str | None, share: int, spec: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", scripts[number]], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    monkeypatch.setattr(workers, "start", start)
    with caplog.at_level(logging.INFO, logger="llmkit"):
        workers.run_workers({}, None, 2, tmp_path)
    assert "worker 0 stopped: the storage went away (its output: " in caplog.text
    assert "worker 1: trial-000: complete 0.5" in caplog.text
    scripts[1] = "raise SystemExit(3)"
    with pytest.raises(LlmkitError, match="every worker stopped; worker 0: the storage went "
                                          "away"):
        workers.run_workers({}, None, 2, tmp_path)
    assert "worker 1 stopped: exit code 3" in caplog.text


def test_a_trial_s_tracker_run_is_filed_under_its_study(tiny_bert: Path, toy: dict[str, Path],
                                                        tmp_path: Path, monkeypatch) -> None:
    from accelerate import Accelerator

    seen: list[dict] = []
    original = Accelerator.init_trackers

    def init_trackers(self, project_name: str, config=None, init_kwargs=None):
        seen.append(init_kwargs)
        assert project_name == "llmkit"  # W&B's project, MLflow's experiment
        return original(self, project_name, config, init_kwargs)

    monkeypatch.setattr(Accelerator, "init_trackers", init_trackers)
    out = tmp_path / "tracked"
    sweep("classify", out, ["learning_rate=log:1e-4:1e-2"], 1,
          overrides=[*fixed(tiny_bert, toy), "train.report_to=tensorboard"])
    assert seen == [{"wandb": {"group": "tracked", "name": "tracked/trial-000"},
                     "trackio": {"group": "tracked", "name": "tracked/trial-000"},
                     "mlflow": {"run_name": "tracked/trial-000", "tags": {"group": "tracked"}}}]
    assert list((out / "trial-000" / "tensorboard").rglob("events.*"))  # its own folder


def test_the_median_pruner_s_unpruned_trials_are_a_fifth_of_the_study() -> None:
    from llmkit.sweep.strategy import pruner_of

    assert [pruner_of("median", n)._n_startup_trials for n in (3, 12, 20, 100)] == [2, 2, 4, 5]
    assert isinstance(pruner_of("successive-halving", 12),
                      optuna.pruners.SuccessiveHalvingPruner)


def test_new_studies_draw_alike_and_a_second_process_draws_its_own(monkeypatch) -> None:
    from optuna.distributions import FloatDistribution

    from llmkit.sweep.strategy import sampler_of
    from llmkit.sweep.workers import WORKER

    def draws(seed: int, before: int) -> list[float]:
        study = optuna.create_study(sampler=sampler_of(seed, before))
        return [study.ask({"lr": FloatDistribution(1e-5, 1e-3, log=True)}).params["lr"]
                for _ in range(3)]

    assert draws(42, 0) == draws(42, 0)  # a pruned and an unpruned study: like for like
    assert draws(42, 0) != draws(43, 0)  # -s train.seed=43: other settings
    assert draws(42, 0) != draws(42, 2)  # joining a study that has trials, or a restart
    monkeypatch.setenv(WORKER, "1")  # --trials-in-parallel's second worker
    first = draws(42, 0)
    monkeypatch.setenv(WORKER, "0")
    assert first != draws(42, 0)
