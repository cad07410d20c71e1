"""Client-level differential privacy (docs/privacy.md): the unit protected is a device.

A device's update is what it changed on the values it sends: its trained rows of B, columns of A
(if the rule trains A) and the head. Each device clips that update to L2 norm `clip_norm` (C).
Then the Gaussian mechanism, in one of two places:

* central: the server (trusted to see clipped updates, never to publish them) clips again (so
  its bound holds whatever a device sent), sums, and adds N(0, (sigma C)^2) to every coordinate
  of the sum that any device trained, before any rule reads it. Every rule whose aggregate is a
  function of that sum (`AggregationRule.from_sums`) is post-processing of one Gaussian release
  per round with sensitivity C. FedEx's exact fold needs each device's own product B_k A_k, so
  central DP cannot protect it; use local DP.
* local: each device adds N(0, (sigma C)^2) to its own clipped update before it leaves; whatever
  the server computes from the noised updates (FedEx's fold included) is post-processing.

Accounting is Opacus' accountant (RDP by default, PRV on request), never our own formula:
central DP composes `rounds` subsampled Gaussian mechanisms at sampling rate
q = devices_per_round / devices (the amplification assumes each device takes part independently
with probability q and that who took part stays secret: the accountant's Poisson model, which
fedlodrop's fixed-size draw approximates; with every device in every round q = 1 and nothing is
assumed); local DP composes, per device, the rounds it took part in at q = 1 (the server sees
who sent, so sampling amplifies nothing), and reports the worst device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from fedlodrop.adapter import AdapterLayout, State
from fedlodrop.masks import Masks
from fedlodrop.rng import torch_generator


@dataclass(frozen=True)
class Mechanism:
    """The run's Gaussian mechanism and what its accountant needs."""

    mode: str  # central | local
    clip_norm: float
    noise_multiplier: float  # sigma: noise std / clip_norm
    delta: float
    accountant: str  # rdp | prv

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm


def default_delta(devices: int) -> float:
    """min(1e-5, 0.1 / devices): well below 1 / (the number of units protected)."""
    return min(1e-5, 0.1 / devices)


def sample_rate(cfg) -> float:
    """q of the accountant: the chance that a device takes part in a round (1 under local DP)."""
    fed = cfg.federation
    if cfg.privacy.mode == "local" or fed.devices_per_round is None:
        return 1.0
    return min(1.0, fed.devices_per_round / fed.devices)


def participations(cfg, rounds: int) -> list[int]:
    """How many of the first `rounds` rounds each device was drawn for."""
    from fedlodrop.server import participants

    counts = [0] * cfg.federation.devices
    for r in range(rounds):
        for k in participants(cfg, r):
            counts[k] += 1
    return counts


def _steps(cfg, rounds: int) -> int:
    """Mechanism invocations the accountant composes after `rounds` rounds."""
    return max(participations(cfg, rounds)) if cfg.privacy.mode == "local" else rounds


def mechanism(cfg) -> Mechanism | None:
    """The run's mechanism; with `target_epsilon`, sigma is the smallest that the accountant says
    spends at most that over all `federation.rounds` (a run stopped early spends less)."""
    p = cfg.privacy
    if not p.dp:
        return None
    delta = p.delta if p.delta is not None else default_delta(cfg.federation.devices)
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = noise_for(p.target_epsilon, delta, sample_rate(cfg), _steps(cfg, cfg.federation.rounds), p.accountant)
    return Mechanism(p.mode, p.clip_norm, float(sigma), delta, p.accountant)


def _rdp_orders() -> dict:
    """Opacus' RDP orders (1.1 ... 63) and larger ones up to 4096: small noise multipliers find
    their best conversion there. Any order gives a valid bound; more orders give a tighter one.
    The large ones are whole numbers: Opacus sums a fractional order's subsampled RDP as a slow
    series (a third of the time of a sigma search at q < 1), a whole one in closed form."""
    from opacus.accountants import RDPAccountant

    return {"alphas": RDPAccountant.DEFAULT_ALPHAS + sorted({round(64 * 2 ** (i / 4)) for i in range(1, 25)})}


def _quiet(fn, kind: str, **kwargs):
    """Call Opacus with the wider orders. Its 'optimal order is the largest/smallest alpha' warning
    says only that the bound could be tighter (it is valid), and PRV's log(1 - q) at q = 1 is a
    handled infinity: neither is shown to the user."""
    import warnings

    extra = _rdp_orders() if kind == "rdp" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        # inf - inf in its log-sum of RDP terms: an order whose bound is infinite, which it skips
        warnings.filterwarnings("ignore", message="invalid value encountered in scalar subtract",
                                category=RuntimeWarning)
        return fn(**kwargs, **extra)


@lru_cache(maxsize=256)
def noise_for(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(_quiet(get_noise_multiplier, accountant, target_epsilon=epsilon, target_delta=delta,
                        sample_rate=q, steps=steps, accountant=accountant, epsilon_tolerance=0.005))


@lru_cache(maxsize=4096)
def _epsilon(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    if steps == 0:
        return 0.0
    if sigma == 0:
        return float("inf")
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    return float(_quiet(acc.get_epsilon, accountant, delta=delta))


def epsilon(mech: Mechanism, cfg, rounds_done: int) -> float:
    """Epsilon spent after `rounds_done` rounds (a function of the round count: nothing to save)."""
    return _epsilon(mech.noise_multiplier, sample_rate(cfg), _steps(cfg, rounds_done), mech.delta, mech.accountant)


# ---------------------------------------------------------------------------- the update


def sent_masks(layout: AdapterLayout, trained: Masks, trains_a: bool) -> State:
    """Per state key, 1 where a device sends (and so may change) a value, else 0."""
    out: State = {}
    for m in layout.modules:
        mask = trained[m.name]
        a = mask.a_cols.float()[None, :].expand(m.r, m.n_in)
        out[m.key_a] = a if trains_a else torch.zeros(m.r, m.n_in)
        out[m.key_b] = mask.b_rows.float()[:, None].expand(m.n_out, m.r)
    for key, shape in layout.head:
        out[key] = torch.ones(shape)
    return out


def clip(start: State, end: State, sent: State, clip_norm: float) -> tuple[State, float]:
    """`end` moved back towards `start` so that the update on the sent values has L2 norm at most
    C (values not sent stay as in `end`); also the update's norm before clipping."""
    norm = float(torch.sqrt(sum(((end[k] - start[k]) * sent[k]).double().pow(2).sum() for k in sent)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = dict(end)
    if scale < 1.0:
        for k, s in sent.items():
            out[k] = end[k] + (scale - 1.0) * (end[k] - start[k]) * s
    return out, norm


def gaussian(shapes: State, std: float, where: State, seed: int, stream: str, *ids: int) -> State:
    """N(0, std^2) on the coordinates where `where` > 0, from the named stream (the same values on
    every engine and machine: drawn on the CPU in the state's key order)."""
    g = torch_generator(seed, stream, *ids)
    out: State = {}
    for key in shapes:
        noise = torch.randn(shapes[key].shape, generator=g) * std
        out[key] = noise * (where[key] > 0)
    return out


def privatize_device(start: State, end: State, layout: AdapterLayout, trained: Masks, trains_a: bool,
                     cfg, round_: int, device: int) -> State:
    """The device's side: clip its update; under local DP, noise it too (only then does the
    device need sigma, and so the accountant)."""
    sent = sent_masks(layout, trained, trains_a)
    out, _ = clip(start, end, sent, cfg.privacy.clip_norm)
    if cfg.privacy.mode == "local":
        std = mechanism(cfg).std
        if std > 0:
            noise = gaussian(out, std, sent, cfg.seed, "dp-noise-device", round_, device)
            out = {k: out[k] + noise[k] for k in out}
    return out
