"""Evaluation metrics of the fine-tuning tasks: WER/CER, accuracy, top-k, MCC, F1, correlations,
and mean average precision (AudioSet mAP).

Pure functions of numpy arrays / strings, so tests can compare them with hand computations and
scikit-learn. WER and CER come from ``jiwer``.

Example::

    word_error_rate(["THE CAT"], ["THE HAT"])          # 0.5
    matthews_corrcoef(np.array([1, 0]), np.array([1, 1]))
"""

from __future__ import annotations

import math

import numpy as np


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word errors (substitutions + deletions + insertions) over reference words, corpus level."""
    import jiwer

    if not references:
        return 0.0
    # jiwer rejects empty reference strings; an empty reference with a non-empty hypothesis is
    # all insertions, which we count by hand.
    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r.strip()]
    extra = sum(len(h.split()) for r, h in zip(references, hypotheses, strict=True)
                if not r.strip())
    words = sum(len(r.split()) for r, _ in pairs)
    if not pairs:
        return float(extra > 0)
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors = out.substitutions + out.deletions + out.insertions + extra
    return errors / max(words, 1)


def char_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Character error rate (spaces count as characters), corpus level."""
    import jiwer

    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r]
    if not pairs:
        return 0.0
    return float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(labels) == np.asarray(predictions))) if len(labels) else 0.0


def top_k_accuracy(labels: np.ndarray, logits: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest logits; logits (N, C)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]  # (N, k)
    return float(np.mean((top == np.asarray(labels)[:, None]).any(1))) if len(labels) else 0.0


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Binary MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when undefined."""
    y, p = np.asarray(labels).astype(bool), np.asarray(predictions).astype(bool)
    tp, tn = float(np.sum(y & p)), float(np.sum(~y & ~p))
    fp, fn = float(np.sum(~y & p)), float(np.sum(y & ~p))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def f1_binary(labels: np.ndarray, predictions: np.ndarray) -> float:
    """F1 of the positive class (label 1)."""
    y, p = np.asarray(labels).astype(bool), np.asarray(predictions).astype(bool)
    tp = float(np.sum(y & p))
    denom = 2 * tp + float(np.sum(~y & p)) + float(np.sum(y & ~p))
    return 2 * tp / denom if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.sum(xc**2) * np.sum(yc**2)))
    return float(np.sum(xc * yc) / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    from scipy.stats import rankdata

    return rankdata(x)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class: mean over positives of the precision at their rank (ties: a whole tied
    group is counted at once, as scikit-learn's ``average_precision_score``); nan without
    positives."""
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # thresholds at the last index of every distinct score
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / y.sum()
    return float(np.sum(precision * recall_step))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over classes that have a positive (AudioSet's metric); labels, scores (N, C)."""
    aps = [average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


__all__ = ["accuracy", "average_precision", "char_error_rate", "f1_binary",
           "matthews_corrcoef", "mean_average_precision", "pearson", "spearman",
           "top_k_accuracy", "word_error_rate"]
