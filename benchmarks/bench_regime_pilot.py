"""Issues 29 (item 4) and 30: the pilot that looks for a regime where dropout can regularise.

    python benchmarks/bench_regime_pilot.py [--jobs 2] [--threads 1] [--seeds 2] [--regimes A:2,B,C:1,D] [--smoke]

Every comparison so far ran in a short regime (3-4 rounds, about a dozen optimizer steps a
device), where dropout slows learning and never regularises. This pilot trains the offline
default's model and data (MiniLM, Rotten Tomatoes, 6 devices, IID) for many rounds with many
local steps, at rate 0 and rate 0.5, and reports, per regime, whether rate 0's validation
accuracy peaks and then falls (the best round before the last, and how far the final one is below
it), and where rate 0.5 ends against rate 0 (paired by seed). A regime where rate 0 peaks and
falls is one where the plan-versus-baselines comparison and the equal-uplink study should be run
again.

Regimes (each over the offline default; lora.r and target modules as named):

    A  360 examples, 20 rounds, 3 local epochs, r 8, query/value
    B  360 examples, 20 rounds, 10 local epochs, r 8, query/value
    C  120 examples, 20 rounds, 10 local epochs, r 16, every linear layer
    D  360 examples, 20 rounds, 10 local epochs, r 16, every linear layer

Cost: `--smoke` measured 29 s of CPU a round for regime A (1 thread), so about 10 min a run of A;
B and D train 3.3x the steps a round. The whole pilot (16 runs at 2 seeds) is some hours with 2
jobs: run it a regime at a time (`--regimes A`); finished runs are reused and a killed one resumes.

Writes docs/benchmarks/regime-pilot.md, .csv, .png; run folders in bench_out/regime-pilot. `--smoke`: 2 rounds of regime A, seed 0, into bench_out/regime-pilot-smoke,
no page (checks the script).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from _tables import grid_args, header, point, run

ROOT = Path(__file__).resolve().parents[1]
BASE = ["federation.devices=6", "data.max_eval_samples=400", "data.train_eval_samples=300"]
REGIMES = {
    "A": ["data.max_train_samples=360", "federation.rounds=20", "federation.local_epochs=3", "lora.r=8"],
    "B": ["data.max_train_samples=360", "federation.rounds=20", "federation.local_epochs=10", "lora.r=8"],
    "C": ["data.max_train_samples=120", "federation.rounds=20", "federation.local_epochs=10", "lora.r=16",
          "lora.target_modules=[query,key,value,dense]"],
    "D": ["data.max_train_samples=360", "federation.rounds=20", "federation.local_epochs=10", "lora.r=16",
          "lora.target_modules=[query,key,value,dense]"],
}
RATES = (0.0, 0.5)


def curves(results, pts) -> dict[tuple, list[float]]:
    """(regime, rate, seed) -> the validation main metric after each round."""
    from fedlodrop.run.folder import RunFolder

    out = {}
    for p in pts:
        folder = RunFolder(results[p.name].path)
        main = folder.summary().main_metric
        out[(p.values["regime"], p.values["rate"], p.seed)] = [r.eval[main] for r in folder.records()]
    return out


def main() -> None:
    parser = grid_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), seeds=2)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--smoke", action="store_true", help="2 rounds of regime A, seed 0; no page")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    # "A:2,C:1": a regime's own number of seeds (else --seeds)
    wanted = [item.split(":") for item in (["A"] if args.smoke else args.regimes.split(","))]
    regimes = [w[0] for w in wanted]
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise SystemExit(f"--regimes: unknown {', '.join(bad)}; choose from {', '.join(REGIMES)}")
    n_seeds = {w[0]: 1 if args.smoke else int(w[1]) if len(w) > 1 else args.seeds for w in wanted}
    t0 = time.perf_counter()
    pts = []
    for name in regimes:
        sets = BASE + REGIMES[name] + (["federation.rounds=2"] if args.smoke else [])
        for seed in range(n_seeds[name]):
            for rate in RATES:
                pts.append(point(f"{name}-rate{rate}-seed{seed}", {"regime": name, "rate": rate},
                                 sets + [f"seed={seed}", f"dropout.rate={rate}"]))
    out = ROOT / "bench_out" / ("regime-pilot-smoke" if args.smoke else "regime-pilot")
    results = run(pts, out, args.jobs, args.threads)
    got = curves(results, pts)
    rows = []
    for name in regimes:
        for rate in RATES:
            runs = [got[(name, rate, s)] for s in range(n_seeds[name])]
            best = [max(c) for c in runs]
            rows.append({"regime": name, "rate": rate, "seeds": n_seeds[name],
                         "best_round": statistics.fmean(c.index(max(c)) + 1 for c in runs),
                         "best": statistics.fmean(best), "final": statistics.fmean(c[-1] for c in runs),
                         "drop_points": [round(100 * (b - c[-1]), 2) for b, c in zip(best, runs)],
                         "vs_rate0_points": [round(100 * (c[-1] - got[(name, 0.0, s)][-1]), 2)
                                             for s, c in enumerate(runs)]})
    lines = [f"# `python benchmarks/bench_regime_pilot.py --jobs {args.jobs} --threads {args.threads} "
             f"--regimes {','.join(f'{r}:{n_seeds[r]}' for r in regimes)}`", "",
             f"{header(args.threads, args.jobs)}. {len(pts)} runs, {(time.perf_counter() - t0) / 60:.0f} min in "
             "this invocation (finished runs are reused).", "",
             "Offline default (MiniLM, Rotten Tomatoes), " + " ".join(BASE) + "; regimes:", ""]
    lines += [f"- {name}: " + " ".join(REGIMES[name]) for name in regimes]
    lines += ["", "| regime | rate | seeds | best round (mean) | best val. | final val. | best - final per seed (points) "
              "| final minus rate 0 per seed (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['rate']} | {r['seeds']} | {r['best_round']:.1f} | {r['best']:.4f} | {r['final']:.4f} | "
                     f"{', '.join(f'{x:+.2f}' for x in r['drop_points'])} | "
                     f"{', '.join(f'{x:+.2f}' for x in r['vs_rate0_points'])} |")
    peaked = [r["regime"] for r in rows if r["rate"] == 0.0 and min(r["drop_points"]) >= 1.0]
    lines += ["", "Rate 0 peaks and then falls by at least 1 point on every seed in: "
              + (", ".join(peaked) if peaked else "none of these regimes") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.smoke:
        return
    (args.docs / "regime-pilot.md").write_text(text + "\n![curves](regime-pilot.png)\n")
    with open(args.docs / "regime-pilot.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["regime", "rate", "seed", "round", "val"])
        for (name, rate, seed), c in sorted(got.items()):
            w.writerows([name, rate, seed, i + 1, v] for i, v in enumerate(c))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(4 * len(regimes), 3.2), squeeze=False)
    for ax, name in zip(axes[0], regimes):
        for rate, colour in zip(RATES, ("tab:blue", "tab:orange")):
            for s in range(n_seeds[name]):
                c = got[(name, rate, s)]
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.7, label=f"rate {rate}" if s == 0 else None)
        ax.set_title(f"regime {name}")
        ax.set_xlabel("round")
        ax.set_ylabel("validation accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.docs / "regime-pilot.png", dpi=100)


if __name__ == "__main__":
    main()
