"""Shared by the grid benchmarks: their grid points as sweep points, run by `fedlodrop.studies.sweep.run_points`
(the runner of `fedlodrop sweep --jobs`: reuse of finished runs, resume of interrupted ones, parallel
processes of a fixed thread count), and their tables in the format of the pages committed under
docs/benchmarks: mean and sample standard deviation over seeds (`fedlodrop.studies.report`'s, from the run
folders read through RunFolder), Markdown, CSV and plot. Run folders go under bench_out/ (ignored by git).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlodrop.cli.app import hide_third_party_deprecations  # noqa: E402
from fedlodrop.run.settings import load_config  # noqa: E402
from fedlodrop.studies.report import Group, run_row  # noqa: E402
from fedlodrop.studies.sweep import Outcome, Point, run_points  # noqa: E402

hide_third_party_deprecations()  # as the CLI does; spawned runs take these filters

GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"
# The long regime (issue 29 item 4, issue 30): bench_regime_pilot.py's D, where rate 0's validation
# accuracy peaks and falls (360 examples, 20 rounds of 10 local epochs, r 16 on every linear layer), at
# batch 16 / lr 0.002: at the defaults (batch 8, lr 0.005) a large Dirichlet shard's 200 local steps diverge.
LONG = ["data.max_train_samples=360", "federation.rounds=20", "federation.local_epochs=10", "lora.r=16",
        "lora.target_modules=[query,key,value,dense]", "train.batch_size=16", "train.lr=0.002"]


def grid_args(parser, seeds: int = 3, glue: str = "--glue"):
    """The options every grid benchmark takes: processes, threads each, seeds, GLUE folder."""
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seeds", type=int, default=seeds, help="seeds 0..n-1 per grid point")
    parser.add_argument(glue, type=Path, default=GLUE, help="folder of the GLUE tsv files")
    return parser


def point(name: str, keys: dict, overrides: list[str]) -> Point:
    """A benchmark's grid point: run folder `name`, the labels its table groups by (besides the
    seed), and the config from `--set` items on the defaults."""
    cfg = load_config(None, overrides)
    return Point(name, dict(keys), cfg.seed, cfg)


def run(points: list[Point], out: Path, jobs: int, threads: int) -> dict[str, Outcome]:
    """Run (or reuse, or resume) every point in `out/<name>`, `jobs` processes of `threads` torch
    threads each (`train.threads`); the outcomes by point name."""
    outcomes = run_points(points, out, jobs=jobs, threads=threads, show_progress=False)
    return {o.point.name: o for o in outcomes}


# report's field of each column these tables have always had
STATS = {
    "final": "final",
    "best": "best",
    "train": "train",
    "gap": "gap",
    "uplink_B_per_round": "uplink_bytes_per_round",
    "downlink_B_per_round": "downlink_bytes_per_round",
}


def table(points: list[Point], results: dict[str, Outcome], group_keys: list[str]) -> list[dict]:
    """One row per group (the points' labels without the seed), in the order of `points`: mean and
    sample std over seeds of each stat."""
    groups: dict[tuple, Group] = {}
    for p in points:
        key = tuple(p.values[k] for k in group_keys)
        group = groups.setdefault(key, Group(dict(zip(group_keys, key)), []))
        group.rows.append(run_row(results[p.name].path, p.values))
    rows = []
    for key, group in groups.items():
        row = dict(zip(group_keys, key)) | {"seeds": len(group.rows)}
        for name, field in STATS.items():
            mean, std, _ = group.stat(field)
            row[f"{name}_mean"] = math.nan if mean is None else mean
            row[f"{name}_std"] = math.nan if std is None else std
        rows.append(row)
    return rows


def markdown(rows: list[dict], group_keys: list[str], metric: str) -> str:
    head = group_keys + [f"final val. {metric}", f"best val. {metric}", f"train {metric}", "gap (train - val.)",
                         "uplink B/round", "downlink B/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in group_keys]
        cells += [f"{r[s + '_mean']:.4f} ± {r[s + '_std']:.4f}" for s in ("final", "best", "train", "gap")]
        cells += [f"{r['uplink_B_per_round_mean']:,.0f}", f"{r['downlink_B_per_round_mean']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], x: str, series: list[str], panels: list[str], path: Path, title: str,
         facet: str | None = None) -> None:
    """One figure: for each facet value (or once), `panels` (stat names) against `x`, a line per
    combination of `series` keys, error bars of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = sorted({r[facet] for r in rows}, key=str) if facet else [None]
    fig, axes = plt.subplots(len(facets), len(panels), figsize=(5 * len(panels), 3.6 * len(facets)), squeeze=False)
    labels = {"final": "final validation", "gap": "gap (train - validation)", "uplink_B_per_round": "uplink B/round",
              "best": "best validation", "train": "train"}
    for i, fv in enumerate(facets):
        sub = [r for r in rows if facet is None or r[facet] == fv]
        lines: dict[tuple, list[dict]] = {}
        for r in sub:
            lines.setdefault(tuple(r[k] for k in series), []).append(r)
        for j, stat in enumerate(panels):
            ax = axes[i][j]
            for key, rs in lines.items():
                rs = sorted(rs, key=lambda r: r[x])
                ax.errorbar([r[x] for r in rs], [r[f"{stat}_mean"] for r in rs], yerr=[r[f"{stat}_std"] for r in rs],
                            marker="o", capsize=3, label=" ".join(str(k) for k in key) or None)
            ax.set_xlabel(x)
            ax.set_title(f"{fv}: {labels.get(stat, stat)}" if facet else labels.get(stat, stat), fontsize=10)
            ax.grid(alpha=0.3)
            if series and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header(threads: int, jobs: int) -> str:
    from fedlodrop.model.backbone import cpu_amx_path

    amx, why = cpu_amx_path()
    return (f"{jobs} process(es) x {threads} torch thread(s) on {os.cpu_count()} CPU(s) "
            f"({platform.processor() or platform.machine()}; train.precision auto trains in "
            f"{'bf16' if amx else 'fp32'}: {why}); {time.strftime('%Y-%m-%d %H:%M')}")
