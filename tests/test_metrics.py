"""Metric functions against hand-computed values (scikit-learn's definitions)."""

from __future__ import annotations

import pytest

from llmkit.scoring.metrics import accuracy, f1, label_measure

PRED = [0, 1, 1, 2, 2, 2, 0]
REF = [0, 1, 2, 2, 2, 0, 1]


def test_accuracy() -> None:
    assert accuracy(PRED, REF) == pytest.approx(4 / 7)
    assert accuracy(["a"], ["a"]) == 1.0


def test_f1_by_hand() -> None:
    # label 0: tp 1 fp 1 fn 1 -> 0.5; label 1: tp 1 fp 1 fn 1 -> 0.5; label 2: tp 2 fp 1 fn 1 -> 2/3
    assert f1(PRED, REF, "macro") == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert f1(PRED, REF, "micro") == pytest.approx(4 / 7)
    assert f1([1, 1, 0, 0], [1, 0, 1, 0], "binary", positive=1) == pytest.approx(0.5)
    assert f1([0, 0], [1, 1], "binary") == 0.0


def test_macro_f1_counts_labels_only_predicted() -> None:
    # label 3 is predicted but never true: it scores 0 and lowers the mean, as in scikit-learn
    assert f1([0, 3], [0, 0], "macro") == pytest.approx((2 / 3 + 0) / 2)


def test_bad_metric_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="unknown average 'samples': use macro, micro, weighted"):
        f1([1], [1], "samples")


@pytest.mark.parametrize("average", ["binary", "macro", "micro", "weighted"])
def test_precision_recall_f1_equal_scikit_learn(average: str) -> None:
    """Each average of scikit-learn's precision_score, recall_score and f1_score, on labels
    with uneven counts, one label only predicted and one never predicted."""
    import random

    from sklearn import metrics

    rng = random.Random(7)
    labels = ["pos", "neg"] if average == "binary" else ["a", "b", "c", "d"]
    refs = [rng.choice(labels[:3] if len(labels) > 2 else labels) for _ in range(150)]
    preds = [r if rng.random() < 0.5 else rng.choice(labels) for r in refs]
    if len(labels) > 2:
        preds = [p if p != "b" else "a" for p in preds]  # b: never predicted, d: never true
    options = {"pos_label": "pos"} if average == "binary" else {}
    for kind, reference in (("precision", metrics.precision_score),
                            ("recall", metrics.recall_score), ("f1", metrics.f1_score)):
        expected = reference(refs, preds, average=average, zero_division=0, **options)
        found = label_measure(kind, preds, refs, average, "pos")
        assert found == pytest.approx(expected, abs=1e-12), (kind, average)
