"""`fedlodrop system random | optimize | calibrate | plot-tradeoff`: SPEC 3-5 from the shell.

Thin commands over `fedlodrop.planning`; every failure on the user's input is a UserError (one
line, exit 2, no file written).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.table import Table

from fedlodrop.errors import UserError

system_app = typer.Typer(no_args_is_help=True, help="Describe the wireless edge system a plan is made for.")
out_console = Console()
METHODS = ("bnb", "psca", "fixed", "equal-bandwidth", "none")


def _user_errors(fn):
    from fedlodrop.cli import user_errors

    return user_errors(fn)


@system_app.command("random")
def system_random(
    devices: Annotated[int, typer.Option("--devices", "-k", help="number of devices K")],
    seed: Annotated[int, typer.Option(help="seed for positions, fading, samples and budgets")] = 0,
    model: Annotated[str, typer.Option(help="payload from a model: roberta-large, roberta-base, minilm ...")] = "roberta-large",
    latency_s: Annotated[Optional[float], typer.Option("--latency", help="T_max (default: where limits bind)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="YAML file (default: print it)")] = None,
) -> None:
    """A realistic random system: devices in a 500 m cell, Rayleigh fading, budgets that bind."""

    @_user_errors
    def go() -> None:
        from fedlodrop.planning.system import dump_system, random_system, resolve_arch

        if devices < 1:
            raise UserError(f"--devices must be at least 1 (got {devices})")
        if latency_s is not None and latency_s <= 0:
            raise UserError(f"--latency must be positive (got {latency_s})")
        resolve_arch(model)
        spec = random_system(devices, seed, model=model, latency_s=latency_s)
        text = dump_system(spec)
        if out is None:
            out_console.print(text, highlight=False, markup=False)
        else:
            out.write_text(text)
            out_console.print(f"wrote {out}: {devices} devices, T_max {spec.round.latency_s:.4g} s")

    go()


def solve(spec, method: str, gamma: float | None = None):
    """One plan for a system; the method's own solver, resources by `make_plan`."""
    from fedlodrop.planning.bnb import solve_bnb
    from fedlodrop.planning.feasibility import InfeasibleError, check_feasible, gamma_lower, smallest_common_gamma
    from fedlodrop.planning.plan import SolverStats, make_plan
    from fedlodrop.planning.psca import solve_psca
    from fedlodrop.planning.system import build_model

    m = build_model(spec)
    if method == "bnb":
        r = solve_bnb(m)
        return make_plan(spec, r.gamma, method, r.stats, m=m)
    if method == "psca":
        r = solve_psca(m)
        return make_plan(spec, r.gamma, method, r.stats, m=m)
    if method == "equal-bandwidth":
        band = np.full(m.K, m.B_tot / m.K)
        lowest = gamma_lower(m, band)
        for k in np.flatnonzero(np.isnan(lowest)):
            raise InfeasibleError(
                f"device {k} ({m.names[k]}) cannot meet its limits on an equal share of the band "
                f"({band[k] / 1e6:.4g} MHz) even at gamma_max = {m.gamma_max}; binding constraint: bandwidth",
                int(k),
                "bandwidth",
            )
        r = solve_psca(m, fixed_bandwidth=band)
        rates = np.minimum(np.maximum(r.gamma, lowest * (1 + _NUDGE)), m.gamma_max)
        return _plan_or_error(make_plan, spec, rates, method, r.stats, band, m)
    if method == "none":
        rates = np.zeros(m.K)
    else:  # fixed: the given rate, or the smallest common rate that fits
        common = smallest_common_gamma(m) if gamma is None else gamma
        if math.isnan(common):
            check_feasible(m)  # names the device and constraint
            raise InfeasibleError("no common rate up to gamma_max fits the band", None, "bandwidth")
        rates = np.full(m.K, min(common * (1 + _NUDGE) + _NUDGE, m.gamma_max) if common > 0 else 0.0)
    check_feasible(m, rates)
    return _plan_or_error(make_plan, spec, rates, method, SolverStats(), None, m)


_NUDGE = 1e-6  # rates found by bisection sit on the boundary; step just inside it


def _plan_or_error(make_plan, spec, rates, method, stats, band, m):
    try:
        return make_plan(spec, rates, method, stats, bandwidth=band, m=m)
    except RuntimeError as err:
        raise UserError(f"{method}: no feasible allocation: {err}") from None


def optimize(
    system: Annotated[Path, typer.Argument(help="system YAML (fedlodrop system random)")],
    method: Annotated[str, typer.Option(help="bnb | psca | fixed | equal-bandwidth | none")] = "bnb",
    gamma: Annotated[Optional[float], typer.Option(help="the common rate for --method fixed")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="plan.json")] = None,
) -> None:
    """Per-device dropout rate, bandwidth, power and frequency that minimise the bound."""

    @_user_errors
    def go() -> None:
        from fedlodrop.planning.system import load_system

        if method not in METHODS:
            raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        if gamma is not None and (method != "fixed" or not 0 <= gamma < 1):
            raise UserError(f"--gamma {gamma}: only with --method fixed, in [0, 1)")
        plan = solve(load_system(system), method, gamma)
        _print_plan(plan)
        if out is not None:
            plan.save(out)
            out_console.print(f"wrote {out}")

    go()


def _print_plan(plan) -> None:
    table = Table(title=f"{plan.method}: bound G = {plan.objective:.6g} (Emp {plan.emp:.4g} + Gap {plan.gap:.4g})")
    for col in ("device", "gamma", "bandwidth MHz", "power W", "freq GHz", "latency s", "energy J", "binds"):
        table.add_column(col, justify="left" if col in ("device", "binds") else "right")
    for d in plan.devices:
        table.add_row(
            d.name, f"{d.gamma:.4f}", f"{d.bandwidth_hz / 1e6:.4f}", f"{d.power_w:.4f}",
            f"{d.frequency_hz / 1e9:.4f}", f"{d.latency_s:.4f}", f"{d.energy_j:.4g}", ", ".join(d.binding) or "-",
        )
    out_console.print(table)
    s = plan.solver
    out_console.print(
        f"solver: {s.status}, {s.iterations} iterations, {s.nodes} nodes, gap {s.gap:.3g}, {s.seconds:.3f} s",
        highlight=False,
    )


def calibrate(
    sweep_dir: Annotated[Path, typer.Argument(help="a sweep folder of run folders at several dropout rates")],
    metric: Annotated[Optional[str], typer.Option(help="fit 1 - this train metric instead of the train loss")] = None,
    system: Annotated[Optional[Path], typer.Option(help="system YAML to update with the fitted constants")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="YAML: the bound: snippet, or the updated system")] = None,
) -> None:
    """Fit the bound's e0 and c_emp to the final training losses of a dropout sweep."""

    @_user_errors
    def go() -> None:
        from fedlodrop.planning.bound import fit_empirical
        from fedlodrop.planning.system import dump_system, load_system

        rates, values = _sweep_points(sweep_dir, metric)
        try:
            e0, c_emp, rmse = fit_empirical(rates, values)
        except ValueError as err:
            raise UserError(f"{sweep_dir}: {err}") from None
        what = f"1 - train {metric}" if metric else "final train loss"
        out_console.print(
            f"fit of {what} over {len(values)} runs: e0 = {e0:.6g}, c_emp = {c_emp:.6g} (rmse {rmse:.4g})",
            highlight=False,
        )
        if system is not None:
            spec = load_system(system)
            spec.bound.e0, spec.bound.c_emp = e0, c_emp
            text = dump_system(spec)
        else:
            text = yaml.safe_dump({"bound": {"e0": e0, "c_emp": c_emp}}, sort_keys=False)
        if out is None:
            out_console.print(text, highlight=False, markup=False)
        else:
            out.write_text(text)
            out_console.print(f"wrote {out}")

    go()


def _sweep_points(sweep_dir: Path, metric: str | None) -> tuple[list, list[float]]:
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder not found: {sweep_dir}")
    rates, values = [], []
    for run in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").is_file()):
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not cfg or not rows:
            continue
        last = rows[-1]
        if metric is None:
            value = last["train_loss"]
        elif metric in last.get("train", {}):
            value = 1.0 - last["train"][metric]
        else:
            raise UserError(f"{run}: no train metric {metric!r} (has {', '.join(last.get('train', {})) or 'none'})")
        rates.append(cfg.get("dropout", {}).get("rate", 0.0))
        values.append(float(value))
    if not values:
        raise UserError(f"{sweep_dir} holds no run folders (config.yaml + metrics.jsonl)")
    return rates, values


def plot_tradeoff(
    system: Annotated[Path, typer.Argument(help="system YAML")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file")] = Path("tradeoff.png"),
    points: Annotated[int, typer.Option(help="latency limits and energy scales to solve for")] = 8,
) -> None:
    """Optimal bound and rates against the latency limit and the energy budget, B&B and P-SCA."""

    @_user_errors
    def go() -> None:
        from fedlodrop.planning.system import load_system

        spec = load_system(system)
        if points < 2:
            raise UserError(f"--points must be at least 2 (got {points})")
        curves = tradeoff_curves(spec, points)
        _plot(curves, out)
        out_console.print(f"wrote {out}")

    go()


def tradeoff_curves(spec, points: int) -> dict:
    """Solve B&B and P-SCA over a range of T_max and of energy-budget scales."""
    from fedlodrop.planning.bnb import solve_bnb
    from fedlodrop.planning.feasibility import InfeasibleError, min_energy_scale, min_latency_limit
    from fedlodrop.planning.psca import solve_psca
    from fedlodrop.planning.system import build_model

    m = build_model(spec)
    t_lo = min_latency_limit(m, np.full(m.K, m.gamma_max))
    e_lo = min_energy_scale(m, np.full(m.K, m.gamma_max))
    axes = {
        "latency": np.linspace(t_lo * 1.02, max(m.T * 2.0, t_lo * 3.0), points),
        "energy": np.linspace(e_lo * 1.02, 3.0, points) if e_lo < 3.0 else np.linspace(e_lo * 1.02, e_lo * 3, points),
    }
    curves: dict = {}
    for axis, values in axes.items():
        for name, solver in (("B&B", solve_bnb), ("P-SCA", solve_psca)):
            objective, mean_rate, max_rate = [], [], []
            for v in values:
                mm = m.with_limits(latency_s=v) if axis == "latency" else m.with_limits(energy_scale=v)
                try:
                    r = solver(mm)
                    objective.append(r.objective)
                    mean_rate.append(float(np.mean(r.gamma)))
                    max_rate.append(float(np.max(r.gamma)))
                except InfeasibleError:
                    objective.append(np.nan)
                    mean_rate.append(np.nan)
                    max_rate.append(np.nan)
            curves[(axis, name)] = (values, objective, mean_rate, max_rate)
    return curves


def _plot(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(2, 2, figsize=(11, 7))
    labels = {"latency": "latency limit T_max (s)", "energy": "energy budgets (x the file's)"}
    for col, axis in enumerate(("latency", "energy")):
        for name, style in (("B&B", "-o"), ("P-SCA", "--s")):
            x, obj, mean_rate, max_rate = curves[(axis, name)]
            axs[0, col].plot(x, obj, style, label=name)
            axs[1, col].plot(x, mean_rate, style, label=f"{name} mean rate")
            axs[1, col].plot(x, max_rate, style, alpha=0.5, label=f"{name} max rate")
        axs[0, col].set_ylabel("optimal bound G")
        axs[1, col].set_ylabel("dropout rate")
        for row in range(2):
            axs[row, col].set_xlabel(labels[axis])
            axs[row, col].grid(alpha=0.3)
            axs[row, col].legend(fontsize=8)
    fig.suptitle("FedLoDrop planning: tighter limits push the rates up")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
