"""Solver time against the number of devices K, on `fedlodrop system random` instances.

Targets (issue "Edge resource planning"): P-SCA for K = 100 in at most 5 s; B&B for K = 10 in at
most 60 s. B&B is timed as `fedlodrop optimize --method bnb` runs it: a P-SCA warm start, then
the certified search to a relative gap of 1e-4. Prints a markdown table and writes it to --out;
exits 1 if a target is missed.

    python benchmarks/bench_planning.py [--seeds 0,1] [--out bench_out/planning.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from fedlodrop.planning import random_system, solve, system_model

PSCA_TARGET = (100, 5.0)
BNB_TARGET = (10, 60.0)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def timed(m, method: str, tol: float):
    t0 = time.perf_counter()
    res = solve(m, method, tol=tol)
    return time.perf_counter() - t0, res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--psca-sizes", default="2,4,6,8,10,25,50,100")
    parser.add_argument("--bnb-sizes", default="2,4,6,8,10")
    parser.add_argument("--seeds", default="0", help="comma-separated instance seeds; the worst time counts")
    parser.add_argument("--tol", type=float, default=1e-4, help="B&B relative gap")
    parser.add_argument("--out", type=Path, default=Path("bench_out/planning.md"))
    args = parser.parse_args()
    seeds = _ints(args.seeds)
    psca_sizes, bnb_sizes = _ints(args.psca_sizes), _ints(args.bnb_sizes)
    rows = ["| K | method | seconds (worst) | iterations | B&B nodes | bound G | B&B gap (rel) | P-SCA vs B&B |",
            "|---|---|---|---|---|---|---|---|"]
    worst: dict[tuple[str, int], float] = {}
    for K in sorted(set(psca_sizes) | set(bnb_sizes)):
        results = {"psca": [], "bnb": []}
        for seed in seeds:
            m = system_model(random_system(K, seed=seed))
            for method in ("psca", "bnb"):
                if K in (psca_sizes if method == "psca" else bnb_sizes):
                    results[method].append(timed(m, method, args.tol))
        for method, runs in results.items():
            if not runs:
                continue
            secs = max(t for t, _ in runs)
            worst[(method, K)] = secs
            its = max(r.stats.iterations for _, r in runs)
            obj = ", ".join(f"{r.objective:.5f}" for _, r in runs)
            if method == "bnb":
                nodes = str(max(r.stats.nodes for _, r in runs))
                gap = f"{max(r.stats.rel_gap for _, r in runs):.1e}"
                vs = "-"
                if results["psca"]:
                    rel = max(p.objective / b.objective - 1 for (_, p), (_, b) in zip(results["psca"], runs))
                    vs = f"{100 * rel:+.4f} %"
            else:
                nodes, gap, vs = "-", "-", "-"
            rows.append(f"| {K} | {method} | {secs:.2f} | {its} | {nodes} | {obj} | {gap} | {vs} |")
            print(rows[-1], flush=True)
    checks = []
    for (method, (K, limit)) in (("psca", PSCA_TARGET), ("bnb", BNB_TARGET)):
        if (method, K) in worst:
            t = worst[(method, K)]
            checks.append((f"{method} K={K}: {t:.2f} s (target <= {limit:g} s)", t <= limit))
    head = (f"Planning solvers on `random_system(K, seed)`, seeds {args.seeds}; {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}. B&B includes its P-SCA warm start; P-SCA vs B&B is the "
            f"worst relative excess of P-SCA's bound over B&B's.")
    text = "\n".join([head, "", *rows, "", *[f"- {'PASS' if ok else 'FAIL'}: {msg}" for msg, ok in checks]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print()
    print(text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
