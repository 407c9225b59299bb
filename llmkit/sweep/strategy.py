"""How the study draws a trial's settings and stops a poor one: Optuna's TPE sampler, seeded,
and its median, Hyperband or successive-halving pruner, fed each evaluation at the samples
trained on."""

from __future__ import annotations

import os
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.run.report import Relay, Reporter
from llmkit.sweep.workers import WORKER

PRUNERS = ("none", "median", "hyperband", "successive-halving")


class TrialReporter(Relay):
    """A trial's run: each evaluation goes to Optuna, which may prune the trial there."""

    def __init__(self, trial: Any, metric: str, shown: Reporter, batch_size: int):
        super().__init__(shown)
        self.trial, self.metric, self.batch_size = trial, metric, batch_size

    def evaluation(self, record: dict[str, Any]) -> None:
        """Reported at the samples trained on, not the step: trials of another batch size are
        compared at the same amount of training."""
        import optuna

        self.shown.evaluation(record)
        seen = record["step"] * self.batch_size
        self.trial.report(float(record[self.metric]), seen)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {record['step']} ({seen} samples)")


def pruner_of(name: str, trials: int) -> Any:
    """Optuna's pruner named by --prune, for a study of `trials` trials. The median pruner's
    unpruned first trials are a fifth of the study (2 to Optuna's 5): Optuna's 5 suit studies
    of 50 or more, and in one of 12 they are 42% of the budget run to the end. Hyperband and
    successive halving (Hyperband's one bracket, the stronger of the two in a study of tens
    of trials) are Optuna's defaults."""
    import optuna

    if name not in PRUNERS:
        raise LlmkitError(f"--prune {name}: choose one of {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, trials // 5)))
    return {"none": optuna.pruners.NopPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "successive-halving": optuna.pruners.SuccessiveHalvingPruner}[name]()


def sampler_of(seed: int, trials_before: int) -> Any:
    """TPE, seeded with the run seed, the trials already in the study and the worker mixed: two
    new studies draw the same settings (pruned or not, like for like), while a second process
    on the same study, a worker or a restart draws settings of its own."""
    import numpy as np
    import optuna

    worker = int(os.environ.get(WORKER, "0"))
    mixed = np.random.SeedSequence([seed, trials_before, worker]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(mixed))
