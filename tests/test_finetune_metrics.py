"""Metrics against hand computations and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, f1_score

from data2vec.finetune import metrics


def test_wer_and_cer_by_hand() -> None:
    # "A B C D" -> "A X C": one substitution (B/X), one deletion (D) = 2 / 4 words
    assert metrics.word_error_rate(["A B C D"], ["A X C"]) == 0.5
    # corpus level: (2 + 1 insertion) / (4 + 2)
    assert metrics.word_error_rate(["A B C D", "E F"], ["A X C", "E F G"]) == 0.5
    # "CAT" -> "CUT": 1 of 3 characters
    assert math.isclose(metrics.char_error_rate(["CAT"], ["CUT"]), 1 / 3)


def test_mcc_accuracy_f1_by_hand() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([1, 1, 0, 0, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(metrics.matthews_corrcoef(y, p), mcc) and math.isclose(mcc, 0.5)
    assert metrics.accuracy(y, p) == 0.75
    assert math.isclose(metrics.f1_binary(y, p), f1_score(y, p))
    assert metrics.matthews_corrcoef(y, np.ones_like(y)) == 0.0  # undefined -> 0


def test_top_k_and_correlations() -> None:
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5]])
    labels = np.array([2, 1, 2])
    assert math.isclose(metrics.top_k_accuracy(labels, logits, 1), 1 / 3)
    assert math.isclose(metrics.top_k_accuracy(labels, logits, 2), 2 / 3)
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    assert math.isclose(metrics.pearson(x, 2 * x + 1), 1.0)
    assert math.isclose(metrics.pearson(x, y), np.corrcoef(x, y)[0, 1])
    assert math.isclose(metrics.spearman(x, y), spearmanr(x, y).statistic)


def test_map_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.3).astype(int)
    labels[0] = 1  # every class has a positive
    scores = np.round(rng.random((40, 5)) + labels * 0.3, 1)  # rounding makes ties
    expected = average_precision_score(labels, scores, average="macro")
    assert math.isclose(metrics.mean_average_precision(labels, scores), expected, rel_tol=1e-9)
    for c in range(5):
        assert math.isclose(metrics.average_precision(labels[:, c], scores[:, c]),
                            average_precision_score(labels[:, c], scores[:, c]), rel_tol=1e-9)


def test_undefined_cases_follow_the_documented_conventions() -> None:
    y = np.array([0, 0, 1, 1])
    assert metrics.pearson(y, np.ones(4)) == 0.0 and metrics.spearman(np.ones(4), y) == 0.0
    assert metrics.f1_binary(np.zeros(4), np.zeros(4)) == 0.0  # no positive anywhere
    assert math.isnan(metrics.average_precision(np.zeros(4), np.arange(4.0)))
    # a class without positives is left out of the mean, as AudioSet's mAP does
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.5], [0.8, 0.3]])
    assert metrics.mean_average_precision(labels, scores) == 1.0
    assert metrics.accuracy(np.array([]), np.array([])) == 0.0
