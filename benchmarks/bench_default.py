"""The offline default, as a new user runs it: `fedlodrop run` with no arguments, timed.

Targets (issue: federated engine): at most 5 minutes on a 2-core CPU, validation accuracy at least
0.75. The wall time covers the whole command: imports, data, model load, all rounds, run folder.

    python benchmarks/bench_default.py [--out bench_out/default.md]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlodrop.runs import RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/default.md"))
    parser.add_argument("--threads", type=int, default=None, help="train.threads (default: torch's choice)")
    args = parser.parse_args()
    extra = ["--set", f"train.threads={args.threads}"] if args.threads else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run(["fedlodrop", "run", "--quiet", "--out", str(run_dir), *extra], check=True, env=env)
        wall = time.perf_counter() - t0
        summary, rows = RunFolder(run_dir).summary(), RunFolder(run_dir).records()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    lines = [
        "| round | train loss | train accuracy | validation accuracy | uplink MB | downlink MB | round s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round} | {r.train_loss:.4f} | {r.train.get('accuracy', float('nan')):.4f} | "
            f"{r.eval['accuracy']:.4f} | {r.uplink_bytes / 1e6:.3f} | {r.downlink_bytes / 1e6:.3f} | "
            f"{r.wall_s:.1f} |"
        )
    acc = summary["final"]["accuracy"]
    lines += [
        "",
        f"`fedlodrop run` (no arguments): {wall:.1f} s wall for the whole command (target <= 300 s), "
        f"final validation accuracy {acc:.4f} (target >= 0.75), best {summary['best']['accuracy']:.4f}, "
        f"peak RSS {peak:.2f} GiB; torch threads: {args.threads or 'torch default'}.",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    ok = wall <= 300 and acc >= 0.75
    print("all targets met" if ok else "TARGET MISSED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
