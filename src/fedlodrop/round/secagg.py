"""Secure aggregation's maths (docs/privacy.md): what a device puts in the secure sum, and how the
server turns the sum back into a round for a rule that needs no more than that.

Under SecAgg+ the server learns only sum_k v_k, where v_k is device k's update on the values it
sends (its trained rows of B / columns of A and the head), zeros elsewhere, as one vector of the
whole adapter's length: every device's vector must have the same shape, so dropout saves
no upload bytes under secure aggregation. The masks come from the run's seed, which the server
holds, so the counts of devices per value need not be sent: the server draws them.

A `from_sums` rule's aggregate depends on the devices' updates only through sum_k kept_k (end_k -
prev) with uniform weights. Giving every device the same share of the sum, end'_k = start_k +
kept_k S / count, has that sum (sum_k kept_k S / count = S where count > 0), so the rule itself
runs unchanged on these stand-in updates (`updates_from_sum`).

Quantisation: each value is clipped to [-c, c] and rounded stochastically to T + 1 levels, so the
sum of n vectors is exact up to n 2c / T per value. T is the largest power of two with
(n + 1) T <= 2^32 (Flower's 32-bit modulus holds the n quantised values and the weights' sum).
"""

from __future__ import annotations

import numpy as np
import torch

from fedlodrop.lora.adapter import AdapterLayout, State
from fedlodrop.lora.aggregation import RULES, DeviceUpdate
from fedlodrop.lora.masks import Masks
from fedlodrop.round.privacy import sent_masks

MODULUS = 2**32


def keys(layout: AdapterLayout) -> list[str]:
    """The order of the values in a device's vector."""
    return [k for m in layout.modules for k in (m.key_a, m.key_b)] + layout.head_keys


def device_vector(start: State, end: State, layout: AdapterLayout, trained: Masks, trains_a: bool) -> np.ndarray:
    """The device's update on the values it sends, zeros elsewhere, flattened in `keys` order; in
    float64, because SecAgg+ quantises in the input's precision (float32 would round x + c to
    ulp(c), 10^2 times coarser than its 2^30 levels). Only the masked integers travel."""
    sent = sent_masks(layout, trained, trains_a)
    parts = [((end[k].double() - start[k].double()) * sent[k].double()).reshape(-1) for k in keys(layout)]
    return torch.cat(parts).numpy()


def split_vector(vector: np.ndarray, layout: AdapterLayout, shapes: State) -> State:
    """A flat vector back into the state's tensors (float32)."""
    out, at = {}, 0
    flat = torch.from_numpy(np.asarray(vector, dtype=np.float64).copy()).float()
    for k in keys(layout):
        n = shapes[k].numel()
        out[k] = flat[at:at + n].reshape(shapes[k].shape)
        at += n
    if at != flat.numel():
        raise ValueError(f"a secure sum of {flat.numel()} values for an adapter of {at}")
    return out


def quantization_levels(devices: int) -> int:
    """T: the largest power of two with (devices + 1) T <= 2^32, at most 2^30."""
    t = 2 ** int(np.floor(np.log2(MODULUS / (devices + 1))))
    return int(min(t, 2**30))


def error_bound(devices: int, clip_range: float, levels: int | None = None) -> float:
    """The most the secure sum of `devices` vectors, quantised to `levels` (by default those
    chosen for that many devices), can differ from the exact sum, per value."""
    return devices * 2 * clip_range / (levels or quantization_levels(devices))


def updates_from_sum(summed: State, starts: list[State], trained: list[Masks], layout: AdapterLayout,
                     trains_a: bool) -> list[DeviceUpdate]:
    """Stand-in updates with the secure sum's sum (see the module's docstring), one per device in it."""
    sent = [sent_masks(layout, t, trains_a) for t in trained]
    count = {k: sum(s[k] for s in sent) for k in sent[0]}
    share = {k: torch.where(count[k] > 0, summed[k] / count[k].clamp_min(1), torch.zeros_like(summed[k]))
             for k in count}
    out = []
    for start, kept, s in zip(starts, trained, sent):
        end = {k: start[k] + share[k] * s[k] if k in share else start[k].clone() for k in start}
        out.append(DeviceUpdate(start, end, kept, 1))
    return out


def check(cfg) -> None:
    """Every setting secure aggregation cannot carry, refused with one line (ValueError;
    `fedlodrop.run.settings` turns it into the user's error)."""
    p, f = cfg.privacy, cfg.federation
    if not p.secure_aggregation:
        return
    if not RULES[f.aggregation].from_sums:
        raise ValueError(
            f"privacy.secure_aggregation cannot carry federation.aggregation {f.aggregation!r}: its aggregate "
            f"needs each device's own update, and the server would see only their sum; use one of: "
            f"{', '.join(RULES.where(lambda cls: cls.from_sums))}"
        )
    if f.weighting != "uniform":
        raise ValueError(
            f"privacy.secure_aggregation needs federation.weighting uniform, not {f.weighting!r}: the sum is unweighted"
        )
    n = f.devices_per_round or f.devices
    shares, threshold = shares_and_threshold(p, n)
    if n < 3:
        raise ValueError(f"privacy.secure_aggregation needs at least 3 devices a round (SecAgg+), got {n}")
    if p.secagg_shares is not None and p.secagg_shares > n:
        raise ValueError(f"privacy.secagg_shares {p.secagg_shares} exceeds the {n} devices of a round")
    if not 2 <= threshold < shares:
        raise ValueError(
            f"privacy.secagg_threshold {threshold} must be at least 2 and below the {shares} shares "
            f"(the {n} devices of a round)"
        )
    if (cfg.system.file is not None or cfg.plan is not None) and cfg.system.enforce == "drop":
        raise ValueError(
            "privacy.secure_aggregation cannot leave a late device out after the fact (its update is already in "
            "the sum): set system.enforce report"
        )


def shares_and_threshold(privacy, devices: int) -> tuple[int, int]:
    """SecAgg+'s share count (each device's secrets go to this many devices, itself included) and
    reconstruction threshold (shares needed to unmask); by default every device of the round and
    a majority of them."""
    shares = min(privacy.secagg_shares or devices, devices)
    threshold = privacy.secagg_threshold or shares // 2 + 1
    return shares, threshold
