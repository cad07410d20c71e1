"""GLUE metrics against values worked out by hand, and quiet, finite scores on degenerate input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedlodrop.data.tasks import TASKS
from fedlodrop.data.metrics import compute_metrics, generalization_gap


def test_keys_follow_the_task():
    two = np.array([0, 1])
    assert list(compute_metrics(TASKS["cola"], two, two)) == ["mcc", "accuracy"]
    assert list(compute_metrics(TASKS["mrpc"], two, two)) == ["f1", "accuracy"]
    assert list(compute_metrics(TASKS["qqp"], two, two)) == ["f1", "accuracy"]
    assert list(compute_metrics(TASKS["rte"], two, two)) == ["accuracy"]
    assert list(compute_metrics(TASKS["stsb"], two * 1.0, two * 1.0)) == ["pearson", "spearman"]


def test_classification_by_hand():
    pred, gold = np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0])
    # TP=2 FP=1 TN=1 FN=0: MCC = (2*1 - 1*0) / sqrt(3*2*2*1); F1 = 2PR/(P+R) with P=2/3, R=1
    cola = compute_metrics(TASKS["cola"], pred, gold)
    assert cola["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert cola["accuracy"] == pytest.approx(0.75)
    assert compute_metrics(TASKS["mrpc"], pred, gold)["f1"] == pytest.approx(0.8)
    mnli = compute_metrics(TASKS["mnli"], np.array([0, 1, 2, 2, 1]), np.array([0, 1, 2, 1, 0]))
    assert mnli["accuracy"] == pytest.approx(0.6)


def test_regression_by_hand():
    # pred [1,2,3] vs gold [1,2,4]: deviations [-1,0,1], [-4/3,-1/3,5/3]; r = 3 / (sqrt(2) sqrt(42)/3)
    scores = compute_metrics(TASKS["stsb"], np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert scores["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert scores["spearman"] == pytest.approx(1.0)
    reversed_ = compute_metrics(TASKS["stsb"], np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 4.0]))
    assert reversed_["spearman"] == pytest.approx(-1.0)


def test_degenerate_predictions_score_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stuck = np.zeros(4, dtype=int)
        gold = np.array([0, 1, 1, 0])
        assert compute_metrics(TASKS["cola"], stuck, gold) == {"mcc": 0.0, "accuracy": 0.5}
        assert compute_metrics(TASKS["mrpc"], stuck, gold)["f1"] == 0.0
        flat = compute_metrics(TASKS["stsb"], np.full(4, 2.5), np.array([0.0, 1.0, 4.0, 5.0]))
        assert flat == {"pearson": 0.0, "spearman": 0.0}
        single = compute_metrics(TASKS["stsb"], np.array([1.0]), np.array([2.0]))
        assert single == {"pearson": 0.0, "spearman": 0.0}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(TASKS["rte"], np.array([0, 1, 1]), np.array([0, 1]))


def test_generalization_gap_uses_main_metric():
    gap = generalization_gap(TASKS["cola"], {"mcc": 0.6, "accuracy": 0.9}, {"mcc": 0.5, "accuracy": 0.8})
    assert gap == pytest.approx(0.1)
