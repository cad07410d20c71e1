"""SPEC 5, B&B: a certified global solution of P1 by branch-reduce-and-bound over gamma boxes.

Eliminating B, p, f leaves  min G(gamma)  s.t.  sum_k beta_k(gamma_k) <= B_tot,  gamma in [l, gamma_max],
with beta_k the (decreasing) minimal bandwidth of device k (feasibility.py). Bounds on a box [a, b]:

* SPEC's monotone bound Emp(a) + Gap(b), and pruning when the easiest corner b does not fit;
* a Lagrangian bound that uses the structure: G = Emp (separable) + Gap(s) with s = sum_k w_k q(gamma_k).
  Relax s <= sum_k w_k q(gamma_k) with lam >= 0 and the band with mu >= 0; the dual function splits
  into one 1-D problem per device plus one in s. beta_k is known only at grid points, so on a grid
  cell [u, v] it is under-estimated by beta_k(v) (monotonicity): every value computed is a valid
  lower bound, with no assumption on the shape of beta_k. The dual is maximised over mu, and for
  each mu over lam, by cutting-plane line searches (tangent intersections, bisection safeguard).

Each box: reduce (raise a_k where the band cannot fit a smaller rate), bound, refine the grids
where a device's 1-D Lagrangian problem is not yet solved to tol / 4K at the dual's multipliers,
bound again; what gap remains is a duality gap (beta_k not convex there), so the box is split,
on the device whose dual minimiser jumps between the two sides of the band constraint. Primal
points (grid points of the dual minimisers, which always fit, and the band-infeasible minimisers
pushed up along the segment to b) update the incumbent; an optional start (P-SCA's rates) seeds
it. The search stops when upper - lower <= max(eps_abs, eps_rel |upper|), or at a node or time
limit, and reports the final gap either way.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np

from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import check_feasible, gamma_lower, min_bandwidth, radial_fit
from fedlodrop.planning.plan import SolverStats
from fedlodrop.planning.system import SystemModel


class _Grids:
    """Per-device sorted sample points of beta_k / B_tot, refined as the search goes."""

    def __init__(self, m: SystemModel, lo: np.ndarray, hi: float, points: int, extra: list[float]):
        self.m = m
        self.g: list[np.ndarray] = []
        for k in range(m.K):
            pts = np.linspace(lo[k], hi, points) if hi > lo[k] else np.array([hi])
            inner = [x for x in extra if lo[k] < x < hi]
            self.g.append(np.unique(np.concatenate([pts, inner])))
        ks = np.concatenate([np.full(len(g), k) for k, g in enumerate(self.g)])
        vals = min_bandwidth(m, ks, np.concatenate(self.g)) / m.B_tot
        self.b: list[np.ndarray] = np.split(vals, np.cumsum([len(g) for g in self.g])[:-1])
        self.evaluations = len(vals)

    def add(self, ks, xs) -> None:
        """Insert points (device ks[i], rate xs[i]) not yet in the grids; one batched evaluation."""
        keep_k, keep_x = [], []
        for k, x in zip(ks, xs):
            g = self.g[k]
            i = np.searchsorted(g, x)
            if (i < len(g) and abs(g[i] - x) <= 1e-13) or (i > 0 and abs(g[i - 1] - x) <= 1e-13):
                continue
            if x < g[0] or x > g[-1]:
                continue
            keep_k.append(int(k))
            keep_x.append(float(x))
        if not keep_k:
            return
        kk, xx = np.array(keep_k), np.array(keep_x)
        vals = min_bandwidth(self.m, kk, xx) / self.m.B_tot
        self.evaluations += len(vals)
        for k in np.unique(kk):
            sel = kk == k
            x, v = xx[sel], vals[sel]
            x, first = np.unique(x, return_index=True)
            g = np.concatenate([self.g[k], x])
            order = np.argsort(g, kind="stable")
            self.g[k] = g[order]
            self.b[k] = np.concatenate([self.b[k], v[first]])[order]

    def index(self, k: int, x: float) -> int:
        i = int(np.searchsorted(self.g[k], x - 1e-13))
        return min(i, len(self.g[k]) - 1)

    def value(self, k: int, x: float) -> float:
        return float(self.b[k][self.index(k, x)])


def _refine(grids: _Grids, bound: Bound, a, b, multipliers: list[tuple[float, float]], slack: float,
            pieces: int = 4, cap: int = 16, rounds: int = 10) -> int:
    """Refine the grids until, at each of the multipliers (lam, mu), each device's step bound on
    min over [a_k, b_k] of w_k (c_emp g/(1-g) - lam q(g)) + mu beta_k(g) is within `slack` of the
    best exact grid value; one batched beta evaluation per round. Returns the new points."""
    w, c = bound.w, bound.spec.c_emp
    added = 0
    for _ in range(rounds):
        ks: list[int] = []
        xs: list[float] = []
        for k in range(len(a)):
            i, j = grids.index(k, a[k]), grids.index(k, b[k])
            if j <= i:
                continue
            g, bt = grids.g[k][i:j + 1], grids.b[k][i:j + 1]
            u, v, bv = g[:-1], g[1:], bt[1:]
            wide = v - u > 1e-11
            split = np.zeros(len(u), dtype=bool)
            for lam, mu in multipliers:
                x = np.clip(bound.gamma_star_scalar(lam), u, v)
                low = w[k] * (c * x / (1 - x) - lam * (2 * x - x * x)) + mu * bv
                exact = w[k] * (c * g / (1 - g) - lam * (2 * g - g * g)) + mu * bt
                cells = np.flatnonzero((low < float(np.min(exact)) - slack) & wide)
                split[cells[np.argsort(low[cells])][:cap]] = True
            for jj in np.flatnonzero(split):
                ks.extend([k] * (pieces - 1))
                xs.extend(np.linspace(u[jj], v[jj], pieces + 1)[1:-1].tolist())
        if not ks:
            break
        before = grids.evaluations
        grids.add(ks, xs)
        added += grids.evaluations - before
    return added


@dataclass
class _DualPoint:
    value: float
    lam: float
    mu: float
    d_lam: float
    d_mu: float
    x: np.ndarray  # per-device minimiser inside its cell
    u: np.ndarray  # left end of that cell
    v: np.ndarray  # right end of that cell (a grid point: exact beta)
    bv: np.ndarray  # beta / B_tot at v


def _maximise(f, lo: float, hi: float, stop_at: float, tol: float, p_lo=None, p_hi=None):
    """Maximise a concave 1-D function on [lo, hi]; f(t) returns a point with .t, .value, .slope.

    Tangent-line intersection (cutting planes, exact in a few steps on piecewise-linear pieces),
    safeguarded by bisection. Returns (best, below, above): the best point seen (every value
    is a valid lower bound) and the last points with slope > 0 and <= 0. The caller ensures
    that hi has slope <= 0 unless the maximum is at hi. p_lo, p_hi: f(lo), f(hi) if known.
    """
    below = p_lo if p_lo is not None else f(lo)
    best = below
    if below.slope <= 0 or best.value >= stop_at or hi <= lo:
        return best, None, below
    above = p_hi if p_hi is not None else f(hi)
    if above.value > best.value:
        best = above
    if above.slope > 0 or best.value >= stop_at:
        return best, above, None
    widths = [hi - lo]
    for _ in range(100):
        sb, sa = below.slope, above.slope
        t = (above.value - below.value + sb * below.t - sa * above.t) / (sb - sa)
        model = below.value + sb * (t - below.t)
        width = above.t - below.t
        if model - best.value <= tol or width <= 1e-13 * max(abs(above.t), 1e-300):
            break
        margin = 0.02 * width
        if len(widths) >= 3 and widths[-1] > 0.5 * widths[-3]:
            t = 0.5 * (below.t + above.t)  # slow progress: bisect
        t = min(max(t, below.t + margin), above.t - margin)
        p = f(t)
        if p.value > best.value:
            best = p
        if best.value >= stop_at:
            break
        if p.slope > 0:
            below = p
        else:
            above = p
        widths.append(above.t - below.t)
    return best, below, above


class _BoxDual:
    """The Lagrangian dual of the step relaxation on one box, as padded (K, cells) arrays."""

    def __init__(self, grids: _Grids, bound: Bound, a: np.ndarray, b: np.ndarray):
        """Cells of all devices laid end to end (ragged: grids differ a lot in size)."""
        self.bound = bound
        self.w = bound.w
        K = len(a)
        us, vs, bvs = [], [], []
        for k in range(K):
            i, j = grids.index(k, a[k]), grids.index(k, b[k])
            g, bt = grids.g[k], grids.b[k]
            if j <= i:
                us.append(g[j:j + 1]), vs.append(g[j:j + 1]), bvs.append(bt[j:j + 1])
            else:
                us.append(g[i:j]), vs.append(g[i + 1:j + 1]), bvs.append(bt[i + 1:j + 1])
        lens = np.array([len(u) for u in us])
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        self.lens = lens
        self.U, self.V, self.BV = np.concatenate(us), np.concatenate(vs), np.concatenate(bvs)
        self.W = np.repeat(self.w, lens)
        self.s_lo = float(bound.sparsity(a))
        self.s_hi = float(bound.sparsity(b))
        self.lam_lo = max(0.0, -float(bound.dgap_ds(self.s_hi)))
        self.lam_hi = max(self.lam_lo, -float(bound.dgap_ds(self.s_lo)))
        self.c = bound.spec.c_emp
        self.e0 = bound.spec.e0
        self.evals = 0

    def _cells(self, lam: float, mu: float):
        """Per device: the minimising cell's (value, x, u, v, beta / B_tot)."""
        X = np.clip(self.bound.gamma_star_scalar(lam), self.U, self.V)
        val = self.W * (self.c * X / (1.0 - X) - lam * (2.0 * X - X * X)) + mu * self.BV
        mins = np.minimum.reduceat(val, self.starts)
        hits = np.flatnonzero(val <= np.repeat(mins, self.lens))
        j = hits[np.searchsorted(hits, self.starts)]
        return mins, X[j], self.U[j], self.V[j], self.BV[j]

    def at(self, lam: float, mu: float) -> _DualPoint:
        self.evals += 1
        mins, x, u, v, bv = self._cells(lam, mu)
        s = self.bound.s_minimiser(lam, self.s_lo, self.s_hi)
        value = self.e0 + float(mins.sum()) + self.bound.gap_scalar(s) + lam * s - mu
        d_lam = s - float(self.w @ (2.0 * x - x * x))
        return _DualPoint(value, lam, mu, d_lam, float(bv.sum()) - 1.0, x, u, v, bv)

    def best_lam(self, mu: float, stop_at: float) -> _DualPoint:
        """max over lam of L(lam, mu)."""

        def f(lam: float) -> _DualPoint:
            p = self.at(lam, mu)
            p.t, p.slope = lam, p.d_lam
            return p

        best, _, _ = _maximise(f, self.lam_lo, self.lam_hi, stop_at, 1e-11)
        return best

    def solve(self, stop_at: float, hint: tuple[float, float] | None = None):
        """(best point, band-infeasible side or None, band-feasible side) of max over (lam, mu)."""

        def f(mu: float) -> _DualPoint:
            p = self.best_lam(mu, stop_at)
            p.t, p.slope = mu, p.d_mu
            return p

        p0 = f(0.0)
        if p0.d_mu <= 0 or p0.value >= stop_at:
            return p0, None, p0
        mu_hi = max(2.0 * hint[1], 1e-4) if hint and hint[1] > 0 else 1.0
        while True:
            top = f(mu_hi)
            if top.d_mu <= 0 or top.value >= stop_at or mu_hi > 1e12:
                break
            mu_hi *= 4.0
        best, below, above = _maximise(f, 0.0, mu_hi, stop_at, 1e-10, p0, top)
        if above is None:
            above = top
        return best, below, above


class _Incumbent:
    """The best feasible rates found so far."""

    def __init__(self, bound: Bound, gamma: np.ndarray, eps_rel: float, eps_abs: float):
        self.bound = bound
        self.gamma = gamma.copy()
        self.value = float(bound.value(gamma))
        self.eps_rel, self.eps_abs = eps_rel, eps_abs

    def offer(self, gamma: np.ndarray, fits: bool) -> None:
        if fits:
            val = float(self.bound.value(gamma))
            if val < self.value:
                self.gamma, self.value = gamma.copy(), val

    def tol(self) -> float:
        return max(self.eps_abs, self.eps_rel * abs(self.value))

    def cutoff(self) -> float:
        """A box whose lower bound reaches this cannot improve the incumbent by more than tol."""
        return self.value - self.tol()


@dataclass
class BnbResult:
    """Branch-and-bound's rates, its bound value and its certificate (the gap, nodes, iterations)."""
    gamma: np.ndarray
    objective: float
    stats: SolverStats


def solve_bnb(
    m: SystemModel,
    eps_rel: float = 1e-4,
    eps_abs: float = 1e-9,
    max_nodes: int = 20000,
    time_limit: float = 300.0,
    grid_points: int = 33,
    refine_rounds: int = 4,
    incumbent: np.ndarray | None = None,
) -> BnbResult:
    """Global minimum of G over feasible rates; raises InfeasibleError (device, constraint) if none."""
    t0 = time.perf_counter()
    bound = Bound.of(m)
    K = m.K
    beta_max = check_feasible(m) / m.B_tot
    # root reduction: device k can use at most what the others leave at gamma_max
    room = 1.0 - (beta_max.sum() - beta_max)
    lo = gamma_lower(m, room * m.B_tot)
    lo = np.where(np.isnan(lo), m.gamma_max, lo)
    hi = np.full(K, m.gamma_max)
    g_free = bound.best_common(0.0, m.gamma_max)
    grids = _Grids(m, lo, m.gamma_max, grid_points, [g_free])
    lo = np.array([grids.g[k][0] for k in range(K)])

    inc = _Incumbent(bound, hi, eps_rel, eps_abs)
    if incumbent is not None:  # e.g. P-SCA's rates: only a starting upper bound, checked here
        start = np.clip(np.asarray(incumbent, float), 0.0, m.gamma_max)
        inc.offer(start, float(min_bandwidth(m, np.arange(K), start).sum()) <= m.B_tot)
    # the box minimiser of G (convex) is optimal if it fits
    x0 = bound.minimise_box(lo, hi)
    grids.add(range(K), x0)
    inc.offer(x0, sum(grids.value(k, x0[k]) for k in range(K)) <= 1.0)

    counter = 0
    heap: list[tuple] = [(-math.inf, counter, lo, hi)]
    pruned_lb = math.inf
    nodes = dual_evals = 0
    status = "optimal"
    while heap:
        lb_parent, _, a, b = heap[0]
        if lb_parent >= inc.cutoff():
            break
        if nodes >= max_nodes or time.perf_counter() - t0 > time_limit:
            status = "limit"
            break
        heapq.heappop(heap)
        nodes += 1
        lb, a, b, split = _process(grids, bound, a, b, lb_parent, inc, refine_rounds)
        dual_evals += split.pop("evals", 0)
        if lb is None:  # infeasible box
            continue
        if lb >= inc.cutoff():
            pruned_lb = min(pruned_lb, lb)
            continue
        k, c = split["device"], split["at"]
        grids.add([k], [c])
        b_left, a_right = b.copy(), a.copy()
        b_left[k], a_right[k] = c, c
        for ca, cb in ((a, b_left), (a_right, b)):
            counter += 1
            heapq.heappush(heap, (lb, counter, ca, cb))
    open_lb = min((item[0] for item in heap), default=math.inf)
    best_val = inc.value
    lower = min(open_lb, pruned_lb, best_val)
    gap = max(0.0, best_val - lower)
    stats = SolverStats(
        iterations=dual_evals, nodes=nodes, gap=gap, rel_gap=gap / max(abs(best_val), 1e-300),
        lower_bound=lower, seconds=time.perf_counter() - t0, status=status,
        grid_points=sum(len(g) for g in grids.g), bandwidth_evaluations=grids.evaluations,
        open_boxes=len(heap),
    )
    return BnbResult(inc.gamma, best_val, stats)


def _process(grids: _Grids, bound: Bound, a, b, lb_parent: float, inc: _Incumbent, refine_rounds: int):
    """Reduce, bound and (if still open) choose a split for one box; lb None: box infeasible.

    Between dual solves each device's grid is refined until, at the dual's multipliers, its
    1-D Lagrangian problem is solved to within tol / 4K. If the bound then still falls short,
    the gap is a duality gap (beta_k not convex there): the box is split, preferably on the
    device whose dual minimiser jumps between the two sides of the band constraint.
    """
    K = len(a)
    a = a.copy()
    bt_b = np.array([grids.value(k, b[k]) for k in range(K)])
    if bt_b.sum() > 1.0:
        return None, a, b, {}
    room = 1.0 - (bt_b.sum() - bt_b)
    for k in range(K):  # raise a_k past grid points whose beta alone overflows the room left
        g, bt = grids.g[k], grids.b[k]
        i, j = grids.index(k, a[k]), grids.index(k, b[k])
        over = np.flatnonzero(bt[i:j + 1] > room[k])
        if len(over):
            a[k] = g[i + over[-1]]
    lb = max(lb_parent, bound.box_lower(a, b))
    inc.offer(b, True)
    evals, hint, radial_done = 0, None, False
    best = below = above = None
    for _ in range(refine_rounds):
        if lb >= inc.cutoff():
            break
        dual = _BoxDual(grids, bound, a, b)
        best, below, above = dual.solve(inc.cutoff(), hint)
        evals += dual.evals
        hint = (best.lam, best.mu)
        points = [p for p in (best, below, above) if p is not None]
        lb = max(lb, best.value)
        inc.offer(above.v, above.d_mu <= 0)
        if below is not None and not radial_done:  # once per box: the band-infeasible minimisers,
            y = radial_fit(grids.m, below.x, b)      # pushed up along the segment to b until they fit
            radial_done = True
            if y is not None:
                inc.offer(y, True)
        if lb >= inc.cutoff():
            break
        slack = inc.tol() / (4.0 * K)
        added = _refine(grids, bound, a, b, [(p.lam, p.mu) for p in points], slack)
        if added == 0:
            break
    if lb >= inc.cutoff() or above is None:
        return lb, a, b, {"evals": evals}
    jump = bound.w * np.abs(above.x - below.x) if below is not None else np.zeros(K)
    if jump.max() > 1e-9:
        k = int(np.argmax(jump))
        c = 0.5 * (above.x[k] + below.x[k])
    else:
        k = int(np.argmax(bound.w * (b - a)))
        x, span = float(best.x[k]), b[k] - a[k]
        c = x if a[k] + 0.05 * span < x < b[k] - 0.05 * span else a[k] + 0.5 * span
    return lb, a, b, {"evals": evals, "device": k, "at": float(c)}
