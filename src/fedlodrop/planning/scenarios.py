"""Realistic random systems (`fedlodrop system random`): devices in a cell, random budgets, and a
latency limit placed where the dropout rates matter.
"""

from __future__ import annotations

import numpy as np

from fedlodrop.errors import UserError
from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import min_latency_limit
from fedlodrop.planning.spec import CellSpec, DeviceSpec, PayloadSpec, RoundSpec, SystemSpec
from fedlodrop.planning.system import system_model


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def split_samples(shares: np.ndarray, total: int) -> np.ndarray:
    """`total` samples in the given shares, each device at least one, summing to exactly `total`
    (largest remainder): rounding each share alone can plan 299 samples for a run that trains 300."""
    k = len(shares)
    if total < k:
        raise UserError(f"{total} training samples cannot give each of {k} devices one")
    exact = 1 + shares / shares.sum() * (total - k)
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: total - int(sizes.sum())]:
        sizes[i] += 1
    return sizes


def random_system(
    devices: int,
    seed: int = 0,
    *,
    model: str = "roberta-large",
    samples_total: int = 6000,
    bandwidth_hz: float = 10e6,
    local_epochs: float = 1.0,
    energy_range: tuple[float, float] = (0.6, 1.3),
    latency_s: float | None = None,
    latency_position: float = 0.5,
    payload: PayloadSpec | None = None,
    samples: list[int] | None = None,
    concentration: float = 4.0,
) -> SystemSpec:
    """K devices uniform in the cell, Rayleigh fading, samples split by a Dirichlet(`concentration`) draw
    (4 by default; smaller spreads the data sizes further).

    Energy budgets are a random factor in `energy_range` times what the device spends computing
    at f_max and uploading at P_max over an equal share of the band, so budgets below 1 force a
    device to slow down. Unless `latency_s` is given, T_max sits at `latency_position` between
    the smallest limit feasible at gamma_max and the one at which the unconstrained optimum
    rate (the same for all devices) fits: the weakest devices then need higher rates. `payload`
    replaces the model's default payload (e.g. the Q, head size and bits a training run really
    sends), before budgets and limit are placed; `samples` gives each device's sample count D_k
    (a run's own partition) instead of the Dirichlet draw.
    """
    if devices < 1:
        raise UserError(f"--devices must be at least 1 (got {devices})")
    rng = np.random.default_rng(seed)
    radius = CellSpec().radius_m
    dist = np.maximum(radius * np.sqrt(rng.uniform(size=devices)), 20.0)
    shares = rng.dirichlet(np.full(devices, concentration))  # drawn either way: the same positions and budgets draws
    if samples is not None:
        if len(samples) != devices or min(samples) < 1:
            raise UserError(f"samples {samples} do not give each of {devices} devices at least one")
        samples = np.asarray(samples, dtype=int)
    else:
        samples = split_samples(shares, samples_total)
    factors = rng.uniform(*energy_range, size=devices)
    devs = [
        DeviceSpec(name=f"dev{k}", samples=int(samples[k]), distance_m=_sig(dist[k]), energy_budget_j=1.0)
        for k in range(devices)
    ]
    spec = SystemSpec(
        devices=devs,
        cell=CellSpec(bandwidth_hz=bandwidth_hz, seed=seed),
        round=RoundSpec(latency_s=1.0, local_epochs=local_epochs),
        payload=payload or PayloadSpec(model=model),
    )
    m = system_model(spec)
    ks = np.arange(devices)
    e_full = m.kappa * m.cycles(0.0, ks) * m.fmax**2
    e_full += m.P * m.uplink_bits(0.0, ks) / m.rate(m.B_tot / devices, m.P, ks)
    for k, dev in enumerate(spec.devices):
        dev.energy_budget_j = _sig(factors[k] * e_full[k])
    if latency_s is None:
        m = system_model(spec)
        g_free = Bound.of(m).best_common(0.0, m.gamma_max)
        t_lo = min_latency_limit(m, m.gamma_max)
        t_hi = min_latency_limit(m, g_free)
        latency_s = _sig(t_lo + latency_position * (t_hi - t_lo), 5)
        if latency_s <= t_lo:
            latency_s = _sig(t_lo * 1.0001, 6)
    spec.round.latency_s = float(latency_s)
    return spec
