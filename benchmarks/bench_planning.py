"""Solver time against the number of devices, on `fedlodrop system random` instances.

Targets (issue: edge resource planning): P-SCA for K = 100 in at most 5 s; B&B for K = 10 in at
most 60 s. Prints a markdown table (seconds, bound value, B&B's certified gap, P-SCA's distance
from B&B where both ran) and writes it to --out.

    python benchmarks/bench_planning.py [--seed 0] [--out bench_out/planning.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedlodrop.planning.bnb import solve_bnb
from fedlodrop.planning.psca import solve_psca
from fedlodrop.planning.system import build_model, random_system


def timed(solver, m):
    t0 = time.perf_counter()
    result = solver(m)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/planning.md"))
    parser.add_argument("--bnb-max", type=int, default=10, help="run B&B up to this K")
    parser.add_argument("--sizes", default="2,4,6,8,10,25,50,100", help="comma-separated K values")
    args = parser.parse_args()
    lines = ["| K | B&B s | B&B bound | B&B gap | P-SCA s | P-SCA bound | P-SCA vs B&B |", "|---|---|---|---|---|---|---|"]
    worst = {"psca100": 0.0, "bnb10": 0.0}
    for k in (int(v) for v in args.sizes.split(",")):
        m = build_model(random_system(k, seed=args.seed))
        t_p, r_p = timed(solve_psca, m)
        if k <= args.bnb_max:
            t_b, r_b = timed(solve_bnb, m)
            rel = (r_p.objective - r_b.objective) / r_b.objective
            lines.append(f"| {k} | {t_b:.2f} | {r_b.objective:.5f} | {r_b.stats.gap:.2e} | {t_p:.2f} | "
                         f"{r_p.objective:.5f} | {100 * rel:+.3f} % |")
            if k == 10:
                worst["bnb10"] = t_b
        else:
            lines.append(f"| {k} | - | - | - | {t_p:.2f} | {r_p.objective:.5f} | - |")
        if k == 100:
            worst["psca100"] = t_p
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)
    ok = worst["psca100"] <= 5 and (args.bnb_max < 10 or worst["bnb10"] <= 60)
    print("all targets met" if ok else f"TARGET MISSED: {worst}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
