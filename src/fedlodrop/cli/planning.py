"""CLI commands of the resource planner: `system random`, `optimize`, `calibrate`, `plot-tradeoff`.

Registered by cli.py. Bad input of any kind (missing file, bad key or value, infeasible system)
prints one line on stderr and exits with code 2, leaving no output file behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedlodrop.cli.common import err_console
from fedlodrop.cli.common import user_errors as _user_errors
from fedlodrop.errors import UserError


class _OutConsole:
    """stdout console made at print time: piped or captured output gets 160 columns, so the
    12-column plan table stays readable in logs (rich would use 80)."""

    def print(self, *args, **kwargs) -> None:
        import sys

        width = None if sys.stdout.isatty() else 160
        Console(width=width).print(*args, **kwargs)


out_console = _OutConsole()

system_app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="System descriptions (devices, cell, round) for `fedlodrop optimize`.",
)


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


# --------------------------------------------------------------------------------------------
# system random
# --------------------------------------------------------------------------------------------


@system_app.command("random")
@_user_errors
def system_random(
    devices: Annotated[Optional[int], typer.Option("--devices", "-k", help="number of devices K (the run's "
                                                   "federation.devices)")] = None,
    seed: Annotated[int, typer.Option(help="seed of positions, samples, budgets and fading")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="YAML file (default: print it)")] = None,
    model: Annotated[Optional[str], typer.Option(help="a planning-only system for this built-in model name or "
                                                 "local config.json (no run behind it; default: the run's "
                                                 "model, measured)")] = None,
    latency: Annotated[Optional[float], typer.Option(help="T_max [s] (default: halfway, see docs)")] = None,
    bandwidth_mhz: Annotated[float, typer.Option(help="B_tot [MHz]")] = 10.0,
    samples: Annotated[Optional[int], typer.Option(help="a planning-only system with this many training samples "
                                                   "over all devices (default: the run's own)")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="the run the system describes (default: "
                                                   "the offline default run): its devices, each device's training "
                                                   "samples, its local epochs and what a device really sends (Q, "
                                                   "head, federation.comm_dtype bits)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key of the run")] = None,
) -> None:
    """Write a realistic random system: devices in a 500 m cell, Rayleigh fading, random budgets, for
    a run (default: the offline default run; --config YOUR.yaml), so that `fedlodrop compare` and
    `fedlodrop run --set system.file=...` train what the plans price; with --model or --samples, a
    planning-only system."""
    from fedlodrop.planning import dump_system, random_system, system_model

    if bandwidth_mhz <= 0:
        raise UserError(f"--bandwidth-mhz must be positive (got {bandwidth_mhz})")
    if latency is not None and latency <= 0:
        raise UserError(f"--latency must be positive (got {latency})")
    if devices is not None and devices < 1:
        raise UserError(f"--devices must be at least 1 (got {devices})")
    if model is None and samples is None:
        from fedlodrop.run.experiment import describe_run
        from fedlodrop.run.settings import load_config

        over = list(set_ or [])
        if config is None and devices is not None:
            over.insert(0, f"federation.devices={devices}")
        cfg = load_config(config, over)
        if devices is not None and devices != cfg.federation.devices:
            raise UserError(f"--devices {devices} but the run's federation.devices is {cfg.federation.devices}")
        devices = cfg.federation.devices
        spec = describe_run(cfg, seed, bandwidth_hz=bandwidth_mhz * 1e6, latency_s=latency)
    else:
        if config is not None or set_:
            raise UserError("--model and --samples make a planning-only system; --config and --set describe a run: "
                            "give one or the other")
        if devices is None:
            raise UserError("give --devices K for a planning-only system (--model or --samples)")
        samples = 6000 if samples is None else samples
        if samples < devices:
            raise UserError(f"--samples ({samples}) must be at least --devices ({devices})")
        spec = random_system(devices, seed, model=model or "roberta-large", samples_total=samples,
                             bandwidth_hz=bandwidth_mhz * 1e6, latency_s=latency)
    text = dump_system(spec)
    m = system_model(spec)
    summary = (f"{devices} devices, {int(m.N)} samples, T_max {m.T:.4g} s, B_tot {m.B_tot / 1e6:.4g} MHz, "
               f"Q {m.Q:,} adapter values + {m.head:,} head values ({m.bits:g} bits each)")
    if out is None:
        out_console.print(text, highlight=False, markup=False, end="")
        err_console.print(summary, highlight=False)
    else:
        _write_text(out, text)
        err_console.print(f"wrote {out}: {summary}", highlight=False)


# --------------------------------------------------------------------------------------------
# optimize
# --------------------------------------------------------------------------------------------


def _plan_table(plan) -> Table:
    table = Table(title=f"{plan.method}: G = {plan.objective:.6f} (Emp {plan.emp:.4f} + Gap {plan.gap:.4f})")
    for col in ("dev", "D", "gamma", "B [MHz]", "p [W]", "f [GHz]", "compute [s]", "upload [s]",
                "latency [s]", "energy [J]", "budget [J]", "binding"):
        table.add_column(col, justify="left" if col in ("dev", "binding") else "right")
    budgets = [d.energy_budget_j for d in plan.system.devices]
    for d, spec_dev, budget in zip(plan.devices, plan.system.devices, budgets):
        table.add_row(
            d.name, str(spec_dev.samples), f"{d.gamma:.4f}", f"{d.bandwidth_hz / 1e6:.4f}", f"{d.power_w:.4f}",
            f"{d.frequency_hz / 1e9:.4f}", f"{d.compute_s:.4g}", f"{d.upload_s:.4g}", f"{d.latency_s:.4g}",
            f"{d.energy_j:.4g}", f"{budget:.4g}", ",".join(d.binding) or "-",
        )
    return table


def _solver_line(plan) -> str:
    s = plan.solver
    parts = [f"status {s.status}", f"{s.seconds:.2f} s", f"iterations {s.iterations}"]
    if plan.method == "bnb":
        parts += [f"nodes {s.nodes}", f"lower bound {s.lower_bound:.6f}", f"gap {s.gap:.2e} ({s.rel_gap:.1e} rel)"]
    used = plan.totals["bandwidth_used_hz"] / 1e6
    binding = " (binding)" if plan.totals["bandwidth_binding"] else ""
    parts.append(f"band {plan.totals['bandwidth_needed_hz'] / 1e6:.4g} of {plan.totals['bandwidth_total_hz'] / 1e6:.4g} "
                 f"MHz needed{binding}, {used:.4g} MHz allotted")
    return "; ".join(parts)


@_user_errors
def optimize(
    system: Annotated[Path, typer.Argument(help="system YAML (see `fedlodrop system random`)")],
    method: Annotated[str, typer.Option("--method", "-m", help="bnb | psca | fixed | equal-bandwidth | none")] = "bnb",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="write the plan here (plan.json)")] = None,
    gamma: Annotated[Optional[str], typer.Option(help="fixed: min (smallest that fits, default), best, or a rate")] = None,
    tol: Annotated[float, typer.Option(help="bnb: relative gap; psca: relative change")] = 1e-4,
    time_limit: Annotated[float, typer.Option(help="bnb: seconds before stopping with a gap")] = 600.0,
) -> None:
    """Choose per-device dropout rates, bandwidth, power and CPU frequency that minimise the bound."""
    from fedlodrop.planning import load_system, plan_system

    if not 0 < tol < 1:
        raise UserError(f"--tol must lie in (0, 1) (got {tol})")
    if time_limit <= 0:
        raise UserError(f"--time-limit must be positive (got {time_limit})")
    spec = load_system(system)
    plan = plan_system(spec, method, gamma, tol, time_limit)
    out_console.print(_plan_table(plan))
    out_console.print(_solver_line(plan), highlight=False)
    if out is not None:
        _write_text(out, plan.to_json() + "\n")
        err_console.print(f"wrote {out}", highlight=False)


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------


@_user_errors
def calibrate(
    sweep_dir: Annotated[Path, typer.Argument(help="folder holding run folders (config.yaml + metrics.jsonl)")],
    metric: Annotated[Optional[str], typer.Option(help="fit 1 - this train metric instead of train_loss, and the "
                                                  "Gap term to the measured gaps")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="YAML to write (snippet or system)")] = None,
    system: Annotated[Optional[Path], typer.Option(help="write this system file updated with the fit to --out")] = None,
    surrogate: Annotated[bool, typer.Option("--surrogate", help="fit the validation error against the rates in the "
                                            "bound's convex shape and write it as the objective the planners "
                                            "minimise (objective: measured); needs --metric")] = False,
    validate: Annotated[Optional[Path], typer.Option(help="a folder of runs the fit never saw (other systems, other "
                                                     "rates, e.g. a compare folder): how well the surrogate and "
                                                     "the bound predict and order their validation errors; "
                                                     "needs --metric")] = None,
) -> None:
    """Fit the bound's constants to a dropout sweep (4 or more rates, no dropped devices): Emp(gamma) = e0 +
    c_emp sum w gamma/(1-gamma) to the final training error, with --metric the Gap term to the measured
    gaps; with --surrogate the validation error, as the planners' objective."""
    import yaml

    from fedlodrop.planning import dump_system, load_system
    from fedlodrop.studies.calibration import calibrate as fit_sweep
    from fedlodrop.studies.calibration import validate as validate_fit

    if system is not None and out is None:
        raise UserError("--system needs --out for the updated system file")
    if validate is not None and metric is None:
        raise UserError("--validate compares validation errors of a metric: give --metric (e.g. accuracy)")
    spec = load_system(system) if system is not None else None
    fit = fit_sweep(sweep_dir, metric, report=lambda line: err_console.print(line, highlight=False),
                    surrogate=surrogate, compared=spec.bound if spec is not None else None)
    table = Table(title=f"calibration on round-{fit.last_round} {fit.what} ({fit.runs} runs, N = {fit.N:g})")
    for col in ("dropout.rate", "x = sum w g/(1-g)", "s", "runs", "train error", "fit", "val error", "gap"):
        table.add_column(col, justify="right")
    for row in fit.rows:
        table.add_row(row.rate, f"{row.feature:.4f}", f"{row.sparsity:.4f}", str(row.runs), f"{row.mean:.5f}",
                      f"{row.fit:.5f}", f"{row.eval_error:.4f}", f"{row.gap:+.4f}")
    out_console.print(table)
    sign = "rises" if fit.c_emp > 0 else "falls" if fit.c_emp < 0 else "is flat"
    out_console.print(f"e0 = {fit.e0:.6g}, c_emp = {fit.c_emp:.6g} (rmse {fit.rmse:.3g}): training error {sign} "
                      "with the rate", highlight=False)
    if fit.gap_curve is not None:
        g = fit.gap_curve
        out_console.print(f"Gap term fitted to the measured gaps: sqrt({g.a:.4g} + {g.b:.4g} / (1 + {g.kappa:.4g} s)) "
                          f"(rmse {fit.gap_rmse:.3g})", highlight=False)
    if fit.surrogate is not None:
        c = fit.surrogate
        out_console.print(f"surrogate of the validation error: {c.e0:.4g} + {c.c:.4g} x + sqrt({c.a:.4g} + {c.b:.4g} / "
                          f"(1 + {c.kappa:.4g} s)); rmse {fit.surrogate_rmse:.3g}, leave-one-rate-out rmse "
                          f"{fit.loo_rmse:.3g}", highlight=False)
    where = "the system's constants" if spec is not None else "SPEC 4's default constants"
    if fit.vacuous:
        out_console.print(f"the bound with {where} is vacuous (G >= 1) at N = {fit.N:g} for rate(s) "
                          + ", ".join(f"{r} (G = {v:.3g})" for r, v in fit.vacuous), highlight=False)
    else:
        out_console.print(f"the bound with {where} is below 1 at every rate of the sweep", highlight=False)
    if validate is not None:
        _print_validation(validate_fit(fit, validate, metric, report=lambda line: err_console.print(line, highlight=False)))
    if out is None:
        return
    N = float(sum(d.samples for d in spec.devices)) if spec is not None else None
    bound = fit.measured(N) if surrogate else fit.bound(N)
    if spec is not None:
        spec.bound = bound
        _write_text(out, dump_system(spec))
    else:
        snippet = {"bound": bound.model_dump(mode="json")}
        _write_text(out, f"# fitted on {sweep_dir} ({'validation error' if surrogate else fit.what}, N = {fit.N:g}); "
                    "merge into the system file\n" + yaml.safe_dump(snippet, sort_keys=False))
    err_console.print(f"wrote {out}", highlight=False)


def _print_validation(v) -> None:
    """The held-out check's lines: the surrogate's error and ordering, the bound's ordering and coverage."""
    groups = len({r.group for r in v.runs})
    out_console.print(f"held out: {len(v.runs)} runs in {groups} groups (same folder, same seed)", highlight=False)
    for what in ("surrogate", "bound"):
        if any(math.isnan(getattr(r, what)) for r in v.runs):
            out_console.print(f"  {what}: none fitted", highlight=False)
            continue
        right, pairs = v.ordered(what)
        line = f"  {what}: orders {right} of {pairs} pairs of a group as measured"
        if what == "surrogate":
            line += f"; rmse {v.rmse():.4f}, bias {v.bias():+.4f} (predicted - measured)"
        else:
            line += f"; at or above the measured error on {v.bound_holds()} of {len(v.runs)} runs"
        out_console.print(line, highlight=False)


# --------------------------------------------------------------------------------------------
# plot-tradeoff
# --------------------------------------------------------------------------------------------


@_user_errors
def plot_tradeoff(
    system: Annotated[Path, typer.Argument(help="system YAML")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write (data: same name, .json)")] = Path(
        "tradeoff.png"),
    points: Annotated[int, typer.Option(help="points per sweep")] = 8,
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "bnb,psca",
    tol: Annotated[float, typer.Option(help="solver tolerance")] = 1e-4,
    time_limit: Annotated[float, typer.Option(help="B&B seconds per point")] = 120.0,
) -> None:
    """PNG of the optimal bound and rates against T_max and against the energy budgets."""
    from fedlodrop.planning import METHODS, load_system, system_model
    from fedlodrop.planning.tradeoff import plot, tradeoff

    chosen = [x.strip() for x in methods.split(",") if x.strip()]
    bad = [x for x in chosen if x not in METHODS]
    if bad or not chosen:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    if not 2 <= points <= 200:
        raise UserError(f"--points must lie in [2, 200] (got {points})")
    if not 0 < tol < 1 or time_limit <= 0:
        raise UserError("--tol must lie in (0, 1) and --time-limit be positive")
    m = system_model(load_system(system))
    result = tradeoff(m, chosen, points, tol, time_limit,
                      report=lambda line: err_console.print(line, highlight=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    _write_text(out.with_suffix(".json"), json.dumps(result.data(), indent=1))
    err_console.print(f"wrote {out} and {out.with_suffix('.json')}", highlight=False)
