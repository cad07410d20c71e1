"""Client-level differential privacy (docs/privacy.md, docs/threat-model.md): the unit protected is
a device, and one neighbouring relation holds for every epsilon fedlodrop prints:

    two federations are neighbours when one has one more device, with all of its data
    ("add or remove one device"; a device that has no data sends no change)

A device's update is what it changed on the values it sends: its trained rows of B, columns of A
(if the rule trains A) and the head. Each device clips that update to L2 norm C; a non-finite
update (a diverged local phase) becomes no change, so nothing about the data decides whether a
reply counts. Devices report nothing else under DP: no sample count, loss, steps or timing.

* central: the server clips again, sums the updates of the devices in the round, adds
  N(0, (sigma C)^2) to every value any device of the federation could send, and divides by fixed
  public totals (`AggregationRule.fixed_totals`: q N, or q times the devices whose masks keep a
  value), never by who took part: adding or removing a device moves the released sum by at most
  C and nothing else. With `federation.devices_per_round` d < N each device takes part with
  probability q = d / N, independently, drawn from the operating system's entropy (Poisson
  sampling, what the accountant assumes); with d = N (or null) every device takes part.
* local: each device adds N(0, (sigma C)^2) to its own clipped update before it leaves; whatever
  the server computes from the noised updates is post-processing. The server sees who sent, so
  sampling amplifies nothing: a device spends in the rounds it took part in, at q = 1.

Noise (and central DP's participation draw) comes from `NoiseSource`: AES-256 in counter mode
keyed by 32 bytes of `os.urandom`, a fresh key for every draw, never the run's seed; a DP run is
therefore not bit-reproducible, and says so. Everything else (masks, data order) still follows
the seed.

The accountant is Opacus' PRV accountant by default (RDP on request), for the sampling used:
`rounds` compositions of the Poisson-subsampled Gaussian at q (central), or per device the rounds
it took part in at q = 1 (local). tests/test_privacy.py checks both against Google's dp-accounting.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedlodrop.adapter import AdapterLayout, State
from fedlodrop.errors import UserError
from fedlodrop.masks import Masks

RELATION = "add/remove one device"
PRV_MIN_SIGMA = 0.1  # below it Opacus' PRV accountant fails or takes minutes (epsilon > 90 a round anyway)
NOISE = "OS entropy (AES-256-CTR keyed by os.urandom), not reproducible"


# ---------------------------------------------------------------------------- randomness


class NoiseSource:
    """Uniform and Gaussian draws from AES-256 in counter mode, keyed by `key` (32 bytes of
    os.urandom unless given): a cryptographically secure stream nobody holding the run's seed,
    config or folder can regenerate. Gaussians by Box-Muller in float64 from 53-bit uniforms."""

    def __init__(self, key: bytes | None = None):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = os.urandom(32) if key is None else key
        self._stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    def _uniform(self, n: int) -> np.ndarray:
        """n draws in (0, 1], 53 random bits each."""
        raw = np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)
        return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53

    def uniform(self, n: int) -> np.ndarray:
        return self._uniform(n)

    def normal(self, n: int) -> np.ndarray:
        half = (n + 1) // 2
        u1, u2 = self._uniform(half), self._uniform(half)
        radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def noise_source(purpose: str, *ids: int) -> NoiseSource:
    """The source of one DP draw (`purpose` and `ids` name it: "sum", round; "device", round,
    device; "participants", round). Always fresh OS entropy: the names are for the tests, which
    swap this function for a seeded one to compare two engines draw for draw."""
    return NoiseSource()


def gaussian(where: State, std: float, source: NoiseSource) -> State:
    """N(0, std^2) on the coordinates where `where` > 0, zero elsewhere (drawn in key order)."""
    out: State = {}
    for key, mask in where.items():
        z = torch.from_numpy(source.normal(mask.numel())).reshape(mask.shape) * std
        out[key] = (z * (mask > 0)).float()
    return out


def poisson_participants(devices: int, q: float, round_: int) -> list[int]:
    """Each device takes part with probability q, independently, from OS entropy."""
    u = noise_source("participants", round_).uniform(devices)
    return [int(k) for k in np.flatnonzero(u <= q)]


# ---------------------------------------------------------------------------- the mechanism


@dataclass(frozen=True)
class Mechanism:
    """The run's Gaussian mechanism and what its accountant needs."""

    mode: str  # central | local
    clip_norm: float
    noise_multiplier: float  # sigma: noise std / clip_norm
    delta: float
    accountant: str  # prv | rdp
    sample_rate: float  # q: the chance a device takes part in a round (central); 1 under local DP

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    @property
    def poisson(self) -> bool:
        """Central DP with a sampled round: participation drawn from OS entropy at rate q."""
        return self.mode == "central" and self.sample_rate < 1.0

    def sampling(self) -> str:
        if self.mode == "local":
            return "local: each device's rounds at q = 1"
        return f"Poisson, q = {self.sample_rate:.4g}, from OS entropy" if self.poisson else "every device, q = 1"


def default_delta(devices: int) -> float:
    """min(1e-5, 0.1 / devices): well below 1 / (the number of units protected)."""
    return min(1e-5, 0.1 / devices)


def sample_rate(cfg) -> float:
    """q: the chance a device takes part in a round under central DP (1 under local DP)."""
    fed = cfg.federation
    if cfg.privacy.mode == "local" or fed.devices_per_round is None:
        return 1.0
    return min(1.0, fed.devices_per_round / fed.devices)


def mechanism(cfg) -> Mechanism | None:
    """The run's mechanism; with `target_epsilon`, sigma is the smallest that the accountant says
    spends at most that over all `federation.rounds` (a run stopped early spends less)."""
    p = cfg.privacy
    if not p.dp:
        return None
    delta = p.delta if p.delta is not None else default_delta(cfg.federation.devices)
    q = sample_rate(cfg)
    sigma = p.noise_multiplier
    if sigma is None:
        steps = cfg.federation.rounds if p.mode == "central" else max(local_participations(cfg, cfg.federation.rounds))
        sigma = noise_for(p.target_epsilon, delta, q, steps, p.accountant)
    if p.accountant == "prv" and 0 < sigma < PRV_MIN_SIGMA:
        raise UserError(f"privacy.accountant prv cannot account noise multiplier {sigma:.3g} (below {PRV_MIN_SIGMA}: "
                        "epsilon above 90 in a single round, where its numerics fail); use privacy.accountant rdp")
    return Mechanism(p.mode, p.clip_norm, float(sigma), delta, p.accountant, q)


def local_participations(cfg, rounds: int) -> list[int]:
    """Under local DP (and without DP): how many of the first `rounds` rounds each device was drawn
    for by the seeded fixed-size draw (the server sees who sends, so nothing here is secret)."""
    from fedlodrop.server import seeded_participants

    counts = [0] * cfg.federation.devices
    for r in range(rounds):
        for k in seeded_participants(cfg, r):
            counts[k] += 1
    return counts


# ---------------------------------------------------------------------------- the accountant


def _rdp_orders() -> dict:
    """Opacus' RDP orders (1.1 ... 63) and larger whole ones up to 4096: small noise multipliers
    find their best conversion there (any order is a valid bound; more give a tighter one)."""
    from opacus.accountants import RDPAccountant

    return {"alphas": RDPAccountant.DEFAULT_ALPHAS + sorted({round(64 * 2 ** (i / 4)) for i in range(1, 25)})}


def _quiet(fn, kind: str, **kwargs):
    """Call Opacus (RDP with the wider orders). Its 'optimal order is the largest/smallest alpha'
    warning says only that the bound could be tighter, PRV's log(1 - q) at q = 1 is a handled
    infinity, and RDP's inf - inf marks an order it skips: none is shown to the user."""
    import warnings

    extra = _rdp_orders() if kind == "rdp" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="invalid value encountered in scalar subtract",
                                category=RuntimeWarning)
        return fn(**kwargs, **extra)


@lru_cache(maxsize=256)
def noise_for(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(_quiet(get_noise_multiplier, accountant, target_epsilon=epsilon, target_delta=delta,
                        sample_rate=q, steps=max(1, steps), accountant=accountant, epsilon_tolerance=0.005))


@lru_cache(maxsize=4096)
def epsilon_of(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon of `steps` compositions of the (Poisson-subsampled at q < 1) Gaussian mechanism with
    noise multiplier sigma, add/remove neighbours, at `delta`."""
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    return float(_quiet(acc.get_epsilon, accountant, delta=delta))


def spent(mech: Mechanism, rounds_done: int, participations: list[int]) -> tuple[float, float | None]:
    """(epsilon against anyone who sees the models, epsilon against someone who also knows who took
    part in each round, or None where that is the same) after `rounds_done` rounds; `participations`:
    the rounds each device took part in."""
    busiest = max(participations, default=0)
    if mech.mode == "local":
        return epsilon_of(mech.noise_multiplier, 1.0, busiest, mech.delta, mech.accountant), None
    model = epsilon_of(mech.noise_multiplier, mech.sample_rate, rounds_done, mech.delta, mech.accountant)
    if not mech.poisson:
        return model, None
    return model, epsilon_of(mech.noise_multiplier, 1.0, busiest, mech.delta, mech.accountant)


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
    C (values not sent stay as in `end`); also the update's norm before clipping. A non-finite
    update becomes no change (norm inf): whether it counts may not depend on the data."""
    norm = float(torch.sqrt(sum(((end[k] - start[k]) * sent[k]).double().pow(2).sum() for k in sent)))
    if not math.isfinite(norm):
        out = dict(end)
        for k, s in sent.items():
            out[k] = torch.where(s > 0, start[k], end[k])
        return out, math.inf
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = dict(end)
    if scale < 1.0:
        for k, s in sent.items():
            out[k] = end[k] + (scale - 1.0) * (end[k] - start[k]) * s
    return out, norm


def privatize_device(start: State, end: State, layout: AdapterLayout, trained: Masks, trains_a: bool,
                     mech: Mechanism, round_: int, device: int) -> State:
    """The device's side: clip its update; under local DP, noise it too, from OS entropy."""
    sent = sent_masks(layout, trained, trains_a)
    out, _ = clip(start, end, sent, mech.clip_norm)
    if mech.mode == "local" and mech.std > 0:
        noise = gaussian(sent, mech.std, noise_source("device", round_, device))
        out = {k: out[k] + noise[k] for k in out}
    return out
