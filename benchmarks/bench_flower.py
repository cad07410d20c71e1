"""Issue 8's check as a benchmark: the same config through `fedlodrop run` and through
`fedlodrop flower simulate` (Flower's simulation engine, a SuperLink on 127.0.0.1), on the
pretrained MiniLM and the offline default's data, with FedLoDrop on and FedEx.

Two settings, sized to finish in a few minutes here (600 training examples, 3 rounds):
  all      3 devices, all train every round
  partial  4 devices, 2 sampled a round (lagging devices catch up on FedEx's folds)

Per setting and engine: wall time of the whole command, final validation accuracy, uplink and
downlink bytes over the run (the in-process engine's counts; Flower's measured from the
messages that travelled) and Flower's own `count_bytes()`; then whether the two run folders hold
the same model bit for bit (largest |difference| over every adapter and base-delta tensor) and
the same metrics.

    python benchmarks/bench_flower.py [--threads 1] [--out docs/benchmarks/flower.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "all": ["federation.devices=3"],
    "partial": ["federation.devices=4", "federation.devices_per_round=2"],
}
COMMON = ["federation.rounds=3", "data.max_train_samples=600", "dropout.rate=0.3",
          "federation.aggregation=fedex", "flower.round_timeout_s=600"]


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="train.threads on both engines (Ray gives an actor 1)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "flower.md")
    args = p.parse_args()
    import flwr

    from fedlodrop.run.folder import RunFolder, compare

    rows, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TMPDIR=str(tmp),
                   FLWR_HOME=str(tmp / "flwr"), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        for name, extra in SETTINGS.items():
            sets = [x for kv in COMMON + extra + [f"train.threads={args.threads}"] for x in ("--set", kv)]
            folders = {}
            for engine, sub in (("in-process", ["run"]), ("flower", ["flower", "simulate"])):
                out = tmp / f"{name}-{engine}"
                wall = _run([sys.executable, "-m", "fedlodrop", *sub, "--quiet", "--out", str(out), *sets], env)
                folders[engine] = out
                m = RunFolder(out).records()
                count = (sum(r.flower.uplink_count_bytes for r in m),
                         sum(r.flower.downlink_count_bytes for r in m)) if engine == "flower" else None
                summary = RunFolder(out).summary()
                rows.append(
                    f"| {name} | {engine} | {wall:.1f} | {summary.final['accuracy']:.4f} | "
                    f"{sum(r.uplink_bytes for r in m):,} | {sum(r.downlink_bytes for r in m):,} | "
                    + (f"{count[0]:,} / {count[1]:,} |" if count else "- |")
                )
                print(rows[-1], flush=True)

            worst, problems = compare(folders["in-process"], folders["flower"])
            participants = [r.participants for r in RunFolder(folders["flower"]).records()]
            checks.append(
                f"- {name}: largest |difference| over every adapter and base-delta tensor {worst:.3g}; "
                f"metrics (losses, accuracies, bytes, per-device records) and summary "
                f"{'identical' if not problems else 'DIFFER: ' + '; '.join(problems)}; "
                f"participants per round {participants}."
            )
            print(checks[-1], flush=True)
    head = (
        f"# `python benchmarks/bench_flower.py --threads {args.threads}`\n\n"
        f"MiniLM (pretrained), the offline default's data, 600 training examples, 3 rounds, dropout 0.3 "
        f"(default variant), FedEx; flwr {flwr.__version__}; {args.threads} torch thread(s) per device on "
        f"{os.cpu_count()} CPU(s); {time.strftime('%Y-%m-%d %H:%M')}. Wall time is the whole command "
        "(Flower: SuperLink, Ray, one backbone per actor).\n\n"
        "| setting | engine | wall s | final accuracy | uplink B (run) | downlink B (run) | Flower count_bytes up / down |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    text = head + "\n".join(rows) + "\n\n" + "\n".join(checks) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
