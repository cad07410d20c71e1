"""The paper's claim end to end (issue 16): the planner against the baselines, trained.

    python benchmarks/bench_compare.py [--jobs 2] [--threads 1] [--tasks rotten_tomatoes,sst2,mrpc]

For each task (the offline default's Rotten Tomatoes, SST-2 and MRPC with the default head), each
latency limit (tight, loose) and each of 3 random systems of 10 devices, `fedlodrop compare` plans
the system with every method (bnb, psca, fixed, equal-bandwidth, none, unplanned) and trains each
plan with 3 training seeds on the simulated clock and meter. The systems are `system random` cells
whose payload is what the run really sends (Q, head size, 32-bit values of this LoRA on MiniLM) and
whose devices hold the run's training set in Dirichlet(4) shares; the tight limit sits at
`latency_position` 0.3 between what gamma_max needs and what the bound's free optimum needs, the
loose one at 1.1 x what rate 0 needs (no device is forced to drop anything; the energy budgets,
0.6-1.3 x a full-speed round, still bind). Runs are small (sized for < 2 h on 2 cores): they are the short-run regime.

Reported per task x limit x method, mean +- std over 3 systems x 3 seeds: the final metric (equal
rounds), the metric at equal simulated time and at equal energy (the last round within B&B's
total time / energy on the same system and seed), the generalization gap, rounds, simulated time,
energy, bytes, devices dropped for missing a limit. Then the bound: `calibrate` fits e0 and c_emp
on the runs of systems 0 and 1, and on system 2 (held out) the Spearman rank correlation between
each method's bound and its measured error (1 - final metric) and between the bound's Gap term
and the measured generalization gap.

Output: docs/benchmarks/compare.md and compare.png; run folders under bench_out/compare (reused).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

from _tables import grid_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["bnb", "psca", "fixed", "equal-bandwidth", "none", "unplanned"]
LIMITS = {"tight": 0.3, "loose": None}  # latency_position; loose: 1.1 x what rate 0 needs
# small runs (324 of them): 10 devices share 300 training examples, 3 rounds of 1 local epoch
RUN = ["federation.devices=10", "federation.rounds=3", "data.max_train_samples=300", "data.max_eval_samples=300",
       "data.train_eval_samples=60", "train.max_length=48", "train.batch_size=8"]


def base_config(task: str, glue: Path, threads: int):
    from fedlodrop.run.settings import load_config

    extra = [] if task == "rotten_tomatoes" else [f"data.glue_dir={glue}"]
    return load_config(None, [f"task={task}", *RUN, *extra, f"train.threads={threads}"])


def make_system(cfg, seed: int, position: float, path: Path):
    """A random cell for this run: its payload is the LoRA this config trains (from the model's
    layout), its devices hold the run's training set."""
    from fedlodrop.run.experiment import build
    from fedlodrop.model.backbone import resolve_model_path
    from fedlodrop.planning import random_system, save_system
    from fedlodrop.planning.spec import PayloadSpec

    exp = build(cfg, eval_data=False)
    layout, n_train = exp.fm.layout, sum(len(exp.shards.raw[k]) for k in range(len(exp.shards)))
    payload = PayloadSpec(model=str(Path(resolve_model_path(cfg.model)) / "config.json"), rank=cfg.lora.r,
                          adapter_values=layout.adapter_values, head_values=layout.head_values, bits_per_value=32)
    spec = random_system(cfg.federation.devices, seed=seed, samples_total=n_train,
                         local_epochs=cfg.federation.local_epochs, latency_position=position or 0.5, payload=payload)
    if position is None:  # loose: every device could go without dropout (energy budgets still bind)
        import numpy as np

        from fedlodrop.planning import system_model
        from fedlodrop.planning.feasibility import min_latency_limit

        m = system_model(spec)
        spec.round.latency_s = float(f"{1.1 * min_latency_limit(m, np.zeros(m.K)):.5g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_system(spec, path)
    return spec


def within(curve: list[tuple[float, float, float]], budget: float, axis: int) -> float:
    """The metric after the last round whose cumulative time (axis 0) / energy (axis 1) fits."""
    fits = [point[2] for point in curve if point[axis] <= budget * (1 + 1e-9)]
    return fits[-1] if fits else math.nan


def curves(folder: Path, main: str) -> list[tuple[float, float, float]]:
    from fedlodrop.run.folder import RunFolder

    t = e = 0.0
    out = []
    for r in RunFolder(folder).records():
        t, e = t + r.system.latency_s, e + r.system.energy_j
        out.append((t, e, r.eval.get(main, math.nan)))
    return out


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(set(x)) > 1 and len(set(y)) > 1 else math.nan


def fmt(values: list[float], digits: int = 4) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    missing = f" ({len(values) - len(v)} none)" if len(v) < len(values) else ""
    return f"{statistics.fmean(v):.{digits}f} +- {sd:.{digits}f}{missing}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid_args(parser, glue="--glue-dir")
    parser.add_argument("--tasks", default="rotten_tomatoes,sst2,mrpc")
    parser.add_argument("--systems", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "compare")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks" / "compare.md")
    parser.add_argument("--smoke", action="store_true", help="a minute's check of the pipeline (tiny runs)")
    args = parser.parse_args()
    if args.smoke:
        RUN[:] = ["federation.devices=10", "federation.rounds=2", "data.max_train_samples=100",
                  "data.max_eval_samples=40", "data.train_eval_samples=20", "train.max_length=32"]

    from rich.console import Console

    from fedlodrop.studies.calibration import calibrate
    from fedlodrop.studies.comparison import compare
    from fedlodrop.data import TASKS
    from fedlodrop.planning import load_plan, load_system, system_model
    from fedlodrop.planning.bound import Bound
    from fedlodrop.run.folder import RunFolder

    console = Console(stderr=True)
    t0 = time.perf_counter()
    tasks = args.tasks.split(",")
    table, corr = [], []
    for task in tasks:
        cfg = base_config(task, args.glue_dir.resolve(), args.threads)
        main_metric = TASKS[task].main_metric
        for limit, position in LIMITS.items():
            per_method: dict[str, dict[str, list]] = {m: {k: [] for k in ("final", "time", "energy", "gap", "rounds",
                                                                           "sim", "joules", "mb", "dropped")}
                                                      for m in METHODS}
            folders = []
            for sys_seed in range(args.systems):
                where = args.out / task / limit / f"system{sys_seed}"
                system = where / "system.yaml"
                if not system.is_file():
                    make_system(cfg, sys_seed, position, system)
                console.print(f"[{(time.perf_counter() - t0) / 60:.0f} min] {task} {limit} system {sys_seed}",
                              highlight=False)
                compare(cfg, system, where, METHODS, args.seeds, args.jobs, args.threads, console=console,
                        show_progress=False)
                folders.append(where)
                for seed in range(cfg.seed, cfg.seed + args.seeds):
                    ref = curves(where / "runs" / f"bnb__seed={seed}", main_metric)
                    for method in METHODS:
                        run = where / "runs" / f"{method}__seed={seed}"
                        s, c = RunFolder(run).summary(), curves(run, main_metric)
                        d = per_method[method]
                        d["final"].append(s.final.get(main_metric, math.nan))
                        d["time"].append(within(c, ref[-1][0], 0))
                        d["energy"].append(within(c, ref[-1][1], 1))
                        d["gap"].append(s.generalization_gap.get(main_metric, math.nan))
                        d["rounds"].append(s.rounds)
                        d["sim"].append(s.system.simulated_time_s)
                        d["joules"].append(s.system.energy_j)
                        d["mb"].append((s.uplink_bytes_total + s.downlink_bytes_total) / 1e6)
                        d["dropped"].append(s.system.devices_dropped_for_limits)
            for method in METHODS:
                d = per_method[method]
                table.append((task, limit, method, d))
            # the bound: fit on systems 0..n-2, rank on the held-out last system
            fit_dirs = folders[:-1]
            held = folders[-1]
            fitted = [calibrate(f / "runs", metric=main_metric) for f in fit_dirs]
            e0 = statistics.fmean(c.e0 for c in fitted)
            c_emp = statistics.fmean(c.c_emp for c in fitted)
            spec = load_system(held / "system.yaml")
            spec.bound.e0, spec.bound.c_emp = e0, c_emp
            bound = Bound.of(system_model(spec))
            g_vals, gap_terms, errors, gaps = [], [], [], []
            for method in METHODS:
                plan_file = held / "plans" / f"{method}.json"
                rates = load_plan(plan_file).gammas if plan_file.is_file() else [0.0] * cfg.federation.devices
                runs = [RunFolder(held / "runs" / f"{method}__seed={s}").summary()
                        for s in range(cfg.seed, cfg.seed + args.seeds)]
                g_vals.append(float(bound.value(rates)))
                gap_terms.append(float(bound.gap(rates)))
                errors.append(statistics.fmean(1 - r.final[main_metric] for r in runs))
                gaps.append(statistics.fmean(r.generalization_gap[main_metric] for r in runs))
            corr.append((task, limit, e0, c_emp, spearman(g_vals, errors), spearman(gap_terms, gaps),
                         list(zip(METHODS, g_vals, errors, gap_terms, gaps))))
    minutes = (time.perf_counter() - t0) / 60
    write_doc(args, table, corr, minutes)
    plot(table, args.doc.with_suffix(".png"))
    print(args.doc.read_text())


def write_doc(args, table, corr, minutes: float) -> None:
    lines = [f"# `python benchmarks/bench_compare.py --jobs {args.jobs} --threads {args.threads}`", "",
             f"{args.systems} random systems x {args.seeds} training seeds per task and limit, 10 devices, "
             f"settings `{' '.join(RUN)}`; {args.jobs} processes x {args.threads} torch thread(s) on "
             f"{os.cpu_count()} CPUs; {minutes:.0f} min; {time.strftime('%Y-%m-%d')}.", "",
             "Metric: accuracy (MRPC: F1). `at equal time` / `at equal energy`: the metric after the last round "
             "within the B&B plan's total simulated time / energy on the same system and seed (n/a: no round fits).",
             "", "| task | limit | method | final | at equal time | at equal energy | gap | rounds | simulated s | "
             "energy J | MB | dropped |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, limit, method, d in table:
        lines.append(f"| {task} | {limit} | {method} | {fmt(d['final'])} | {fmt(d['time'])} | {fmt(d['energy'])} | "
                     f"{fmt(d['gap'])} | {fmt(d['rounds'], 1)} | {fmt(d['sim'], 3)} | {fmt(d['joules'], 3)} | "
                     f"{fmt(d['mb'], 1)} | {fmt(d['dropped'], 1)} |")
    lines += ["", "## Does the bound order the plans?", "",
              "e0, c_emp: `calibrate` (1 - final train metric) on all runs of the first systems, averaged; "
              "Spearman rho on the held-out last system, over the 6 methods (means over seeds).", "",
              "| task | limit | e0 | c_emp | rho(bound G, test error) | rho(Gap term, measured gap) |", "|---|---|---|---|---|---|"]
    for task, limit, e0, c_emp, rho_g, rho_gap, _ in corr:
        lines.append(f"| {task} | {limit} | {e0:.4f} | {c_emp:.4f} | {rho_g:.3f} | {rho_gap:.3f} |")
    lines += ["", "Per method on the held-out system (bound G, error, Gap term, measured gap):", ""]
    for task, limit, *_, detail in corr:
        cells = "; ".join(f"{m} {g:.3f}/{e:.3f}/{gt:.3f}/{gp:.3f}" for m, g, e, gt, gp in detail)
        lines.append(f"- {task} {limit}: {cells}")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(t, lim) for t, lim, _, _ in table}, key=lambda x: (x[0], x[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, (task, limit) in zip(axes[0], groups):
        rows = [(m, d) for t, lim, m, d in table if (t, lim) == (task, limit)]
        means = [statistics.fmean([x for x in d["final"] if not math.isnan(x)] or [math.nan]) for _, d in rows]
        sds = [statistics.stdev(d["final"]) if len(d["final"]) > 1 else 0.0 for _, d in rows]
        ax.bar(range(len(rows)), means, yerr=sds, capsize=3)
        ax.set_xticks(range(len(rows)), [m for m, _ in rows], rotation=60, fontsize=7)
        finite = [m - s for m, s in zip(means, sds) if not math.isnan(m)]
        ax.set_ylim(max(0.0, min(finite) - 0.05) if finite else 0, None)
        ax.set_title(f"{task}, {limit}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final metric (mean +- std, 3 systems x 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
