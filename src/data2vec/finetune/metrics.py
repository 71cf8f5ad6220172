"""Evaluation metrics of the fine-tuning tasks: WER/CER, accuracy, top-k, MCC, F1, correlations,
and mean average precision (AudioSet mAP).

Pure functions of numpy arrays / strings. WER and CER come from ``jiwer``; accuracy, MCC, F1 and
average precision from scikit-learn; Pearson and Spearman from scipy. The wrappers only fix the
conventions (undefined -> 0 or nan, as each docstring says) and the GLUE / AudioSet choices.

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
    """Fraction of exact matches (0 for no examples)."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions)) if len(labels) else 0.0


def top_k_accuracy(labels: np.ndarray, logits: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest logits; logits (N, C)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]  # (N, k)
    return float(np.mean((top == np.asarray(labels)[:, None]).any(1))) if len(labels) else 0.0


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Matthews correlation (CoLA's metric); 0 when undefined (scikit-learn's convention)."""
    from sklearn.metrics import matthews_corrcoef as mcc

    return float(mcc(labels, predictions))


def f1_binary(labels: np.ndarray, predictions: np.ndarray) -> float:
    """F1 of the positive class (label 1) (MRPC / QQP); 0 when there is no positive at all."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels).astype(int), np.asarray(predictions).astype(int),
                          pos_label=1, average="binary", zero_division=0.0))


def _constant(x: np.ndarray) -> bool:
    return len(x) < 2 or bool(np.all(x == x[0]))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (STS-B); 0 when either side is constant (undefined)."""
    from scipy.stats import pearsonr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return 0.0 if _constant(x) or _constant(y) else float(pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (STS-B); 0 when either side is constant (undefined)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return 0.0 if _constant(x) or _constant(y) else float(spearmanr(x, y).statistic)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class (scikit-learn's ``average_precision_score``: a tied group of scores is one
    threshold); nan without positives, where AP is undefined."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, np.asarray(scores, dtype=np.float64)))


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over classes that have a positive (AudioSet's metric); labels, scores (N, C)."""
    aps = [average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


__all__ = ["accuracy", "average_precision", "char_error_rate", "f1_binary",
           "matthews_corrcoef", "mean_average_precision", "pearson", "spearman",
           "top_k_accuracy", "word_error_rate"]
