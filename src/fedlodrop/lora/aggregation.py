"""SPEC 2, as amended in docs/dropout.md: the aggregation rules, pure functions on adapter states.

Every rule moves the global model by what the devices trained, never by what their masks removed:
a slice a device did not train counts as "no change", not as a zero weight.

* `fedit`  - each factor moves by the weighted mean of its trained slices' changes.
* `masked` - each row of B / column of A moves to the mean over the devices that trained it.
* `fedex`  - factors as `federation.factor_rule`, then the residual that makes the global
             effective weight exact is returned for folding into the frozen base:
                 W' = W + sum_k w_k (W_k^end - W_k^start)
             where W_k^start is the model device k held (the global one seen through its view)
             and W_k^end what it trained. Without dropout this is FedEx-LoRA's mean of models.
* `ffa`    - A stays at its shared seeded initialisation and never travels; B as factor_rule.

For devices of different ranks (`lora.ranks`; every rule above takes them, a rank component
counting as a slice the device did not train):

* `hetlora`  - HetLoRA: each factor is the weighted mean of the devices' factors zero-padded to
               the model's rank (a component a device lacks counts as zero, not as no change).
* `hetlora-sw` - HetLoRA with its sparsity-weighted aggregation: in each module, device k weighs
               w_k ||s B_k A_k||_F, renormalised, so a device with few or pruned components dilutes less.
* `flora`    - FLoRA: the devices' products are stacked into the fold, exactly
                   W' = W + sum_k w_k (W_k^end - W_k^start),
               and every device restarts from the initial adapter (A_0, B = 0) each round; only
               the head and the fold travel down.
* `flexlora` - FlexLoRA: the weighted mean of the devices' products s B_k A_k, truncated by SVD
               to the model's rank; a device of rank r_k holds its first r_k components, the
               best rank-r_k approximation. Its truncation error is logged per round and rank.
The head moves by the weighted mean of the head changes under every rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from fedlodrop.lora.adapter import AdapterLayout, ModuleShape, State
from fedlodrop.lora.masks import Masks
from fedlodrop.registry import Registry

RULES: Registry[AggregationRule] = Registry("federation.aggregation")
FACTOR_RULES: Registry[FactorRule] = Registry("federation.factor_rule")


class FactorRule:
    """How a factor's slices are averaged over the devices of a round: the one hook a rule's
    factors differ by. A new one subclasses, names itself and registers (`@FACTOR_RULES.register`)."""

    name: ClassVar[str]

    def move(self, change: torch.Tensor, kept: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The factor's change from the devices' `change` (K x ...; zero where not trained), their
        `kept` masks (K x broadcast) and weights `w` (K), plus central DP's `noise` on the sum."""
        raise NotImplementedError

    def total(self, sent: torch.Tensor) -> torch.Tensor:
        """Per value, how many of the devices whose sent-values masks are stacked in `sent` it
        averages over: what central DP divides its noised sum by, at participation rate 1."""
        raise NotImplementedError


@FACTOR_RULES.register
class MeanOverAll(FactorRule):
    """FedAvg: each slice moves by the weighted mean over all devices, a slice a device did not
    train counting as no change."""

    name = "fedit"

    def move(self, change, kept, w, noise):
        """Sum of the devices' weighted changes (their weights sum to 1), plus the noise."""
        summed = torch.einsum("k,kij->ij", w, change)
        return summed if noise is None else summed + noise

    def total(self, sent):
        """Every device of the federation, wherever any device could send."""
        return torch.full_like(sent[0], float(len(sent))) * (sent.sum(0) > 0)


@FACTOR_RULES.register
class MeanOverKept(FactorRule):
    """Each slice moves to the weighted mean over the devices that trained it; a slice nobody
    trained stays."""

    name = "masked"

    def move(self, change, kept, w, noise):
        """Per slice, the weighted mean change over the devices that trained it (the noise joins the sum); a
        slice nobody trained does not move."""
        wk = w.view(-1, 1, 1) * kept
        total = wk.sum(0)
        summed = (wk * change).sum(0) if noise is None else (wk * change).sum(0) + noise
        mean = summed / total.clamp_min(torch.finfo(change.dtype).tiny)
        return torch.where(total > 0, mean, torch.zeros_like(mean))

    def total(self, sent):
        """Per value, the devices whose masks keep it."""
        return sent.sum(0)


@dataclass
class DeviceUpdate:
    """One device's round, as the server reconstructs it from the messages."""

    start: State  # what it received, full size, zeros outside its view
    end: State  # start with its trained slices replaced by what it uploaded
    trained: Masks  # the slices it trained and sent
    num_samples: int


@dataclass
class Residual:
    """A fold, U @ V in the B @ A (out x in) orientation, scaling folded into U."""

    u: torch.Tensor  # n_out x R
    v: torch.Tensor  # R x n_in

    def dense(self) -> torch.Tensor:
        """U @ V: the dense (out x in) matrix."""
        return self.u @ self.v

    def truncated(self, rank: int) -> tuple[Residual, float, float]:
        """The best rank-`rank` approximation (Eckart-Young) with |R - R_k|_F and |R|_F.

        From the factors, never the dense matrix (`svd`), so a 4096 x 4096 module costs O(4096 R^2)."""
        (u, v), sing = self.svd(rank)
        norm = float(sing.norm())
        if rank >= int((sing > 0).sum()):
            return self, 0.0, norm
        return Residual(u, v), float(sing[rank:].norm()), norm

    def svd(self, rank: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """U @ V's first `rank` singular directions as (n_out x rank, rank x n_in) factors, each
        carrying the square root of the singular values (zero-padded past U @ V's rank), and
        every singular value. From the factors: QR of U and V^T, then the SVD of the small core."""
        qu, ru = torch.linalg.qr(self.u.double())
        qv, rv = torch.linalg.qr(self.v.double().T)
        p, sing, qh = torch.linalg.svd(ru @ rv.T)
        k = min(rank, len(sing))
        root = sing[:k].sqrt()
        u = torch.zeros(self.u.shape[0], rank, dtype=torch.float64)
        v = torch.zeros(rank, self.v.shape[1], dtype=torch.float64)
        u[:, :k] = (qu @ p[:, :k]) * root
        v[:k] = root[:, None] * (qh[:k] @ qv.T)
        padded = torch.zeros(max(rank, len(sing)), dtype=torch.float64)
        padded[: len(sing)] = sing
        return (u.float(), v.float()), padded

    @property
    def factored(self) -> bool:
        """Send the factors when they are fewer values than the dense matrix."""
        n_out, rank = self.u.shape
        return rank * (n_out + self.v.shape[1]) < n_out * self.v.shape[1]


class DenseResidual(Residual):
    """A fold that is not low-rank (a server optimiser's step on FedEx's effective weight): U is the
    matrix, V the identity; it travels dense."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(matrix, torch.eye(matrix.shape[1], dtype=matrix.dtype))

    def dense(self) -> torch.Tensor:
        """The matrix itself (no product with the identity)."""
        return self.u


def device_weights(updates: list[DeviceUpdate], weighting: Literal["samples", "uniform"]) -> torch.Tensor:
    """Each device's weight in the round, summing to 1: by its sample count, or equal."""
    raw = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    w = torch.tensor(raw, dtype=torch.float64)
    return (w / w.sum()).float()


class AggregationRule:
    """A rule, as a class with a few hooks (in the spirit of Flower's strategies and PEFT's LoRA
    variants): what devices train and send (`trains_a`, `sends`), whether the server folds a
    residual into the base weights (`folds`), and how factors move (`factor_rule`). `aggregate`
    is the one template every rule shares; a new rule overrides what differs and registers.
    """

    name: ClassVar[str]
    trains_a: ClassVar[bool] = True  # devices train A (FFA-LoRA freezes it at its seeded start)
    folds: ClassVar[bool] = False  # the server folds the residual that makes the model exact
    # the aggregate is a function of the (weighted) sum of the devices' updates and of the public
    # masks alone: central DP may noise that sum, secure aggregation may hide the addends
    from_sums: ClassVar[bool] = True

    default_factor_rule: ClassVar[str | None] = None  # a rule that fixes its factor rule names it here
    # a server optimiser can step on this rule's aggregate (round/optimizers.py)
    takes_server_optimizer: ClassVar[bool] = True

    # what the last `aggregate` measured (flexlora: its truncation error per rank), for the round's record
    stats: dict

    def __init__(self, factor_rule: str = "masked"):
        self.factor_rule: FactorRule = FACTOR_RULES.make(self.default_factor_rule or factor_rule)
        self.initial: State = {}  # the seeded initial adapter (`make_rule`), for rules that restart from it
        self.stats = {}

    def sends(self, key: str) -> bool:
        """Whether a state key travels (FFA's A is known to every device and never sent)."""
        return self.trains_a or not key.endswith(".lora_A")

    def sends_down(self, key: str) -> bool:
        """Whether a state key travels to the devices (a device rebuilds the rest from the seeded
        initial adapter, B's from zeros)."""
        return self.sends(key)

    def aggregate(
        self, layout: AdapterLayout, global_state: State, updates: list[DeviceUpdate], weights: torch.Tensor,
        noise: State | None = None, totals: State | None = None,
    ) -> tuple[State, dict[str, Residual]]:
        """New global state and, for a folding rule, each module's residual for its base weight.

        Central DP (a `from_sums` rule) gives `noise`, added to the sum of the changes, and
        `totals` (`fixed_totals`): each value then moves by (sum_k kept_k change_k + noise) /
        total, a division by public numbers that do not depend on who took part (`weights` unused)."""
        if totals is not None:
            return self._from_noised_sum(layout, global_state, updates, noise or {}, totals), {}
        new: State = {}
        residuals: dict[str, Residual] = {}
        noise = noise or {}
        module_weights = {}
        for m in layout.modules:
            w = module_weights[m.name] = self.module_weights(m, updates, weights)
            b = _move(m.key_b, lambda u: u.trained[m.name].b, global_state, updates, w,
                      self.factor_rule, noise.get(m.key_b))
            if self.trains_a:
                a = _move(m.key_a, lambda u: u.trained[m.name].a, global_state, updates, w,
                          self.factor_rule, noise.get(m.key_a))
            else:
                a = global_state[m.key_a].clone()
            new[m.key_a], new[m.key_b] = a, b
            if self.folds:
                residuals[m.name] = _residual(m, global_state, updates, w, a, b)
        for key in layout.head_keys:
            change = sum(w * (u.end[key] - u.start[key]) for w, u in zip(weights, updates))
            new[key] = global_state[key] + change + noise.get(key, 0.0)
        return self.corrected(layout, global_state, updates, module_weights, new), residuals

    def corrected(self, layout: AdapterLayout, global_state: State, updates: list[DeviceUpdate],
                  module_weights: dict[str, torch.Tensor], new: State) -> State:
        """The new state after the rule's own correction (`module_weights`: each module's device
        weights, as the factors were averaged with); none by default."""
        return new

    def module_weights(self, m: ModuleShape, updates: list[DeviceUpdate], weights: torch.Tensor) -> torch.Tensor:
        """The devices' weights for module `m`'s factors: the round's weights (the head always takes
        those); a rule that weighs modules by what the devices trained overrides this."""
        return weights

    def fixed_totals(self, layout: AdapterLayout, sent: list[State], q: float) -> State:
        """What central DP divides each value's noised sum by: the expected number of devices that
        send it, from every device of the federation (`sent`: each one's sent-values mask this
        round, drawn from the seed) at participation rate q. `fedit` averages over all devices
        (q N), `masked` over those whose masks keep the value (q times their count); the head over
        all. Public, and the same whoever took part: the released model then moves by at most
        C / total when one device is added or removed."""
        out: State = {}
        for key in sent[0]:
            stacked = torch.stack([s[key] for s in sent])
            rule = MeanOverAll() if key in layout.head_keys else self.factor_rule  # every device sends the head
            out[key] = q * rule.total(stacked)
        return out

    def _from_noised_sum(self, layout: AdapterLayout, prev: State, updates: list[DeviceUpdate], noise: State,
                         totals: State) -> State:
        new: State = {}
        for key in [k for m in layout.modules for k in (m.key_a, m.key_b)] + layout.head_keys:
            if key.endswith(".lora_A") and not self.trains_a:
                new[key] = prev[key].clone()  # never sent (FFA's A)
                continue
            summed = noise.get(key, torch.zeros_like(prev[key])).clone()
            for u in updates:
                summed += (u.end[key] - prev[key]) * _sent(u, key, layout)
            total = totals[key]
            new[key] = prev[key] + torch.where(total > 0, summed / total.clamp_min(1e-12), torch.zeros_like(summed))
        return new


@RULES.register
class FedIT(AggregationRule):
    """FedAvg of the factors: each moves by the weighted mean of its trained slices' changes."""

    name = "fedit"
    default_factor_rule = "fedit"


@RULES.register
class Masked(AggregationRule):
    """Each row of B / column of A moves to the mean over the devices that trained it."""

    name = "masked"
    default_factor_rule = "masked"


@RULES.register
class FedEx(AggregationRule):
    """Factors by `federation.factor_rule`, then the residual folded into the frozen base makes
    the global model exactly the weighted mean of what the devices trained (docs/dropout.md)."""

    name = "fedex"
    folds = True
    from_sums = False  # the fold needs each device's own product B_k A_k


@RULES.register
class FFA(AggregationRule):
    """FFA-LoRA: A stays at its shared seeded initialisation and never travels."""

    name = "ffa"
    trains_a = False


@RULES.register
class HetLoRA(AggregationRule):
    """HetLoRA (Cho et al. 2024): factors zero-padded to the model's rank, then the weighted mean,
    so a component only high-rank devices hold is diluted by the others' zeros. Within a device's
    rank a slice dropout removed counts as no change, as under every rule."""

    name = "hetlora"
    default_factor_rule = "fedit"
    from_sums = False  # kept simple: central DP and SecAgg+ use the rules built on sums

    def corrected(self, layout, global_state, updates, module_weights, new):
        """fedit's mean of the changes, less each factor value times the weight of the devices
        that lack its rank component: sum_k w_k pad(end_k)."""
        for m in layout.modules:
            w_m = module_weights[m.name]
            lacking = sum(w * (~u.trained[m.name].ranks).float() for w, u in zip(w_m, updates))
            new[m.key_a] = new[m.key_a] - global_state[m.key_a] * lacking[:, None]
            new[m.key_b] = new[m.key_b] - global_state[m.key_b] * lacking[None, :]
        return new


@RULES.register
class HetLoRASparsity(HetLoRA):
    """HetLoRA with its sparsity-weighted aggregation: in each module device k weighs w_k ||s B_k A_k||_F
    (the norm of the product it ends with, over the components it holds), renormalised. A device whose
    components are few or pruned has a small product and dilutes the others' components less than under
    plain zero-padding. The head keeps the round's weights."""

    name = "hetlora-sw"

    def module_weights(self, m, updates, weights):
        """w_k ||s B_k A_k||_F / sum_j w_j ||s B_j A_j||_F; the round's weights if every product is zero."""
        norms = torch.stack([
            torch.linalg.matrix_norm(m.scaling * (u.end[m.key_b] * u.trained[m.name].ranks) @ u.end[m.key_a])
            for u in updates])
        scored = weights * norms
        total = scored.sum()
        return scored / total if total > 0 else weights


@RULES.register
class FLoRA(AggregationRule):
    """FLoRA (Wang et al. 2024): stacking. The fold is exactly sum_k w_k (B_k^e A_k^e - B_k^s A_k^s)
    (the stacked factors of every device, whatever its rank), and the adapter restarts from its
    initialisation every round: the devices rebuild it, only the head and the fold travel down."""

    name = "flora"
    folds = True
    from_sums = False  # the fold needs each device's own product

    def sends_down(self, key: str) -> bool:
        """Only the head: the adapter a device starts from is the seeded initial one."""
        return not (key.endswith(".lora_A") or key.endswith(".lora_B"))

    def aggregate(self, layout, global_state, updates, weights, noise=None, totals=None):
        """A as it started (the initial A: a restart), B = 0, and the residual that makes the model exact."""
        new: State = {}
        residuals: dict[str, Residual] = {}
        for m in layout.modules:
            new[m.key_a], new[m.key_b] = global_state[m.key_a].clone(), torch.zeros_like(global_state[m.key_b])
            residuals[m.name] = _residual(m, global_state, updates, weights, new[m.key_a], new[m.key_b])
        for key in layout.head_keys:
            new[key] = global_state[key] + sum(w * (u.end[key] - u.start[key]) for w, u in zip(weights, updates))
        return new, residuals


@RULES.register
class FlexLoRA(AggregationRule):
    """FlexLoRA (Bai et al. 2024): the weighted mean of the devices' products s B_k A_k, truncated
    by SVD to the model's rank r and split evenly into B and A; the first r_k components are the
    best rank-r_k approximation, which a device of rank r_k holds. A component the mean does not
    fill restarts at the initial A with B = 0, so it can still learn. `stats`: per rank, the
    relative truncation error |dW - dW_r| / |dW| summed over modules."""

    name = "flexlora"
    from_sums = False  # the products are not linear in the updates
    takes_server_optimizer = False  # every round's factors are a new SVD basis: their differences mean nothing

    def aggregate(self, layout, global_state, updates, weights, noise=None, totals=None):
        """SVD of the products' weighted mean, from the stacked factors (never the dense matrix)."""
        new: State = {}
        ranks = sorted({int(u.trained[m.name].ranks.sum()) for u in updates for m in layout.modules} | {
            m.r for m in layout.modules})
        lost = {r: 0.0 for r in ranks}
        total = 0.0
        for m in layout.modules:
            held = [_held(m, global_state, u) for u in updates]
            stacked = Residual(torch.cat([m.scaling * w * b for w, (b, _) in zip(weights.tolist(), held)], 1),
                               torch.cat([a for _, a in held], 0))
            (u_, v_), sing = stacked.svd(m.r)
            total += float(sing.pow(2).sum())
            for r in ranks:
                lost[r] += float(sing[r:].pow(2).sum())
            root = m.scaling ** 0.5
            b, a = u_ / root, v_ / root
            unused = sing[: m.r] <= 1e-6 * float(sing[0])  # float32 products: below this it is rounding
            if m.key_a in self.initial and bool(unused.any()):  # restart what the mean leaves empty
                a[unused] = self.initial[m.key_a][unused]
                b[:, unused] = 0.0
            new[m.key_a], new[m.key_b] = a, b
        for key in layout.head_keys:
            new[key] = global_state[key] + sum(w * (u.end[key] - u.start[key]) for w, u in zip(weights, updates))
        self.stats = {"truncation": {r: (lost[r] / total) ** 0.5 if total else 0.0 for r in ranks}}
        return new, {}


def make_rule(aggregation: str, factor_rule: str = "masked", initial: State | None = None) -> AggregationRule:
    """The one place a rule is chosen by name (`fedlodrop.run.settings` checks the names first);
    `initial`: the seeded initial adapter, for a rule that restarts components from it."""
    rule = RULES.make(aggregation, factor_rule)
    rule.initial = initial or {}
    return rule


def _move(
    key: str, trained_of, prev: State, updates: list[DeviceUpdate], w: torch.Tensor, rule: FactorRule,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The factor plus the mean change of its trained slices (the factor rule's `move`), measured
    from the global value (for `reset`, whose dropped slices restart from zero, that is the mean of
    what devices sent). `noise` joins the weighted sum of the changes (zero where nobody trained)."""
    kept = torch.stack([trained_of(u) for u in updates]).to(prev[key].dtype)  # K x (broadcast)
    change = torch.stack([u.end[key] - prev[key] for u in updates]) * kept
    return prev[key] + rule.move(change, kept, w, noise)


def _sent(u: DeviceUpdate, key: str, layout: AdapterLayout) -> torch.Tensor:
    """1 where update `u` trained (and sent) the values of `key`."""
    if key in layout.head_keys:
        return torch.ones(())
    name, part = key.rsplit(".", 1)
    mask = u.trained[name]
    return mask.a.float() if part == "lora_A" else mask.b.float()


def _held(m: ModuleShape, prev: State, u: DeviceUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of device `u` as FlexLoRA averages it: the global factors with its trained slices as it
    sent them (a slice dropout removed: no change), zero outside its rank (its product has rank r_k)."""
    mask = u.trained[m.name]
    b = (prev[m.key_b] + (u.end[m.key_b] - prev[m.key_b]) * mask.b) * mask.ranks[None, :]
    a = (prev[m.key_a] + (u.end[m.key_a] - prev[m.key_a]) * mask.a) * mask.ranks[:, None]
    return b, a


def _residual(
    m: ModuleShape, prev: State, updates: list[DeviceUpdate], w: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> Residual:
    """s (B A + sum_k w_k (B_k^e A_k^e - B_k^s A_k^s) - B' A'), as factors.

    Equal (B, A) pairs are merged first: devices that all started from the whole global adapter
    (no view mask) cancel the B A term, leaving FedEx-LoRA's rank (K + 1) r residual.
    """
    terms: list[list] = [[prev[m.key_b], prev[m.key_a], 1.0]]
    for wk, u in zip(w.tolist(), updates):
        terms.append([u.end[m.key_b], u.end[m.key_a], wk])
        terms.append([u.start[m.key_b], u.start[m.key_a], -wk])
    terms.append([b, a, -1.0])
    merged: list[list] = []
    for tb, ta, c in terms:
        for other in merged:
            if torch.equal(other[0], tb) and torch.equal(other[1], ta):
                other[2] += c
                break
        else:
            merged.append([tb, ta, c])
    kept = [(tb, ta, c) for tb, ta, c in merged if abs(c) > 1e-6 and bool(tb.any())]  # a zero B adds nothing
    if not kept:
        return Residual(torch.zeros(m.n_out, 0), torch.zeros(0, m.n_in))
    u = torch.cat([m.scaling * c * tb for tb, _, c in kept], dim=1)
    v = torch.cat([ta for _, ta, _ in kept], dim=0)
    return Residual(u, v)
