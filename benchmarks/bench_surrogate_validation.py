"""Issue 29, item 5: the surrogate and the calibrated bound, validated on held-out systems and rates
before they plan.

    python benchmarks/bench_surrogate_validation.py --jobs 2 --threads 1 [--seeds 3]

1. A pilot sweep in the plan-versus-baselines regime (bench_plan_vs_baselines.RUN: 6 devices, 360
   Rotten Tomatoes examples, 8 rounds, budget masks) at one shared rate per run, rates 0, 0.2, 0.4,
   0.6 and 0.8, with the train metric scored on 300 examples (what `calibrate` needs). `fedlodrop
   calibrate --metric accuracy --surrogate` fits on it: Emp and the Gap term (the bound), and the
   surrogate of the validation error, with its leave-one-rate-out error.
2. The held-out set: the runs of `bench_plan_vs_baselines.py` that train with dropout (B&B, the best
   shared rate, equal bandwidth) on its 9 screened systems x 3 seeds: per-device rates and data
   sizes (Dirichlet(1)) the fit never saw, all 8 rounds, no dropped device. Run that benchmark first.
3. `calibrate --validate`'s numbers on them: the surrogate's error against the measured validation
   error, and for the surrogate and the bound how many pairs of runs of one (system, seed) they
   order as measured (what a planner needs: it picks the smaller predicted error).

Pilot runs are reused (bench_out/surrogate-fit). Output: docs/benchmarks/surrogate-validation.md.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from _tables import grid_args, header, point, run
from bench_plan_vs_baselines import RUN

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
PILOT = [*RUN, "federation.rounds=8", "dropout.sampler=budget", "data.train_eval_samples=300"]
HELD_OUT = ("bnb", "fixed", "equal-bandwidth")


def main() -> None:
    parser = grid_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), seeds=3)
    parser.add_argument("--held-out", type=Path, default=ROOT / "bench_out" / "plan-vs-baselines")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    if not args.held_out.is_dir():
        raise SystemExit(f"no held-out runs at {args.held_out}: run benchmarks/bench_plan_vs_baselines.py first")
    from fedlodrop.studies.calibration import calibrate, validate

    t0 = time.perf_counter()
    pts = [point(f"rate{rate}-seed{seed}", {"rate": rate}, [*PILOT, f"seed={seed}", f"dropout.rate={rate}"])
           for rate in RATES for seed in range(args.seeds)]
    out = ROOT / "bench_out" / "surrogate-fit"
    run(pts, out, args.jobs, args.threads)
    notes: list[str] = []
    fit = calibrate(out, "accuracy", report=notes.append, surrogate=True)
    held = validate(fit, args.held_out, "accuracy", report=notes.append,
                    keep=lambda path: path.name.split("__")[0] in HELD_OUT)
    c, g = fit.surrogate, fit.gap_curve
    lines = ["# The surrogate and the bound on held-out systems and rates (issue 29, item 5)", "",
             f"`python benchmarks/bench_surrogate_validation.py --jobs {args.jobs} --threads {args.threads} "
             f"--seeds {args.seeds}`; {header(args.threads, args.jobs)}; {(time.perf_counter() - t0) / 60:.0f} min in "
             "this invocation (finished runs are reused).", "",
             f"Pilot sweep (the fit): {' '.join(PILOT)}, one shared rate per run, rates {', '.join(map(str, RATES))}, "
             f"{args.seeds} seeds ({fit.runs} runs, N = {fit.N:g}).", "",
             "| dropout.rate | x = sum w g/(1-g) | s | runs | train error | Emp fit | val. error | gap |",
             "|---|---|---|---|---|---|---|---|"]
    for row in fit.rows:
        lines.append(f"| {row.rate} | {row.feature:.4f} | {row.sparsity:.4f} | {row.runs} | {row.mean:.4f} | "
                     f"{row.fit:.4f} | {row.eval_error:.4f} | {row.gap:+.4f} |")
    lines += ["",
              f"- Emp: e0 = {fit.e0:.4g}, c_emp = {fit.c_emp:.4g} (rmse {fit.rmse:.3g}).",
              f"- Gap term fitted to the measured gaps: sqrt({g.a:.4g} + {g.b:.4g} / (1 + {g.kappa:.4g} s)) "
              f"(rmse {fit.gap_rmse:.3g})." if g is not None else "- Gap term: not fitted.",
              f"- Surrogate of the validation error: {c.e0:.4g} + {c.c:.4g} x + sqrt({c.a:.4g} + {c.b:.4g} / "
              f"(1 + {c.kappa:.4g} s)); rmse {fit.surrogate_rmse:.4f}, leave-one-rate-out rmse {fit.loo_rmse:.4f}.",
              "- SPEC 4's default constants are vacuous (G >= 1) at this N for: "
              + (", ".join(f"{r} (G = {v:.3g})" for r, v in fit.vacuous) or "no rate") + ".", ""]
    groups = len({r.group for r in held.runs})
    s_right, s_pairs = held.ordered("surrogate")
    lines += [f"Held out: {len(held.runs)} runs ({', '.join(HELD_OUT)}) in {groups} (system, seed) groups of "
              f"{args.held_out.relative_to(ROOT) if args.held_out.is_relative_to(ROOT) else args.held_out}"
              + (f"; skipped {len(held.skipped)}" if held.skipped else "") + ".", "",
              "| objective | held-out rmse | bias (predicted - measured) | pairs of a group ordered as measured | "
              "at or above the measured error |", "|---|---|---|---|---|",
              f"| surrogate | {held.rmse():.4f} | {held.bias():+.4f} | {s_right} of {s_pairs} "
              f"({100 * s_right / max(s_pairs, 1):.0f} %) | {sum(r.surrogate >= r.eval_error for r in held.runs)} "
              f"of {len(held.runs)} |"]
    if not any(math.isnan(r.bound) for r in held.runs):
        b_right, b_pairs = held.ordered("bound")
        rmse_b = math.sqrt(sum((r.bound - r.eval_error) ** 2 for r in held.runs) / len(held.runs))
        bias_b = sum(r.bound - r.eval_error for r in held.runs) / len(held.runs)
        lines.append(f"| calibrated bound | {rmse_b:.4f} | {bias_b:+.4f} | {b_right} of {b_pairs} "
                     f"({100 * b_right / max(b_pairs, 1):.0f} %) | {held.bound_holds()} of {len(held.runs)} |")
    spread = [r.eval_error for r in held.runs]
    lines += ["", f"Measured validation error of the held-out runs: {min(spread):.4f} to {max(spread):.4f}."]
    lines += [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    (args.docs / "surrogate-validation.md").write_text(text)


if __name__ == "__main__":
    main()
