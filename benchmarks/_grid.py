"""Shared by the dropout benchmarks: run a list of configurations (reusing finished runs, resuming
interrupted ones), in parallel processes of a fixed thread count, then tabulate mean and standard
deviation over seeds and plot. Run folders go under bench_out/ (ignored by git)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"


@dataclass
class Point:
    name: str  # run folder name
    keys: dict  # what the table groups by (besides the seed)
    overrides: list[str] = field(default_factory=list)  # --set items


def _one(args) -> tuple[str, dict, list[dict], float]:
    name, overrides, out, threads = args
    import torch

    torch.set_num_threads(threads)
    from fedlodrop import engine
    from fedlodrop.config import load_config
    from fedlodrop.runs import RunFolder

    folder = RunFolder(Path(out) / name)
    t0 = time.perf_counter()
    cfg = load_config(None, overrides + [f"train.threads={threads}"])
    same = folder.finished or folder.rounds_done() > 0
    same = same and folder.config() == cfg  # a folder from other settings is run again, not reused
    if same and folder.finished:
        summary = folder.summary()
    elif same:
        summary = engine.resume(folder.path, show_progress=False)
    else:
        summary = engine.run(cfg, folder.path, show_progress=False, force=True)
    return name, summary, folder.metrics(), time.perf_counter() - t0


def run_points(points: list[Point], out: Path, jobs: int, threads: int) -> dict[str, tuple[dict, list[dict]]]:
    out.mkdir(parents=True, exist_ok=True)
    work = [(p.name, p.overrides, str(out), threads) for p in points]
    results: dict[str, tuple[dict, list[dict]]] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, (name, summary, metrics, secs) in enumerate(pool.map(_one, work), 1):
            main = summary["main_metric"]
            print(f"[{i}/{len(work)}] {name}: final {main} {summary['final'][main]:.4f} ({secs:.0f} s, "
                  f"{(time.perf_counter() - t0) / 60:.1f} min so far)", file=sys.stderr, flush=True)
            results[name] = (summary, metrics)
    return results


def row_of(summary: dict, metrics: list[dict]) -> dict:
    main = summary["main_metric"]
    rounds = len(metrics)
    return {
        "final": summary["final"][main],
        "best": summary["best"][main],
        "train": summary["final_train"].get(main, float("nan")),
        "gap": summary["generalization_gap"].get(main, float("nan")),
        "uplink_B_per_round": summary["uplink_bytes_total"] / rounds,
        "downlink_B_per_round": summary["downlink_bytes_total"] / rounds,
    }


STATS = ("final", "best", "train", "gap", "uplink_B_per_round", "downlink_B_per_round")


def table(points: list[Point], results, group_keys: list[str]) -> list[dict]:
    """One row per group (the points' `keys` without the seed): mean and sample std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    order: list[tuple] = []
    for p in points:
        key = tuple(p.keys[k] for k in group_keys)
        if key not in groups:
            groups[key], _ = [], order.append(key)
        groups[key].append(row_of(*results[p.name]))
    rows = []
    for key in order:
        runs = groups[key]
        row = dict(zip(group_keys, key)) | {"seeds": len(runs)}
        for s in STATS:
            xs = [r[s] for r in runs]
            row[f"{s}_mean"] = statistics.fmean(xs)
            row[f"{s}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
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
    import platform

    return (f"{jobs} process(es) x {threads} torch thread(s) on {os.cpu_count()} CPU(s) "
            f"({platform.processor() or platform.machine()}); {time.strftime('%Y-%m-%d %H:%M')}")


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2))
