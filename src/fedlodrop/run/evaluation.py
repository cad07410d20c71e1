"""Scoring the global model: the server does it after every round, `evaluate` on a saved run.

The global model is the backbone with the FedEx fold F, the global adapter and the head. With
`dropout.test_ensemble` N > 0 it is scored as the mean of N sub-adapter models at the devices'
mean rate (masks from their own named stream), the way dropout is averaged at test time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlodrop.data import make_loader
from fedlodrop.data.metrics import compute_metrics
from fedlodrop.lora.adapter import State
from fedlodrop.lora.masks import apply_masks, draw_masks
from fedlodrop.round.client import predict, predict_outputs
from fedlodrop.run.experiment import Experiment, load_run


def evaluate(exp: Experiment, data, global_state: State, round_: int = 0) -> tuple[dict[str, float], float]:
    """The task's metrics and the mean loss of the global model on `data` (empty data: {}, nan)."""
    if data is None or len(data) == 0:
        return {}, float("nan")
    fm, cfg = exp.fm, exp.cfg
    loader = make_loader(data, fm.tokenizer, cfg.train.batch_size * 2, False, 0, sort_by_length=True)
    n = cfg.dropout.test_ensemble
    if n == 0:
        fm.set_view(None)
        fm.set_state(global_state)
        preds, labels, loss = predict(fm, loader, exp.task.is_regression)
        return compute_metrics(exp.task, preds, labels), loss
    rate = float(np.mean(exp.rates))
    total = None
    for i in range(n):
        masks = draw_masks(fm.layout, rate, cfg.dropout.sampler, cfg.seed, round_, i, stream="test-mask")
        fm.set_view(masks)
        fm.set_state(apply_masks(global_state, fm.layout, masks))
        out, labels, _ = predict_outputs(fm, loader, probabilities=not exp.task.is_regression)
        total = out if total is None else total + out
    fm.set_view(None)
    mean = total / n
    probs, target = torch.from_numpy(mean).double(), torch.from_numpy(labels)
    if exp.task.is_regression:
        preds = mean.squeeze(-1)
        loss = F.mse_loss(probs.squeeze(-1), target.double())
    else:
        preds = mean.argmax(-1)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), target.long())  # the ensemble's cross-entropy
    return compute_metrics(exp.task, preds, labels), float(loss)


def rescore(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), precision: str | None = None) -> dict:
    """Rebuild a saved run's global model (backbone + folded deltas + adapter) and score it, in
    the run's `train.eval_precision` (fp32 unless asked otherwise) or `precision`."""
    run = load_run(run_dir, overrides, eval_data=True, precision=precision)
    metrics, loss = evaluate(run.exp, run.exp.eval_set, run.adapter, run.rounds_done - 1)
    return {"eval": metrics, "eval_loss": loss, "rounds_done": run.rounds_done,
            "precision": run.fm.eval_precision.to_json()}
