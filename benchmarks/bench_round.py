"""Round time, peak memory and the cost of FedLoDrop's own machinery, on the reference workload.

The released reference code's CPU workload: SST-2, the first 600 training and 300 validation
examples, the packaged MiniLM, 3 devices, 1 local epoch, batch 32, LoRA r 4 alpha 8, FedIT. The
reference evaluates only the validation set, so `data.train_eval_samples` is 0 here too.

Three measurements, each in its own process so peak RSS is that run's alone:
  speed    3 devices, FedIT: seconds per round (target <= 17 s; the reference takes 45-52 s)
  memory   10 devices: peak RSS of the whole process (target < 1.5 GiB; the reference 3.6 GiB)
  dropout  3 devices, gamma 0.3, FedEx, the default variant: share of the round spent outside
           local training and evaluation (masks, packing, decoding, aggregating; target <= 3 %)

    python benchmarks/bench_round.py --glue-dir ../shared/data/glue [--rounds 3] [--out bench_out/round.md]
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

from fedlodrop.run.folder import RunFolder

WORKLOAD = [
    "task=sst2",
    "data.source=glue_dir",
    "federation.local_epochs=1",
    "train.batch_size=32",
    "lora.r=4",
    "lora.alpha=8",
    "data.train_eval_samples=0",
]


def first_rows(glue_dir: Path, into: Path, n_train: int, n_dev: int) -> Path:
    """A GLUE folder holding the first n rows of SST-2's train and dev files, as the reference."""
    (into / "SST-2").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = (glue_dir / "SST-2" / name).read_text(encoding="utf-8").splitlines()
        (into / "SST-2" / name).write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return into


def one_run(extra: list[str], out: Path) -> dict:
    """`fedlodrop run` in a child process; its metrics and its own peak RSS."""
    cmd = [sys.executable, "-m", "fedlodrop", "run", "--quiet", "--out", str(out)]
    for item in WORKLOAD + extra:
        cmd += ["--set", item]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rows = RunFolder(out).records()
    return {"rows": rows, "peak_gib": peak_kib / 2**20, "grew": peak_kib > before, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_out/round.md"))
    parser.add_argument("--threads", type=int, default=None, help="train.threads (default: torch's choice)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        glue = first_rows(args.glue_dir, tmp / "glue", 600, 300)
        common = [f"data.glue_dir={glue}", f"federation.rounds={args.rounds}"]
        if args.threads:
            common.append(f"train.threads={args.threads}")
        speed = one_run(common + ["federation.devices=3", "federation.aggregation=fedit"], tmp / "speed")
        memory = one_run(common + ["federation.devices=10", "federation.aggregation=fedit"], tmp / "memory")
        drop = one_run(
            common + ["federation.devices=3", "federation.aggregation=fedex", "dropout.rate=0.3"], tmp / "dropout"
        )
    round_s = [r.wall_s for r in speed["rows"]]
    share = [
        (r.timing.other_device_s + r.timing.aggregate_s) / r.wall_s for r in drop["rows"]
    ]
    lines = [
        "| measurement | value | target |",
        "|---|---|---|",
        f"| round time, 3 devices FedIT (mean of {len(round_s)}) | {sum(round_s) / len(round_s):.2f} s "
        f"(max {max(round_s):.2f} s) | <= 17 s |",
        f"| validation accuracy after {len(round_s)} rounds | {speed['rows'][-1]['eval']['accuracy']:.4f} | |",
        f"| peak RSS, 10 devices | {memory['peak_gib']:.2f} GiB | < 1.5 GiB |",
        f"| round time, 10 devices | {sum(r.wall_s for r in memory['rows']) / len(memory['rows']):.2f} s | |",
        f"| masks + aggregation share of a round, gamma 0.3 FedEx | {100 * max(share):.2f} % (max over rounds) "
        f"| <= 3 % |",
        f"| uplink per round, gamma 0 vs 0.3 | {speed['rows'][0]['uplink_bytes']} B vs "
        f"{drop['rows'][0]['uplink_bytes']} B | |",
    ]
    lines.append(f"| torch threads | {args.threads or 'torch default'} | |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    ok = max(round_s) <= 17 and memory["peak_gib"] < 1.5 and max(share) <= 0.03
    print("all targets met" if ok else "TARGET MISSED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
