"""Break one thing at a time and check the suite catches it (issue 15, item 2).

    python benchmarks/break_check.py [--only NAME ...] [--src-root DIR]

Each mutation is a realistic bug in the code the suite guards (weights, masks, the fold, sampling,
resume, bytes, Flower failure handling, local training). For each one the script copies the tree
(`--src-root`, default this checkout) to a temporary folder, applies the mutation (its text must
occur exactly once, in one of the spellings given, so that it also applies to older versions of
the code), runs the tests that guard it, and reports CAUGHT (some test failed) or MISSED. Nothing
in the checkout changes. The tests run with one torch thread each (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    what: str
    file: str  # under src/fedlodrop
    edits: list[tuple[str, str]]  # (old, new) spellings; the first that occurs exactly once is applied
    tests: list[str]  # pytest node ids or files, relative to the root


MUTATIONS = [
    Mutation("weights", "devices weighted uniformly instead of by their sample counts", "aggregation.py",
             [('raw = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]',
               'raw = [1.0 for u in updates]')],
             ["tests/test_engine.py::test_devices_are_weighted_by_their_sample_counts"]),
    Mutation("mask-rate", "Bernoulli masks keep with probability 1 - rate/2", "masks.py",
             [("keep = rng.random(n) >= rate", "keep = rng.random(n) >= rate / 2")],
             ["tests/test_masks.py"]),
    Mutation("mask-seed", "every device draws device 0's masks", "masks.py",
             [('numpy_rng(seed, f"{stream}-A", round_, device, index)', 'numpy_rng(seed, f"{stream}-A", round_, 0, index)')],
             ["tests/test_masks.py"]),
    Mutation("fold-orientation", "the FedEx delta transposed for nn.Linear (the released code's bug)", "adapter.py",
             [("return delta.T if shape.fan_in_fan_out else delta", "return delta if shape.fan_in_fan_out else delta.T")],
             ["tests/test_fedex_exact.py"]),
    Mutation("fold-start", "the fold forgets what each device started from", "aggregation.py",
             [("terms.append([u.start[m.key_b], u.start[m.key_a], -wk])",
               "terms.append([u.start[m.key_b], u.start[m.key_a], 0.0])")],
             ["tests/test_fedex_exact.py", "tests/test_aggregation.py"]),
    Mutation("sampling", "the same devices take part in every round", "server.py",
             [('rng = numpy_rng(cfg.seed, "participants", round_)', 'rng = numpy_rng(cfg.seed, "participants", 0)')],
             ["tests/test_learning.py::test_partial_participation_with_fedex_learns",
              "tests/test_flower_round.py"]),
    Mutation("resume-metrics", "resume keeps the metrics line of a round its checkpoint does not cover", "runs.py",
             [('rows = [r for r in self._rows() if r["round"] <= rounds]',
               'rows = [r for r in self._rows() if r["round"] <= rounds + 1]'),
              ('records = [r for r in self.metrics() if r["round"] <= rounds]',
               'records = [r for r in self.metrics() if r["round"] <= rounds + 1]')],
             ["tests/test_resume.py"]),
    Mutation("resume-foldlog", "the checkpoint loses the recent folds devices catch up from", "runs.py",
             [('tensors |= {f"log/{update.round}/{k}": v for k, v in update.tensors.items()}',
               'pass')],
             ["tests/test_resume.py"]),
    Mutation("bytes", "a task's bytes leave out the folds it carries", "messages.py",
             [("return payload_bytes(self.adapter) + (self.fold.nbytes if self.fold else 0)",
               "return payload_bytes(self.adapter)")],
             ["tests/test_engine.py::test_fedex_folds_travel_down_the_next_round_in_the_comm_dtype"]),
    Mutation("flower-errors", "the Flower strategy reads an error reply as a reply", "flower/strategy.py",
             [("            if msg.has_error():\n                state.problems[device] = error_reason(msg)\n                continue\n",
               "")],
             ["tests/test_flower_round.py"]),
    Mutation("grad-mask", "dropped slices train too (their gradients are not zeroed)", "client.py",
             [("                grad_owner.grad.mul_(mask)", "                pass")],
             ["tests/test_engine.py::test_what_each_variant_trains"]),
    Mutation("meter-bytes", "the clock prices the upload with the downlink's bytes", "meter.py",
             [("up = 8.0 * uplink_bytes / float(m.rate(b, p, k)) if uplink_bytes > 0 else 0.0",
               "up = 8.0 * downlink_bytes / float(m.rate(b, p, k)) if uplink_bytes > 0 else 0.0")],
             ["tests/test_meter.py::test_every_round_is_priced_from_what_travelled_on_both_engines"]),
    Mutation("enforce", "a device over the latency limit is kept", "server.py",
             [('if problem is None and entry.limit and self.meter.enforce == "drop":',
               'if problem is None and entry.limit and self.meter.enforce == "never":')],
             ["tests/test_meter.py::test_a_device_over_the_latency_limit_is_dropped_and_the_run_still_learns"]),
    Mutation("budget", "the run budget forgets what earlier rounds spent", "engine.py",
             [("if fed.time_budget_s is not None and sum(x.latency_s for x in spent) + latency > fed.time_budget_s:",
               "if fed.time_budget_s is not None and latency > fed.time_budget_s:")],
             ["tests/test_meter.py::test_a_time_budget_ends_the_run_before_the_round_that_would_exceed_it"]),
    Mutation("lr-schedule", "the learning-rate schedule restarts every round", "client.py",
             [("lambda f: lr((task.round + f) / rounds)", "lambda f: lr(f)")],
             ["tests/test_engine.py::test_learning_rate_spans_the_federation"]),
]


def apply(tree: Path, m: Mutation) -> bool:
    """Apply the mutation; False if this version of the code has nothing it applies to."""
    path = tree / "src" / "fedlodrop" / m.file
    text = path.read_text() if path.is_file() else ""
    for old, new in m.edits:
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return True
    return False


def run(m: Mutation, src_root: Path) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"break-{m.name}-") as tmp:
        tree = Path(tmp)
        for part in ("src", "tests", "pyproject.toml", "README.md", "configs"):
            source = src_root / part
            (shutil.copytree if source.is_dir() else shutil.copy)(source, tree / part)
        if not apply(tree, m):
            return "n/a", 0.0, f"not in this version of {m.file}"
        tests = [t for t in m.tests if (tree / t.split("::")[0]).is_file()]
        env = dict(os.environ, PYTHONPATH=str(tree / "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0",
                               *tests],
                              cwd=tree, env=env, capture_output=True, text=True, check=False)
        secs = time.perf_counter() - t0
        last = (proc.stdout.strip().splitlines() or ["?"])[-1]
        failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        verdict = "CAUGHT" if proc.returncode == 1 and failed else ("MISSED" if proc.returncode == 0 else f"ERROR rc={proc.returncode}")
        return verdict, secs, (failed[0] if failed else last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--src-root", type=Path, default=ROOT, help="the checkout to mutate (default: this one)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.src_root, capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"break check of {args.src_root} ({commit}); torch threads per test process: 1", flush=True)
    print("| mutation | what breaks | verdict | first failing test | s |\n|---|---|---|---|---|", flush=True)
    for m in chosen:
        verdict, secs, detail = run(m, args.src_root)
        print(f"| {m.name} | {m.what} | {verdict} | {detail} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
