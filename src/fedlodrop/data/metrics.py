"""GLUE metrics from predictions, and the generalisation gap.

Degenerate inputs (a model stuck on one class, a constant regression output) are common in the
first rounds of federated training; they score 0.0 instead of nan and emit no warnings, so
metrics.jsonl stays numeric and logs stay readable.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from fedlodrop.data.tasks import Task


def _is_constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x.flat[0]))


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold)) if gold.size else 0.0


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    # MCC is 0/0 when either side is constant; define it as 0 (no correlation) like GLUE does.
    if _is_constant(pred) or _is_constant(gold):
        return 0.0
    return float(matthews_corrcoef(gold, pred))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(f1_score(gold, pred, average="binary", pos_label=1, zero_division=0.0))


def _macro_f1(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """The mean F1 over every class (one the model never predicts scores 0 for it)."""
    return float(f1_score(gold, pred, average="macro", labels=list(range(num_labels)), zero_division=0.0))


def _correlation(fn, pred: np.ndarray, gold: np.ndarray) -> float:
    if pred.size < 2 or _is_constant(pred) or _is_constant(gold):
        return 0.0
    value = float(fn(pred, gold)[0])
    return 0.0 if math.isnan(value) else value


_FUNCS = {
    "accuracy": _accuracy,
    "mcc": _mcc,
    "f1": _f1,
    "pearson": lambda p, g: _correlation(pearsonr, p, g),
    "spearman": lambda p, g: _correlation(spearmanr, p, g),
}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Scores of `task.metrics`. `predictions`: class ids (argmax) or regression values."""
    pred = np.asarray(predictions).reshape(-1)
    gold = np.asarray(labels).reshape(-1)
    if pred.shape != gold.shape:
        raise ValueError(f"{pred.size} predictions for {gold.size} labels")
    if task.is_regression:
        pred, gold = pred.astype(np.float64), gold.astype(np.float64)
    else:
        pred, gold = pred.astype(np.int64), gold.astype(np.int64)
    return {key: _macro_f1(pred, gold, task.num_labels) if key == "macro_f1" else _FUNCS[key](pred, gold)
            for key in task.metrics}


def generalization_gap(task: Task, train: dict[str, float], evaluation: dict[str, float]) -> float:
    """Train minus eval main metric: positive means the model fits its training data better."""
    return float(train[task.main_metric] - evaluation[task.main_metric])
