"""Paired bootstrap resampling against a baseline system (sacrebleu --paired-bs)."""

from __future__ import annotations

import os
from typing import Any

from llmkit.scoring.metrics import SACREBLEU, label_score, sacrebleu_metric


def paired_bootstrap(name: str, system: list[str], baseline: list[str],
                     references: list[list[str]], options: dict[str, Any]) -> dict[str, float]:
    """Paired bootstrap resampling against a baseline system, as `sacrebleu --paired-bs` (and
    Moses) do it; the same resamples and p-value rule for the label metrics."""
    import numpy as np
    from sacrebleu.significance import PairedTest, _compute_p_value

    samples = options.get("bootstrap_samples", 1000)
    if name in SACREBLEU:
        metric, _ = sacrebleu_metric(name, options)
        _, scores = PairedTest([("baseline", baseline), ("system", system)], {name: metric},
                               references, test_type="bs", n_samples=samples)()
        base, result = next(v for k, v in scores.items() if k != "System")
        assert not isinstance(base, str) and not isinstance(result, str)
        return {"baseline": base.score, "p_value": float(result.p_value or 0.0),
                "bootstrap_samples": samples}
    refs = references[0]

    def value(hyps: list[str], rows: Any = None) -> float:
        picked = range(len(refs)) if rows is None else rows
        return label_score(name, [hyps[i] for i in picked], [refs[i] for i in picked],
                           options).value

    seed = os.environ.get("SACREBLEU_SEED", "12345")
    rng = np.random.default_rng(None if seed.lower() == "none" else int(seed))
    rows = rng.choice(len(refs), size=(samples, len(refs)), replace=True)
    diffs = np.array([abs(value(system, r) - value(baseline, r)) for r in rows])
    p_value = _compute_p_value(diffs - diffs.mean(), abs(value(system) - value(baseline)))
    return {"baseline": value(baseline), "p_value": float(p_value), "bootstrap_samples": samples}
