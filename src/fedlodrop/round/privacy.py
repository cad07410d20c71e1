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

from fedlodrop.errors import UserError
from fedlodrop.lora.adapter import AdapterLayout, State
from fedlodrop.lora.aggregation import RULES
from fedlodrop.lora.masks import Masks, device_masks
from fedlodrop.lora.variants import make_variant
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.round.records import PrivacySpent
from fedlodrop.round.sampling import seeded_participations

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
        """n draws in (0, 1]."""
        return self._uniform(n)

    def normal(self, n: int) -> np.ndarray:
        """n standard normal draws."""
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


def check(cfg) -> None:
    """Every combination client-level DP cannot protect as stated, refused with one line
    (ValueError; `fedlodrop.run.settings` turns it into the user's error)."""
    p = cfg.privacy
    if not p.dp:
        return
    if cfg.federation.weighting != "uniform":
        raise ValueError(
            f"privacy.dp needs federation.weighting uniform, not {cfg.federation.weighting!r}: a device's "
            "sample count would scale its sensitivity and travel in the clear"
        )
    rule = cfg.federation.aggregation
    if p.mode == "central" and not RULES[rule].from_sums:
        raise ValueError(
            f"privacy.mode central cannot protect federation.aggregation {rule!r}: its aggregate needs each "
            f"device's own update, not only their noised sum; use privacy.mode local, or one of: "
            f"{', '.join(RULES.where(lambda cls: cls.from_sums))}"
        )
    if p.mode == "central" and cfg.dropout.variant == "reset":
        raise ValueError(
            "privacy.mode central cannot protect dropout.variant 'reset': each device restarts its dropped "
            "slices from zero, which moves the sum by more than the clipped update and shows who took part; "
            "use dropout.variant update or subadapter, or privacy.mode local"
        )


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
        """sigma C: the noise's standard deviation."""
        return self.noise_multiplier * self.clip_norm

    @property
    def poisson(self) -> bool:
        """Central DP with a sampled round: participation drawn from OS entropy at rate q."""
        return self.mode == "central" and self.sample_rate < 1.0

    def sampling(self) -> str:
        """How devices take part, as every epsilon's record states it."""
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
    """Under local DP: how many of the first `rounds` rounds each device was drawn for by the
    seeded fixed-size draw (the server sees who sends, so nothing here is secret)."""
    return seeded_participations(cfg, rounds)


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
    """The smallest noise multiplier that spends at most `epsilon` at `delta` over `steps` compositions at
    sampling rate q (Opacus' search)."""
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
        out[m.key_a] = mask.a.float() if trains_a else torch.zeros(m.r, m.n_in)
        out[m.key_b] = mask.b.float()
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


# ---------------------------------------------------------------------------- the plug-in


class DifferentialPrivacy(RoundPlugin):
    """Client-level DP as a plug-in of the round (`round.plugin`): on the device, clip (and under
    local DP noise) the update and report nothing else; on the server, under central DP, draw who
    takes part (Poisson, when sampled), re-clip what came, and release the noised sum over fixed
    totals; on every round, the epsilon spent."""

    def __init__(self, cfg, mech: Mechanism):
        self.cfg, self.mech = cfg, mech

    @classmethod
    def from_config(cls, cfg) -> DifferentialPrivacy | None:
        """The plug-in `cfg` asks for, or None without privacy.dp."""
        mech = mechanism(cfg)
        return None if mech is None else cls(cfg, mech)

    @property
    def central(self) -> bool:
        """Central DP (the server noises the sum), not local."""
        return self.mech.mode == "central"

    # ------------------------------------------------------------------ the server's half
    def participants(self, round_: int) -> list[int] | None:
        """Central DP with sampling: each device joins with probability q, from OS entropy."""
        if self.mech.poisson:  # who takes part is secret: not the seed's
            return poisson_participants(self.cfg.federation.devices, self.mech.sample_rate, round_)
        return None

    def device_update(self, start: State, end: State, sent: State) -> State:
        """Central DP: the server's bound holds whatever a device sent, so it clips again."""
        return clip(start, end, sent, self.mech.clip_norm)[0] if self.central else end

    def aggregate(self, server, updates: list) -> tuple[State, dict] | None:
        """Central DP: the noised sum of the updates over fixed public totals, even of nobody (its
        noise is released)."""
        if not self.central:
            return None
        round_, layout, sent = server.state.rounds_done, server.layout, []
        variant = make_variant(self.cfg.dropout.variant)
        for k in range(self.cfg.federation.devices):  # every device's masks, taking part or not: public
            masks = device_masks(self.cfg, layout, server.rates[k], round_, k)
            sent.append(sent_masks(layout, variant.trained(masks, layout), server.rule.trains_a))
        totals = server.rule.fixed_totals(layout, sent, self.mech.sample_rate)
        noise = gaussian(totals, self.mech.std, noise_source("sum", round_))
        return server.rule.aggregate(layout, server.state.global_state, updates, torch.ones(len(updates)),
                                     noise, totals)

    def on_record(self, record, server) -> None:
        """The epsilon spent so far (and against someone who knows who took part), with the relation, sampling,
        accountant and noise source."""
        m = self.mech
        model, known = spent(m, server.state.rounds_done, server.state.participations)
        record.privacy = PrivacySpent(model, m.delta, m.noise_multiplier, m.clip_norm, m.mode, RELATION,
                                      m.sampling(), m.accountant, NOISE, known)

    def required_updates(self, configured: int) -> int:
        """Poisson rounds vary in size, even to nobody: such a round stands (its noise is released)."""
        return 0 if self.central and self.mech.poisson else configured

    # ------------------------------------------------------------------ the device's half
    def privatize(self, start: State, end: State, sent: State, round_: int, device: int) -> State:
        """Clip the update; under local DP, noise it too, from OS entropy."""
        out, _ = clip(start, end, sent, self.mech.clip_norm)
        if self.mech.mode == "local" and self.mech.std > 0:
            noise = gaussian(sent, self.mech.std, noise_source("device", round_, device))
            out = {k: out[k] + noise[k] for k in out}
        return out

    def reply(self, reply):
        """Under DP a device sends its update and nothing else."""
        return reply.private()
