"""What one device does with the shared backbone: train its sub-adapter, or score a data set.

In `persistent` mode the dropped columns of A and rows of B start at zero and their gradients are
zeroed every step; AdamW then leaves them exactly zero (zero moments give a zero step, and weight
decay of zero is zero), so the device really trains only its sub-adapter. In `reset` mode (the
released reference code) they are zeroed once and then trained like everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fedlodrop.adapter import State
from fedlodrop.config import TrainConfig
from fedlodrop.masks import Masks, apply_masks
from fedlodrop.model import FedModel


@dataclass
class LocalResult:
    state: State  # full-size, float32, on CPU
    loss: float  # mean training loss over the local steps
    steps: int
    seconds: float


def _autocast(fm: FedModel):
    if fm.bf16:
        return torch.autocast(device_type=fm.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def local_steps(batches_per_epoch: int, local_epochs: float, grad_accum: int) -> int:
    """Optimizer steps of one local phase (fractional epochs round up to whole steps)."""
    return max(1, math.ceil(batches_per_epoch * local_epochs / grad_accum))


def train_local(
    fm: FedModel,
    start: State,
    masks: Masks,
    mask_mode: str,
    loader,
    train: TrainConfig,
    local_epochs: float,
    lr_at: Callable[[float], float],
    train_a: bool = True,
) -> LocalResult:
    """Local phase of one device. `lr_at(fraction of the phase done)` gives the learning rate."""
    import time

    t0 = time.perf_counter()
    fm.set_state(apply_masks(start, fm.layout, masks))
    fm.set_a_trainable(train_a)
    params = fm.trainable(train_a)
    optim = torch.optim.AdamW(params, lr=lr_at(0.0), weight_decay=train.weight_decay)
    grad_masks = _grad_masks(fm, masks) if mask_mode == "persistent" else []
    steps = local_steps(len(loader), local_epochs, train.grad_accum)
    fm.net.train()
    losses: list[float] = []
    batches = _cycle(loader)
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step / steps)
        for _ in range(train.grad_accum):
            batch = _to_device(next(batches), fm.device)
            with _autocast(fm):
                loss = fm.net(**batch).loss
            (loss / train.grad_accum).backward()
            losses.append(loss.detach())
        for grad_owner, mask in grad_masks:
            if grad_owner.grad is not None:
                grad_owner.grad.mul_(mask)
        if train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optim.step()
        optim.zero_grad(set_to_none=True)
    fm.set_a_trainable(True)
    mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    return LocalResult(fm.get_state(), mean_loss, steps, time.perf_counter() - t0)


def _grad_masks(fm: FedModel, masks: Masks) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    out = []
    for shape, a, b in fm.lora_params():
        mask = masks[shape.name]
        out.append((a, mask.a_cols.to(a.device, a.dtype)[None, :]))
        out.append((b, mask.b_rows.to(b.device, b.dtype)[:, None]))
    return out


def _cycle(loader):
    while True:
        yield from loader


@torch.no_grad()
def predict(fm: FedModel, loader, is_regression: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and mean loss of the model as it is loaded now."""
    fm.net.eval()
    preds, labels, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = _to_device(batch, fm.device)
        with _autocast(fm):
            out = fm.net(**batch)
        logits = out.logits.float()
        size = logits.shape[0]
        loss_sum += float(out.loss) * size
        n += size
        preds.append((logits.squeeze(-1) if is_regression else logits.argmax(-1)).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    if n == 0:
        return np.array([]), np.array([]), float("nan")
    return np.concatenate(preds), np.concatenate(labels), loss_sum / n
