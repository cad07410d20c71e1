"""SPEC section 2: the aggregation rules, as pure functions on adapter states.

* `fedit`  - weighted mean of A and of B, dropped entries counted as zeros (inexact).
* `masked` - each column of A / row of B averaged over the devices that kept it.
* `fedex`  - factors by `factor_rule`, then the residual s (sum_k w_k B_k A_k - B A) is returned
             so the caller folds it into the frozen base weight: the global model then equals the
             weighted mean of the devices' models exactly.
* `ffa`    - A stays at its (shared, seeded) initialisation; only B is averaged.
The head is always the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedlodrop.adapter import AdapterLayout, ModuleShape, State
from fedlodrop.masks import Masks

Rule = Literal["fedit", "masked", "fedex", "ffa"]
FactorRule = Literal["masked", "fedit"]


@dataclass
class DeviceUpdate:
    state: State  # full-size matrices, zeros where the device's mask dropped
    masks: Masks  # what the device trained and sent (all kept in `reset` mode)
    num_samples: int


@dataclass
class Residual:
    """s (sum_k w_k B_k A_k - B A) = U @ V, in the B @ A (out x in) orientation."""

    u: torch.Tensor  # n_out x R, scaling folded in
    v: torch.Tensor  # R x n_in

    def dense(self) -> torch.Tensor:
        return self.u @ self.v

    def downlink_values(self) -> int:
        """Values the server must send: the factors or the dense matrix, whichever is smaller."""
        n_out, rank = self.u.shape
        n_in = self.v.shape[1]
        return min(n_out * n_in, rank * (n_out + n_in))


def device_weights(updates: list[DeviceUpdate], weighting: Literal["samples", "uniform"]) -> torch.Tensor:
    raw = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    w = torch.tensor(raw, dtype=torch.float64)
    return (w / w.sum()).float()


def aggregate(
    rule: Rule,
    layout: AdapterLayout,
    global_state: State,
    updates: list[DeviceUpdate],
    weights: torch.Tensor,
    factor_rule: FactorRule = "masked",
) -> tuple[State, dict[str, Residual]]:
    """New global state and, for fedex, the residual of every module to fold into its base."""
    new: State = {}
    residuals: dict[str, Residual] = {}
    base_rule: FactorRule = "fedit" if rule == "fedit" else ("masked" if rule == "masked" else factor_rule)
    for m in layout.modules:
        if rule == "ffa":
            a = global_state[m.key_a].clone()
        else:
            a = _mean_factor(m.key_a, lambda u: u.masks[m.name].a_cols[None, :], global_state, updates, weights, base_rule)
        b = _mean_factor(m.key_b, lambda u: u.masks[m.name].b_rows[:, None], global_state, updates, weights, base_rule)
        new[m.key_a], new[m.key_b] = a, b
        if rule == "fedex":
            residuals[m.name] = _residual(m, updates, weights, a, b)
    for key in layout.head_keys:
        new[key] = sum(w * u.state[key] for w, u in zip(weights, updates))
    return new, residuals


def _mean_factor(
    key: str, kept_of, prev: State, updates: list[DeviceUpdate], w: torch.Tensor, rule: FactorRule
) -> torch.Tensor:
    """Weighted mean of one factor over devices; `kept_of(update)` broadcasts its mask."""
    stacked = torch.stack([u.state[key] for u in updates])  # K x rows x cols
    if rule == "fedit":
        return torch.einsum("k,kij->ij", w, stacked)
    kept = torch.stack([kept_of(u) for u in updates]).float()
    return _masked_mean(stacked, kept, w, prev[key])


def _masked_mean(
    stacked: torch.Tensor, kept: torch.Tensor, w: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """Mean over the devices that kept each slice, weights renormalised; nobody kept it: previous."""
    wk = w.view(-1, *([1] * (stacked.dim() - 1))) * kept  # K x (broadcast)
    total = wk.sum(0)
    mean = (wk * stacked).sum(0) / total.clamp_min(torch.finfo(stacked.dtype).tiny)
    return torch.where(total > 0, mean, previous)


def _residual(
    m: ModuleShape, updates: list[DeviceUpdate], w: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> Residual:
    """Factored residual: U = s [w_1 B_1 ... w_K B_K  -B],  V = [A_1; ...; A_K; A]."""
    u = torch.cat([wk * up.state[m.key_b] for wk, up in zip(w, updates)] + [-b], dim=1)
    v = torch.cat([up.state[m.key_a] for up in updates] + [a], dim=0)
    return Residual(m.scaling * u, v)
