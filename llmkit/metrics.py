"""Pure, offline metric functions: lists in, floats out."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def _check(predictions: Sequence[object], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("no references to score")


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _check(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def _f1_of(label: Hashable, predictions: Sequence[Hashable], references: Sequence[Hashable]
           ) -> float:
    pairs = list(zip(predictions, references, strict=True))
    tp = sum(p == label and r == label for p, r in pairs)
    fp = sum(p == label and r != label for p, r in pairs)
    fn = sum(p != label and r == label for p, r in pairs)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(predictions: Sequence[Hashable], references: Sequence[Hashable], average: str = "macro",
       positive: Hashable = 1) -> float:
    """F1 as scikit-learn defines it: `macro` over every label seen in either list, `micro`
    (equal to accuracy for single-label data), or `binary` for the `positive` label."""
    _check(predictions, references)
    if average == "binary":
        return _f1_of(positive, predictions, references)
    if average == "micro":
        return accuracy(predictions, references)
    if average == "macro":
        labels = sorted(set(references) | set(predictions), key=repr)
        return sum(_f1_of(lab, predictions, references) for lab in labels) / len(labels)
    raise ValueError(f"unknown F1 average {average!r}: use macro, micro or binary")
