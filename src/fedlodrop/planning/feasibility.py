"""Per-device feasibility for given rates: the minimal bandwidth, p_k and f_k, and the binding limit.

For a fixed gamma_k and bandwidth B_k a device has one free choice, how to split T_max between
computing (t_c, so f = W / t_c) and uploading (t_u = T' - t_c, T' = T_max - T_dn). Both energies
fall as their time grows: E_cmp = kappa W^3 / t_c^2 and E_up(t_u) = t_u (N0 B / h)(2^(S/(B t_u)) - 1)
are convex, so the energy-minimal split is a 1-D convex problem (bisection on the derivative).

The minimal bandwidth beta_k(gamma) swaps the two minimisations: for a split t_c the smallest B
that delivers S bits in t_u with power p_eff = min(P_max, (E - E_cmp(t_c)) / t_u) has a closed
form (Lambert W), and it is quasiconvex in t_c (its sublevel sets are intervals), so a golden
section search finds beta exactly. beta_k is decreasing in gamma_k, which B&B exploits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import lambertw

from fedlodrop.errors import UserError
from fedlodrop.planning.system import LN2, SAFETY_MARGIN, SystemModel

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class InfeasibleError(UserError):
    """No rates in [0, gamma_max] meet the limits; names the device and the binding constraint."""

    def __init__(self, message: str, device: int | None, constraint: str):
        super().__init__(message)
        self.device = device
        self.constraint = constraint


# ------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------


def bandwidth_for_rate(a, R):
    """Smallest B with B log2(1 + a / B) >= R, where a = p h / N0 [Hz] and R [bit/s].

    With x = a / B the condition is ln(1 + x) / x = c, c = R ln2 / a, whose positive root is
    x = y - 1, y = -W_{-1}(-c e^{-c}) / c; a few Newton steps polish it. c >= 1: no finite B.
    """
    a, R = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(R, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _bandwidth_for_rate(a, R)


def _bandwidth_for_rate(a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """bandwidth_for_rate without argument checks (hot path; caller sets np.errstate)."""
    c = R * LN2 / a
    ok = (c > 0) & (c < 1)
    cc = np.where(ok, c, 0.5)
    np.clip(cc, 1e-300, 1 - 1e-16, out=cc)
    x = -lambertw(-cc * np.exp(-cc), -1).real / cc - 1.0
    bad = ~(x > 0)
    if bad.any():  # next to c = 1 the branch point loses precision: series root
        x[bad] = 2.0 * (1.0 - cc[bad])
    for _ in range(2):  # Newton on ln(1+x) - c x, decreasing through its positive root
        dfx = 1.0 / (1.0 + x) - cc
        step = (np.log1p(x) - cc * x) / dfx
        x = np.where((dfx < 0) & (x - step > 0), x - step, x)
    return np.where(ok, a / x, np.where(R <= 0, 0.0, np.inf))


def uplink_energy(m: SystemModel, k, S, B, tu):
    """E_up = p t_u with the power p that sends S bits in t_u over B."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x = S / (B * tu)
        return tu * (m.N0 * B / m.h[k]) * np.expm1(np.minimum(x * LN2, 700.0))


def _limits(m: SystemModel, k, gamma):
    """S, W, T' (time left after the downlink) and E, with the safety margin applied."""
    gamma = np.asarray(gamma, dtype=float)
    S = m.uplink_bits(gamma, k)
    W = m.cycles(gamma, k)
    Tp = m.T * (1.0 - SAFETY_MARGIN) - m.downlink_time(gamma, k)
    E = m.E[k] * (1.0 - SAFETY_MARGIN)
    return S, W, Tp, E


# ------------------------------------------------------------------------------------------
# minimal bandwidth beta_k(gamma)
# ------------------------------------------------------------------------------------------


def _bandwidth_at_split(m: SystemModel, k, S, W, Tp, E, tc):
    """Least B for the split t_c (hot path; caller sets np.errstate)."""
    tu = Tp - tc
    e_avail = E - m.kappa * W**3 / tc**2
    p_eff = np.minimum(m.P[k], e_avail / tu)
    B = _bandwidth_for_rate(np.maximum(p_eff, 0.0) * m.h[k] / m.N0, S / tu)
    return np.where((tu > 0) & (e_avail > 0), B, np.inf)


_ITERATIONS = 48


def min_bandwidth(m: SystemModel, k, gamma, iterations: int = _ITERATIONS) -> np.ndarray:
    """beta_k(gamma): least bandwidth with which device k meets latency and energy (inf: none).

    `k` (device indices) and `gamma` broadcast against each other, so one call evaluates any
    set of (device, rate) pairs.
    """
    k, gamma = np.broadcast_arrays(np.asarray(k), np.asarray(gamma, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _min_bandwidth(m, k, gamma, iterations)


def _min_bandwidth(m: SystemModel, k, gamma, iterations: int, enough: float | None = None) -> np.ndarray:
    """The golden-section search. With `enough`, it stops once the betas found so far sum to at most
    `enough`: the search only lowers each beta (min(f1, f2) is the least value seen), so the full
    search's sum would be at most `enough` too, and a feasibility test gets the same answer."""
    S, W, Tp, E = _limits(m, k, gamma)
    e_min_up = S * m.N0 * LN2 / m.h[k]  # uplink energy with infinite bandwidth
    t_lo = W / m.fmax[k]
    t_hi = Tp - e_min_up / m.P[k]
    t_e = np.where(E > e_min_up, np.sqrt(m.kappa * W**3 / np.maximum(E - e_min_up, 1e-300)), np.inf)
    lo = np.maximum(t_lo, t_e * (1 + 1e-12))
    hi = t_hi * (1 - 1e-12)
    empty = ~(lo < hi)
    hi = np.where(empty, lo + 1.0, hi)
    h_k, P_k = m.h[k], m.P[k]
    kW3 = m.kappa * W**3
    scale = h_k / m.N0

    def f(tc):
        tu = Tp - tc
        e_avail = E - kW3 / tc**2
        p_eff = np.minimum(P_k, e_avail / tu)
        B = _bandwidth_for_rate(np.maximum(p_eff, 0.0) * scale, S / tu)
        return np.where((tu > 0) & (e_avail > 0), B, np.inf)

    best = f(lo)
    x1 = hi - _GOLDEN * (hi - lo)
    x2 = lo + _GOLDEN * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iterations):
        left = f1 <= f2  # the minimum lies in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        new_x = np.where(left, hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo))
        f_new = f(new_x)
        x2, f2, x1, f1 = (
            np.where(left, x1, new_x), np.where(left, f1, f_new),
            np.where(left, new_x, x2), np.where(left, f_new, f2),
        )
        if enough is not None and np.where(empty, np.inf, np.minimum(best, np.minimum(f1, f2))).sum() <= enough:
            break
    best = np.minimum(best, np.minimum(f1, f2))
    return np.where(empty, np.inf, best)


# ------------------------------------------------------------------------------------------
# energy-minimal allocation for given gamma and B
# ------------------------------------------------------------------------------------------


@dataclass
class Allocation:
    """p_k, f_k and the time split for given (gamma_k, B_k); feasible[k] says whether it fits."""

    power: np.ndarray
    frequency: np.ndarray
    t_compute: np.ndarray
    t_upload: np.ndarray
    energy: np.ndarray
    feasible: np.ndarray
    limit: np.ndarray  # "", "latency" or "energy": what fails when infeasible


def allocate(m: SystemModel, k, gamma, B, iterations: int = 100) -> Allocation:
    """The energy-minimal (p, f) that meets T_max with bandwidth B (full time is always used)."""
    k, gamma, B = np.broadcast_arrays(np.asarray(k), np.asarray(gamma, dtype=float), np.asarray(B, float))
    S, W, Tp, E = _limits(m, k, gamma)
    tu_min = S / m.rate(B, m.P[k], k)
    tc_lo = W / m.fmax[k]
    tc_hi = Tp - tu_min
    # limits already carry SAFETY_MARGIN; the 1e-12 absorbs rounding of a B at exactly beta_k
    lat_ok = tc_lo <= tc_hi + 1e-12 * Tp
    hi0 = np.where(lat_ok, np.maximum(tc_hi, tc_lo), tc_lo)

    def dphi(tc):  # derivative of E_cmp(tc) + E_up(T' - tc), increasing in tc
        tu = Tp - tc
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = np.minimum(S / (B * tu) * LN2, 700.0)
            dEu = (m.N0 * B / m.h[k]) * (np.exp(x) * (1.0 - x) - 1.0)
        return -2.0 * m.kappa * W**3 / tc**3 - dEu

    lo, hi = tc_lo.copy(), hi0.copy()
    d_lo, d_hi = dphi(lo), dphi(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        neg = dphi(mid) < 0
        lo = np.where(neg, mid, lo)
        hi = np.where(neg, hi, mid)
    tc = np.where(d_lo >= 0, tc_lo, np.where(d_hi <= 0, hi0, 0.5 * (lo + hi)))
    tu = Tp - tc
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        p = (m.N0 * B / m.h[k]) * np.expm1(np.minimum(S / (B * tu) * LN2, 700.0))
    p = np.minimum(p, m.P[k])
    energy = m.kappa * W**3 / tc**2 + uplink_energy(m, k, S, B, tu)
    en_ok = energy <= E * (1 + 1e-12)
    feasible = lat_ok & en_ok
    limit = np.where(~lat_ok, "latency", np.where(~en_ok, "energy", ""))
    f = np.minimum(W / tc, m.fmax[k])  # t_c = W / f_max can round f a hair above f_max
    return Allocation(p, f, tc, tu, energy, feasible, limit)


def min_bandwidth_bisect(m: SystemModel, k, gamma, iterations: int = 200) -> np.ndarray:
    """beta_k(gamma) by plain bisection on B with the convex energy check (slow; for tests)."""
    k, gamma = np.broadcast_arrays(np.asarray(k), np.asarray(gamma, dtype=float))
    lo = np.full(gamma.shape, 1.0)
    hi = np.full(gamma.shape, 1e15)
    ok_hi = allocate(m, k, gamma, hi).feasible
    for _ in range(iterations):
        mid = np.sqrt(lo * hi)
        ok = allocate(m, k, gamma, mid).feasible
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return np.where(ok_hi, hi, np.inf)


# ------------------------------------------------------------------------------------------
# rates, the whole system, and reasons for infeasibility
# ------------------------------------------------------------------------------------------


def multisection(pred, lo, hi, points: int = 16, rounds: int = 12):
    """Smallest x in [lo, hi] with pred(x) true, for predicates monotone (false ... true) in x.

    Many searches run at once (lo, hi are arrays) and each round tests `points` inner points,
    so a 1e-13 resolution costs a dozen batched calls instead of forty sequential ones.
    pred maps an array (searches, points) to booleans; the caller knows pred(hi) holds.
    """
    lo = np.array(lo, dtype=float, ndmin=1)
    hi = np.array(hi, dtype=float, ndmin=1)
    frac = np.arange(1, points + 1) / (points + 1)
    for _ in range(rounds):
        X = lo[:, None] + (hi - lo)[:, None] * frac[None, :]
        ok = pred(X)
        first = np.argmax(ok, axis=1)
        anyok = ok.any(axis=1)
        rows = np.arange(len(lo))
        new_hi = np.where(anyok, X[rows, first], hi)
        new_lo = np.where(anyok, np.where(first > 0, X[rows, np.maximum(first - 1, 0)], lo), X[:, -1])
        lo, hi = new_lo, new_hi
        if np.all(hi - lo <= 1e-14 * np.maximum(1.0, np.abs(hi))):
            break
    return hi


def gamma_lower(m: SystemModel, budget, k=None) -> np.ndarray:
    """Smallest gamma_k in [0, gamma_max] with beta_k(gamma_k) <= budget_k (nan: none)."""
    k = np.arange(m.K) if k is None else np.asarray(k)
    budget = np.broadcast_to(np.asarray(budget, dtype=float), k.shape)
    ok0 = min_bandwidth(m, k, 0.0) <= budget
    okmax = min_bandwidth(m, k, m.gamma_max) <= budget
    search = np.flatnonzero(~ok0 & okmax)
    out = np.where(ok0, 0.0, np.where(okmax, m.gamma_max, np.nan))
    if len(search):
        kk, bb = k[search][:, None], budget[search][:, None]
        out[search] = multisection(
            lambda X: min_bandwidth(m, np.broadcast_to(kk, X.shape), X) <= bb,
            np.zeros(len(search)), np.full(len(search), m.gamma_max),
        )
    return out


def smallest_common_gamma(m: SystemModel) -> float:
    """Smallest gamma shared by all devices with sum_k beta_k(gamma) <= B_tot (nan: none)."""
    ks = np.arange(m.K)

    def pred(X):  # X: (1, n) candidate common rates
        beta = min_bandwidth(m, ks[:, None], X[0][None, :])
        return (beta.sum(axis=0) <= m.B_tot)[None, :]

    if pred(np.array([[0.0]]))[0, 0]:
        return 0.0
    if not pred(np.array([[m.gamma_max]]))[0, 0]:
        return math.nan
    return float(multisection(pred, [0.0], [m.gamma_max])[0])


def radial_fit(m: SystemModel, x: np.ndarray, top: np.ndarray) -> np.ndarray | None:
    """The feasible point nearest x on the segment x -> top (feasibility is monotone along it)."""
    ks = np.arange(m.K)

    def pred(X):  # X: (1, n) positions t on the segment
        pts = x[:, None] + X[0][None, :] * (top - x)[:, None]
        return (min_bandwidth(m, ks[:, None], pts).sum(axis=0) <= m.B_tot)[None, :]

    if pred(np.array([[0.0]]))[0, 0]:
        return x.copy()
    if not pred(np.array([[1.0]]))[0, 0]:
        return None
    t = float(multisection(pred, [0.0], [1.0], points=24, rounds=4)[0])
    return x + t * (top - x)


def device_reason(m: SystemModel, k: int, gamma: float, B: float) -> str:
    """A sentence on why device k cannot meet its limits at this gamma with bandwidth B."""
    S, W, Tp, E = (float(np.asarray(v)) for v in _limits(m, k, gamma))
    name = f"device {k} ({m.names[k]})"
    at = f"even at gamma_max = {gamma:.3g}" if gamma >= m.gamma_max else f"at gamma = {gamma:.3g}"
    t_cmp = W / m.fmax[k]
    t_up = S / float(m.rate(B, m.P[k], k))
    dl = float(m.downlink_time(gamma, k))
    if t_cmp + t_up > Tp:
        dl_txt = f" + downlink {dl:.3g} s" if dl > 0 else ""
        return (f"{name} cannot meet the latency limit round.latency_s = {m.T:.4g} s {at} "
                f"with {B / 1e6:.4g} MHz, p_max and f_max: it needs {t_cmp + t_up + dl:.4g} s "
                f"(compute {t_cmp:.4g} s + upload {t_up:.4g} s{dl_txt}); binding constraint: latency")
    alloc = allocate(m, k, gamma, B)
    return (f"{name} cannot meet its energy budget energy_budget_j = {m.E[k]:.4g} J {at} "
            f"with {B / 1e6:.4g} MHz: within T_max = {m.T:.4g} s it needs at least "
            f"{float(alloc.energy):.4g} J; binding constraint: energy")


def check_feasible(m: SystemModel, gamma=None) -> np.ndarray:
    """Raise InfeasibleError unless the rates (default: gamma_max everywhere) fit; return beta.

    A device that cannot fit even with the whole band is named with its binding constraint
    (latency or energy); otherwise, if the band is too small, the constraint is `bandwidth`.
    """
    g = np.full(m.K, m.gamma_max) if gamma is None else np.broadcast_to(np.asarray(gamma, float), (m.K,))
    beta = min_bandwidth(m, np.arange(m.K), g)
    for k in np.flatnonzero(beta > m.B_tot):
        raise InfeasibleError(device_reason(m, int(k), float(g[k]), m.B_tot), int(k), _constraint(m, int(k), g[k]))
    total = float(beta.sum())
    if total > m.B_tot:
        k = int(np.argmax(beta))
        raise InfeasibleError(
            f"the band is too small: at the given rates the devices need {total / 1e6:.4g} MHz in total "
            f"but cell.bandwidth_hz is {m.B_tot / 1e6:.4g} MHz (largest need: device {k} ({m.names[k]}), "
            f"{beta[k] / 1e6:.4g} MHz); binding constraint: bandwidth",
            k,
            "bandwidth",
        )
    return beta


def _constraint(m: SystemModel, k: int, gamma: float) -> str:
    S, W, Tp, _ = (float(np.asarray(v)) for v in _limits(m, k, gamma))
    t_up = S / float(m.rate(m.B_tot, m.P[k], k))
    return "latency" if W / m.fmax[k] + t_up > Tp else "energy"


def system_feasible(m: SystemModel, gamma) -> bool:
    """Whether the rates fit: every beta_k finite and sum_k beta_k <= B_tot."""
    g = np.broadcast_to(np.asarray(gamma, float), (m.K,))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        beta = _min_bandwidth(m, np.arange(m.K), g, _ITERATIONS, enough=m.B_tot)
    return bool(beta.sum() <= m.B_tot)


def _smallest_fitting(fits: Callable[[float], bool], start: float, rel_tol: float, cap: float = 1e9) -> float:
    """Smallest x > 0 with fits(x), for fits monotone (false ... true) in x: double from `start`
    until it fits (inf once past `cap`), then bisect to a relative `rel_tol`."""
    lo, hi = 0.0, start
    while not fits(hi):
        lo, hi = hi, 2.0 * hi
        if hi > cap:
            return math.inf
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def min_latency_limit(m: SystemModel, gamma, rel_tol: float = 1e-6) -> float:
    """Smallest T_max at which the rates `gamma` fit (feasibility is monotone in T_max)."""
    fits = lambda T: system_feasible(m.with_limits(latency_s=T), gamma)  # noqa: E731
    return _smallest_fitting(fits, max(m.T, 1e-3), rel_tol)


def energy_free_scale(m: SystemModel) -> float:
    """A factor on every energy budget at and above which energy never binds.

    Within T_max a device spends at most kappa W f_max^2 computing (W at gamma = 0) and
    P_max T_max uploading, so with budgets that large only latency and bandwidth limit it.
    """
    worst = m.kappa * m.cycles(0.0, slice(None)) * m.fmax**2 + m.P * m.T
    return 2.0 * float(np.max(worst / m.E))


def min_energy_scale(m: SystemModel, gamma, rel_tol: float = 1e-6) -> float:
    """Smallest factor on every energy budget at which the rates `gamma` fit."""
    fits = lambda s: system_feasible(m.with_limits(energy_scale=s), gamma)  # noqa: E731
    return _smallest_fitting(fits, 1.0, rel_tol)
