"""SPEC 3: the latency and energy of one round over an FDMA uplink.

`SystemModel` is a system file (`fedlodrop.planning.spec.SystemSpec`) resolved to numpy arrays in
SI units (Hz, W, s, J, bits, cycles), which every solver uses; `system_model` builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fedlodrop.planning.spec import BoundSpec, SystemSpec, resolve_payload, system_from_dict

LN2 = math.log(2.0)
# The solvers work on limits shrunk by this relative margin, so that a returned plan meets the
# real limits even after floating-point rounding when someone recomputes them.
SAFETY_MARGIN = 1e-9


def channel_gains(spec: SystemSpec) -> np.ndarray:
    """h_k: given, or path loss at distance_m times a Rayleigh draw seeded by cell.seed."""
    cell = spec.cell
    rng = np.random.default_rng(cell.seed)
    draws = rng.exponential(1.0, size=len(spec.devices))
    gains = []
    for k, dev in enumerate(spec.devices):
        if dev.channel_gain is not None:
            gains.append(dev.channel_gain)
            continue
        d_km = max(dev.distance_m, cell.path_loss.min_distance_m) / 1000.0
        pl_db = cell.path_loss.intercept_db + cell.path_loss.slope_db * math.log10(d_km)
        if dev.fading is not None:
            fade = dev.fading
        elif cell.fading == "rayleigh":
            fade = max(float(draws[k]), cell.fading_floor)
        else:
            fade = 1.0
        gains.append(10 ** (-pl_db / 10) * fade)
    return np.asarray(gains, dtype=float)


@dataclass(frozen=True)
class SystemModel:
    """The system in SI units as arrays over devices; all SPEC 3 formulas live here."""

    names: list[str]
    D: np.ndarray  # samples
    h: np.ndarray  # channel power gains
    P: np.ndarray  # P_max [W]
    fmax: np.ndarray  # [Hz]
    E: np.ndarray  # energy budgets [J]
    T: float  # latency limit [s]
    tau: float
    c0: float  # backbone cycles per sample
    c1: float  # adapter cycles per sample (scaled by 1 - gamma)
    kappa: float
    Q: int
    head: int
    bits: float  # b, bits per value
    N0: float  # noise density [W/Hz]
    B_tot: float
    gamma_max: float
    dl_rate: np.ndarray | None  # downlink rate per device [bit/s], None when not modelled
    dl_extra_bits: float
    bound: BoundSpec = field(default_factory=BoundSpec)
    share: np.ndarray | None = None  # per device r_k / r: the part of Q (and of c1) its rank holds; None: all
    up_bits: float | None = None  # bits a value on the uplink; None: `bits`
    up_extra_bits: float = 0.0  # bits a device sends up every round besides the values

    @property
    def ub(self) -> float:
        """Bits a value on the uplink."""
        return self.bits if self.up_bits is None else self.up_bits

    @property
    def Qk(self) -> np.ndarray:
        """Each device's adapter values at gamma = 0: Q r_k / r."""
        return self.Q * (self.share if self.share is not None else np.ones(self.K))

    @property
    def c1k(self) -> np.ndarray:
        """Each device's adapter cycles per sample at gamma = 0: c1 r_k / r."""
        return self.c1 * (self.share if self.share is not None else np.ones(self.K))

    @property
    def K(self) -> int:
        """Devices."""
        return len(self.D)

    @property
    def N(self) -> float:
        """Training samples over all devices."""
        return float(self.D.sum())

    @property
    def w(self) -> np.ndarray:
        """Each device's weight in the bound: D_k / N."""
        return self.D / self.D.sum()

    def with_limits(self, latency_s: float | None = None, energy_scale: float | None = None) -> SystemModel:
        """A copy with another T_max or all energy budgets scaled (for trade-off sweeps)."""
        return replace(
            self,
            T=self.T if latency_s is None else float(latency_s),
            E=self.E if energy_scale is None else self.E * float(energy_scale),
        )

    # ---- per-device quantities; `k` indexes devices (array or slice), gamma broadcasts ----
    def uplink_bits(self, gamma, k=slice(None)):
        """S_k = (1 - gamma_k) Q_k b_up + S_head b_up + the extra (Q_k = Q r_k / r)."""
        return (1.0 - np.asarray(gamma)) * self.Qk[k] * self.ub + self.head * self.ub + self.up_extra_bits + 0.0 * self.D[k]

    def downlink_bits(self, gamma, k=slice(None)):
        """Bits a device downloads: its view and the head at b bits a value, plus the extra (a FedEx fold)."""
        return (1.0 - np.asarray(gamma)) * self.Qk[k] * self.bits + self.head * self.bits + self.dl_extra_bits + 0.0 * self.D[k]

    def cycles(self, gamma, k=slice(None)):
        """tau D_k c_k(gamma) with c_k(gamma) = c0 + (1 - gamma) c1 r_k / r."""
        return self.tau * self.D[k] * (self.c0 + (1.0 - np.asarray(gamma)) * self.c1k[k])

    def downlink_time(self, gamma, k=slice(None)):
        """Seconds a device's download takes (zero where the cell models no downlink)."""
        if self.dl_rate is None:
            return 0.0 * np.asarray(gamma) * self.D[k]
        return self.downlink_bits(gamma, k) / self.dl_rate[k]

    def rate(self, B, p, k=slice(None)):
        """R_k = B log2(1 + p h / (N0 B)) [bit/s]."""
        B = np.asarray(B, dtype=float)
        return B * np.log2(1.0 + np.asarray(p) * self.h[k] / (self.N0 * B))

    def latency_energy(self, gamma, B, p, f, k=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(T_dn + T_cmp + T_up, E_cmp + E_up) of SPEC 3's table."""
        W = self.cycles(gamma, k)
        t_up = self.uplink_bits(gamma, k) / self.rate(B, p, k)
        latency = self.downlink_time(gamma, k) + W / np.asarray(f) + t_up
        energy = self.kappa * W * np.asarray(f) ** 2 + np.asarray(p) * t_up
        return latency, energy


def system_model(spec: SystemSpec) -> SystemModel:
    """The system file resolved: payload sizes, cycles per sample, channel gains, noise, downlink rates."""
    pay = resolve_payload(spec)
    rnd = spec.round
    fpc = rnd.flops_per_cycle
    tokens = rnd.tokens_per_sample
    # FLOPs of one training sample ~ 6 x parameters x tokens; the head sees one token (CLS).
    c0 = rnd.cycles_per_sample
    if c0 is None:
        c0 = rnd.flops_per_param_token * (pay.backbone_params * tokens + pay.head_values) / fpc
    c1 = rnd.adapter_cycles_per_sample
    if c1 is None:
        c1 = rnd.flops_per_param_token * pay.adapter_values * tokens / fpc
    h = channel_gains(spec)
    N0 = 10 ** ((spec.cell.noise_dbm_per_hz - 30) / 10)
    dl_rate = None
    if spec.cell.downlink_bandwidth_hz is not None:
        # FDMA downlink: each device gets B_dn / K and P_s / K, so its SNR is P_s h / (N0 B_dn).
        bdn, ps, K = spec.cell.downlink_bandwidth_hz, spec.cell.server_power_w, len(spec.devices)
        dl_rate = (bdn / K) * np.log2(1.0 + ps * h / (N0 * bdn))
    return SystemModel(
        names=[d.name or f"dev{k}" for k, d in enumerate(spec.devices)],
        D=np.array([d.samples for d in spec.devices], dtype=float),
        h=h,
        P=np.array([d.p_max_w for d in spec.devices], dtype=float),
        fmax=np.array([d.f_max_hz for d in spec.devices], dtype=float),
        E=np.array([d.energy_budget_j for d in spec.devices], dtype=float),
        T=float(rnd.latency_s),
        tau=float(rnd.local_epochs),
        c0=float(c0),
        c1=float(c1),
        kappa=float(rnd.kappa),
        Q=pay.adapter_values,
        head=pay.head_values,
        bits=float(pay.bits_per_value),
        up_bits=float(pay.uplink_bits_per_value),
        up_extra_bits=float(pay.uplink_extra_bits),
        N0=float(N0),
        B_tot=float(spec.cell.bandwidth_hz),
        gamma_max=float(rnd.gamma_max),
        dl_rate=dl_rate,
        dl_extra_bits=float(spec.payload.downlink_extra_values * pay.bits_per_value),
        bound=spec.bound,
        share=(np.array([(d.rank or spec.payload.rank) / spec.payload.rank for d in spec.devices], dtype=float)
               if any(d.rank is not None for d in spec.devices) else None),
    )


def as_model(system: SystemSpec | SystemModel | dict) -> SystemModel:
    """A system model from a model, a spec, or a parsed tree."""
    if isinstance(system, SystemModel):
        return system
    if isinstance(system, dict):
        system = system_from_dict(system)
    return system_model(system)
