"""How the study draws a trial's settings and stops a poor one: Optuna's TPE sampler, seeded,
and its median or Hyperband pruner, fed each evaluation at the samples trained on."""

from __future__ import annotations

import os
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.run.report import Relay, Reporter
from llmkit.sweep.workers import WORKER

PRUNERS = ("none", "median", "hyperband")


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


def pruner_of(name: str) -> Any:
    """Optuna's pruner named by --prune."""
    import optuna

    if name not in PRUNERS:
        raise LlmkitError(f"--prune {name}: choose one of {', '.join(PRUNERS)}")
    return {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
            "hyperband": optuna.pruners.HyperbandPruner}[name]()


def sampler_of(seed: int, trials_before: int) -> Any:
    """TPE, seeded with the run seed, the trials already in the study and the worker mixed: two
    new studies draw the same settings (pruned or not, like for like), while a second process
    on the same study, a worker or a restart draws settings of its own."""
    import numpy as np
    import optuna

    worker = int(os.environ.get(WORKER, "0"))
    mixed = np.random.SeedSequence([seed, trials_before, worker]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(mixed))
