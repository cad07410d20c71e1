"""SPEC 5, P-SCA: penalised successive convex approximation of P1 (fast, locally optimal).

Variables per device (scaled: MHz, Mbit, Gcycles, s, J): gamma, B, the compute time t_c
(f = W / t_c), the upload time t_u, the compute energy E_c, the upload energy e = p t_u, and the
time-bandwidth product y = B t_u. In these variables SPEC 3's constraints are convex except one:

    t_c + t_u + T_dn(gamma) <= T_max,   W(gamma) <= f_max t_c,   E_c >= kappa W(gamma)^3 / t_c^2,
    E_c + e <= E_max,   e <= P_max t_u,   sum B <= B_tot,   0 <= gamma <= gamma_max,
    S(gamma) <= y log2(1 + e h / (N0 y))        (the rate: a perspective, jointly concave)
    y <= B t_u                                   (not convex)

The last is sqrt(y) <= sqrt(B t_u) (a second-order cone on the right); the concave sqrt(y) is
linearised at the current y0 (an upper bound, so the surrogate is an inner approximation, tight
at y0), scaled by 1 / sqrt(y0) so the slack is relative, and gets a slack with penalty
rho * sum(slack), rho grown every iteration, so any start works. This is SPEC's "linearise the
rate": the rate's only non-convexity, the product B t_u, is what gets linearised.
G(gamma) is convex (bound.py), so it enters exactly; linearising it, as SPEC suggests, would make
the surrogate a lower model and break the descent property. One parametrised (DPP) CVXPY problem
is compiled once and re-solved with new parameters each iteration.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from fedlodrop.errors import UserError
from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import allocate, check_feasible, gamma_lower, min_bandwidth, radial_fit
from fedlodrop.planning.plan import SolverStats
from fedlodrop.planning.system import LN2, SAFETY_MARGIN, SystemModel


class SolverFailedError(UserError):
    """P-SCA's convex solvers found no solution of a surrogate: there are no P-SCA rates to give.

    Falling back to some other rates (gamma_max) would hand back a plan that was not asked for.
    """


@dataclass
class PscaResult:
    """P-SCA's rates, its bound value and its iterations."""
    gamma: np.ndarray
    objective: float
    stats: SolverStats


class _Surrogate:
    """The parametrised convex surrogate for one system."""

    def __init__(self, m: SystemModel, fixed_bandwidth: np.ndarray | None = None):
        K = m.K
        bnd = m.bound
        w = m.w
        self.m = m
        bits = m.bits
        self.S0 = ((m.Qk + m.head) * m.ub + m.up_extra_bits) / 1e6  # uplink Mbit at gamma = 0, per device (its rank's Q)
        self.S1 = m.Qk * m.ub / 1e6
        self.W0 = m.tau * m.D * (m.c0 + m.c1k) / 1e9  # Gcycles at gamma = 0
        self.W1 = m.tau * m.D * m.c1k / 1e9
        a = m.h / (m.N0 * 1e6)  # received SNR per joule per (MHz s)
        kappa = m.kappa * 1e27
        T = m.T * (1 - SAFETY_MARGIN)
        E = m.E * (1 - SAFETY_MARGIN)

        self.g = cp.Variable(K, nonneg=True)
        self.B = cp.Variable(K, nonneg=True)
        self.tc = cp.Variable(K, nonneg=True)
        self.tu = cp.Variable(K, nonneg=True)
        self.Ec = cp.Variable(K, nonneg=True)
        self.e = cp.Variable(K, nonneg=True)
        self.y = cp.Variable(K, nonneg=True)
        self.slack = cp.Variable(K, nonneg=True)
        self.root = cp.Variable(K, nonneg=True)  # <= sqrt(B t_u)
        self.inv_y0 = cp.Parameter(K, nonneg=True)
        self.inv_sqrt_y0 = cp.Parameter(K, nonneg=True)
        self.rho = cp.Parameter(nonneg=True)

        g, B, tc, tu, y = self.g, self.B, self.tc, self.tu, self.y
        S = self.S0 - cp.multiply(self.S1, g)
        W = self.W0 - cp.multiply(self.W1, g)
        t_dn = 0.0
        if m.dl_rate is not None:
            dl0 = (m.Qk + m.head) * bits + m.dl_extra_bits
            t_dn = cp.multiply((dl0 - cp.multiply(m.Qk * bits, g)), 1.0 / m.dl_rate)
        B_floor = 1e-6 * m.B_tot / 1e6 / K
        cons = [
            tc + tu + t_dn <= T,
            W <= cp.multiply(m.fmax / 1e9, tc),
            cp.constraints.PowCone3D(self.Ec / kappa, tc, W, 1.0 / 3.0),
            self.Ec + self.e <= E,
            self.e <= cp.multiply(m.P, tu),
            *self._rate_constraints(LN2 * S, y, a, m),
            cp.SOC(B + tu, cp.vstack([2 * self.root, B - tu]), axis=0),  # root <= sqrt(B t_u)
            0.5 + 0.5 * cp.multiply(self.inv_y0, y) <= cp.multiply(self.inv_sqrt_y0, self.root) + self.slack,
            g <= m.gamma_max,
            B >= B_floor,
            tu >= 1e-6 * m.T,
        ]
        if fixed_bandwidth is None:
            cons.append(cp.sum(B) <= m.B_tot / 1e6)
        else:
            cons.append(B == fixed_bandwidth / 1e6)
        s = w @ (2 * g) - w @ cp.square(g)
        z = bnd.lambda_min + 2 * bnd.lam * s
        C = 24.0 * bnd.M * bnd.rho**2
        gap = cp.norm(cp.hstack([bnd.M, math.sqrt(C) * cp.power(z, -0.5)]), 2) / math.sqrt(2 * m.N * bnd.delta)
        emp = bnd.e0 + bnd.c_emp * (w @ cp.inv_pos(1 - g) - 1.0)
        self.problem = cp.Problem(cp.Minimize(emp + gap + self.rho * cp.sum(self.slack)), cons)

    def _rate_constraints(self, s_nats, y, a: np.ndarray, m: SystemModel) -> list:
        """S ln2 <= y ln(1 + a e / y), with e^{S ln2 / y} = 1 + SNR inside an exponential cone.

        Near the base station the SNR reaches 1e6 and more, and the cone is then so badly
        conditioned that Clarabel stalls. For devices whose SNR at P_max over an equal share of
        the band exceeds 1e3, the rate is taken as y ln(a e / y) = y ln a - rel_entr(y, e):
        smaller by a relative ln(1 + 1/SNR) / ln(1 + SNR), so conservative (plans stay feasible);
        on random systems with K = 100 it raises the G that P-SCA reaches by about 0.02 %.
        """
        snr = a * m.P / (m.B_tot / 1e6 / m.K)
        high = np.flatnonzero(snr >= 1e3)
        low = np.flatnonzero(snr < 1e3)
        cons = []
        if len(low):
            cons.append(s_nats[low] <= -cp.rel_entr(y[low], y[low] + cp.multiply(a[low], self.e[low])))
        if len(high):
            cons.append(s_nats[high] <= cp.multiply(np.log(a[high]), y[high]) - cp.rel_entr(y[high], self.e[high]))
        return cons

    def set_point(self, y0: np.ndarray, rho: float) -> None:
        # keep the linearisation point in a sane range (MHz s): a start at B t_u ~ 0 would put
        # 1/y0 ~ 1e9 into the problem data
        full = self.m.B_tot / 1e6 * self.m.T
        y0 = np.clip(y0, 1e-6 * full / self.m.K, full)
        self.inv_y0.value = 1.0 / y0
        self.inv_sqrt_y0.value = 1.0 / np.sqrt(y0)
        self.rho.value = rho

    def solve(self) -> str:
        """Clarabel; on a numerical failure Clarabel with more iterations, then SCS."""
        attempts = [
            {"solver": cp.CLARABEL},
            {"solver": cp.CLARABEL, "max_iter": 500, "static_regularization_constant": 1e-7},
            {"solver": cp.SCS, "eps": 1e-9, "max_iters": 50000},
        ]
        self.failure = ""
        for opts in attempts:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    self.problem.solve(**opts)
            except cp.error.SolverError as err:
                self.failure = f"{opts['solver']}: {str(err).splitlines()[0] if str(err) else 'solver error'}"
                continue
            if self.problem.status in ("optimal", "optimal_inaccurate") and self.g.value is not None:
                return self.problem.status
            self.failure = f"{opts['solver']}: status {self.problem.status}"
        return "failed"


def _start_point(m: SystemModel, start, fixed_bandwidth: np.ndarray | None) -> np.ndarray:
    """y0 = B t_u [MHz s] where the non-convex constraint is first linearised.

    "feasible": the resources of gamma = gamma_max (always feasible); "equal": equal bandwidth
    shares and half the round for the upload (usually infeasible); or (bandwidth_hz, upload_s).
    """
    ks = np.arange(m.K)
    if isinstance(start, str) and start == "feasible":
        g = np.full(m.K, m.gamma_max)
        beta = min_bandwidth(m, ks, g)
        B = beta * (m.B_tot / beta.sum()) if fixed_bandwidth is None else fixed_bandwidth
        alloc = allocate(m, ks, g, B)
        return B / 1e6 * alloc.t_upload
    if isinstance(start, str) and start == "equal":
        B = np.full(m.K, m.B_tot / m.K) if fixed_bandwidth is None else fixed_bandwidth
        return B / 1e6 * 0.5 * m.T
    if isinstance(start, str):
        raise ValueError(f"unknown P-SCA start '{start}' (feasible, equal, or (bandwidth_hz, upload_s))")
    B, tu = (np.broadcast_to(np.asarray(v, float), (m.K,)) for v in start)
    return B / 1e6 * tu


def solve_psca(
    m: SystemModel,
    start="feasible",
    rho0: float = 10.0,
    rho_growth: float = 2.0,
    rho_max: float = 1e6,
    tol: float = 1e-4,
    slack_tol: float = 1e-6,
    max_iterations: int = 100,
    fixed_bandwidth: np.ndarray | None = None,
) -> PscaResult:
    """P-SCA from `start` (see _start_point). Stops when G changes by less than `tol` (relative)
    and every slack is below `slack_tol`. The rates are then checked with the exact formulas and,
    if the solver's tolerance left them marginally outside, raised just enough (`repair`).
    Raises InfeasibleError for an infeasible system and SolverFailedError when a surrogate
    cannot be solved (no rates are made up then)."""
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1 (got {max_iterations})")
    t0 = time.perf_counter()
    check_feasible(m)
    bound = Bound.of(m)
    sur = _Surrogate(m, fixed_bandwidth)
    y0 = _start_point(m, start, fixed_bandwidth)
    g = None
    rho, prev, it = rho0, math.inf, 0
    status, max_slack, inaccurate = "max_iterations", math.inf, 0
    for it in range(1, max_iterations + 1):
        sur.set_point(y0, rho)
        st = sur.solve()
        if st == "failed":
            raise SolverFailedError(
                f"P-SCA failed: no convex solver (Clarabel, then SCS) solved the surrogate problem of "
                f"iteration {it} (last: {sur.failure}); no rates to plan with. Try --method bnb"
            )
        inaccurate += st != "optimal"
        g = np.clip(sur.g.value, 0.0, m.gamma_max)
        y0 = np.maximum(sur.B.value * sur.tu.value, 1e-12)  # where y <= B t_u is tight
        val = float(bound.value(g))
        max_slack = float(sur.slack.value.max())
        if abs(prev - val) <= tol * abs(val) and max_slack <= slack_tol:
            status = "converged"
            break
        prev = val
        rho = min(rho * rho_growth, rho_max)
    g, repair = _make_feasible(m, g, fixed_bandwidth)
    stats = SolverStats(
        iterations=it, nodes=0, gap=0.0, rel_gap=0.0, lower_bound=None,
        seconds=time.perf_counter() - t0, status=status, max_slack=max_slack, repair=repair,
        final_rho=rho, inaccurate_solves=inaccurate,
    )
    return PscaResult(g, float(bound.value(g)), stats)


def _make_feasible(m: SystemModel, g: np.ndarray, fixed_bandwidth: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Nudge rates up just enough that the exact check passes (solver tolerance is ~1e-8)."""
    top = np.full(m.K, m.gamma_max)
    beta = min_bandwidth(m, np.arange(m.K), g)
    if fixed_bandwidth is not None:
        if np.all(beta <= fixed_bandwidth):
            return g, 0.0
        lo = gamma_lower(m, fixed_bandwidth)
        out = np.maximum(g, lo)
        return out, float(np.max(out - g))
    if beta.sum() <= m.B_tot:
        return g, 0.0
    y = radial_fit(m, g, top)
    if y is None:  # cannot happen for a feasible system: gamma_max fits
        y = top
    return y, float(np.max(y - g))
