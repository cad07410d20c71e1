"""The paper's claim in a comparison that could come out either way (issue 29).

    python benchmarks/bench_plan_vs_baselines.py --jobs 2 --threads 1 [--systems 6] [--seeds 3] [--screen 60]
        [--set KEY=VALUE ...] [--methods bnb,fixed,int8] [--out DIR] [--doc PAGE]

1. Screening, with the planner alone (no training): random cells around the benchmark's run (its
   payload, local epochs and samples, Dirichlet(1) data sizes: a wide spread), energy budgets 0.3-1.0 x a
   full-speed round so that they bind, the latency limit halfway between what gamma_max and the
   bound's free optimum need. A system is kept when B&B's rates differ from the best shared rate's
   or equal bandwidth's by at least `--min-disagreement` (0.1) in sample-weighted L1 distance,
   sum_k w_k |gamma_k - gamma'_k|; the page says how many were screened to find `--systems`.
2. On each kept system `fedlodrop compare` trains, for every training seed, B&B and the baselines
   under one simulated time budget (`--budget-rounds` x T_max): each method trains the rounds its
   plan fits in the budget. Baselines: the best shared rate (`fixed`), equal bandwidth, and four
   that meet the limit without dropout: `fit-only` (rate 0 with the devices that fit), `longer-rounds`
   (rate 0 at the round limit it meets, fewer rounds), `bf16` (rate 0, half the bytes both ways) and
   `int8` (rate 0, each update sent up as int8 with a scale a tensor: FedPAQ's quantised update).
   `bnb-int8` is B&B planned on the int8 uplink's payload: the plan's dropout on top of quantisation.
3. Paired differences per (system, seed), B&B (and B&B on the int8 uplink) minus each baseline, of the metric at equal time
   (the budget) and at equal energy (the last evaluation within the energy B&B spent on that system
   and seed; a method that spent less is read at its end),
   with 95 % t intervals; the number of pairs an interval of +-0.5 points would need.

Runs are reused: a rerun trains only what is missing (bench_out/plan-vs-baselines). Output:
docs/benchmarks/plan-vs-baselines.md, .csv and .png.

The long regime (issue 29 item 4: regime D of bench_regime_pilot.py, where rate 0's accuracy
peaks and falls), about 27 min a run on one thread:

    python benchmarks/bench_plan_vs_baselines.py --jobs 2 --threads 1 --systems 5 --seeds 1 --budget-rounds 20 \
        --set federation.local_epochs=10 --set lora.r=16 --set "lora.target_modules=[query,key,value,dense]" \
        --set train.batch_size=16 --set train.lr=0.002 --methods bnb,int8 \
        --out bench_out/plan-vs-baselines-long --doc docs/benchmarks/plan-vs-baselines-long.md

(batch 16 and lr 0.002: at the defaults, batch 8 and lr 0.005, the largest Dirichlet shard takes
200 local steps a round and training diverges; B&B's run fell to the majority class by round 3.)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _tables import grid_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PLAN = "bnb"
PLANS = [PLAN, "bnb-int8"]  # the plan, and the plan on the int8 uplink (dropout and quantisation together)
BASELINES = ["fixed", "equal-bandwidth", "fit-only", "longer-rounds", "bf16", "int8"]
METHODS = [*PLANS, *BASELINES]
# the short regime: 6 devices share 360 training examples, 1 local epoch a round
RUN = ["federation.devices=6", "data.max_train_samples=360", "data.max_eval_samples=300",
       "data.train_eval_samples=0", "train.max_length=48", "train.batch_size=8"]


def base_config(threads: int, extra: list[str]):
    from fedlodrop.run.settings import load_config

    return load_config(None, [*RUN, *extra, f"train.threads={threads}"])


def screen(cfg, count: int, wanted: int, min_disagreement: float, out: Path, report) -> tuple[list[Path], int]:
    """Random cells around the run, kept where B&B and a baseline planner disagree; (kept files, screened)."""
    import numpy as np

    from fedlodrop.planning import InfeasibleError, optimize, random_system, save_system, system_model
    from fedlodrop.planning.spec import PayloadSpec
    from fedlodrop.run.experiment import run_shape

    shape = run_shape(cfg)
    payload = PayloadSpec(model=None, rank=shape.rank, num_labels=shape.num_labels,
                          adapter_values=shape.adapter_values, head_values=shape.head_values,
                          backbone_params=float(shape.backbone_params), bits_per_value=float(shape.bits_per_value))
    kept, screened = [], 0
    for seed in range(count):
        if len(kept) == wanted:
            break
        screened += 1
        spec = random_system(len(shape.samples), seed, samples_total=sum(shape.samples), payload=payload,
                             local_epochs=shape.local_epochs, energy_range=(0.3, 1.0), concentration=1.0)
        m = system_model(spec)
        try:
            plans = {name: optimize(spec, name, **({"gamma": "best"} if name == "fixed" else {}))
                     for name in ("bnb", "fixed", "equal-bandwidth")}
        except InfeasibleError:
            continue
        g = {name: np.array(p.gammas) for name, p in plans.items()}
        apart = max(float(m.w @ np.abs(g["bnb"] - g[other])) for other in ("fixed", "equal-bandwidth"))
        if apart >= min_disagreement:
            path = out / f"system{seed}" / "system.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_system(spec, path)
            kept.append(path)
            report(f"system seed {seed}: kept (B&B vs baselines {apart:.3f})")
    return kept, screened


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences."""
    from scipy.stats import t

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, math.nan, math.nan
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def pairs_for(diffs: list[float], half_width: float) -> int:
    """Pairs a 95 % interval of +-`half_width` would take at this spread (normal approximation)."""
    if len(diffs) < 2:
        return 0
    return math.ceil((1.96 * statistics.stdev(diffs) / half_width) ** 2)


def read(where: Path, seed: int, main: str, methods: list[str]) -> dict[str, dict]:
    """Each method's curve and summary on one system and seed, and the rates its plan gave."""
    from fedlodrop.run.folder import RunFolder

    runs = {}
    for method in methods:
        if not (where / "runs" / f"{method}__seed={seed}").is_dir():
            continue  # no round of its plan fits the budget: not trained
        folder = RunFolder(where / "runs" / f"{method}__seed={seed}")
        clock, joules, curve, losses = 0.0, 0.0, [], []
        for r in folder.records():
            clock, joules = clock + r.system.latency_s, joules + r.system.energy_j
            curve.append((clock, joules, r.eval.get(main, math.nan)))
            losses.append((clock, joules, r.eval_loss))
        s = folder.summary()
        runs[method] = {"curve": curve, "loss_curve": losses, "final": s.final.get(main, math.nan), "rounds": s.rounds,
                        "device_rounds": sum(len(r.participants) for r in folder.records()),
                        "seconds": s.system.simulated_time_s, "joules": s.system.energy_j,
                        "dropped": s.system.devices_dropped_for_limits,
                        "gap": s.generalization_gap.get(main, math.nan), "rates": planned_rates(where, method)}
    return runs


def planned_rates(where: Path, method: str) -> list[float]:
    """The dropout rate the method's plan gave each device (empty: it trains without a plan file)."""
    from fedlodrop.planning import load_plan

    plan = where / "plans" / f"{method}.json"
    return [d.gamma for d in load_plan(plan).devices] if plan.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid_args(parser)
    parser.add_argument("--systems", type=int, default=6, help="systems to train on (kept by the screening)")
    parser.add_argument("--screen", type=int, default=200, help="most random systems to screen")
    parser.add_argument("--min-disagreement", type=float, default=0.1)
    parser.add_argument("--budget-rounds", type=float, default=8.0, help="time budget in units of T_max")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="a run key (the regime)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "plan-vs-baselines")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks" / "plan-vs-baselines.md")
    parser.add_argument("--methods", default=",".join(METHODS), help="the rows to train (B&B always)")
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in {PLAN, *args.methods.split(",")}]

    import torch
    from rich.console import Console

    from fedlodrop.planning import load_system
    from fedlodrop.run.settings import with_overrides
    from fedlodrop.studies.comparison import compare, within

    console = Console(stderr=True)
    report = lambda line: console.print(line, highlight=False)  # noqa: E731
    t0 = time.perf_counter()
    cfg = base_config(args.threads, args.extra)
    systems, screened = screen(cfg, args.screen, args.systems, args.min_disagreement, args.out, report)
    report(f"screened {screened} random systems, kept {len(systems)}")
    pairs: list[dict] = []
    for system in systems:
        spec = load_system(system)
        run_cfg = with_overrides(cfg, {"federation.time_budget_s": args.budget_rounds * spec.round.latency_s,
                                       "system.file": str(system)})
        report(f"[{(time.perf_counter() - t0) / 60:.0f} min] {system.parent.name}")
        compare(run_cfg, system, system.parent, args.methods, args.seeds, args.jobs, args.threads, console=console,
                show_progress=False)
        for seed in range(cfg.seed, cfg.seed + args.seeds):
            runs = read(system.parent, seed, "accuracy", args.methods)
            for r in runs.values():
                r["at_time"] = r["final"]  # every method spends at most the budget
                # equal energy: within what the plan spent (a frugal method: its final), per plan
                r["at_energy"] = {plan: within(r["curve"], runs[plan]["joules"], 1) for plan in PLANS if plan in runs}
                r["loss_at_time"] = r["loss_curve"][-1][2]
                r["loss_at_energy"] = {plan: within(r["loss_curve"], runs[plan]["joules"], 1)
                                       for plan in PLANS if plan in runs}
            pairs.append({"system": system.parent.name, "seed": seed, "runs": runs})
    minutes = (time.perf_counter() - t0) / 60
    write(args, pairs, screened, minutes, torch.get_num_threads())
    print(args.doc.read_text())


def write(args, pairs: list[dict], screened: int, minutes: float, threads: int) -> None:
    lines = ["# The plan against baselines that can meet the limit (issue 29)", "",
             f"`python benchmarks/bench_plan_vs_baselines.py --jobs {args.jobs} --threads {args.threads} "
             f"--systems {args.systems} --seeds {args.seeds} --budget-rounds {args.budget_rounds:g}"
             + "".join(f" --set {x}" for x in args.extra)
             + (f" --methods {','.join(args.methods)}" if args.methods != METHODS else "") + f"`; {minutes:.0f} min in this invocation (finished runs are reused) on {platform.processor() or platform.machine()}, "
             f"{args.jobs} processes x {args.threads} torch thread(s).", "",
             f"Run: Rotten Tomatoes, the offline default model and LoRA, {' '.join(effective(RUN + args.extra))}. "
             f"Screened {screened} random systems with the planner alone to find {len({p['system'] for p in pairs})} "
             f"where B&B's rates differ from the best shared rate's or equal bandwidth's by at least "
             f"{args.min_disagreement} (sample-weighted L1). Time budget: {args.budget_rounds:g} x T_max per "
             f"system; each method trains the rounds its plan fits. {len(pairs)} (system, seed) pairs.", "",
             "At equal time: every method ends within the budget. At equal energy: each method's last "
             "evaluation within the energy B&B spent on that system and seed (a method that spent less: its end; "
             "in the paired table of B&B on the int8 uplink, within what that plan spent). "
             "Mean +- standard deviation over the pairs; devices dropped: device-rounds left out for missing a "
             "limit, of those asked. Best accuracy and lowest validation loss in the budget: the best round's, "
             "picked on the validation set itself (an early stop that knows the answer: optimistic for every row "
             "alike).", "",
             "| method | accuracy at equal time | at equal energy | best accuracy in the budget | validation loss at "
             "equal time | lowest in the budget | rounds | simulated s | energy J | devices dropped "
             "| planned rates (min-max over devices and systems) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(values, digits=4):
        v = [x for x in values if not math.isnan(x)]
        return "n/a" if not v else f"{statistics.fmean(v):.{digits}f} +- {statistics.stdev(v) if len(v) > 1 else 0:.{digits}f}"

    for method in args.methods:
        rs = [p["runs"][method] for p in pairs if method in p["runs"]]
        if not rs:
            lines.append(f"| {method} | no round fits the budget | | | | | | | | | |")
            continue
        dropped, asked = sum(r["dropped"] for r in rs), sum(r["device_rounds"] for r in rs)
        flag = " (cannot meet the limit: most devices dropped)" if dropped > asked / 2 else ""
        lines.append(f"| {method}{flag} | {ms([r['at_time'] for r in rs])} | {ms([r['at_energy'][PLAN] for r in rs])} | "
                     f"{ms([max(c[2] for c in r['curve']) for r in rs])} | {ms([r['loss_at_time'] for r in rs], 3)} | "
                     f"{ms([min(c[2] for c in r['loss_curve']) for r in rs], 3)} | "
                     f"{ms([r['rounds'] for r in rs], 1)} | {ms([r['seconds'] for r in rs], 3)} | "
                     f"{ms([r['joules'] for r in rs], 3)} | {dropped} of {asked} | {span(r['rates'] for r in rs)} |")
    baselines = [m for m in BASELINES if m in args.methods]
    for plan in PLANS:
        if plan in args.methods:
            lines += paired(plan, pairs, baselines) + paired(plan, pairs, baselines, LOSS)
    lines.append("")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")
    with open(args.doc.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["system", "seed", "method", "at_time", "at_energy", "rounds", "seconds", "joules", "dropped"])
        for p in pairs:
            for method, r in p["runs"].items():
                w.writerow([p["system"], p["seed"], method, r["at_time"], r["at_energy"][PLAN], r["rounds"],
                            r["seconds"], r["joules"], r["dropped"]])
    plot(pairs, args.doc.with_suffix(".png"), baselines)


def effective(items: list[str]) -> list[str]:
    """KEY=VALUE items with a key given twice shown once, at its last value (the one the run takes)."""
    keys: dict[str, str] = {}
    for item in items:
        key, value = item.split("=", 1)
        keys.pop(key, None)
        keys[key] = value
    return [f"{k}={v}" for k, v in keys.items()]


def span(rates) -> str:
    """min-max of the planned rates (rate 0 for a row without a plan file)."""
    flat = [g for r in rates for g in r] or [0.0]
    return f"{min(flat):.2f}-{max(flat):.2f}"


NAMES = {"bnb": "B&B", "bnb-int8": "B&B on the int8 uplink"}


@dataclass(frozen=True)
class Metric:
    """What a paired table compares: accuracy in points (higher is better) or the validation loss
    (lower is better: a model that overfits grows confident and wrong before its accuracy moves)."""

    label: str
    prefix: str  # the run's keys: PREFIX + "at_time", PREFIX + "at_energy"
    scale: float
    unit: str
    higher_better: bool
    half_width: float  # the interval the "pairs for" column sizes for, in `unit`


ACCURACY = Metric("accuracy", "", 100.0, "points", True, 0.5)
LOSS = Metric("validation loss", "loss_", 1.0, "nats", False, 0.05)


def paired(plan: str, pairs: list[dict], baselines: list[str], metric: Metric = ACCURACY) -> list[str]:
    """The table of paired differences, `plan` minus each baseline, and its verdict lines."""
    who, at_time, at_energy, k = NAMES[plan], metric.prefix + "at_time", metric.prefix + "at_energy", metric.scale
    lines = ["", f"Paired differences in {metric.label}, {who} minus the baseline, per (system, seed), in "
             f"{metric.unit} ({'higher' if metric.higher_better else 'lower'} is better); 95 % t interval; pairs an "
             f"interval of +-{metric.half_width:g} would take at this spread:", "",
             "| baseline | at equal time | 95 % CI | at equal energy | 95 % CI | pairs for +-"
             f"{metric.half_width:g} (time) | read before its end at equal energy |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    mine = [p for p in pairs if plan in p["runs"]]
    for base in baselines:
        both = [p for p in mine if base in p["runs"]]
        if len(both) < len(mine):
            lines.append(f"| {base} | no round fits the budget in {len(mine) - len(both)} of {len(mine)} pairs "
                         "(left out below) | | | | | |")
        if len(both) < 2:
            continue
        dt = [k * (p["runs"][plan][at_time] - p["runs"][base][at_time]) for p in both]
        de = [k * (p["runs"][plan][at_energy][plan] - p["runs"][base][at_energy][plan]) for p in both]
        de = [d for d in de if not math.isnan(d)]  # nan: the baseline had no evaluation within that energy
        mt, lt, ht = t_interval(dt)
        me, le, he = t_interval(de) if len(de) > 1 else (math.nan,) * 3
        rows.append((base, mt, lt, ht, me, le, he))
        early = sum(1 for p in both if p["runs"][base][at_energy][plan] != p["runs"][base][at_time])
        if len(de) < 2:
            energy = f"none: no evaluation within {who}'s energy in {len(both) - len(de)} of {len(both)} pairs | -"
        else:
            missing = f" ({len(de)} of {len(both)} pairs with an evaluation)" if len(de) < len(both) else ""
            energy = f"{me:+.2f}{missing} | [{le:+.2f}, {he:+.2f}]"
        lines.append(f"| {base} | {mt:+.2f} | [{lt:+.2f}, {ht:+.2f}] | {energy} | "
                     f"{pairs_for(dt, metric.half_width)} | {early} of {len(both)} pairs |")
    if not rows:
        return lines + ["", "Too few pairs for an interval."]
    fair = [r for r in rows if sum(p["runs"][r[0]]["dropped"] for p in mine if r[0] in p["runs"])
            <= sum(p["runs"][r[0]]["device_rounds"] for p in mine if r[0] in p["runs"]) / 2]
    sign = 1 if metric.higher_better else -1
    best = max((r[0] for r in fair),
               key=lambda b: sign * statistics.fmean(p["runs"][b][at_time] for p in mine if b in p["runs"]))
    row = next(r for r in rows if r[0] == best)
    wins, loses = (row[2] > 0, row[3] < 0) if metric.higher_better else (row[3] < 0, row[2] > 0)
    verdict = "beats" if wins else "loses to" if loses else "is not distinguishable from"
    lines += ["", f"In {metric.label}, the best baseline that meets the limit, at equal time, is **{best}**; {who} "
              f"**{verdict}** it: {row[1]:+.2f} {metric.unit}, 95 % CI [{row[2]:+.2f}, {row[3]:+.2f}]."]
    for label, lo, hi in (("equal time", 2, 3), ("equal energy", 5, 6)):
        above = [r[0] for r in rows if r[lo] > 0]
        below = [r[0] for r in rows if r[hi] < 0]
        better, worse = (above, below) if metric.higher_better else (below, above)
        level = [r[0] for r in rows if r[lo] <= 0 <= r[hi]]
        unread = [r[0] for r in rows if math.isnan(r[lo])]
        lines.append(f"At {label}, {who} is better than {', '.join(better) or 'no baseline'} (an interval that "
                     "excludes zero)"
                     + (f"; not distinguishable from {', '.join(level)}" if level else "")
                     + (f"; worse than {', '.join(worse)}" if worse else "")
                     + (f"; {', '.join(unread)} had no evaluation within {who}'s energy (their first round "
                        "costs more)" if unread else "") + ".")
    return lines


def plot(pairs: list[dict], path: Path, baselines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, base in enumerate(baselines):
        dt = [100 * (p["runs"][PLAN]["at_time"] - p["runs"][base]["at_time"]) for p in pairs if base in p["runs"]]
        if len(dt) < 2:
            continue
        ax1.scatter([i] * len(dt), dt, alpha=0.6)
        ax1.errorbar([i + 0.15], [statistics.fmean(dt)], yerr=[[statistics.fmean(dt) - t_interval(dt)[1]],
                                                                [t_interval(dt)[2] - statistics.fmean(dt)]],
                     fmt="o", color="black", capsize=4)
    ax1.axhline(0, color="gray", lw=0.8)
    ax1.set_xticks(range(len(baselines)), baselines, rotation=15)
    ax1.set_ylabel("B&B - baseline, accuracy points at equal time")
    first = pairs[0]
    for method, r in first["runs"].items():
        ax2.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], marker=".", label=method)
    ax2.set_xlabel(f"simulated time [s] ({first['system']}, seed {first['seed']})")
    ax2.set_ylabel("validation accuracy")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
