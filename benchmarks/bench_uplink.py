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

`--regime long` runs the same arms where dropout can regularise: regime D of bench_regime_pilot.py
(360 examples, 20 rounds of 10 local epochs, r 16 on every linear layer; rate 0's accuracy peaks and
falls there), with 6 devices of ranks 4/4/8/8/16/16 (half: 2/2/4/4/8/8), batch 16 and lr 0.002 (the
long comparison's: at batch 8 / lr 0.005 a large Dirichlet shard's local steps diverge). About 30 min
a run on one thread, so by default only the offline default's task (Rotten Tomatoes), IID and
Dirichlet 0.5, 3 seeds: 24 runs, about 6 h at 2 jobs; `--tasks` adds SST-2 and MRPC.

    python benchmarks/bench_uplink.py --regime long [--tasks rotten_tomatoes,sst2,mrpc]

Writes docs/benchmarks/study-uplink-long.md, .csv, .png; run folders in bench_out/uplink-long.
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
from dataclasses import dataclass
from pathlib import Path

from _tables import LONG, grid_args, header

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
ARM_NAMES = ("full", "dropout", "rank", "bf16")


@dataclass(frozen=True)
class Regime:
    """A setting of the study: its run keys, the devices' ranks, the default tasks, where it goes."""

    setting: list[str]
    ranks: list[int]
    tasks: str
    name: str  # run folders bench_out/<name>, page docs/benchmarks/study-<name>.md
    says: str  # the setting in words, for the page

    def arms(self) -> dict[str, str]:
        """Each arm's keys: `full` at the ranks, the three ways of sending half of it."""
        ranks = ",".join(map(str, self.ranks))
        half = ",".join(str(r // 2) for r in self.ranks)
        return {
            "full": f"{{lora.ranks: [{ranks}]}}",
            "dropout": f"{{lora.ranks: [{ranks}], dropout.rate: 0.5, dropout.sampler: budget}}",
            "rank": f"{{lora.ranks: [{half}]}}",
            "bf16": f"{{lora.ranks: [{ranks}], federation.comm_dtype: bfloat16}}",
        }


REGIMES = {
    "short": Regime(["lora.r=16", "data.max_train_samples=800", "data.max_eval_samples=300",
                     "data.train_eval_samples=200", "federation.rounds=4", "federation.local_epochs=1"],
                    [4, 8, 16], "rotten_tomatoes,sst2,mrpc", "uplink",
                    "Ranks 4/8/16 on a rank-16 MiniLM, fedex, 3 devices, 800 examples, 4 rounds"),
    "long": Regime([*LONG, "federation.devices=6", "data.max_eval_samples=400", "data.train_eval_samples=300"],
                   [4, 4, 8, 8, 16, 16], "rotten_tomatoes", "uplink-long",
                   "The long regime (bench_regime_pilot.py's D): ranks 4/4/8/8/16/16 on a rank-16 MiniLM "
                   "(every linear layer), fedex, 6 devices, 360 examples, 20 rounds of 10 local epochs, "
                   "batch 16, lr 0.002"),
}


def command(args, regime: Regime, out: Path) -> list[str]:
    """The `fedlodrop sweep` this study is: the regime's keys, one `--arm` per arm, tasks x partitions."""
    cmd = ["fedlodrop", "sweep", "--quiet", "--out", str(out), "--seeds", str(args.seeds), "--jobs", str(args.jobs),
           "--threads", str(args.threads), "--set", f"data.glue_dir={args.glue}"]
    for item in regime.setting:
        cmd += ["--set", item]
    for name, sets in regime.arms().items():
        cmd += ["--arm", f"{name}={sets}"]
    return cmd + ["--vary", f"task={args.tasks or regime.tasks}", "--vary", "federation.partition=iid,dirichlet"]


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
    for arm in ARM_NAMES:
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
    parser.add_argument("--regime", choices=list(REGIMES), default="short",
                        help="short: 4 rounds of 1 epoch; long: where dropout can regularise (regime D)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: the regime's)")
    args = parser.parse_args()
    args.glue = Path(args.glue).resolve()
    regime = REGIMES[args.regime]
    out = ROOT / "bench_out" / regime.name
    page = f"study-{regime.name}"
    cmd = command(args, regime, out)
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
    shutil.copy(out / "sweep.csv", DOCS / f"{page}.csv")
    shutil.copy(out / "sweep.png", DOCS / f"{page}.png")
    flags = ("" if args.regime == "short" else f" --regime {args.regime}") + (f" --tasks {args.tasks}" if args.tasks else "")
    md = "\n".join([
        f"# `python benchmarks/bench_uplink.py{flags}`", "",
        "At equal uplink bytes: dropout at rate 0.5, half the rank, or bf16 on the uplink; `full` sends twice the "
        f"bytes. {regime.says}. {header(args.threads, args.jobs)}; "
        f"{minutes:.0f} min in this invocation (finished runs are reused).", "",
        "The sweep it runs (GLUE: the folder of the GLUE tsv files):", "",
        f"    {shown}", "",
        f"Mean ± sample std over seeds (`fedlodrop report bench_out/{regime.name}` prints the same table):", "",
        "```", buf.getvalue().rstrip(), "```", "",
        "Paired differences in the final validation metric, per (task, partition, seed), in points:", "",
        *paired(rep), "",
        f"![uplink]({page}.png)", "",
    ])
    (DOCS / f"{page}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
