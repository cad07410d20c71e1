"""Issues 29 (item 4) and 30: the pilot that looks for a regime where dropout can regularise.

    python benchmarks/bench_regime_pilot.py [--jobs 2] [--threads 1] [--seeds 2] [--regimes A:2,B,C:1,D] [--smoke]

Every comparison so far ran in a short regime (3-4 rounds, about a dozen optimizer steps a
device), where dropout slows learning and never regularises. This pilot trains the offline
default's model and data (MiniLM, Rotten Tomatoes, 6 devices, IID) for many rounds with many
local steps, at rate 0 and rate 0.5, and reports, per regime, whether rate 0's validation
accuracy peaks and then falls (the best round before the last, and how far the final one is below
it), whether its validation loss does (a model that fits its training data grows confident and
wrong on some validation examples: the loss rises before, or without, the accuracy falling), the
round from which it fits its training sample, and where rate 0.5 ends against rate 0 in both
(paired by seed). A regime where rate 0 overfits is one where the plan-versus-baselines comparison
and the equal-uplink study should be run again.

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


def curves(results, pts) -> dict[tuple, dict[str, list[float]]]:
    """(regime, rate, seed) -> per round: the validation main metric ("val"), the validation loss
    ("loss") and the main metric on the training sample ("train")."""
    from fedlodrop.run.folder import RunFolder

    out = {}
    for p in pts:
        folder = RunFolder(results[p.name].path)
        main = folder.summary().main_metric
        records = folder.records()
        out[(p.values["regime"], p.values["rate"], p.seed)] = {
            "val": [r.eval[main] for r in records], "loss": [r.eval_loss for r in records],
            "train": [r.train.get(main, float("nan")) for r in records]}
    return out


def summarise(got: dict, name: str, rate: float, seeds: int) -> dict:
    """One regime and rate over its seeds: where accuracy and loss peak, and how far they end from it."""
    runs = [got[(name, rate, s)] for s in range(seeds)]
    rate0 = [got[(name, 0.0, s)] for s in range(seeds)]
    return {
        "regime": name, "rate": rate, "seeds": seeds,
        "best_round": statistics.fmean(c["val"].index(max(c["val"])) + 1 for c in runs),
        "best": statistics.fmean(max(c["val"]) for c in runs), "final": statistics.fmean(c["val"][-1] for c in runs),
        "drop_points": [round(100 * (max(c["val"]) - c["val"][-1]), 2) for c in runs],
        "vs_rate0_points": [round(100 * (c["val"][-1] - z["val"][-1]), 2) for c, z in zip(runs, rate0)],
        "loss_best_round": statistics.fmean(c["loss"].index(min(c["loss"])) + 1 for c in runs),
        "loss_best": statistics.fmean(min(c["loss"]) for c in runs),
        "loss_final": statistics.fmean(c["loss"][-1] for c in runs),
        "loss_vs_rate0": [round(c["loss"][-1] - z["loss"][-1], 3) for c, z in zip(runs, rate0)],
        "train_final": statistics.fmean(c["train"][-1] for c in runs),
        "fits_round": [next((i + 1 for i, t in enumerate(c["train"]) if t >= 0.995), None) for c in runs],
    }


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
    rows = [summarise(got, name, rate, n_seeds[name]) for name in regimes for rate in RATES]

    def listed(xs, fmt="+.2f"):
        return ", ".join("-" if x is None else f"{x:{fmt}}" for x in xs)

    lines = [f"# `python benchmarks/bench_regime_pilot.py --jobs {args.jobs} --threads {args.threads} "
             f"--regimes {','.join(f'{r}:{n_seeds[r]}' for r in regimes)}`", "",
             f"{header(args.threads, args.jobs)}. {len(pts)} runs, {(time.perf_counter() - t0) / 60:.0f} min in "
             "this invocation (finished runs are reused).", "",
             "Offline default (MiniLM, Rotten Tomatoes), " + " ".join(BASE) + "; regimes:", ""]
    lines += [f"- {name}: " + " ".join(REGIMES[name]) for name in regimes]
    lines += ["", "Validation accuracy (400 examples: a point is 4 examples):", "",
              "| regime | rate | seeds | best round (mean) | best val. | final val. | best - final per seed (points) "
              "| final minus rate 0 per seed (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['rate']} | {r['seeds']} | {r['best_round']:.1f} | {r['best']:.4f} | "
                     f"{r['final']:.4f} | {listed(r['drop_points'])} | {listed(r['vs_rate0_points'])} |")
    lines += ["", "Validation loss (cross-entropy) and the training sample's accuracy (300 examples):", "",
              "| regime | rate | lowest loss round (mean) | lowest loss | final loss | final minus rate 0 per seed "
              "| final train accuracy | train accuracy >= 0.995 from round, per seed |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['rate']} | {r['loss_best_round']:.1f} | {r['loss_best']:.3f} | "
                     f"{r['loss_final']:.3f} | {listed(r['loss_vs_rate0'], '+.3f')} | {r['train_final']:.4f} | "
                     f"{listed(r['fits_round'], 'd')} |")
    peaked = [r["regime"] for r in rows if r["rate"] == 0.0 and min(r["drop_points"]) >= 1.0]
    overfit = [r["regime"] for r in rows if r["rate"] == 0.0 and r["loss_final"] >= 2 * r["loss_best"]]
    lower = [r["regime"] for r in rows if r["rate"] > 0 and max(r["loss_vs_rate0"]) < 0]
    lines += ["", "Rate 0's validation accuracy peaks and then falls by at least 1 point on every seed in: "
              + (", ".join(peaked) if peaked else "none of these regimes") + ".",
              "Rate 0's validation loss ends at least twice its lowest (it overfits) in: "
              + (", ".join(overfit) if overfit else "none of these regimes") + ".",
              "Rate 0.5 ends with a lower validation loss than rate 0 on every seed in: "
              + (", ".join(lower) if lower else "none of these regimes") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.smoke:
        return
    (args.docs / "regime-pilot.md").write_text(text + "\n![curves](regime-pilot.png)\n")
    with open(args.docs / "regime-pilot.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["regime", "rate", "seed", "round", "val", "val_loss", "train"])
        for (name, rate, seed), c in sorted(got.items()):
            w.writerows([name, rate, seed, i + 1, v, c["loss"][i], c["train"][i]] for i, v in enumerate(c["val"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(regimes), figsize=(4 * len(regimes), 6.4), squeeze=False)
    for col, name in enumerate(regimes):
        for row, (what, label) in enumerate((("val", "validation accuracy"), ("loss", "validation loss"))):
            ax = axes[row][col]
            for rate, colour in zip(RATES, ("tab:blue", "tab:orange")):
                for s in range(n_seeds[name]):
                    c = got[(name, rate, s)][what]
                    ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.7, label=f"rate {rate}" if s == 0 else None)
            ax.set_title(f"regime {name}")
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.legend()
    fig.tight_layout()
    fig.savefig(args.docs / "regime-pilot.png", dpi=100)


if __name__ == "__main__":
    main()
