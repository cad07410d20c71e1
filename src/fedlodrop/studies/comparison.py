"""`fedlodrop compare`: the paper's question for one system, answered by training.

    fedlodrop compare system.yaml --set task=sst2 --seeds 3 --jobs 2 --out runs/compare

For one task and one system (devices, cell, limits), each method plans the round and the same
federation trains with its plan, over several seeds, on the simulated clock and meter
(fedlodrop.run.meter):

    bnb, psca          the planner: per-device rates, bandwidth, power and frequency minimising the bound
    fixed              one shared rate (the best feasible one for the bound) with optimised resources
    equal-bandwidth    B_k = B_tot / K, rates and power/frequency optimised
    none               no dropout, resources optimised
    unplanned          no planning at all: rate 0, equal bandwidth, full power and frequency

Every run draws its masks with `dropout.sampler: budget` (ceil(rate n) rows and columns dropped),
so a device never sends more than its plan priced: a plan sits on its latency limit, and
Bernoulli masks would send more than the expected bytes about half the time and miss it.

A method whose rates cannot meet the limits is trained as it would really behave (its rates, an
equal share of the band, full power and frequency; devices that still miss a limit are dropped
each round, and a round in which every device missed leaves the model as it was:
`federation.min_devices: 0`), never skipped. The result is one table (markdown and CSV) and one plot: the task's
metric, the generalization gap, rounds completed, simulated time and energy, bytes, and the
devices dropped for missing a limit, mean and spread over seeds.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fedlodrop.config import RunConfig
from fedlodrop.data.tasks import task_from_config
from fedlodrop.errors import UserError
from fedlodrop.planning import InfeasibleError, load_plan, load_system, optimize, system_model
from fedlodrop.planning.plan import as_is_plan
from fedlodrop.round.records import Summary
from fedlodrop.run.experiment import build
from fedlodrop.run.folder import RunFolder, run_folders
from fedlodrop.run.systems import check_system
from fedlodrop.run.settings import with_overrides
from fedlodrop.studies.sweep import Point, check_jobs, run_points

UNPLANNED = "unplanned"
METHODS = ("bnb", "psca", "fixed", "equal-bandwidth", "none", UNPLANNED)
# the rates a method falls back to when nothing it can choose meets the limits
_FALLBACK = {"none": 0.0}


@dataclass
class MethodResult:
    """One planning method in a comparison: whether its plan fits, its bound and mean rate, and each seed's run
    (summary and accuracy-against-time curve)."""
    method: str
    feasible: bool
    bound: float  # the plan's G(gamma) (unplanned: G at rate 0)
    mean_rate: float
    runs: list[Summary] = field(default_factory=list)  # one summary per seed
    curves: list[list[tuple[float, float]]] = field(default_factory=list)  # per seed: (simulated s, metric)


def make_plans(spec, methods: list[str], folder: Path, report=print) -> dict[str, Path | None]:
    """plan.json of every method (unplanned: None), written to `folder`."""

    folder.mkdir(parents=True, exist_ok=True)
    m = system_model(spec)
    paths: dict[str, Path | None] = {}
    for method in methods:
        if method == UNPLANNED:
            paths[method] = None
            continue
        try:
            plan = optimize(spec, method, **({"gamma": "best"} if method == "fixed" else {}))
        except InfeasibleError as err:
            rate = _FALLBACK.get(method, m.gamma_max)
            plan = as_is_plan(spec, [rate] * m.K, method, str(err), m)
            report(f"{method}: infeasible ({err}); trained as it would behave: rate {rate:g}, equal bandwidth, "
                   f"full power and frequency, devices over a limit dropped")
        paths[method] = folder / f"{method}.json"
        plan.save(paths[method])
        rates = [d.gamma for d in plan.devices]
        report(f"{method}: bound {plan.objective:.4f}, rates {min(rates):.3f}..{max(rates):.3f}")
    return paths


def check(cfg: RunConfig, spec, system: Path, methods: list[str], seeds: int) -> None:
    """Everything `compare` can refuse, before anything is written."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if cfg.plan is not None:
        raise UserError("compare makes each method's plan itself: drop plan from the config")
    check_system(cfg, spec, system)
    # the run's shards and model, built once: every refusal of a run on this system comes before anything is written
    build(with_overrides(cfg, {"system.file": str(system), "plan": None}), eval_data=False)


def compare(cfg: RunConfig, system: Path, out: Path, methods: list[str], seeds: int, jobs: int = 1,
            threads: int | None = None, console=None, show_progress: bool = True) -> list[MethodResult]:
    """Plan with every method, train each plan for `seeds` seeds, then tabulate and plot in `out`."""

    system = Path(system).expanduser().resolve()
    spec = load_system(system)
    check(cfg, spec, system, methods, seeds)
    check_jobs(jobs, threads)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    report = (lambda line: console.print(line, highlight=False)) if console else print
    plans = make_plans(spec, methods, out / "plans", report)
    points = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for method in methods:
            over = {"system.file": str(system), "plan": str(plans[method].resolve()) if plans[method] else None,
                    "seed": seed, "dropout.sampler": "budget", "federation.min_devices": 0}
            if method == UNPLANNED:
                over["dropout.rate"] = 0.0
            point_cfg = with_overrides(cfg, over)
            points.append(Point(f"{method}__seed={seed}", {"method": method}, seed, point_cfg))
    run_points(points, out / "runs", jobs, threads, console, show_progress)
    results = collect(out, methods, plans, cfg, spec)
    write_table(results, out / "compare.md", out / "compare.csv", cfg, system)
    plot(results, out / "compare.png", cfg)
    return results


def collect(out: Path, methods: list[str], plans: dict, cfg: RunConfig, spec) -> list[MethodResult]:

    """Every method's runs in a comparison folder, with its plan's fit, bound and mean rate."""
    main = _main_metric(out, cfg)
    results = []
    m = system_model(spec)
    for method in methods:
        if plans[method] is None:  # rate 0, B_tot / K, full power and frequency: fits if every device does
            as_is = as_is_plan(spec, [0.0] * m.K, method, "no planning", m)
            feasible, bound, rate = not as_is.totals["devices_over_limits"], as_is.objective, 0.0
        else:
            plan = load_plan(plans[method])
            feasible, bound, rate = plan.feasible, plan.objective, statistics.fmean(plan.gammas)
        res = MethodResult(method, feasible, bound, rate)
        for folder in sorted((out / "runs").glob(f"{method}__seed=*")):
            run = RunFolder(folder)
            res.runs.append(run.summary())
            clock, curve = 0.0, []
            for r in run.records():
                clock += r.system.latency_s
                curve.append((clock, r.eval.get(main, math.nan)))
            res.curves.append(curve)
        results.append(res)
    return results


def _stat(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


COLUMNS = ("final", "gap", "rounds", "simulated_s", "energy_j", "mb", "dropped")


def rows(results: list[MethodResult], main: str) -> list[dict]:
    """The comparison table's numbers: mean and standard deviation over seeds per method."""
    out = []
    for res in results:
        s = res.runs
        out.append({
            "method": res.method, "feasible": res.feasible, "bound": res.bound, "mean_rate": res.mean_rate,
            "runs": len(s),
            "final": _stat([x.final.get(main) for x in s]),
            "gap": _stat([x.generalization_gap.get(main) for x in s]),
            "rounds": _stat([x.rounds for x in s]),
            "simulated_s": _stat([x.system.simulated_time_s for x in s]),
            "energy_j": _stat([x.system.energy_j for x in s]),
            "mb": _stat([(x.uplink_bytes_total + x.downlink_bytes_total) / 1e6 for x in s]),
            "dropped": _stat([x.system.devices_dropped_for_limits for x in s]),
        })
    return out


def _main_metric(out: Path, cfg: RunConfig) -> str:
    """The task's main metric: its runs' (own data's task may be decided by the data), else the config's."""

    for folder in run_folders(out / "runs"):
        return folder.task().main_metric
    task = task_from_config(cfg)
    return task.main_metric if task is not None else "accuracy"


def _results_metric(results: list[MethodResult], cfg: RunConfig) -> str:
    for res in results:
        for summary in res.runs:
            return summary.main_metric

    task = task_from_config(cfg)
    return task.main_metric if task is not None else "accuracy"


def write_table(results: list[MethodResult], md: Path, csv_path: Path, cfg: RunConfig, system: Path) -> str:
    """The comparison's Markdown table and CSV; the table's text."""
    main = _results_metric(results, cfg)
    table = rows(results, main)
    head = (f"| method | plan fits | bound G | mean rate | {main} | gap | rounds | simulated s | energy J | "
            "MB sent | devices dropped | runs |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table:
        cell = {k: (f"{r[k][0]:.4f} +- {r[k][1]:.4f}" if k in ("final", "gap") else f"{r[k][0]:.4g} +- {r[k][1]:.2g}")
                for k in COLUMNS}
        lines.append(f"| {r['method']} | {'yes' if r['feasible'] else 'no'} | {r['bound']:.4f} | {r['mean_rate']:.3f} | "
                     f"{cell['final']} | {cell['gap']} | {cell['rounds']} | {cell['simulated_s']} | {cell['energy_j']} | "
                     f"{cell['mb']} | {cell['dropped']} | {r['runs']} |")
    text = "\n".join(lines)
    md.write_text(f"# fedlodrop compare {system}\n\ntask {cfg.task}, model {cfg.model}, {cfg.federation.devices} "
                  f"devices, {cfg.federation.rounds} rounds; mean +- standard deviation over seeds.\n\n{text}\n")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "feasible", "bound", "mean_rate", "runs"]
                        + [f"{k}_{s}" for k in COLUMNS for s in ("mean", "std")])
        for r in table:
            writer.writerow([r["method"], r["feasible"], r["bound"], r["mean_rate"], r["runs"]]
                            + [v for k in COLUMNS for v in r[k]])
    return text


def plot(results: list[MethodResult], path: Path, cfg: RunConfig) -> None:
    """Left: the task's metric per method (mean, spread over seeds); right: the metric against the
    simulated clock, each seed's run as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _results_metric(results, cfg)
    table = rows(results, main)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = range(len(table))
    ax1.bar(xs, [r["final"][0] for r in table], yerr=[r["final"][1] for r in table], capsize=4,
            color=["tab:blue" if r["feasible"] else "tab:gray" for r in table])
    ax1.set_xticks(list(xs), [r["method"] for r in table], rotation=20)
    finite = [r["final"][0] - r["final"][1] for r in table if not math.isnan(r["final"][0])]
    if finite:
        ax1.set_ylim(max(0.0, min(finite) - 0.05), None)
    ax1.set_ylabel(f"final {main} (grey: plan does not fit)")
    for res, color in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2):
        for i, curve in enumerate(res.curves):
            if curve:
                ax2.plot(*zip(*curve), marker=".", color=color, alpha=0.8, label=res.method if i == 0 else None)
    ax2.set_xlabel("simulated time [s]")
    ax2.set_ylabel(f"validation {main}")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
