"""Issue 9's numbers: memory, scale, throughput against a bare PEFT loop, padding, round anatomy,
and FedEx at scale with a truncated fold. Each prints a table and writes docs/benchmarks/engine-<name>.md.

  memory      peak RSS of a 1-round run with 1, 10, 50, 200 devices, each holding the same 64
              SST-2 sentences (each run in its own process). Goal: 200 devices <= 1.3 x one device.
  scale       training seconds per optimizer step with 3 and with 100 devices of 64 examples,
              batch 16. Goal: <= 1.15 x.
  throughput  local-training samples/s of fedlodrop's device step against a bare PEFT loop over
              the same batches, precision and threads (reference workload: SST-2's first 600
              examples, MiniLM r 4, batch 32). Goal: >= 0.9.
  padding     training samples/s with dynamic padding and length grouping against padding every
              example to 128 tokens (the released code), on a seeded sample of SST-2's training
              set (--sample, default 4096; --sample 0: all 67,349). Goal: >= 3 x.
  anatomy     share of a round in local training, masks and packing, aggregation, evaluation and
              checkpointing, on the offline default at rate 0.3. Goal: all but training and
              evaluation <= 3 %.
  fedex-scale 200 devices of 64 examples, FedEx, 2 rounds: bytes down in round 2 (which carries
              round 1's fold), the fold's truncation error and accuracy for
              federation.residual_rank exact / 16 / 4.

    python benchmarks/bench_engine.py memory|scale|throughput|padding|anatomy|fedex-scale|all [--threads 1]

Run on a quiet machine; every table says how many threads it used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlodrop.run.folder import RunFolder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / ".." / "shared" / "data" / "glue"
DOCS = ROOT / "docs" / "benchmarks"


def _cfg(overrides: list[str]):
    from fedlodrop.run.settings import load_config

    return load_config(None, overrides)


def _sst2(glue: Path, extra: list[str]) -> list[str]:
    return ["task=sst2", f"data.glue_dir={glue}", "data.source=glue_dir"] + extra


def _child_run(overrides: list[str], out: Path) -> tuple[float, list[dict]]:
    """`fedlodrop run` in its own process: its peak RSS (GiB) and its metrics."""
    cmd = [sys.executable, "-m", "fedlodrop", "run", "--quiet", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    code = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)"
    )
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    peak_kib = int(res.stdout.strip().splitlines()[-1])
    return peak_kib / 2**20, RunFolder(out).records()


def _write(name: str, title: str, table: str, threads: int) -> str:
    text = f"# `python benchmarks/bench_engine.py {name}`\n\n{title} torch threads: {threads}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}.\n\n{table}\n"
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"engine-{name}.md").write_text(text)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------- memory


def _same_examples_glue(glue: Path, tmp: Path, copies: int) -> Path:
    """A GLUE folder whose SST-2 training file is SST-2's first 64 training examples `copies` times
    over (and whose dev file is its first 64 dev examples): with `copies` devices each holds 64
    of the same sentences, so the longest batch, the token count and the data do not grow with
    the number of devices; only per-device state can."""
    out = tmp / f"glue-{copies}" / "SST-2"
    out.mkdir(parents=True)
    head, *rows = (glue / "SST-2" / "train.tsv").read_text().splitlines()
    (out / "train.tsv").write_text("\n".join([head] + rows[:64] * copies) + "\n")
    head, *rows = (glue / "SST-2" / "dev.tsv").read_text().splitlines()
    (out / "dev.tsv").write_text("\n".join([head] + rows[:64]) + "\n")
    return out.parent


def memory(args) -> None:
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 10, 50, 200):
            glue = _same_examples_glue(args.glue, Path(tmp), k)
            over = _sst2(glue, [f"federation.devices={k}", "data.max_train_samples=null",
                                "federation.rounds=1", "data.max_eval_samples=64", "data.train_eval_samples=0",
                                "dropout.rate=0.3", f"train.threads={args.threads}"])
            peak, _ = _child_run(over, Path(tmp) / f"k{k}")
            base = base or peak
            rows.append(f"| {k} | {64 * k} | {peak:.3f} | {peak / base:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    verdict = "met" if peak / base <= 1.3 else "MISSED"
    table = "| devices | training examples | peak RSS GiB | vs 1 device |\n|---|---|---|---|\n" + "\n".join(rows)
    table += f"\n\nGoal (200 devices <= 1.3 x 1 device): {verdict}."
    _write("memory", "Peak RSS of a whole `fedlodrop run` (1 round, FedEx, rate 0.3, the default variant, MiniLM r 8); "
           "every device holds the same 64 SST-2 training sentences (SST-2's first 64, repeated once per device), "
           "so only per-device state can grow.", table, args.threads)


# ---------------------------------------------------------------------------- scale


def scale(args) -> None:
    import torch

    from fedlodrop.run import engine

    torch.set_num_threads(args.threads)
    out_rows = []
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (3, 100):
            cfg = _cfg(_sst2(args.glue, [f"federation.devices={k}", f"data.max_train_samples={64 * k}",
                                         "federation.rounds=1", "data.max_eval_samples=64", "data.train_eval_samples=0",
                                         "train.batch_size=16", f"train.threads={args.threads}"]))
            engine.run(cfg, Path(tmp) / f"k{k}", show_progress=False)
            devices = RunFolder(Path(tmp) / f"k{k}").records()[0].devices
            per_step[k] = sum(d.train_s for d in devices) / sum(d.steps for d in devices)
            out_rows.append(f"| {k} | {sum(d.steps for d in devices)} | {per_step[k] * 1000:.1f} |")
    ratio = per_step[100] / per_step[3]
    table = "| devices | optimizer steps | ms per step |\n|---|---|---|\n" + "\n".join(out_rows)
    table += f"\n\n100 devices / 3 devices: {ratio:.3f} (goal <= 1.15: {'met' if ratio <= 1.15 else 'MISSED'})."
    _write("scale", "Training time per optimizer step (64 SST-2 examples per device, batch 16, MiniLM r 8, 1 round).",
           table, args.threads)


# ---------------------------------------------------------------------------- throughput


def _reference_experiment(glue: Path, threads: int):
    from fedlodrop.run.experiment import build

    cfg = _cfg(_sst2(glue, ["federation.devices=1", "data.max_train_samples=600", "federation.rounds=1",
                            "lora.r=4", "lora.alpha=8", "train.batch_size=32", "data.max_eval_samples=32",
                            "data.train_eval_samples=0", f"train.threads={threads}"]))
    return build(cfg)


def _ours(exp) -> float:
    from fedlodrop.round.client import device_step
    from fedlodrop.round.server import Server, ServerState

    server = Server(exp.cfg, exp.fm.layout, ServerState(0, exp.fm.get_state()), exp.rates, exp.known)
    (task,) = server.configure(0)
    reply = device_step(exp.fm, task, exp.shards[0], exp.cfg, exp.known)
    return len(exp.shards[0]) / reply.train_s


def _bare(exp) -> float:
    """A plain PEFT training loop: the same model object, the same batches, nothing else."""
    import torch

    from fedlodrop.data import make_loader
    from fedlodrop.rng import stream_seed

    cfg = exp.cfg
    loader = make_loader(exp.shards[0], exp.fm.tokenizer, cfg.train.batch_size, True,
                         stream_seed(cfg.seed, "data", 0, 0), group_by_length=cfg.train.group_by_length)
    net = exp.fm.net
    exp.fm.set_state(exp.known)
    params = [p for p in net.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.train.lr)
    net.train()
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        loss = net(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        n += batch["input_ids"].shape[0]
    return n / (time.perf_counter() - t0)


def throughput(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    exp = _reference_experiment(args.glue, args.threads)
    ours, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both
        ours.append(_ours(exp))
        bare.append(_bare(exp))
    o, b = statistics.median(ours), statistics.median(bare)
    table = (
        "| loop | samples/s (median of {n}) | all runs |\n|---|---|---|\n"
        f"| fedlodrop device step | {o:.1f} | {', '.join(f'{x:.1f}' for x in ours)} |\n"
        f"| bare PEFT loop | {b:.1f} | {', '.join(f'{x:.1f}' for x in bare)} |\n\n"
        f"fedlodrop / bare: {o / b:.3f} (goal >= 0.9: {'met' if o / b >= 0.9 else 'MISSED'})."
    ).replace("{n}", str(args.repeats))
    _write("throughput", "Local training on SST-2's first 600 examples, MiniLM r 4, batch 32 (length-grouped), fp32.",
           table, args.threads)


# ---------------------------------------------------------------------------- padding


def padding(args) -> None:
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from fedlodrop.data import make_loader

    torch.set_num_threads(args.threads)
    sample = args.sample or None
    exp = _reference_experiment(args.glue, args.threads)
    from fedlodrop.data import TASKS, load_splits, tokenize

    cfg = _cfg(_sst2(args.glue, [f"data.max_train_samples={sample}" if sample else "data.max_train_samples=null"]))
    train, _ = load_splits(TASKS["sst2"], cfg.data, 0)
    ds = tokenize(train, exp.fm.tokenizer, TASKS["sst2"], 128)
    dynamic = make_loader(ds, exp.fm.tokenizer, 32, True, 0, group_by_length=True)
    fixed = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
                       collate_fn=DataCollatorWithPadding(exp.fm.tokenizer, padding="max_length", max_length=128))
    net = exp.fm.net
    params = [p for p in net.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    net.train()
    speeds = {}
    for name, loader in (("dynamic + length grouping", dynamic), ("fixed 128 (released code)", fixed)):
        t0 = time.perf_counter()
        for batch in loader:
            net(**batch).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
        speeds[name] = len(ds) / (time.perf_counter() - t0)
        print(name, f"{speeds[name]:.1f} samples/s", file=sys.stderr, flush=True)
    d, f = speeds.values()
    table = "| padding | samples/s | one epoch of SST-2 (67,349), min |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {v:.1f} | {67349 / v / 60:.1f} |" for k, v in speeds.items())
    table += f"\n\ndynamic / fixed: {d / f:.2f} x (goal >= 3: {'met' if d / f >= 3 else 'MISSED'})."
    what = f"a seeded sample of {len(ds):,} SST-2 training examples" if sample else "one epoch of SST-2's training set"
    _write("padding", f"Training throughput on {what}, MiniLM r 8, batch 32, fp32.", table, args.threads)


# ---------------------------------------------------------------------------- anatomy


def anatomy(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, rows = _child_run(["dropout.rate=0.3", "federation.rounds=3", f"train.threads={args.threads}"], Path(tmp) / "r")
    parts = {"local training": "train_s", "masks, packing, decoding (devices)": "other_device_s",
             "aggregation and fold": "aggregate_s", "evaluation": "eval_s", "checkpoint": "checkpoint_s"}
    total = sum(r.wall_s + r.timing.checkpoint_s for r in rows)
    shares = {k: sum(getattr(r.timing, v) for r in rows) / total for k, v in parts.items()}
    overhead = 1 - shares["local training"] - shares["evaluation"]
    table = "| part of a round | share | seconds (3 rounds) |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {100 * v:.2f} % | {v * total:.2f} |" for k, v in shares.items())
    table += f"\n\nEverything but training and evaluation: {100 * overhead:.2f} % (goal <= 3 %: {'met' if overhead <= 0.03 else 'MISSED'})."
    _write("anatomy", "Where a round goes: the offline default (MiniLM, Rotten Tomatoes, 3 devices, FedEx) at rate 0.3, 3 rounds.",
           table, args.threads)


# ---------------------------------------------------------------------------- fedex at scale


def fedex_scale(args) -> None:
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in ("null", "16", "4"):
            over = _sst2(args.glue, ["federation.devices=200", "data.max_train_samples=12800", "federation.rounds=2",
                                     "data.max_eval_samples=872", "data.train_eval_samples=0",
                                     f"federation.residual_rank={rank}", f"train.threads={args.threads}"])
            _, rows = _child_run(over, Path(tmp) / f"rank{rank}")
            down = [r.downlink_bytes / 1e6 for r in rows]
            up = [r.uplink_bytes / 1e6 for r in rows]
            err = [r.fold_error_rel or 0.0 for r in rows]
            out_rows.append(
                f"| {'exact' if rank == 'null' else rank} | {statistics.fmean(up):.1f} | "
                f"{statistics.fmean(down[1:]):.1f} | {rows[0].fold_bytes / 1e6:.2f} | "
                f"{', '.join(f'{e:.3f}' for e in err)} | {rows[-1].eval['accuracy']:.4f} |")
            print(out_rows[-1], file=sys.stderr, flush=True)
    table = ("| residual_rank | uplink MB/round | downlink MB in round 2 | fold MB per device | "
             "fold error |R - R_k|/|R| by round | final accuracy |\n|---|---|---|---|---|---|\n" + "\n".join(out_rows))
    _write("fedex-scale", "FedEx with 200 devices of 64 SST-2 examples (MiniLM r 8, 2 rounds, rate 0): the fold each "
           "device downloads, exact (rank 201 r > 384: dense) or truncated.", table, args.threads)


COMMANDS = {"memory": memory, "scale": scale, "throughput": throughput, "padding": padding, "anatomy": anatomy,
            "fedex-scale": fedex_scale}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=[*COMMANDS, "all"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--glue", type=Path, default=GLUE)
    p.add_argument("--sample", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    args.glue = args.glue.resolve()
    for name in COMMANDS if args.what == "all" else [args.what]:
        COMMANDS[name](args)


if __name__ == "__main__":
    main()
