"""`fedlodrop plot-tradeoff`: the optimal bound and rates against T_max and against a common factor
on every energy budget, each swept from just above its tightest feasible value to past the one
where that limit stops binding, solved at each point by each method; and the figure of both.

Progress and warnings go to `report` (one line each), so the caller decides where they are shown.
matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import (
    InfeasibleError,
    check_feasible,
    energy_free_scale,
    min_energy_scale,
    min_latency_limit,
    smallest_common_gamma,
)
from fedlodrop.planning.methods import solve
from fedlodrop.planning.psca import SolverFailedError
from fedlodrop.planning.system import SystemModel

Report = Callable[[str], None]
Rows = dict[str, dict[str, list]]  # method -> {"x": [...], "objective": [...], "gamma": [[...], ...]}


def _silent(line: str) -> None:
    pass


@dataclass
class Sweep:
    """One swept limit: per method the points that were solved; `note` says why none, if none."""

    rows: Rows
    xlabel: str
    mark: float  # the system's own value of the limit (a vertical line)
    note: str


@dataclass
class Tradeoff:
    """The optimal bound and rates against the latency limit and against the energy budgets (what `plot-
    tradeoff` draws)."""
    latency: Sweep
    energy: Sweep
    weights: np.ndarray  # w_k = D_k / N, for the weighted mean rate
    latency_limit_s: float

    def data(self) -> dict:
        """What plot-tradeoff writes next to the PNG (.json)."""
        return {"latency": self.latency.rows, "energy": self.energy.rows, "weights": self.weights.tolist(),
                "latency_limit_s": self.latency_limit_s}


def _sweep(methods: Sequence[str], values, make, tol: float, time_limit: float, report: Report) -> Rows:
    rows = {meth: {"x": [], "objective": [], "gamma": []} for meth in methods}
    for x in values:
        mx = make(x)
        for meth in methods:
            try:
                res = solve(mx, meth, tol=tol, time_limit=time_limit)
            except InfeasibleError:
                continue
            except SolverFailedError as err:  # no made-up point: leave it out and say so
                report(f"  warning: {meth} at {x:.5g} left out: {err}")
                continue
            rows[meth]["x"].append(float(x))
            rows[meth]["objective"].append(float(res.objective))
            rows[meth]["gamma"].append([float(g) for g in res.gamma])
        report(f"  {x:.5g} done")
    return rows


def _sweep_values(lo: float, hi: float, at: float, points: int):
    """From just above the tightest feasible limit `lo` to past `hi`, where every rate is as free as
    the other limit allows, and past the system's own limit `at`; None if an end is not finite."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return np.linspace(lo * 1.001, max(hi + 0.5 * (hi - lo), at * 1.05, lo * 1.01), points)


def _best_common_that_fits(relaxed: SystemModel, g_free: float) -> float:
    """The best common rate once the swept limit no longer binds: G is convex in a common rate and
    larger rates fit more easily, so it is g_free or the smallest common rate that fits."""
    g = smallest_common_gamma(relaxed)
    return max(g_free, g) if math.isfinite(g) else relaxed.gamma_max


def tradeoff(m: SystemModel, methods: Sequence[str], points: int, tol: float = 1e-4,
             time_limit: float = 120.0, report: Report = _silent) -> Tradeoff:
    """Both sweeps of `points` points; raises InfeasibleError if the system itself is infeasible."""
    check_feasible(m)
    g_free = Bound.of(m).best_common(0.0, m.gamma_max)
    # each sweep ends past the limit at which the best common rate fits once that limit no longer
    # binds; the other limit stays as given (g_free itself may never fit under it)
    g_lat = _best_common_that_fits(m.with_limits(latency_s=1e3 * m.T), g_free)
    g_en = _best_common_that_fits(m.with_limits(energy_scale=energy_free_scale(m)), g_free)
    t_vals = _sweep_values(min_latency_limit(m, m.gamma_max), min_latency_limit(m, g_lat), m.T, points)
    e_vals = _sweep_values(min_energy_scale(m, m.gamma_max), min_energy_scale(m, g_en), 1.0, points)
    sweeps = []
    for name, values, make, xlabel, mark in (
        ("T_max", t_vals, lambda x: m.with_limits(latency_s=x), "latency limit T_max [s]", m.T),
        ("the energy budgets x", e_vals, lambda x: m.with_limits(energy_scale=x),
         "energy budgets (factor on every E_k^max)", 1.0),
    ):
        if values is None:
            rows, note = {meth: {"x": [], "objective": [], "gamma": []} for meth in methods}, (
                f"nothing to draw: no finite range of {name} found")
        else:
            report(f"sweeping {name} over [{values[0]:.4g}, {values[-1]:.4g}]")
            rows = _sweep(methods, values, make, tol, time_limit, report)
            note = (f"nothing to draw: no method found a feasible point for {name} "
                    f"in [{values[0]:.4g}, {values[-1]:.4g}]")
        if not any(r["x"] for r in rows.values()):
            report(f"warning: {note}")
        sweeps.append(Sweep(rows, xlabel, mark, note))
    return Tradeoff(sweeps[0], sweeps[1], m.w, m.T)


def plot(result: Tradeoff, path: Path) -> None:
    """One figure: per sweep, the optimal bound (left) and the rates (right: weighted mean, band
    from the smallest to the largest device rate), one line style per method. A sweep with no
    point gets its note (why not) written across both panels instead of empty axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps, weights = (result.latency, result.energy), result.weights
    styles = {"bnb": ("-", "o", "B&B"), "psca": ("--", "x", "P-SCA"), "fixed": (":", "s", "fixed"),
              "equal-bandwidth": ("-.", "^", "equal bandwidth"), "none": (":", "v", "no dropout")}
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(11, 4.0 * len(sweeps)), squeeze=False)
    for sweep, (ax1, ax2) in zip(sweeps, axes):
        drawn = False
        for meth, r in sweep.rows.items():
            if not r["x"]:
                continue
            drawn = True
            ls, mk, label = styles.get(meth, ("-", ".", meth))
            ax1.plot(r["x"], r["objective"], ls, marker=mk, label=label)
            G = np.array(r["gamma"])
            line = ax2.plot(r["x"], G @ weights, ls, marker=mk, lw=2, label=f"{label}: weighted mean")[0]
            ax2.fill_between(r["x"], G.min(axis=1), G.max(axis=1), alpha=0.12, color=line.get_color())
        for ax in (ax1, ax2):
            if drawn:
                ax.axvline(sweep.mark, color="grey", lw=0.8)
            else:
                ax.text(0.5, 0.5, sweep.note, transform=ax.transAxes, ha="center", va="center", wrap=True,
                        color="firebrick", fontsize=10)
            ax.set_xlabel(sweep.xlabel)
            ax.grid(alpha=0.3)
        ax1.set_ylabel("optimal bound G")
        ax2.set_ylabel("dropout rate (mean; band: min to max)")
        if drawn:
            ax1.legend()
            ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
