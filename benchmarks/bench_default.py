"""The offline default, as a new user runs it: `fedlodrop run` with no arguments, timed, on each
CPU path `train.precision: auto` can take.

Targets (issue: federated engine): at most 5 minutes on a 2-core CPU, validation accuracy at least
0.75. The wall time covers the whole command: imports, data, model load, all rounds, run folder.

`auto` trains in bf16 autocast on a CPU with AMX-BF16 and in fp32 elsewhere (evaluation is fp32 on
both), so the figure a user sees depends on the CPU. `--cpu-path both` (the default) runs the
command twice, with FEDLODROP_CPU_AMX=0 (the fp32 path) and =1 (the AMX path: native bf16 on an
AMX CPU, emulated and slower elsewhere), and says which CPU produced the numbers.

    python benchmarks/bench_default.py [--cpu-path both|hardware|amx|no-amx] [--out bench_out/default.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedlodrop.model.backbone import CPU_AMX_ENV, _cpu_has_amx_bf16
from fedlodrop.run.folder import RunFolder

PATHS = {"no-amx": "0", "amx": "1", "hardware": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def one_run(path: str, threads: int | None) -> list[str]:
    extra = ["--set", f"train.threads={threads}"] if threads else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop(CPU_AMX_ENV, None)
    if PATHS[path] is not None:
        env[CPU_AMX_ENV] = PATHS[path]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        subprocess.run(["fedlodrop", "run", "--quiet", "--out", str(run_dir), *extra], check=True, env=env)
        wall = time.perf_counter() - t0
        summary, rows = RunFolder(run_dir).summary(), RunFolder(run_dir).records()
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    train = " / ".join(f"{p['dtype']} ({p['why']})" for p in summary.precision["train"])
    lines = [
        f"### {path} path: training {train}, evaluation {summary.precision['eval']['dtype']}",
        "",
        "| round | train loss | train accuracy | validation accuracy | uplink MB | downlink MB | round s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round} | {r.train_loss:.4f} | {r.train.get('accuracy', float('nan')):.4f} | "
            f"{r.eval['accuracy']:.4f} | {r.uplink_bytes / 1e6:.3f} | {r.downlink_bytes / 1e6:.3f} | "
            f"{r.wall_s:.1f} |"
        )
    acc = summary.final["accuracy"]
    lines += [
        "",
        f"`fedlodrop run` (no arguments): {wall:.1f} s wall for the whole command (target <= 300 s), "
        f"final validation accuracy {acc:.4f} (target >= 0.75), best {summary.best['accuracy']:.4f}, "
        f"peak RSS {peak:.2f} GiB (the largest child so far); torch threads: {threads or torch.get_num_threads()}"
        f"{'' if threads else ' (torch default)'}.",
        "",
    ]
    ok = wall <= 300 and acc >= 0.75
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/default.md"))
    parser.add_argument("--threads", type=int, default=None, help="train.threads (default: torch's choice)")
    parser.add_argument("--cpu-path", choices=[*PATHS, "both"], default="both",
                        help="which path train.precision auto takes (FEDLODROP_CPU_AMX); both: no-amx, then amx")
    args = parser.parse_args()
    paths = ["no-amx", "amx"] if args.cpu_path == "both" else [args.cpu_path]
    amx = _cpu_has_amx_bf16()
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} CPUs, AMX-BF16: {'yes' if amx else 'no'}"
             f"{'' if amx else ' (the amx path emulates bf16: slower here, the same kind of numbers)'}.", ""]
    all_ok = True
    for path in paths:
        more, ok = one_run(path, args.threads)
        lines += more
        all_ok &= ok
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print("all targets met" if all_ok else "TARGET MISSED")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
