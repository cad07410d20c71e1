"""The device's half of a round: decode what arrived, train, pack the upload.

`device_step` needs only the task it received, its own data and the shared backbone, so the
in-process engine and the Flower ClientApp call it the same way. A device trains on exactly what
was sent: the adapter slices decoded from the download (communication dtype included) over a base
brought up to date by the download's folds and seen through the device's view.

Slices outside the trained masks have their gradients zeroed every step; AdamW then leaves them
exactly as they were (zero moments give a zero step), so only the kept slices change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedlodrop.config import RunConfig, TrainConfig
from fedlodrop.data import make_loader
from fedlodrop.lora.adapter import State
from fedlodrop.lora.aggregation import make_rule
from fedlodrop.lora.masks import Masks, device_masks, rank_of
from fedlodrop.lora.messages import (
    COMM_DTYPES,
    DeviceReply,
    DeviceTask,
    decode_adapter,
    encode_upload,
    make_uplink,
    merge_trained,
)
from fedlodrop.lora.variants import make_variant
from fedlodrop.model.backbone import FedModel
from fedlodrop.rng import seed_torch, stream_seed
from fedlodrop.round import secagg
from fedlodrop.round.features import features
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.round.privacy import sent_masks


@dataclass
class LocalResult:
    """A local phase's end state, mean loss, steps, seconds and first and last learning rates."""
    state: State  # full-size, float32, on CPU
    loss: float  # mean training loss over the local steps
    steps: int
    seconds: float
    lr_first: float
    lr_last: float


def lr_schedule(cfg: RunConfig) -> Callable[[float], float]:
    """lr at federation progress p in [0, 1]: linear warm-up, then linear decay to 0 or flat.

    The schedule spans the whole federation, not one local phase: round t's local phase runs
    from p = t / rounds to (t + 1) / rounds."""
    base, warm, kind = cfg.train.lr, cfg.train.warmup_ratio, cfg.train.schedule

    def lr(p: float) -> float:
        if warm > 0 and p < warm:
            return base * p / warm
        if kind == "constant":
            return base
        return base * max(0.0, 1.0 - p) / (1.0 - warm)

    return lr


def device_step(fm: FedModel, task: DeviceTask, shard, cfg: RunConfig, known: State,
                plugins: list[RoundPlugin] | None = None) -> DeviceReply:
    """One device's round: `shard` is its tokenised data, `known` the seeded initial adapter,
    `plugins` the round's features (by default those `cfg` asks for: `round.features`)."""
    return _step(fm, task, shard, cfg, known, plugins)[0]


def secure_step(fm: FedModel, task: DeviceTask, shard, cfg: RunConfig, known: State,
                plugins: list[RoundPlugin] | None = None) -> tuple[DeviceReply, np.ndarray]:
    """`device_step` plus what the device puts in the secure sum (secagg.py): its update on the
    values it sent, measured from what it was sent, as one full-length vector. Refuses to send a
    value the sum would clip or could not carry (SecAgg+ would clip it silently)."""
    reply, start, trained, trains_a = _step(fm, task, shard, cfg, known, plugins)
    end = merge_trained(start, reply.upload, fm.layout, trained)  # what the server would rebuild
    vector = secagg.device_vector(start, end, fm.layout, trained, trains_a)
    if not np.isfinite(vector).all() or (reply.train_loss is not None and not math.isfinite(reply.train_loss)):
        raise RuntimeError("non-finite update or training loss: not added to the secure sum")
    c = cfg.privacy.secagg_clip_range
    if np.abs(vector).max(initial=0.0) > c:  # the value itself stays on the device: the error travels in the clear
        raise RuntimeError(f"an update value exceeds privacy.secagg_clip_range {c:g}: not added to the secure sum")
    return reply, vector


def _step(fm: FedModel, task: DeviceTask, shard, cfg: RunConfig, known: State, plugins: list[RoundPlugin] | None):
    """The round, and the start, trained masks and rule's A flag the secure sum needs."""
    layout = fm.layout
    plugins = features(cfg) if plugins is None else plugins
    rule = make_rule(cfg.federation.aggregation, cfg.federation.factor_rule)
    variant = make_variant(cfg.dropout.variant)
    masks = device_masks(cfg, layout, task.rate, task.round, task.device, task.rank)
    view, trained = variant.view(masks, layout), variant.trained(masks, layout)
    if task.fold is not None:
        fm.sync_fold(task.fold)
    fm.set_view(view)  # None: the whole global model
    start = decode_adapter(task.adapter, layout, view, known)
    seed_torch(cfg.seed, "local-train", task.round, task.device)
    loader = make_loader(
        shard,
        fm.tokenizer,
        cfg.train.batch_size,
        True,
        stream_seed(cfg.seed, "data", task.round, task.device),
        group_by_length=cfg.train.group_by_length,
    )
    lr, rounds = lr_schedule(cfg), cfg.federation.rounds
    target = pruned_rank(masks, cfg.lora.self_prune)
    held = rank_of(masks)

    def regulariser() -> torch.Tensor:
        return cfg.lora.prune_lambda * tail_norm(fm.lora_params(), target, held)
    result = train_local(
        fm,
        start,
        trained,
        loader,
        cfg.train,
        cfg.federation.local_epochs,
        lambda f: lr((task.round + f) / rounds),
        train_a=rule.trains_a,
        regulariser=regulariser if target is not None and cfg.lora.prune_lambda > 0 else None,
    )
    end = result.state
    next_rank = None
    if target is not None:  # HetLoRA's self-pruning: the tail the regulariser shrank is dropped for good
        before, after = (float(tail_norm(_factors(layout, s), target, held)) for s in (start, end))
        next_rank = target if after < before else None
    sent = sent_masks(layout, trained, rule.trains_a)
    for plugin in plugins:  # DP: clip, and under local DP noise, before it leaves
        end = plugin.privatize(start, end, sent, task.round, task.device)
    upload = encode_upload(end, start, layout, trained, rule, COMM_DTYPES[cfg.federation.comm_dtype],
                           make_uplink(cfg.federation.uplink), stream_seed(cfg.seed, "uplink", task.round, task.device))
    reply = DeviceReply(
        task.device, task.round, upload, len(shard), result.loss, result.steps, result.seconds,
        result.lr_first, result.lr_last, precision=fm.train_precision, next_rank=next_rank,
    )
    for plugin in plugins:  # DP: the update and nothing else
        reply = plugin.reply(reply)
    return reply, start, trained, rule.trains_a


def pruned_rank(masks: Masks, keep: float | None) -> int | None:
    """The rank a device would prune to under `lora.self_prune` (floor(keep r_k), at least 1), or
    None: no self-pruning, or a device already at rank 1."""
    if keep is None:
        return None
    held = rank_of(masks)
    target = max(1, math.floor(keep * held))
    return target if target < held else None


def tail_norm(factors, start: int, end: int) -> torch.Tensor:
    """HetLoRA's regulariser: sum over modules of ||A[start:end]||_F ||B[:, start:end]||_F, the
    components a pruned device would drop (`factors`: (shape, A, B) triples)."""
    return sum(a[start:end].norm() * b[:, start:end].norm() for _, a, b in factors)


def _factors(layout, state: State) -> list:
    return [(m, state[m.key_a], state[m.key_b]) for m in layout.modules]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def local_steps(batches_per_epoch: int, local_epochs: float, grad_accum: int) -> int:
    """Optimizer steps of one local phase (fractional epochs round up to whole steps)."""
    return max(1, math.ceil(batches_per_epoch * local_epochs / grad_accum))


def train_local(
    fm: FedModel,
    start: State,
    trained: Masks | None,
    loader,
    train: TrainConfig,
    local_epochs: float,
    lr_at: Callable[[float], float],
    train_a: bool = True,
    regulariser: Callable[[], torch.Tensor] | None = None,
) -> LocalResult:
    """Local phase from `start`; only the slices of `trained` change (all of them if None).
    `lr_at(fraction of the phase done)` gives the learning rate of each step; `regulariser()`, if
    given, is added to each step's loss (self-pruning's tail norm)."""
    t0 = time.perf_counter()
    fm.set_state(start)
    fm.set_a_trainable(train_a)
    params = fm.trainable(train_a)
    head = list(fm.head.values())
    lora = [p for p in params if all(p is not h for h in head)]
    scales = [1.0, train.head_lr_scale]
    optim = torch.optim.AdamW(
        [{"params": lora}, {"params": head}], lr=lr_at(0.0), weight_decay=train.weight_decay
    )
    grad_masks = _grad_masks(fm, trained) if trained is not None else []
    anchors = [p.detach().clone() for p in params] if train.prox_mu > 0 else []  # FedProx's w_start
    steps = local_steps(len(loader), local_epochs, train.grad_accum)
    fm.net.train()
    losses: list[torch.Tensor] = []
    batches = _cycle(loader)
    rates = [lr_at(step / steps) for step in range(steps)]
    for step in range(steps):
        for group, scale in zip(optim.param_groups, scales):
            group["lr"] = rates[step] * scale
        for _ in range(train.grad_accum):
            batch = _to_device(next(batches), fm.device)
            with fm.train_autocast():
                loss = fm.net(**batch).loss
            objective = loss + _proximal(params, anchors, train.prox_mu) if anchors else loss
            if regulariser is not None:
                objective = objective + regulariser()
            (objective / train.grad_accum).backward()
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
    return LocalResult(fm.get_state(), mean_loss, steps, time.perf_counter() - t0, rates[0], rates[-1])


def _proximal(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's term mu / 2 sum |w - w_start|^2 (a slice whose gradient is masked never leaves its start)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def _grad_masks(fm: FedModel, masks: Masks) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The gradient masks of the slices that must not move (none for a factor kept whole)."""
    out = []
    for shape, a, b in fm.lora_params():
        mask = masks[shape.name]
        if not bool(mask.a_cols.all() and mask.ranks.all()):
            out.append((a, mask.a.to(a.device, a.dtype)))
        if not bool(mask.b_rows.all() and mask.ranks.all()):
            out.append((b, mask.b.to(b.device, b.dtype)))
    return out


def _cycle(loader):
    while True:
        yield from loader


@torch.no_grad()
def predict(fm: FedModel, loader, is_regression: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and mean loss of the model as it is loaded now."""
    outputs, labels, loss = predict_outputs(fm, loader)
    if len(labels) == 0:
        return np.array([]), np.array([]), float("nan")
    preds = outputs.squeeze(-1) if is_regression else outputs.argmax(-1)
    return preds, labels, loss


@torch.no_grad()
def predict_outputs(fm: FedModel, loader, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits (or class probabilities), labels and the mean loss over `loader`."""
    fm.net.eval()
    outs, labels, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = _to_device(batch, fm.device)
        with fm.eval_autocast():
            out = fm.net(**batch)
        logits = out.logits.float()
        size = logits.shape[0]
        if out.loss is not None:
            loss_sum += float(out.loss) * size
        n += size
        outs.append((logits.softmax(-1) if probabilities else logits).cpu().numpy())
        if "labels" in batch:
            labels.append(batch["labels"].cpu().numpy())
    if n == 0:
        return np.zeros((0, 1)), np.array([]), float("nan")
    return np.concatenate(outs), np.concatenate(labels) if labels else np.array([]), loss_sum / n
