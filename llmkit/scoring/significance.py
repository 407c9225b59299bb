"""Paired significance tests against a baseline system, as sacrebleu runs them: paired
bootstrap resampling (`--paired-bs`) and approximate randomization (`--paired-ar`)."""

from __future__ import annotations

import os
from typing import Any

from llmkit.scoring.metrics import SACREBLEU, label_score, sacrebleu_metric


def paired_test(name: str, system: list[str], baseline: list[str],
                references: list[list[str]], options: dict[str, Any]) -> dict[str, Any]:
    """The baseline's score, the p-value of the difference and the signature with the test in
    it (`bs:1000|seed:12345`): sacrebleu's own PairedTest for BLEU, chrF and TER (`paired_ar`:
    approximate randomization with `paired_ar_n` trials, else paired bootstrap with
    `bootstrap_samples` resamples, as sacrebleu and Moses do it); the same resamples or
    shuffles, seed and p-value rule for the label metrics."""
    from sacrebleu.significance import PairedTest

    kind = "ar" if options.get("paired_ar") else "bs"
    samples = (options.get("paired_ar_n") or 10000) if kind == "ar" else (
        options.get("bootstrap_samples") or 1000)
    found = {"test": "approximate randomization" if kind == "ar" else "paired bootstrap",
             "ar_trials" if kind == "ar" else "bootstrap_samples": samples}
    if name in SACREBLEU:
        metric, _ = sacrebleu_metric(name, options)
        signatures, scores = PairedTest([("baseline", baseline), ("system", system)],
                                        {name: metric}, references, test_type=kind,
                                        n_samples=samples)()
        key, (base, result) = next((k, v) for k, v in scores.items() if k != "System")
        assert not isinstance(base, str) and not isinstance(result, str)
        return found | {"baseline": base.score, "p_value": float(result.p_value or 0.0),
                        "signature": str(signatures[key])}
    seed = os.environ.get("SACREBLEU_SEED", "12345").lower()
    signature = label_score(name, system, references[0], options).signature
    return found | label_test(name, kind, samples, system, baseline, references[0], options) | {
        "signature": f"{signature}|{kind}:{samples}|seed:{seed}"}


def label_test(name: str, kind: str, samples: int, system: list[str], baseline: list[str],
               refs: list[str], options: dict[str, Any]) -> dict[str, float]:
    """sacrebleu's two tests on a label metric, with sacrebleu's method: each line's statistics
    summed over each resample (bootstrap) or over each pseudo-system made by swapping lines at
    random (approximate randomization), the metric computed from the sums (`label_value`)."""
    import numpy as np
    from sacrebleu.significance import _compute_p_value

    base = label_score(name, baseline, refs, options).value  # bad options fail here
    labels = sorted(set(system) | set(baseline) | set(refs), key=repr)
    index = {label: i for i, label in enumerate(labels)}
    positive = index.get(options.get("positive") or "1", -1)
    stats = [line_stats(name, hyps, refs, index) for hyps in (system, baseline)]

    def value(sums: Any) -> Any:
        return label_value(name, sums.reshape(-1, 3, len(labels)) if sums.shape[-1] > 1
                           else sums.reshape(-1, 1) / len(refs), options, positive)

    seed = os.environ.get("SACREBLEU_SEED", "12345").lower()
    rng = np.random.default_rng(None if seed == "none" else int(seed))
    real = abs(value(stats[0].sum(0)) - value(stats[1].sum(0)))[0]
    if kind == "ar":  # as sacrebleu's _paired_ar_test: a coin per line and trial
        swap = rng.integers(2, size=(samples, len(refs)), dtype=bool)
        diffs = np.abs(value(swap @ stats[1] + ~swap @ stats[0])
                       - value(~swap @ stats[1] + swap @ stats[0]))
        p_value = _compute_p_value(diffs, real)
    else:  # as _paired_bs_test: the same resampled lines for both systems
        rows = rng.choice(len(refs), size=(samples, len(refs)), replace=True)
        picked = np.zeros((samples, len(refs)))
        np.add.at(picked, (np.arange(samples)[:, None], rows), 1)
        diffs = np.abs(value(picked @ stats[0]) - value(picked @ stats[1]))
        p_value = _compute_p_value(diffs - diffs.mean(), real)
    return {"baseline": base, "p_value": float(p_value)}


def line_stats(name: str, hyps: list[str], refs: list[str], index: dict[str, int]) -> Any:
    """Each line's statistics: right or not (accuracy), or its counts by label (right,
    predicted, true) for precision, recall and F1."""
    import numpy as np

    right = np.array([h == r for h, r in zip(hyps, refs, strict=True)], dtype=float)
    if name not in ("f1", "precision", "recall"):
        return right[:, None]
    lines = np.arange(len(refs))
    stats = np.zeros((len(refs), 3, len(index)))
    stats[lines, 0, [index[h] for h in hyps]] = right
    stats[lines, 1, [index[h] for h in hyps]] = 1
    stats[lines, 2, [index[r] for r in refs]] = 1
    return stats.reshape(len(refs), -1)


def label_value(name: str, sums: Any, options: dict[str, Any], positive: int) -> Any:
    """A label metric from summed line statistics (`line_stats`), as `label_score` computes it
    from lines: accuracy, or precision, recall or F1 with scikit-learn's averages over the
    labels seen (in the references or the predictions)."""
    import numpy as np

    if name not in ("f1", "precision", "recall"):
        return sums[:, 0]  # the fraction right
    right, predicted, true = sums[:, 0], sums[:, 1], sums[:, 2]
    average = options.get("average") or "macro"
    if average == "micro":
        right, predicted, true = (x.sum(1, keepdims=True) for x in (right, predicted, true))
    below = {"precision": predicted, "recall": true, "f1": (true + predicted) / 2}[name]
    measure = np.divide(right, below, out=np.zeros_like(right), where=below > 0)
    if average == "binary":
        return measure[:, positive]
    if average == "weighted":
        return (measure * true).sum(1) / true.sum(1)
    seen = (true + predicted) > 0
    return (measure * seen).sum(1) / seen.sum(1)
