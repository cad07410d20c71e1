"""Issue 30's study: at equal uplink bytes, which buys more accuracy: FedLoDrop's dropout at rate
gamma, a rank of r (1 - gamma), or the same rank with a compressed (bf16) uplink?

Three devices of different classes (ranks 4, 8 and 16 on one rank-16 MiniLM), fedex, on the
offline default's data (Rotten Tomatoes) and on SST-2 and MRPC, IID and Dirichlet 0.5 shards,
3 seeds; 800 training examples, 4 rounds of 1 local epoch (the aggregation study's short regime).
Arms, each sending half the adapter's uplink bytes of `full`:

  full     ranks 4/8/16, float32            (the reference: twice the bytes)
  dropout  ranks 4/8/16, rate 0.5, the `budget` sampler (exactly half of every row and column)
  rank     ranks 2/4/8,  float32
  bf16     ranks 4/8/16, federation.comm_dtype bfloat16

It is one `fedlodrop sweep` (the command is printed and quoted on the page); this script runs it
and adds the paired per-seed differences against the dropout arm, with 95 % t intervals over
the 18 (task, partition, seed) pairs. Resumable: finished runs are reused.

    python benchmarks/bench_uplink.py [--jobs 2] [--threads 1] [--seeds 3]

Writes docs/benchmarks/study-uplink.md, .csv, .png; run folders in bench_out/uplink.
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _tables import grid_args, header

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
SETTING = ["lora.r=16", "data.max_train_samples=800", "data.max_eval_samples=300", "data.train_eval_samples=200",
           "federation.rounds=4", "federation.local_epochs=1"]
ARMS = {
    "full": "{lora.ranks: [4,8,16]}",
    "dropout": "{lora.ranks: [4,8,16], dropout.rate: 0.5, dropout.sampler: budget}",
    "rank": "{lora.ranks: [2,4,8]}",
    "bf16": "{lora.ranks: [4,8,16], federation.comm_dtype: bfloat16}",
}


def command(args, out: Path) -> list[str]:
    cmd = ["fedlodrop", "sweep", "--quiet", "--out", str(out), "--seeds", str(args.seeds), "--jobs", str(args.jobs),
           "--threads", str(args.threads), "--set", f"data.glue_dir={args.glue}"]
    for item in SETTING:
        cmd += ["--set", item]
    for name, sets in ARMS.items():
        cmd += ["--arm", f"{name}={sets}"]
    return cmd + ["--vary", "task=rotten_tomatoes,sst2,mrpc", "--vary", "federation.partition=iid,dirichlet"]


def t95(n: int) -> float:
    """The 97.5 % quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired(rep) -> list[str]:
    """Per arm, its final metric minus the dropout arm's on the same task, partition and seed."""
    by = {}
    for row in rep.rows:
        key = (row.values["task"], row.values["federation.partition"], row.seed)
        by.setdefault(row.values["arm"], {})[key] = row.stats["final"]
    lines = ["| arm minus dropout | pairs | mean (points) | 95% CI | per task and partition (mean of seeds) |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        if arm == "dropout" or arm not in by:
            continue
        keys = sorted(set(by[arm]) & set(by.get("dropout", {})))
        diffs = [100 * (by[arm][k] - by["dropout"][k]) for k in keys]
        if len(diffs) < 2:
            continue
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        half = t95(len(diffs)) * sd / math.sqrt(len(diffs))
        cells = {}
        for k, d in zip(keys, diffs):
            cells.setdefault(f"{k[0]} {k[1]}", []).append(d)
        per = ", ".join(f"{c} {statistics.mean(v):+.2f}" for c, v in cells.items())
        lines.append(f"| {arm} | {len(diffs)} | {mean:+.2f} | [{mean - half:+.2f}, {mean + half:+.2f}] | {per} |")
    return lines


def main() -> None:
    parser = grid_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    args.glue = Path(args.glue).resolve()
    out = ROOT / "bench_out" / "uplink"
    cmd = command(args, out)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fedlodrop", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
    minutes = (time.time() - t0) / 60
    sys.path.insert(0, str(ROOT / "src"))
    from fedlodrop.studies.report import collect, table

    rep = collect(out)
    shown = " ".join(shlex.quote(c) for c in cmd).replace(str(ROOT) + "/", "").replace(str(args.glue), "GLUE")
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=250, color_system=None).print(table(rep))
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "sweep.csv", DOCS / "study-uplink.csv")
    shutil.copy(out / "sweep.png", DOCS / "study-uplink.png")
    md = "\n".join([
        "# `python benchmarks/bench_uplink.py`", "",
        "At equal uplink bytes: dropout at rate 0.5, half the rank, or bf16 on the uplink; `full` sends twice the "
        f"bytes. Ranks 4/8/16 on a rank-16 MiniLM, fedex, 3 devices, 800 examples, 4 rounds. {header(args.threads, args.jobs)}; "
        f"{minutes:.0f} min in this invocation (finished runs are reused).", "",
        "The sweep it runs (GLUE: the folder of the GLUE tsv files):", "",
        f"    {shown}", "",
        "Mean ± sample std over seeds (`fedlodrop report bench_out/uplink` prints the same table):", "",
        "```", buf.getvalue().rstrip(), "```", "",
        "Paired differences in the final validation metric, per (task, partition, seed), in points:", "",
        *paired(rep), "",
        "![uplink](study-uplink.png)", "",
    ])
    (DOCS / "study-uplink.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
