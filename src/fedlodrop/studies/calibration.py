"""Calibrating SPEC 4's empirical term on a dropout sweep (`fedlodrop calibrate`).

Every run folder below the sweep folder gives its dropout rate (`dropout.rate`, a number or a
per-device list, or its plan's per-device rates) and its final round's training error (`train_loss`, or 1 - a train metric); runs
that stopped before the others' last round are skipped (interrupted), runs with the same rate are
averaged (seeds), and Emp(gamma) = e0 + c_emp gamma / (1 - gamma) is fitted by non-negative least
squares (per-device rates enter through the mean of gamma_k / (1 - gamma_k)).

Run folders are read through `fedlodrop.run.folder` only; the fit is the planner's (`planning.bound`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fedlodrop.errors import UserError
from fedlodrop.planning import load_plan
from fedlodrop.planning.bound import emp_feature, fit_empirical
from fedlodrop.run.folder import CONFIG, METRICS, RunFolder, run_folders


@dataclass(frozen=True)
class FinalRound:
    """What one run contributes: its rate, the error of its final round, and that round."""

    folder: Path
    rate: float | list[float]
    value: float
    round: int


@dataclass(frozen=True)
class CalibrationRow:
    """Runs of one rate (same gamma / (1 - gamma)): their mean error and the fitted value."""

    rate: str  # dropout.rate as JSON
    feature: float  # gamma / (1 - gamma), the mean over devices for a list
    runs: int
    mean: float
    fit: float


@dataclass
class Calibration:
    """A fit of the bound's Emp term to a dropout sweep: e0, c_emp, the fit's error, and each rate's measured
    and fitted value."""
    e0: float
    c_emp: float
    rmse: float
    rows: list[CalibrationRow]
    last_round: int
    what: str  # the fitted error: "train_loss" or "1 - train <metric>"
    runs: int  # the finished runs the fit used
    skipped: list[Path] = field(default_factory=list)  # runs that stopped before last_round


def read_final_round(folder: RunFolder, metric: str | None = None) -> FinalRound:
    """The rate and final-round error of one run; a bad folder is a one-line UserError naming the file."""
    config, metrics = folder.path / CONFIG, folder.path / METRICS
    try:
        cfg = folder.config()
    except UserError as err:
        raise UserError(str(err) if str(config) in str(err) else f"{config}: {err}") from None
    except OSError as err:
        raise UserError(f"{config}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{config}: not valid YAML: {str(err).splitlines()[0]}") from None
    rate = cfg.dropout.rate
    if cfg.plan is not None:  # the plan's per-device rates are the ones the run trained with

        rate = [float(g) for g in load_plan(cfg.plan).gammas]
    try:
        records = folder.records()
    except OSError as err:
        raise UserError(f"{metrics}: cannot read: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{metrics}: a line is not JSON ({err.msg})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{metrics}: a line is not a round record ({type(err).__name__}: {err})") from None
    last = None
    for rec in records:
        if last is None or rec.round >= last.round:
            last = rec
    if last is None:
        raise UserError(f"{metrics}: no record with a `round`")
    if metric is None:
        try:
            value = last.train_loss
        except TypeError:  # a device marked ok without its report
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{metrics}: final round has no numeric train_loss")
    else:
        value = last.train.get(metric)
        if not isinstance(value, (int, float)):
            raise UserError(f"{metrics}: final round has no train metric '{metric}'")
        value = 1.0 - value
    return FinalRound(folder.path, rate if isinstance(rate, list) else float(rate), float(value), int(last.round))


def calibrate(sweep_dir: Path, metric: str | None = None,
              report: Callable[[str], None] = lambda line: None) -> Calibration:
    """Fit e0 and c_emp on the run folders below `sweep_dir`; `report` gets the line that names
    skipped runs. Raises UserError when there is nothing to fit (no folders, one rate)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} does not exist")
    folders = run_folders(sweep_dir)
    if not folders:
        raise UserError(f"no run folders (config.yaml + metrics.jsonl) under {sweep_dir}")
    runs = [read_final_round(folder, metric) for folder in folders]
    last_round = max(r.round for r in runs)
    short = [r.folder for r in runs if r.round < last_round]
    if short:  # interrupted runs: their "final" loss is from an earlier round, not comparable
        report(f"skipping {len(short)} run(s) that stopped before round {last_round}: "
               f"{', '.join(str(f) for f in short[:3])}{' ...' if len(short) > 3 else ''}")
    groups: dict[float, list[float]] = {}
    labels: dict[float, str] = {}
    for r in runs:
        if r.round < last_round:
            continue
        x = round(emp_feature(r.rate), 12)
        groups.setdefault(x, []).append(r.value)
        labels[x] = json.dumps(r.rate)
    xs = sorted(groups)
    if len(xs) < 2:
        raise UserError(f"all finished runs under {sweep_dir} use one dropout rate; need two or more")
    means = [float(np.mean(groups[x])) for x in xs]
    rates = [x / (1 + x) for x in xs]  # the rate with the same gamma/(1-gamma)
    e0, c_emp, rmse = fit_empirical(rates, means)
    rows = [CalibrationRow(labels[x], x, len(groups[x]), mean, e0 + c_emp * x) for x, mean in zip(xs, means)]
    what = "train_loss" if metric is None else f"1 - train {metric}"
    return Calibration(e0, c_emp, rmse, rows, last_round, what, sum(len(v) for v in groups.values()), short)
