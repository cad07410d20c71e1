"""Issue 17's measurement: what privacy costs.

    python benchmarks/bench_privacy.py [--jobs 2] [--threads 1] [--seeds 3] [--skip-secagg]

1. Client-level DP (central, `masked` rule, uniform weights, C = 1, about the median update norm
   here): epsilon 1, 3, 8 and none, dropout rate 0 and 0.3, on the offline default's data and
   model (Rotten Tomatoes, MiniLM) and on SST-2. Client-level DP protects a device, so it needs
   many of them: 50 devices share the training set (600 examples, 12 each), all train every
   round, 3 rounds of 1 local epoch (the short-run regime, sized for < 2 h here). Without privacy
   the same federation is the reference (same rule, weights and data). Reported: final
   validation metric, epsilon spent (Opacus RDP, delta 1e-5), bytes per round, wall time.
2. Secure aggregation: the same setting with 10 devices and 2 rounds (no DP) through
   `fedlodrop flower simulate` with and without `privacy.secure_aggregation`, rate 0 and 0.3:
   wall time of the whole command, bytes both ways (all four SecAgg+ exchanges), final metric.

Writes docs/benchmarks/privacy.md, .csv, .png; run folders in bench_out/privacy (reused).

`--regime learned`: the short regime barely trains (each device takes 1 optimizer step a round);
this one gives each device 5 local epochs (5 steps) a round, clips at C = 2, and measures only
epsilon 8, clipping alone and no privacy at rate 0 (about 15 min): whether the cost holds where
the model learns. Writes privacy-learned.md, .csv, .png (no SecAgg+ part).

`--regime devices`: the learned regime with 100 devices of 12 examples each (1200 examples): what
twice the devices a round buys, since the noise on the mean is sigma C / devices (about 40 min
for 2 seeds). Writes privacy-devices.md, .csv, .png.

`--regime devices200`: the same with 200 devices of 12 examples each (2400 examples), epsilon 8
and no privacy only (clipping alone, measured at 50 and 100 devices, costs 1.0 to 1.4 points;
about 75 min for 3 seeds). Epsilon 8 runs at two clip norms: C = 2 (the learned regime's) and
C = 3.5, the median update norm in this setting, which `--norms` measures (a non-private probe:
devices of a Poisson sample train as in the regime and the norms of their updates are printed).
Writes privacy-devices-200.md, .csv, .png.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _tables import grid_args, header, plot, point, run

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = (1.0, 3.0, 8.0, "clip-only", None)  # clip-only: C = 1, sigma 0 (epsilon infinite): what clipping alone does
RATES = (0.0, 0.3)
RUN = ["federation.devices=50", "federation.rounds=3", "data.max_train_samples=600", "data.max_eval_samples=400",
       "data.train_eval_samples=64", "train.max_length=48", "federation.aggregation=masked",
       "federation.weighting=uniform"]
DP = ["privacy.dp=true", "privacy.mode=central", "privacy.clip_norm=1.0"]
SECAGG = ["federation.devices=10", "federation.rounds=2", "data.max_train_samples=600", "data.max_eval_samples=400",
          "data.train_eval_samples=64", "train.max_length=48", "federation.aggregation=masked",
          "federation.weighting=uniform", "flower.round_timeout_s=1200"]


def task_sets(task: str, glue: Path) -> list[str]:
    return [] if task == "rotten_tomatoes" else [f"task={task}", f"data.glue_dir={glue}"]


REGIMES = {
    "short": {"run": RUN, "dp": DP, "epsilons": EPSILONS, "rates": RATES, "name": "privacy"},
    "learned": {"run": RUN + ["federation.local_epochs=5"], "dp": DP[:-1] + ["privacy.clip_norm=2.0"],
                "epsilons": (8.0, "clip-only", None), "rates": (0.0,), "name": "privacy-learned"},
    # twice the devices at the same 12 examples each: the noise on the mean halves (sigma C / m)
    "devices": {"run": [x.replace("devices=50", "devices=100").replace("samples=600", "samples=1200") for x in RUN]
                + ["federation.local_epochs=5"], "dp": DP[:-1] + ["privacy.clip_norm=2.0"],
                "epsilons": (8.0, "clip-only", None), "rates": (0.0,), "name": "privacy-devices"},
    "devices200": {"run": [x.replace("devices=50", "devices=200").replace("samples=600", "samples=2400") for x in RUN]
                   + ["federation.local_epochs=5"], "dp": DP[:-1] + ["privacy.clip_norm=2.0"],
                   "epsilons": (8.0, None), "rates": (0.0,), "name": "privacy-devices-200",
                   "clips": (2.0, 3.5)},  # 3.5: the median update norm here (--norms)
}


def dp_points(tasks, seeds, glue, regime="short"):
    g = REGIMES[regime]
    RUN, DP, EPSILONS, RATES = g["run"], g["dp"], g["epsilons"], g["rates"]
    pts = []
    for task in tasks:
        for seed in range(seeds):
            for rate in RATES:
                for eps in EPSILONS:
                    for clip in (g.get("clips", (None,)) if eps else (None,)):
                        sets = RUN + task_sets(task, glue) + [f"seed={seed}", f"dropout.rate={rate}"]
                        if eps == "clip-only":
                            sets += DP + ["privacy.noise_multiplier=0"]
                        elif eps:
                            sets += DP + [f"privacy.target_epsilon={eps}"]
                        name = f"{task}-eps{eps or 'none'}-rate{rate}-seed{seed}"
                        if clip is not None and f"privacy.clip_norm={clip}" not in DP:  # the regime's own C keeps its name
                            sets, name = sets + [f"privacy.clip_norm={clip}"], f"{name}-C{clip}"
                        values = {"task": task, "epsilon": eps or "none", "rate": rate}
                        pts.append(point(name, values | ({"clip": clip} if clip is not None else {}), sets))
    return pts


def update_norms(regime: str, threads: int) -> list[float]:
    """The L2 norms of device updates in `regime` without noise (seed 0): each round a Poisson sample
    of about 1/25 of the devices trains as the regime's devices do, under DP with sigma 0 and a C no
    update reaches, and each update's norm before clipping is recorded. A non-private measurement on
    the devices' data: a deployment would estimate the median privately (adaptive clipping, Andrew et
    al. 2021) or on public data."""
    import fedlodrop.round.privacy as privacy
    from fedlodrop.run.engine import run as run_engine
    from fedlodrop.run.settings import load_config

    norms, privatize = [], privacy.DifferentialPrivacy.privatize

    def recording(self, start, end, sent, round_, device):
        norms.append(privacy.clip(start, end, sent, math.inf)[1])  # the device's update, before clipping
        return privatize(self, start, end, sent, round_, device)

    privacy.DifferentialPrivacy.privatize = recording
    g = REGIMES[regime]
    sets = g["run"] + ["seed=0", "privacy.dp=true", "privacy.mode=central", "privacy.clip_norm=1e6",
                       "privacy.noise_multiplier=0", "data.max_eval_samples=100", f"train.threads={threads}"]
    devices = int(next(x for x in g["run"] if x.startswith("federation.devices=")).split("=")[1])
    sets.append(f"federation.devices_per_round={max(1, devices // 25)}")
    with tempfile.TemporaryDirectory() as tmp:
        run_engine(load_config(None, sets), Path(tmp) / "r", show_progress=False)
    privacy.DifferentialPrivacy.privatize = privatize
    return norms


def _mean_sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


accounts: set[str] = set()  # the accountants the runs' records name


def dp_table(pts, results):
    from fedlodrop.run.folder import RunFolder

    groups: dict[tuple, list] = {}
    for p in pts:
        folder = RunFolder(results[p.name].path)
        s, rows = folder.summary(), folder.records()
        main = s.main_metric
        spent = s.privacy.epsilon if s.privacy else None
        accounts.add(s.privacy.accountant if s.privacy else "")
        groups.setdefault((p.values["task"], p.values["epsilon"], p.values["rate"], p.values.get("clip")), []).append(
            (s.final[main], spent, s.uplink_bytes_total / len(rows), s.downlink_bytes_total / len(rows),
             s.wall_s, main, s.privacy.noise_multiplier if s.privacy else None, p.seed))
    out = []
    for (task, eps, rate, clip), runs in groups.items():
        final = _mean_sd([r[0] for r in runs])
        out.append({"task": task, "epsilon": eps, "rate": rate, "clip": clip or "", "seeds": len(runs), "metric": runs[0][5],
                    "final_mean": final[0], "final_std": final[1],
                    "spent": _mean_sd([r[1] for r in runs])[0], "sigma": runs[0][6],
                    "up": statistics.fmean(r[2] for r in runs), "down": statistics.fmean(r[3] for r in runs),
                    "wall": statistics.fmean(r[4] for r in runs),
                    "by_seed": {r[7]: r[0] for r in runs}})  # for paired differences; not in the CSV
    return out


def secagg_rows(task: str, glue: Path, threads: int) -> list[dict]:
    from fedlodrop.run.folder import RunFolder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TMPDIR=str(tmp),
                   FLWR_HOME=str(tmp / "flwr"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        for rate in RATES:
            for secure in (False, True):
                sets = SECAGG + task_sets(task, glue) + [f"dropout.rate={rate}", f"train.threads={threads}",
                                                         f"privacy.secure_aggregation={str(secure).lower()}"]
                out = tmp / f"{task}-{rate}-{secure}"
                cmd = [sys.executable, "-m", "fedlodrop", "flower", "simulate", "--quiet", "--out", str(out),
                       *[x for kv in sets for x in ("--set", kv)]]
                t0 = time.perf_counter()
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - t0
                if res.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
                folder = RunFolder(out)
                s, recs = folder.summary(), folder.records()
                rows.append({"task": task, "rate": rate, "secure": secure, "wall": wall,
                             "final": s.final[s.main_metric], "metric": s.main_metric,
                             "up": sum(r.uplink_bytes for r in recs) / len(recs),
                             "down": sum(r.downlink_bytes for r in recs) / len(recs),
                             "bound": max(r.flower.secagg.error_bound if r.flower and r.flower.secagg else 0.0 for r in recs)})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_args(p)
    p.add_argument("--tasks", default="rotten_tomatoes,sst2")
    p.add_argument("--skip-secagg", action="store_true")
    p.add_argument("--regime", choices=list(REGIMES), default="short")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--norms", action="store_true", help="print the regime's update norms (no privacy) and stop")
    args = p.parse_args()
    tasks, glue = args.tasks.split(","), args.glue.resolve()
    t0 = time.perf_counter()
    if args.norms:
        norms = update_norms(args.regime, args.threads)
        deciles = statistics.quantiles(norms, n=10)
        print(f"{header(args.threads, 1)}. Regime {args.regime}: {len(norms)} device updates, L2 norm median "
              f"{statistics.median(norms):.2f}, deciles {', '.join(f'{x:.2f}' for x in deciles)}, "
              f"max {max(norms):.2f}")
        return
    regime = REGIMES[args.regime]
    name = regime["name"]
    pts = dp_points(tasks, args.seeds, glue, args.regime)
    results = run(pts, ROOT / "bench_out" / name, args.jobs, args.threads)
    rows = dp_table(pts, results)
    dp_minutes = (time.perf_counter() - t0) / 60
    run_minutes = sum(r["wall"] * r["seeds"] for r in rows) / 60
    flags = f" --regime {args.regime} --tasks {args.tasks}" if args.regime != "short" else ""
    lines = [f"# `python benchmarks/bench_privacy.py --jobs {args.jobs} --threads {args.threads} --seeds {args.seeds}{flags}`",
             "", f"{header(args.threads, args.jobs)}. DP grid: {len(pts)} runs, {dp_minutes:.0f} min "
             f"in this invocation (runs finished earlier are reused); the runs' own wall times sum to "
             f"{run_minutes:.0f} min.", "",
             "Setting: " + " ".join(regime["run"]) + "; DP: " + " ".join(regime["dp"])
             + (" or the table's C" if "clips" in regime else "") + " (target epsilon over the 3 rounds, "
             f"delta 1e-5, Opacus' {'/'.join(sorted(a for a in accounts if a)) or 'RDP'} accountant, add/remove one "
             "device; q = 1; noise from the OS's entropy; no score on the devices' data under DP). Mean ± sd over "
             "seeds; epsilon spent is the run's.", "",
             "| task | epsilon target | clip norm C | rate | final val. (metric) | epsilon spent | sigma | uplink B/round "
             "| downlink B/round | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    dp_clip = next(x for x in regime["dp"] if x.startswith("privacy.clip_norm=")).split("=")[1]
    for r in rows:
        sigma = "-" if r["sigma"] is None else f"{r['sigma']:.3g}"
        spent = "inf" if r["sigma"] == 0 else "-" if math.isnan(r["spent"]) else f"{r['spent']:.3g}"
        c = "-" if r["epsilon"] == "none" else r["clip"] or dp_clip
        lines.append(f"| {r['task']} | {r['epsilon']} | {c} | {r['rate']} | {r['final_mean']:.4f} ± {r['final_std']:.4f} "
                     f"({r['metric']}) | {spent} | {sigma} | {r['up']:,.0f} | {r['down']:,.0f} | {r['wall']:.0f} |")
    lines.append("")
    for task in tasks:
        ref = {r["rate"]: r for r in rows if r["task"] == task and r["epsilon"] == "none"}
        clip = {r["rate"]: r for r in rows if r["task"] == task and r["epsilon"] == "clip-only"}
        for r in rows:
            if r["task"] == task and r["epsilon"] == 8.0 and r["rate"] in ref:
                d = 100 * (r["final_mean"] - ref[r["rate"]]["final_mean"])
                c = (f"; clipping alone (sigma 0) {100 * (clip[r['rate']]['final_mean'] - ref[r['rate']]['final_mean']):+.1f}"
                     if r["rate"] in clip else "")
                at = f" at C = {r['clip'] or dp_clip}" if "clips" in regime else ""
                lines.append(f"- {task}, rate {r['rate']}: epsilon 8{at} ends {d:+.1f} points against no privacy "
                             f"(goal: no worse than -3 on the mean and on every seed){c}.")
                none = ref[r["rate"]]["by_seed"]
                paired = [100 * (v - none[seed]) for seed, v in sorted(r["by_seed"].items()) if seed in none]
                ci = ""
                if len(paired) > 1:
                    from scipy.stats import t

                    half = t.ppf(0.975, len(paired) - 1) * statistics.stdev(paired) / math.sqrt(len(paired))
                    mean = statistics.fmean(paired)
                    ci = f"; mean {mean:+.2f}, 95 % t interval [{mean - half:+.2f}, {mean + half:+.2f}]"
                lines.append(f"  Per seed (same seed, same data): {', '.join(f'{x:+.2f}' for x in paired)}{ci}; "
                             f"worst seed {min(paired):+.2f}.")
    numeric = {"none": 16.0, "clip-only": 32.0}
    plot_rows = [dict(r, eps=numeric.get(r["epsilon"], r["epsilon"])) for r in rows]
    plot(plot_rows, "eps", ["rate", "clip"] if "clips" in regime else ["rate"], ["final"], args.docs / f"{name}.png",
         "final validation metric against epsilon (16 = no privacy, 32 = clipping only)", facet="task")
    lines += ["", f"![privacy]({name}.png)"]
    if not args.skip_secagg and args.regime == "short":
        t1 = time.perf_counter()
        sec = secagg_rows(tasks[0], glue, args.threads)
        lines += ["", f"## Secure aggregation ({(time.perf_counter() - t1) / 60:.0f} min)", "",
                  "Setting: " + " ".join(SECAGG) + f", task {tasks[0]}, seed 0, `fedlodrop flower simulate` "
                  "(wall time of the whole command: SuperLink, Ray, one backbone per actor).", "",
                  "| rate | SecAgg+ | final val. | uplink B/round | downlink B/round | wall s | error bound per value |",
                  "|---|---|---|---|---|---|---|"]
        for r in sec:
            lines.append(f"| {r['rate']} | {'yes' if r['secure'] else 'no'} | {r['final']:.4f} | {r['up']:,.0f} | "
                         f"{r['down']:,.0f} | {r['wall']:.0f} | {r['bound']:.3g} |")
    text = "\n".join(lines) + "\n"
    (args.docs / f"{name}.md").write_text(text)
    import csv

    with open(args.docs / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "by_seed"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(text)


if __name__ == "__main__":
    main()
