"""Tables and plots from run folders: what `fedlodrop sweep` prints at its end, and `fedlodrop report`.

Input: a folder whose sub-folders are run folders (config.yaml + summary.json), read through
`fedlodrop.run.folder.RunFolder`; unfinished ones (no summary.json) are skipped. The varied keys are the
ones `sweep.json` names (in its order), then any other config key whose value differs between the
runs (`seed` aside: seeds are repetitions).

Outputs, for a prefix P (default `DIR/sweep`):

* `P_runs.csv`: one row per run: the varied keys, seed, the main metric (final round, best round,
  train, generalization gap = train - validation, all at the final round unless named best),
  bytes per round, and the same four numbers for every metric of the task (`final_<m>`, ...).
* `P.csv`: one row per grid point: mean and standard deviation across seeds of those numbers.
  The standard deviation is the sample one (n - 1 in the denominator); 0 for a single seed.
* `P.png`: validation metric, gap and bytes per round against the first varied key, with error
  bars of one standard deviation across seeds, one line per combination of the other keys
  (categorical x when that key's values are not all numbers).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlodrop.errors import UserError
from fedlodrop.round.records import Summary
from fedlodrop.run.folder import RunFolder
from fedlodrop.studies.sweep import ARM_KEY, MANIFEST, REUSE_IGNORED, flatten, format_value, read_manifest

# Fields of a run row that are aggregated across seeds, with their table headings.
STAT_FIELDS = (
    "final",
    "best",
    "train",
    "gap",
    "uplink_bytes_per_round",
    "downlink_bytes_per_round",
    "bytes_per_round",
    "epsilon",  # privacy.dp: the epsilon the run spent (None without DP)
)
_NOT_VARIED = frozenset({"seed"}) | REUSE_IGNORED


@dataclass
class RunRow:
    """One run folder as a report row: its grid point, seed, task, and the numbers the tables show."""
    name: str
    values: dict[str, Any]  # varied key -> value of this run
    seed: int | None
    task: str
    main_metric: str
    rounds: int
    best_round: int | None
    wall_s: float | None
    stats: dict[str, float | None]  # STAT_FIELDS
    uplink_bytes_total: float | None
    downlink_bytes_total: float | None
    metrics: dict[str, float | None] = field(default_factory=dict)  # final_<m>, best_<m>, ...


@dataclass
class Group:
    """One grid point: the runs that differ only in their seed."""

    values: dict[str, Any]
    rows: list[RunRow]

    @property
    def main_metric(self) -> str:
        """The main metric of the group's runs."""
        return self.rows[0].main_metric

    @property
    def task(self) -> str:
        """The task of the group's runs."""
        return self.rows[0].task

    def stat(self, name: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) of a STAT_FIELDS entry over the group's runs that have it."""
        xs = [r.stats[name] for r in self.rows if _finite(r.stats.get(name))]
        if not xs:
            return None, None, 0
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return statistics.fmean(xs), std, len(xs)


@dataclass
class Report:
    """A sweep folder's runs, grouped by grid point: what `fedlodrop report` tabulates and plots."""
    folder: Path
    keys: list[str]
    rows: list[RunRow]
    groups: list[Group]
    skipped: list[str]
    csv_path: Path | None = None
    runs_csv_path: Path | None = None
    png_path: Path | None = None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> float | None:
    return float(x) if _finite(x) else None


# ---------------------------------------------------------------------------- collecting


def _read_run(path: Path) -> tuple[Summary, dict] | None:
    """A finished run's summary and flattened config, read through RunFolder; None if unreadable."""
    folder = RunFolder(path)
    try:
        summary = folder.summary()
        cfg = folder.config()
    except (OSError, ValueError, TypeError, KeyError, UserError, yaml.YAMLError):
        return None
    return summary, flatten(cfg.model_dump(mode="json"))


def run_row(path: Path, values: dict[str, Any]) -> RunRow:
    """One finished run folder as a report row whose grid point is `values` (any labels, e.g. a
    benchmark's own); raises UserError if the folder holds no readable finished run."""
    read = _read_run(Path(path))
    if read is None:
        raise UserError(f"{path} holds no readable finished run (summary.json and config.yaml)")
    summary, flat = read
    row = _row(Path(path).name, summary, flat, [])
    row.values = dict(values)
    return row


def _row(name: str, summary: Summary, flat: dict, keys: list[str]) -> RunRow:
    main = summary.main_metric
    final, best, train, gap = summary.final, summary.best, summary.final_train, summary.generalization_gap
    rounds = summary.rounds
    up, down = _num(summary.uplink_bytes_total), _num(summary.downlink_bytes_total)
    per = (lambda b: b / rounds if b is not None and rounds else None)
    up_r, down_r = per(up), per(down)
    metrics: dict[str, float | None] = {}
    for m in list(dict.fromkeys([*final, *best])):
        metrics[f"final_{m}"] = _num(final.get(m))
        metrics[f"best_{m}"] = _num(best.get(m))
        metrics[f"train_{m}"] = _num(train.get(m))
        metrics[f"gap_{m}"] = _num(gap.get(m))
    seed = flat.get("seed")
    return RunRow(
        name=name,
        values={k: flat.get(k) for k in keys},
        seed=seed if isinstance(seed, int) else None,
        task=summary.task,
        main_metric=main,
        rounds=rounds,
        best_round=summary.best_round,
        wall_s=_num(summary.wall_s),
        stats={
            "final": _num(final.get(main)),
            "best": _num(best.get(main)),
            "train": _num(train.get(main)),
            "gap": _num(gap.get(main)),
            "uplink_bytes_per_round": up_r,
            "downlink_bytes_per_round": down_r,
            "bytes_per_round": up_r + down_r if up_r is not None and down_r is not None else None,
            "epsilon": _num(summary.privacy.epsilon if summary.privacy else None),
        },
        uplink_bytes_total=up,
        downlink_bytes_total=down,
        metrics=metrics,
    )


def _value_order(value: Any, known: list) -> tuple:
    """Sort key: the manifest's order first, then numbers by value, then text."""
    if value in known:
        return (0, known.index(value), "")
    if _finite(value):
        return (1, float(value), "")
    return (2, 0.0, json.dumps(value, sort_keys=True, default=str))


def collect(folder: Path) -> Report:
    """Read every finished run folder directly inside `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    runs, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        run = RunFolder(path)
        if not run.finished:
            if run.started:
                skipped.append(path.name)
            continue
        read = _read_run(path)
        if read is None:
            skipped.append(path.name)
            continue
        summary, flat = read
        runs.append((path.name, summary, flat))
    if not runs:
        raise UserError(f"no finished run folders (with summary.json) in {folder}")

    manifest = read_manifest(folder) or {}
    known: dict[str, list] = {}
    arms: dict[str, dict] = {}
    for axis in manifest.get("vary", []):
        if isinstance(axis, dict) and isinstance(axis.get("key"), str):
            known[axis["key"]] = list(axis.get("values") or [])
            if isinstance(axis.get("sets"), dict):
                arms = axis["sets"]
    for name, _, flat in runs:  # a sweep's --arm: the arm its folder is named after (one arm's keys may be another's)
        named = [part.split("=", 1)[1] for part in name.split("__") if part.startswith(f"{ARM_KEY}=")]
        flat[ARM_KEY] = named[0] if named and named[0] in arms else None
    explained = {k for sets in arms.values() for k in sets}  # shown as the arm's name
    keys = [k for k in known if k not in _NOT_VARIED]
    all_keys = sorted(set().union(*(flat.keys() for _, _, flat in runs)))
    for k in all_keys:
        if k in keys or k in _NOT_VARIED or k in explained:
            continue
        seen = {json.dumps(flat.get(k), sort_keys=True, default=str) for _, _, flat in runs}
        if len(seen) > 1:
            keys.append(k)

    rows = [_row(name, summary, flat, keys) for name, summary, flat in runs]
    rows.sort(
        key=lambda r: (
            [_value_order(r.values[k], known.get(k, [])) for k in keys],
            r.seed if r.seed is not None else -1,
            r.name,
        )
    )
    groups: list[Group] = []
    index: dict[str, Group] = {}
    for r in rows:
        gid = json.dumps([r.values[k] for k in keys], sort_keys=True, default=str)
        if gid not in index:
            index[gid] = Group(dict(r.values), [])
            groups.append(index[gid])
        index[gid].rows.append(r)
    return Report(folder, keys, rows, groups, skipped)


# ---------------------------------------------------------------------------- CSV


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _key_cell(v: Any) -> str:
    return "null" if v is None else _cell(v)


def write_runs_csv(rep: Report, path: Path) -> None:
    """One line per run (sweep_runs.csv)."""
    metric_cols = list(dict.fromkeys(c for r in rep.rows for c in r.metrics))
    head = ["run", *rep.keys, "seed", "task", "main_metric", "rounds", "best_round", "final", "best", "train",
            "gap", "uplink_bytes_per_round", "downlink_bytes_per_round", "bytes_per_round",
            "uplink_bytes_total", "downlink_bytes_total", "wall_s", *metric_cols]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for r in rep.rows:
            w.writerow(
                [r.name, *(_key_cell(r.values[k]) for k in rep.keys)]
                + [_cell(x) for x in (r.seed, r.task, r.main_metric, r.rounds, r.best_round)]
                + [_cell(r.stats[f]) for f in STAT_FIELDS]
                + [_cell(x) for x in (r.uplink_bytes_total, r.downlink_bytes_total, r.wall_s)]
                + [_cell(r.metrics.get(c)) for c in metric_cols]
            )


def write_csv(rep: Report, path: Path) -> None:
    """One line per grid point, mean and standard deviation over seeds (sweep.csv)."""
    head = [*rep.keys, "runs", "seeds", "task", "main_metric"]
    for f in STAT_FIELDS:
        head += [f"{f}_mean", f"{f}_std"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head)
        for g in rep.groups:
            seeds = " ".join(str(r.seed) for r in g.rows)
            row = [*(_key_cell(g.values[k]) for k in rep.keys), len(g.rows), seeds, g.task, g.main_metric]
            for f in STAT_FIELDS:
                mean, std, _ = g.stat(f)
                row += [_cell(mean), _cell(std)]
            w.writerow(row)


# ---------------------------------------------------------------------------- table


def _fmt(mean: float | None, std: float | None, n: int, scale: float = 1.0, digits: int = 4) -> str:
    if mean is None:
        return "-"
    text = f"{mean / scale:.{digits}f}"
    return f"{text} ±{std / scale:.{digits}f}" if n > 1 else text


def table(rep: Report):
    """Rich table, one row per grid point: mean±std across seeds of the main metric and bytes."""
    from rich.table import Table

    mains = {g.main_metric for g in rep.groups}
    m = mains.pop() if len(mains) == 1 else "main metric"
    seeds = max(len(g.rows) for g in rep.groups)
    title = f"{rep.folder}: {len(rep.rows)} runs; validation {m}" + (
        f", mean±std over {seeds} seeds" if seeds > 1 else ""
    )
    caption = "n: runs (seeds); gap = train - validation at the final round; MB per round"
    t = Table(title=title, caption=caption)
    for k in rep.keys:
        t.add_column(k, overflow="fold")
    t.add_column("n", justify="right")
    private = any(r.stats.get("epsilon") is not None for r in rep.rows)
    for h in ("final", "best", "train", "gap", "up MB", "down MB") + (("epsilon",) if private else ()):
        t.add_column(h, justify="right")
    for g in rep.groups:
        cells = [format_value(g.values[k]) for k in rep.keys] + [str(len(g.rows))]
        cells += [_fmt(*g.stat(f)) for f in ("final", "best", "train", "gap")]
        for f in ("uplink_bytes_per_round", "downlink_bytes_per_round"):
            cells.append(_fmt(*g.stat(f), scale=1e6, digits=3))
        if private:
            cells.append(_fmt(*g.stat("epsilon"), digits=3))
        t.add_row(*cells)
    return t


# ---------------------------------------------------------------------------- plot


def _series_label(values: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={format_value(values[k])}" for k in keys)


def plot(rep: Report, path: Path):
    """PNG: validation metric (final, best), gap, bytes per round against the first varied key.

    Returns the matplotlib Figure (panels: metric, gap, bytes).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = rep.keys
    xkey, others = (keys[0], keys[1:]) if keys else (None, [])
    xs_all = [g.values[xkey] if xkey else rep.groups[0].task for g in rep.groups]
    numeric = xkey is not None and all(_finite(x) for x in xs_all)
    cats = list(dict.fromkeys(json.dumps(x, sort_keys=True, default=str) for x in xs_all))
    cat_labels = {c: format_value(json.loads(c)) for c in cats}

    series: dict[str, list[Group]] = {}
    for g in rep.groups:
        series.setdefault(_series_label(g.values, others), []).append(g)

    fig = Figure(figsize=(15, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_g, ax_b = fig.subplots(1, 3)
    mains = {g.main_metric for g in rep.groups}
    metric = mains.pop() if len(mains) == 1 else "main metric"
    colors = [f"C{i % 10}" for i in range(len(series))]

    def xpos(g: Group, j: int) -> float:
        x = g.values[xkey] if xkey else g.task
        if numeric:
            return float(x)
        offset = (j - (len(series) - 1) / 2) * 0.06 if len(series) > 1 else 0.0
        return cats.index(json.dumps(x, sort_keys=True, default=str)) + offset

    def draw(ax, groups, j, field_, style, scale=1.0, label=None, alpha=1.0):
        pts = sorted(((xpos(g, j), *g.stat(field_)) for g in groups), key=lambda p: p[0])
        pts = [(x, m, s) for x, m, s, _ in pts if m is not None]
        if not pts:
            return
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] / scale for p in pts],
            yerr=[p[2] / scale for p in pts],
            fmt=style,
            color=colors[j],
            capsize=3,
            label=label,
            alpha=alpha,
        )

    for j, (label, groups) in enumerate(series.items()):
        draw(ax_m, groups, j, "final", "o-", label=label or None)
        draw(ax_m, groups, j, "best", "^--", alpha=0.55)
        draw(ax_g, groups, j, "gap", "o-", label=label or None)
        draw(ax_b, groups, j, "uplink_bytes_per_round", "o-", scale=1e6, label=label or None)
        draw(ax_b, groups, j, "downlink_bytes_per_round", "s--", scale=1e6, alpha=0.55)

    ax_m.set_title(f"validation {metric} (solid: final round, dashed: best round)", fontsize=10)
    ax_g.set_title(f"generalization gap: train - validation {metric}", fontsize=10)
    ax_g.axhline(0.0, color="0.6", lw=0.8)
    ax_b.set_title("MB per round (solid: uplink, dashed: downlink)", fontsize=10)
    for ax in (ax_m, ax_g, ax_b):
        ax.set_xlabel(xkey or "task")
        ax.grid(alpha=0.3)
        if numeric:
            vals = sorted({float(x) for x in xs_all})
            if min(vals) > 0 and max(vals) / min(vals) >= 10:
                ax.set_xscale("log")
                ax.minorticks_off()
            ax.set_xticks(vals, [format_value(v) for v in sorted({x for x in xs_all}, key=float)])
        else:
            ax.set_xticks(range(len(cats)), [cat_labels[c] for c in cats])
            ax.set_xlim(-0.5, len(cats) - 0.5)
    ax_m.set_ylabel(metric)
    ax_g.set_ylabel(f"train - validation {metric}")
    ax_b.set_ylabel("MB")
    if any(series):
        ax_m.legend(fontsize=8, title=", ".join(others), title_fontsize=8)
    seeds = max(len(g.rows) for g in rep.groups)
    tasks = sorted({g.task for g in rep.groups})
    fig.suptitle(
        f"{', '.join(tasks)}: {len(rep.rows)} runs"
        + (f"; error bars: ±1 std over {seeds} seeds" if seeds > 1 else "; one seed per point"),
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------- all of it


def build_report(folder: Path, prefix: Path | str | None = None, console=None) -> Report:
    """Collect the runs in `folder`; write <prefix>.csv, <prefix>_runs.csv, <prefix>.png; print a table."""
    rep = collect(folder)
    prefix = Path(prefix) if prefix is not None else Path(folder) / "sweep"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rep.csv_path = prefix.with_name(prefix.name + ".csv")
    rep.runs_csv_path = prefix.with_name(prefix.name + "_runs.csv")
    rep.png_path = prefix.with_name(prefix.name + ".png")
    write_csv(rep, rep.csv_path)
    write_runs_csv(rep, rep.runs_csv_path)
    plot(rep, rep.png_path)
    if console is not None:
        console.print(table(rep))
        if rep.skipped:
            console.print(f"skipped {len(rep.skipped)} unfinished run folder(s): {', '.join(rep.skipped)}",
                          highlight=False)
        console.print(f"wrote {rep.csv_path}, {rep.runs_csv_path}, {rep.png_path}", highlight=False)
    return rep


__all__ = ["MANIFEST", "Group", "Report", "RunRow", "build_report", "collect", "plot", "run_row", "table"]
