"""SPEC 5's baselines, each with optimised resources: one shared rate, equal bandwidth, no dropout.

All three reduce to 1-D problems on the exact per-device functions, so they are solved exactly
(bisection), with no convex solver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import (
    InfeasibleError,
    check_feasible,
    device_reason,
    gamma_lower,
    min_bandwidth,
    smallest_common_gamma,
)
from fedlodrop.planning.plan import SolverStats
from fedlodrop.planning.system import SystemModel


@dataclass
class BaselineResult:
    """A baseline's rates, its bound value, and how it was found."""
    gamma: np.ndarray
    objective: float
    stats: SolverStats
    bandwidth: np.ndarray | None = None  # fixed bandwidth split (equal-bandwidth), else None


def _done(m: SystemModel, gamma: np.ndarray, t0: float, bandwidth=None, **extra) -> BaselineResult:
    stats = SolverStats(seconds=time.perf_counter() - t0, status="optimal", **extra)
    return BaselineResult(gamma, float(Bound.of(m).value(gamma)), stats, bandwidth)


def solve_fixed(m: SystemModel, gamma: float | str = "min") -> BaselineResult:
    """One rate for every device.

    "min" (default): the smallest shared rate that fits; "best": the shared rate that minimises
    G among the feasible ones (G is convex along the diagonal and feasibility monotone, so it is
    max(smallest feasible, unconstrained optimum)); a number: that rate (infeasible: an error).
    """
    t0 = time.perf_counter()
    if isinstance(gamma, str) and gamma not in ("best", "min"):
        raise ValueError(f"--gamma must be best, min or a number in [0, {m.gamma_max}] (got {gamma!r})")
    if not isinstance(gamma, str):
        g = float(gamma)
        if not 0.0 <= g <= m.gamma_max:
            raise InfeasibleError(f"--gamma {g} lies outside [0, round.gamma_max = {m.gamma_max}]", None, "gamma_max")
        check_feasible(m, np.full(m.K, g))
        return _done(m, np.full(m.K, g), t0, smallest_feasible=None)
    check_feasible(m)
    g_min = smallest_common_gamma(m)
    if gamma == "min":
        return _done(m, np.full(m.K, g_min), t0, smallest_feasible=g_min)
    g = max(g_min, Bound.of(m).best_common(0.0, m.gamma_max))
    return _done(m, np.full(m.K, g), t0, smallest_feasible=g_min)


def solve_equal_bandwidth(m: SystemModel) -> BaselineResult:
    """B_k = B_tot / K; then each device's smallest feasible rate bounds it from below and the
    convex G is minimised over that box exactly."""
    t0 = time.perf_counter()
    check_feasible(m)  # a device that fails even with the whole band is named as such first
    share = m.B_tot / m.K
    lo = gamma_lower(m, np.full(m.K, share))
    bad = np.flatnonzero(np.isnan(lo))
    if len(bad):
        k = int(bad[0])
        reason = device_reason(m, k, m.gamma_max, share)
        constraint = "latency" if "binding constraint: latency" in reason else "energy"
        raise InfeasibleError(f"with equal bandwidth shares: {reason}", k, constraint)
    g = Bound.of(m).minimise_box(lo, np.full(m.K, m.gamma_max))
    # the bisection's resolution may leave g a hair below the true lower limit: nudge up
    while np.any(min_bandwidth(m, np.arange(m.K), g) > share):
        g = np.minimum(g + 1e-12 + 1e-9 * g, m.gamma_max)
    return _done(m, g, t0, np.full(m.K, share))


def solve_none(m: SystemModel) -> BaselineResult:
    """No dropout (gamma = 0); infeasible is reported with the device and constraint."""
    t0 = time.perf_counter()
    g = np.zeros(m.K)
    check_feasible(m, g)
    return _done(m, g, t0)
