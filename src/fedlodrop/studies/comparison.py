"""`fedlodrop compare`: the paper's question for one system, answered by training.

    fedlodrop compare system.yaml --set task=sst2 --seeds 3 --jobs 2 --out runs/compare

For one task and one system (devices, cell, limits), each method plans the round and the same
federation trains with its plan, over several seeds, on the simulated clock and meter
(fedlodrop.run.meter):

    bnb, psca          the planner: per-device rates, bandwidth, power and frequency minimising the bound
    fixed              one shared rate (the best feasible one for the bound) with optimised resources
    equal-bandwidth    B_k = B_tot / K, rates and power/frequency optimised
    none               no dropout, resources optimised
    fit-only           no dropout, only the devices that can meet the limits at rate 0 take part
    longer-rounds      no dropout, the smallest round limit rate 0 meets (fewer rounds in a time budget)
    bf16               no dropout, every value sent in bfloat16 (half of float32's bytes)
    int8               no dropout, each device's update sent up as int8 with a scale per tensor (FedPAQ)
    bnb-int8           B&B's dropout planned on the int8 uplink's payload, trained with it
    unplanned          no planning at all: rate 0, equal bandwidth, full power and frequency

Every run draws its masks with `dropout.sampler: budget` (ceil(rate n) rows and columns dropped),
so a device never sends more than its plan priced: a plan sits on its latency limit, and
Bernoulli masks would send more than the expected bytes about half the time and miss it.

A method whose rates cannot meet the limits is trained as it would really behave (its rates, an
equal share of the band, full power and frequency; devices that still miss a limit are dropped
each round, and a round in which every device missed leaves the model as it was:
`federation.min_devices: 0`), never skipped; a method whose every device misses every round shows
"cannot meet the limit" instead of the untrained model's score.

With a budget (`federation.time_budget_s` and/or `energy_budget_j`) rounds are not a setting: each
method trains as many rounds as its plan's round cost fits in the budget (the learning-rate
schedule spans them), so a plan that spends less per round trains longer. The result is one table
(markdown and CSV) and one plot: the task's metric at the end, at equal simulated time and at equal
energy (the last evaluation within the least time / energy any method spent on that seed), the
time and energy to a target metric, the generalization gap, rounds, simulated time and energy,
bytes, and the devices dropped for missing a limit, mean and spread over seeds.
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
from fedlodrop.lora.adapter import AdapterLayout
from fedlodrop.planning import InfeasibleError, load_plan, load_system, optimize, system_model
from fedlodrop.planning.feasibility import min_latency_limit
from fedlodrop.planning.plan import as_is_plan, subset_plan
from fedlodrop.planning.spec import SystemSpec
from fedlodrop.round.records import Summary
from fedlodrop.run.experiment import build
from fedlodrop.run.folder import RunFolder, run_folders
from fedlodrop.run.systems import COMM_BITS, check_system, uplink_bits
from fedlodrop.run.settings import with_overrides
from fedlodrop.studies.sweep import Point, check_jobs, run_points

class Method:
    """A row of the comparison: how it plans the system (`plan`; None: no plan) and the run keys it
    sets. `own_system`: its plan carries another system than the file (a relaxed limit, a smaller
    payload), and its run is priced on that."""
    name = ""
    keys: dict = {}
    own_system = False

    def plan(self, spec, m, report, sized=None):
        """The method's plan for system `spec` (`m`: its model), or None. `sized(keys)`: the system
        with the payload the run sends under run keys `keys` (compare's `Sized`)."""
        raise NotImplementedError


class Planner(Method):
    """A planner method (`fedlodrop optimize --method NAME`). When nothing it can choose meets the
    limits it is trained as it would behave: its rates (none: 0, the others gamma_max), an equal share
    of the band, full power and frequency; devices over a limit are dropped each round."""

    def __init__(self, name: str, fallback: float | None = None, solver: str | None = None, **options):
        self.name, self.fallback, self.solver, self.options = name, fallback, solver or name, options

    def plan(self, spec, m, report, sized=None):
        """The solver's plan, or how the method behaves when it has none that fits."""
        try:
            return optimize(spec, self.solver, **self.options).model_copy(update={"method": self.name})
        except InfeasibleError as err:
            rate = m.gamma_max if self.fallback is None else self.fallback
            report(f"{self.name}: infeasible ({err}); trained as it would behave: rate {rate:g}, equal bandwidth, "
                   f"full power and frequency, devices over a limit dropped")
            return as_is_plan(spec, [rate] * m.K, self.name, str(err), m)


class Unplanned(Method):
    """No planning at all: rate 0, B_tot / K, full power and frequency."""
    name, keys = "unplanned", {"dropout.rate": 0.0}

    def plan(self, spec, m, report, sized=None):
        """No plan: the run uses rate 0 and no planning's resources."""
        return None


class FitOnly(Method):
    """Rate 0 with only the devices that can meet the limits at rate 0, chosen by the latency and
    energy model: the device the planner names as infeasible is left out until the rest fit, and the
    band is shared among those that take part (the others are never asked)."""
    name = "fit-only"

    def plan(self, spec, m, report, sized=None):
        """The plan of the largest set the planner's removals leave that fits at rate 0."""
        members = list(range(m.K))
        # each device keeps its channel: a smaller cell would draw other fading for the same device
        own = [dev.model_copy(update={"channel_gain": float(m.h[k])}) for k, dev in enumerate(spec.devices)]
        while members:
            sub = spec.model_copy(update={"devices": [own[k] for k in members]})
            try:
                plan = subset_plan(spec, optimize(sub, "none"), members, self.name)
                report(f"{self.name}: {len(members)} of {m.K} devices fit at rate 0")
                return plan
            except InfeasibleError as err:
                members.pop(err.device)
        report(f"{self.name}: no device meets the limits at rate 0; trained as unplanned would behave")
        return as_is_plan(spec, [0.0] * m.K, self.name, "no device fits at rate 0", m)


class LongerRounds(Method):
    """Rate 0 with the smallest per-round latency limit it meets (energy budgets kept): longer rounds,
    so fewer of them in a time budget. Its plan carries the relaxed system."""
    name, own_system = "longer-rounds", True

    def plan(self, spec, m, report, sized=None):
        """The rate-0 plan on the system with the relaxed round limit."""
        limit = min_latency_limit(m, 0.0) * (1 + 1e-4)
        relaxed = spec.model_copy(update={"round": spec.round.model_copy(update={"latency_s": limit})}, deep=True)
        report(f"{self.name}: rate 0 meets a round limit of {limit:.4g} s (T_max {m.T:.4g} s)")
        return optimize(relaxed, "none")


class OnPayload(Planner):
    """A planner on the payload the run sends under other run keys: `bf16` and `int8` are rate 0 with
    every value in bfloat16 (PyTorch DDP's `bf16_compress_hook` for gradients) or each update sent up
    as int8 with a scale a tensor (`federation.uplink: int8`, FedPAQ's quantised update); `bnb-int8`
    is B&B's dropout on top of the int8 uplink. Its plan carries the system with that payload."""
    own_system = True

    def __init__(self, name: str, keys: dict, **options):
        super().__init__(name, **options)
        self.keys = keys

    def plan(self, spec, m, report, sized=None):
        """The planner's plan on the system with the payload the run sends under its keys."""
        if sized is None:
            raise TypeError(f"{self.name} plans for the run's own payload: pass sized")
        small = sized(self.keys)
        return super().plan(small, system_model(small), report)


@dataclass
class Sized:
    """The system `spec` with the payload the run of `cfg` (its adapter: `layout`) sends under other
    run keys: the bits a value up and down and the uplink's extra bits (int8's scales)."""
    spec: SystemSpec
    cfg: RunConfig
    layout: AdapterLayout

    def __call__(self, keys: dict) -> SystemSpec:
        run = with_overrides(self.cfg, keys)
        bits = COMM_BITS[run.federation.comm_dtype]
        up, extra = uplink_bits(run, self.layout)
        payload = self.spec.payload.model_copy(update={
            "bits_per_value": float(bits), "uplink_bits_per_value": up if up != bits else None, "uplink_extra_bits": extra})
        return self.spec.model_copy(update={"payload": payload}, deep=True)


REGISTRY = {method.name: method for method in (
    Planner("bnb"), Planner("psca"), Planner("fixed", gamma="best"), Planner("equal-bandwidth"),
    Planner("none", fallback=0.0), FitOnly(), LongerRounds(),
    OnPayload("bf16", {"federation.comm_dtype": "bfloat16"}, fallback=0.0, solver="none"),
    OnPayload("int8", {"federation.uplink": "int8"}, fallback=0.0, solver="none"),
    OnPayload("bnb-int8", {"federation.uplink": "int8"}, solver="bnb"), Unplanned())}
METHODS = tuple(REGISTRY)


@dataclass
class MethodResult:
    """One planning method in a comparison: whether its plan fits, its bound and mean rate, and each seed's run
    (summary and accuracy-against-time curve)."""
    method: str
    feasible: bool
    bound: float  # the plan's G(gamma) (unplanned: G at rate 0)
    mean_rate: float
    runs: list[Summary] = field(default_factory=list)  # one summary per seed
    curves: list[list[tuple[float, float, float]]] = field(default_factory=list)  # per seed: (s, J, metric)
    device_rounds: list[int] = field(default_factory=list)  # per seed: devices asked to train, over rounds

    @property
    def never_met(self) -> bool:
        """Every device missed a limit in every round of every seed: the model never moved."""
        return bool(self.runs) and all(s.system.devices_dropped_for_limits >= n > 0
                                       for s, n in zip(self.runs, self.device_rounds))


def make_plans(spec, methods: list[str], folder: Path, report=print, sized: Sized | None = None) -> dict[str, Path | None]:
    """plan.json of every method (unplanned: None), written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    m = system_model(spec)
    paths: dict[str, Path | None] = {}
    for name in methods:
        plan = REGISTRY[name].plan(spec, m, report, sized)
        if plan is None:
            paths[name] = None
            continue
        paths[name] = folder / f"{name}.json"
        plan.save(paths[name])
        rates = [d.gamma for d in plan.devices if d.takes_part] or [0.0]
        report(f"{name}: bound {plan.objective:.4f}, rates {min(rates):.3f}..{max(rates):.3f}")
    return paths


MAX_BUDGET_ROUNDS = 10_000


def round_cost(plan, m, enforce: str) -> tuple[float, float]:
    """A round's simulated seconds and joules under `plan`: the slowest device, or T_max when a device
    misses it and is dropped (the server waits until the deadline); every device's energy."""
    lat = [d.latency_s for d in plan.devices if d.takes_part]
    late = enforce == "drop" and max(lat) > m.T * (1 + 1e-12)
    return (m.T if late else max(lat)), sum(d.energy_j for d in plan.devices)


def budget_rounds(cfg: RunConfig, plan_path: Path | None, spec, method: str) -> int | None:
    """The rounds `method`'s plan fits in the run budget (None without a budget; 0 when not one does):
    rounds uncapped, the budget decides. The run's own budget check still ends it exactly, should a
    round cost more."""
    fed = cfg.federation
    if fed.time_budget_s is None and fed.energy_budget_j is None:
        return None
    plan = load_plan(plan_path) if plan_path is not None else None
    m = system_model(plan.system if plan is not None else spec)  # a relaxed limit is the plan's own
    plan = plan or as_is_plan(spec, [0.0] * m.K, method, "no planning", m)
    seconds, joules = round_cost(plan, m, cfg.system.enforce)
    fits = [math.floor(budget / cost * (1 + 1e-12)) for budget, cost in
            ((fed.time_budget_s, seconds), (fed.energy_budget_j, joules)) if budget is not None]
    return min(min(fits), MAX_BUDGET_ROUNDS)  # 0: not one round fits; the method is not trained


def check(cfg: RunConfig, spec, system: Path, methods: list[str], seeds: int):
    """Everything `compare` can refuse, before anything is written; the run's adapter layout."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if cfg.plan is not None:
        raise UserError("compare makes each method's plan itself: drop plan from the config")
    check_system(cfg, spec, system)
    # the run's shards and model, built once: every refusal of a run on this system comes before anything is written
    exp = build(with_overrides(cfg, {"system.file": str(system), "plan": None}), eval_data=False)
    for method in methods:  # a method's own keys must make a valid run too
        try:
            with_overrides(cfg, REGISTRY[method].keys)
        except UserError as err:
            raise UserError(f"--methods {method} cannot run with this config ({err}); leave it out") from None
    return exp.fm.layout


def compare(cfg: RunConfig, system: Path, out: Path, methods: list[str], seeds: int, jobs: int = 1,
            threads: int | None = None, console=None, show_progress: bool = True,
            target: float | None = None) -> list[MethodResult]:
    """Plan with every method, train each plan for `seeds` seeds, then tabulate and plot in `out`
    (`target`: the metric that time / energy to target is measured at; default 0.95 x the best)."""

    system = Path(system).expanduser().resolve()
    spec = load_system(system)
    layout = check(cfg, spec, system, methods, seeds)
    check_jobs(jobs, threads)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    report = (lambda line: console.print(line, highlight=False)) if console else print
    plans = make_plans(spec, methods, out / "plans", report, Sized(spec, cfg, layout))
    rounds = {method: budget_rounds(cfg, plans[method], spec, method) for method in methods}
    if any(n is not None for n in rounds.values()):
        report("rounds from the budget: " + ", ".join(f"{m} {n}" for m, n in rounds.items()))
    points = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for method in methods:
            way = REGISTRY[method]
            over = {"system.file": None if way.own_system else str(system),
                    "plan": str(plans[method].resolve()) if plans[method] else None,
                    "seed": seed, "dropout.sampler": "budget", "federation.min_devices": 0, **way.keys}
            if rounds[method] == 0:
                continue  # its table row says that no round fits the budget
            if rounds[method] is not None:
                over["federation.rounds"] = rounds[method]
            point_cfg = with_overrides(cfg, over)
            points.append(Point(f"{method}__seed={seed}", {"method": method}, seed, point_cfg))
    run_points(points, out / "runs", jobs, threads, console, show_progress)
    results = collect(out, methods, plans, cfg, spec)
    write_table(results, out / "compare.md", out / "compare.csv", cfg, system, target)
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
            rates = [d.gamma for d in plan.devices if d.takes_part] or [0.0]
            feasible, bound, rate = plan.feasible, plan.objective, statistics.fmean(rates)
        res = MethodResult(method, feasible, bound, rate)
        for folder in sorted((out / "runs").glob(f"{method}__seed=*")):
            run = RunFolder(folder)
            res.runs.append(run.summary())
            clock, joules, curve = 0.0, 0.0, []
            records = run.records()
            for r in records:
                clock, joules = clock + r.system.latency_s, joules + r.system.energy_j
                curve.append((clock, joules, r.eval.get(main, math.nan)))
            res.curves.append(curve)
            res.device_rounds.append(sum(len(r.participants) for r in records))
        results.append(res)
    return results


def _stat(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


COLUMNS = ("final", "at_time", "at_energy", "to_target_s", "to_target_j", "gap", "rounds", "simulated_s",
           "energy_j", "mb", "dropped")


def within(curve: list[tuple[float, float, float]], budget: float, axis: int) -> float:
    """The metric of the last evaluation within `budget` on `axis` (0: seconds, 1: joules)."""
    inside = [point[2] for point in curve if point[axis] <= budget * (1 + 1e-9)]
    return inside[-1] if inside else math.nan


def _first(curve: list[tuple[float, float, float]], target: float, axis: int) -> float:
    """Seconds (axis 0) or joules (axis 1) until the metric first reaches `target`; nan if never."""
    return next((point[axis] for point in curve if point[2] >= target), math.nan)


def default_target(results: list[MethodResult], main: str) -> float:
    """0.95 x the best method's mean final metric: a level most methods can reach, late or early."""
    finals = [statistics.fmean(v) for r in results if not r.never_met
              for v in [[s.final.get(main) for s in r.runs if s.final.get(main) is not None]] if v]
    return 0.95 * max(finals) if finals else math.nan


def rows(results: list[MethodResult], main: str, target: float | None = None) -> list[dict]:
    """The comparison table's numbers: mean and standard deviation over seeds per method. Equal time and
    energy: per seed, the least total any method that trained spent."""
    target = default_target(results, main) if target is None else target
    seeds = max((len(r.curves) for r in results), default=0)
    spent = [[r.curves[i][-1] for r in results if i < len(r.curves) and r.curves[i] and not r.never_met]
             for i in range(seeds)]
    t_eq = [min((c[0] for c in pts), default=math.nan) for pts in spent]
    e_eq = [min((c[1] for c in pts), default=math.nan) for pts in spent]
    out = []
    for res in results:
        s = res.runs
        out.append({
            "method": res.method, "feasible": res.feasible, "bound": res.bound, "mean_rate": res.mean_rate,
            "runs": len(s), "never_met": res.never_met, "target": target,
            "final": _stat([x.final.get(main) for x in s]),
            "at_time": _stat([within(c, t_eq[i], 0) for i, c in enumerate(res.curves)]),
            "at_energy": _stat([within(c, e_eq[i], 1) for i, c in enumerate(res.curves)]),
            "to_target_s": _stat([_first(c, target, 0) for c in res.curves]),
            "to_target_j": _stat([_first(c, target, 1) for c in res.curves]),
            "reached": sum(1 for c in res.curves if not math.isnan(_first(c, target, 0))),
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


NEVER_MET = "cannot meet the limit"
NO_ROUND = "no round fits the budget"
_METRIC_COLUMNS = ("final", "at_time", "at_energy", "to_target_s", "to_target_j", "gap")


def write_table(results: list[MethodResult], md: Path, csv_path: Path, cfg: RunConfig, system: Path,
                target: float | None = None) -> str:
    """The comparison's Markdown table and CSV; the table's text."""
    main = _results_metric(results, cfg)
    table = rows(results, main, target)
    target = table[0]["target"] if table else math.nan
    head = (f"| method | plan fits | bound G | mean rate | {main} | at equal time | at equal energy | "
            f"s to {target:.4f} | J to {target:.4f} | gap | rounds | simulated s | energy J | MB sent | "
            "devices dropped | runs |\n" + "|---" * 16 + "|")
    lines = [head]
    for r in table:
        def cell(k):
            if r["runs"] == 0:
                return NO_ROUND if k in _METRIC_COLUMNS else "n/a"
            if r["never_met"] and k in _METRIC_COLUMNS:
                return NEVER_MET
            mean, std = r[k]
            if math.isnan(mean):
                return "n/a"
            if k in ("to_target_s", "to_target_j"):
                return f"{mean:.4g} +- {std:.2g} ({r['reached']}/{r['runs']})"
            return f"{mean:.4f} +- {std:.4f}" if k in ("final", "at_time", "at_energy", "gap") else f"{mean:.4g} +- {std:.2g}"
        lines.append(f"| {r['method']} | {'yes' if r['feasible'] else 'no'} | {r['bound']:.4f} | {r['mean_rate']:.3f} | "
                     + " | ".join(cell(k) for k in COLUMNS) + f" | {r['runs']} |")
    text = "\n".join(lines)
    fed = cfg.federation
    budget = ", ".join(f"{k} {v:g}" for k, v in (("time budget s", fed.time_budget_s),
                                                 ("energy budget J", fed.energy_budget_j)) if v is not None)
    rounds = f"rounds from the budget ({budget})" if budget else f"{fed.rounds} rounds"
    md.write_text(f"# fedlodrop compare {system}\n\ntask {cfg.task}, model {cfg.model}, {fed.devices} devices, "
                  f"{rounds}; mean +- standard deviation over seeds. At equal time / energy: the last evaluation "
                  f"within the least simulated time / energy any method that trained spent on the seed. To "
                  f"{target:.4f}: until the {main} first reached it (seeds that did / runs). "
                  f"\"{NEVER_MET}\": every device missed a limit every round, the model never moved.\n\n{text}\n")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "feasible", "never_met", "bound", "mean_rate", "runs", "target", "reached"]
                        + [f"{k}_{s}" for k in COLUMNS for s in ("mean", "std")])
        for r in table:
            writer.writerow([r["method"], r["feasible"], r["never_met"], r["bound"], r["mean_rate"], r["runs"],
                             r["target"], r["reached"]] + [v for k in COLUMNS for v in r[k]])
    return text


def plot(results: list[MethodResult], path: Path, cfg: RunConfig) -> None:
    """Left: the task's final metric per method (mean, spread over seeds); then the metric against the
    simulated clock and against the simulated energy, each seed's run as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _results_metric(results, cfg)
    table = rows(results, main)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.2))
    xs = range(len(table))
    ax1.bar(xs, [math.nan if r["never_met"] else r["final"][0] for r in table],
            yerr=[0.0 if r["never_met"] else r["final"][1] for r in table], capsize=4,
            color=["tab:blue" if r["feasible"] else "tab:gray" for r in table])
    for x, r in zip(xs, table):
        if r["never_met"]:
            ax1.text(x, 0.5, NEVER_MET, rotation=90, ha="center", va="center", fontsize=8, transform=ax1.get_xaxis_transform())
    ax1.set_xticks(list(xs), [r["method"] for r in table], rotation=20)
    finite = [r["final"][0] - r["final"][1] for r in table if not math.isnan(r["final"][0]) and not r["never_met"]]
    if finite:
        ax1.set_ylim(max(0.0, min(finite) - 0.05), None)
    ax1.set_ylabel(f"final {main} (grey: plan does not fit)")
    for res, color in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2):
        for i, curve in enumerate(res.curves):
            if curve and not res.never_met:
                label = res.method if i == 0 else None
                ax2.plot([c[0] for c in curve], [c[2] for c in curve], marker=".", color=color, alpha=0.8, label=label)
                ax3.plot([c[1] for c in curve], [c[2] for c in curve], marker=".", color=color, alpha=0.8, label=label)
    ax2.set_xlabel("simulated time [s]")
    ax3.set_xlabel("simulated energy, all devices [J]")
    for ax in (ax2, ax3):
        ax.set_ylabel(f"validation {main}")
        ax.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
