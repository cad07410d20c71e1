"""Calibrating SPEC 4's bound, or a surrogate of the validation error, on a dropout sweep
(`fedlodrop calibrate`).

Every run folder below the sweep folder gives its dropout rate (`dropout.rate`, a number or a
per-device list, or its plan's per-device rates), its devices' sample counts D_k, and its final
round's training error (`train_loss`, or 1 - a train metric), validation error and generalization
gap. Runs that stopped before the others' last round (interrupted) and runs in which a device was
dropped for missing a limit are skipped, runs with the same rate are averaged (seeds), and:

* Emp(gamma) = e0 + c_emp x, x = sum_k w_k gamma_k / (1 - gamma_k) with the bound's weights
  w_k = D_k / N, by ordinary least squares: the sign is the data's (a negative c_emp is reported,
  and is not written: the bound cannot say that dropout lowers the training error);
* with a train metric, the Gap term's constants, fitted to the measured gaps against the expected
  sparsity s (`planning.bound.fit_curve`), so that every constant of the bound comes from the data;
* with `--surrogate`, the validation error against the rates in the bound's convex shape
  e0 + c x + sqrt(a + b / (1 + kappa s)), written as the bound's constants with `objective:
  measured`, so that B&B and P-SCA minimise it as they minimise the bound. Its leave-one-rate-out
  error says how well it predicts a rate it did not see.

A fit needs 4 or more rates, and a train metric scored on at least 300 examples
(`data.train_eval_samples`); the report says at which rates the bound (with the constants it is
compared with) is vacuous: G >= 1, above any error rate.

Run folders are read through `fedlodrop.run.folder` only; the fits are the planner's (`planning.bound`).
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
from fedlodrop.planning.bound import Bound, Curve, emp_feature, fit_curve, fit_empirical, sparsity_feature
from fedlodrop.planning.spec import BoundSpec
from fedlodrop.run.folder import CONFIG, METRICS, RunFolder, run_folders


MIN_RATES = 4
MIN_TRAIN_EXAMPLES = 300


@dataclass(frozen=True)
class FinalRound:
    """What one run contributes: its rate and device weights, its final round's errors, and that round."""

    folder: Path
    rate: float | list[float]
    weights: list[float] | None  # each device's samples D_k (per-device rates only)
    samples: int  # training samples over all devices (N)
    value: float  # training error
    eval_error: float  # 1 - validation metric (nan without a metric)
    gap: float  # the measured generalization gap (nan without a metric)
    round: int
    dropped: int  # device-rounds left out for missing a limit
    train_examples: int  # data.train_eval_samples


@dataclass(frozen=True)
class CalibrationRow:
    """Runs of one rate (same weighted gamma / (1 - gamma)): their mean errors and the fitted values."""

    rate: str  # dropout.rate as JSON
    feature: float  # x = sum_k w_k gamma_k / (1 - gamma_k)
    sparsity: float  # s = sum_k w_k (2 gamma_k - gamma_k^2)
    runs: int
    mean: float
    fit: float
    eval_error: float = math.nan
    gap: float = math.nan


@dataclass
class Calibration:
    """Fits of the bound to a dropout sweep: Emp's e0 and c_emp, the Gap term's constants and the
    surrogate of the validation error (when asked), with their errors and each rate's values."""
    e0: float
    c_emp: float
    rmse: float
    rows: list[CalibrationRow]
    last_round: int
    what: str  # the fitted error: "train_loss" or "1 - train <metric>"
    runs: int  # the finished runs the fit used
    N: float = 0.0  # training samples of the sweep's runs
    skipped: list[Path] = field(default_factory=list)  # runs that stopped before last_round
    dropped: list[Path] = field(default_factory=list)  # runs with devices left out for a limit
    gap_curve: Curve | None = None  # the Gap term fitted to the measured gaps (with a metric)
    gap_rmse: float = math.nan
    surrogate: Curve | None = None  # the validation error's surrogate (--surrogate)
    surrogate_rmse: float = math.nan
    loo_rmse: float = math.nan  # the surrogate's leave-one-rate-out error
    vacuous: list[tuple[str, float]] = field(default_factory=list)  # (rate, G) where G >= 1

    def bound(self, N: float | None = None) -> BoundSpec:
        """Every constant of the bound as fitted (N: the system's samples; default the sweep's);
        one-line UserError when the data gives c_emp < 0."""
        if self.c_emp < 0:
            raise UserError(f"the fit gives c_emp = {self.c_emp:.4g} < 0: training error falls as the rate rises, "
                            "which the bound's Emp term cannot express; nothing written (see --surrogate)")
        n = N or self.N
        base = self.gap_curve.as_bound(n) if self.gap_curve is not None else BoundSpec()
        return base.model_copy(update={"e0": max(self.e0, 0.0), "c_emp": self.c_emp})

    def measured(self, N: float | None = None) -> BoundSpec:
        """The surrogate as the bound's constants, `objective: measured`."""
        if self.surrogate is None:
            raise UserError("no surrogate fitted: give --surrogate with --metric")
        return self.surrogate.as_bound(N or self.N, "measured")


def read_final_round(folder: RunFolder, metric: str | None = None, train: bool = True) -> FinalRound:
    """The rate, weights and final-round errors of one run; a bad folder is a one-line UserError naming the file.
    `train` False: a run without a train metric gives nan for it (held-out runs need only the validation error)."""
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
    samples = {d.device: d.samples for rec in records for d in rec.devices}
    weights = None
    if isinstance(rate, list):
        missing = [k for k in range(len(rate)) if k not in samples]
        if missing:
            raise UserError(f"{metrics}: device {missing[0]} never reported its samples: its weight is unknown")
        weights = [float(samples[k]) for k in range(len(rate))]
    dropped = sum(1 for rec in records for d in rec.devices if d.limit and not d.ok)
    eval_error = gap = math.nan
    if metric is None:
        try:
            value = last.train_loss
        except TypeError:  # a device marked ok without its report
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{metrics}: final round has no numeric train_loss")
    else:
        value = last.train.get(metric)
        if not isinstance(value, (int, float)) and train:
            raise UserError(f"{metrics}: final round has no train metric '{metric}'")
        value = 1.0 - value if isinstance(value, (int, float)) else math.nan
        if isinstance(last.eval.get(metric), (int, float)):
            eval_error = 1.0 - last.eval[metric]
            gap = eval_error - value
    return FinalRound(folder.path, rate if isinstance(rate, list) else float(rate), weights,
                      int(sum(samples.values())), float(value), eval_error, gap, int(last.round), dropped,
                      int(cfg.data.train_eval_samples))


def calibrate(sweep_dir: Path, metric: str | None = None, report: Callable[[str], None] = lambda line: None,
              surrogate: bool = False, compared: BoundSpec | None = None) -> Calibration:
    """Fit the bound (and with `surrogate` the validation error's surrogate) on the run folders below
    `sweep_dir`; `report` gets the lines that name skipped runs; `compared`: the constants whose
    vacuity to report (default SPEC 4's). UserError when there is not enough to fit."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder {sweep_dir} does not exist")
    if surrogate and metric is None:
        raise UserError("--surrogate fits the validation error of a metric: give --metric (e.g. accuracy)")
    folders = run_folders(sweep_dir)
    if not folders:
        raise UserError(f"no run folders (config.yaml + metrics.jsonl) under {sweep_dir}")
    runs = [read_final_round(folder, metric) for folder in folders]
    last_round = max(r.round for r in runs)
    short = [r.folder for r in runs if r.round < last_round]
    if short:  # interrupted runs: their "final" loss is from an earlier round, not comparable
        report(f"skipping {len(short)} run(s) that stopped before round {last_round}: "
               f"{', '.join(str(f) for f in short[:3])}{' ...' if len(short) > 3 else ''}")
    dropped = [r.folder for r in runs if r.round == last_round and r.dropped]
    if dropped:  # a device that missed a limit did not train what its rate says
        report(f"skipping {len(dropped)} run(s) with devices dropped for missing a limit: "
               f"{', '.join(str(f) for f in dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
    used = [r for r in runs if r.round == last_round and not r.dropped]
    few = [r for r in used if r.train_examples < MIN_TRAIN_EXAMPLES]
    if metric is not None and few:
        raise UserError(f"{few[0].folder}: the train {metric} is scored on data.train_eval_samples = "
                        f"{few[0].train_examples} examples (about +-{100 / math.sqrt(max(few[0].train_examples, 1)):.0f} "
                        f"points); a fit needs at least {MIN_TRAIN_EXAMPLES}")
    groups: dict[float, list[FinalRound]] = {}
    for r in used:
        groups.setdefault(round(emp_feature(r.rate, r.weights), 12), []).append(r)
    xs = sorted(groups)
    if len(xs) < MIN_RATES:
        raise UserError(f"the finished runs under {sweep_dir} without dropped devices use {len(xs)} dropout rate(s); "
                        f"a fit needs {MIN_RATES} or more")

    def mean(x, what):
        return float(np.mean([getattr(r, what) for r in groups[x]]))

    ss = [float(np.mean([sparsity_feature(r.rate, r.weights) for r in groups[x]])) for x in xs]
    means = [mean(x, "value") for x in xs]
    e0, c_emp, rmse = fit_empirical(xs, means)
    what = "train_loss" if metric is None else f"1 - train {metric}"
    fit = Calibration(e0, c_emp, rmse, [], last_round, what, len(used), float(np.median([r.samples for r in used])),
                      short, dropped)
    evals, gaps = [mean(x, "eval_error") for x in xs], [mean(x, "gap") for x in xs]
    if metric is not None and all(math.isfinite(g) for g in gaps):
        fit.gap_curve, fit.gap_rmse = fit_curve(xs, ss, gaps, gap_only=True)
    if surrogate:
        if not all(math.isfinite(e) for e in evals):
            raise UserError(f"--surrogate: a run under {sweep_dir} has no validation {metric}")
        fit.surrogate, fit.surrogate_rmse = fit_curve(xs, ss, evals)
        misses = []
        for i in range(len(xs)):  # leave one rate out: how well it predicts a rate it has not seen
            keep = [j for j in range(len(xs)) if j != i]
            curve, _ = fit_curve([xs[j] for j in keep], [ss[j] for j in keep], [evals[j] for j in keep])
            misses.append(float(curve(xs[i], ss[i])) - evals[i])
        fit.loo_rmse = float(math.sqrt(np.mean(np.square(misses))))
    ref = compared or BoundSpec()
    for x, s, m_, ev, gp in zip(xs, ss, means, evals, gaps):
        label = json.dumps(groups[x][0].rate)
        fit.rows.append(CalibrationRow(label, x, s, len(groups[x]), m_, e0 + c_emp * x, ev, gp))
        gap_term = math.sqrt((ref.M**2 + 24 * ref.M * ref.rho**2 / (ref.lambda_min + 2 * ref.lam * s))
                             / (2 * fit.N * ref.delta))
        value = ref.e0 + ref.c_emp * x + gap_term
        if value >= 1.0:
            fit.vacuous.append((label, value))
    return fit


# --------------------------------------------------------------------------------------------
# Validation on held-out systems and rates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """One held-out run: its group (same folder, same seed: the runs whose order matters), its measured
    validation error, and what the surrogate and the bound say of its rates."""

    folder: Path
    group: tuple[str, int]
    eval_error: float
    surrogate: float  # nan without a surrogate
    bound: float  # nan when the fit gives no bound (c_emp < 0)


@dataclass
class Validation:
    """How a fit predicts runs it never saw: the surrogate's error, and for the surrogate and the bound
    how often they order two runs of one group (one system, one seed) as the measurements do."""

    runs: list[HeldOut]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def rmse(self) -> float:
        """The surrogate's root-mean-square error on the held-out runs."""
        return float(math.sqrt(np.mean([(r.surrogate - r.eval_error) ** 2 for r in self.runs])))

    def bias(self) -> float:
        """Mean of predicted minus measured (positive: the surrogate is pessimistic)."""
        return float(np.mean([r.surrogate - r.eval_error for r in self.runs]))

    def ordered(self, what: str) -> tuple[int, int]:
        """(pairs ordered right, pairs): two runs of one group whose measured errors differ, ordered by
        `what` ("surrogate" or "bound") as measured; a tie in the prediction counts as wrong."""
        groups: dict[tuple, list[HeldOut]] = {}
        for r in self.runs:
            groups.setdefault(r.group, []).append(r)
        right = pairs = 0
        for runs in groups.values():
            for i, a in enumerate(runs):
                for b in runs[i + 1:]:
                    if a.eval_error == b.eval_error:
                        continue
                    pairs += 1
                    right += (getattr(a, what) - getattr(b, what)) * (a.eval_error - b.eval_error) > 0
        return right, pairs

    def bound_holds(self) -> int:
        """Held-out runs whose measured validation error is at most the bound's value."""
        return sum(1 for r in self.runs if r.eval_error <= r.bound)


def validate(fit: Calibration, held_out: Path, metric: str, report: Callable[[str], None] = lambda line: None,
             keep: Callable[[Path], bool] = lambda path: True) -> Validation:
    """The surrogate and the bound of `fit` on the runs below `held_out` (other systems, other rates;
    `keep`: which run folders to use): each run's rates and device weights, at its own N, against its
    final validation error. Runs of another length than the sweep's, or with devices dropped for a
    limit, are skipped and named."""
    held_out = Path(held_out)
    if not held_out.is_dir():
        raise UserError(f"held-out folder {held_out} does not exist")
    folders = [f for f in run_folders(held_out) if keep(f.path)]
    if not folders:
        raise UserError(f"no run folders (config.yaml + metrics.jsonl) under {held_out}")
    out = Validation([])
    for folder in folders:
        run = read_final_round(folder, metric, train=False)
        why = ("another number of rounds than the sweep's" if run.round != fit.last_round else
               "devices dropped for missing a limit" if run.dropped else
               f"no validation {metric}" if not math.isfinite(run.eval_error) else None)
        if why:
            out.skipped.append((folder.path, why))
            continue
        rates = np.atleast_1d(np.asarray(run.rate, dtype=float))
        w = (np.full(len(rates), 1.0 / len(rates)) if run.weights is None
             else np.asarray(run.weights, float) / np.sum(run.weights))
        surrogate = (float(Bound(fit.measured(run.samples), w, run.samples).value(rates))
                     if fit.surrogate is not None else math.nan)
        bound = float(Bound(fit.bound(run.samples), w, run.samples).value(rates)) if fit.c_emp >= 0 else math.nan
        out.runs.append(HeldOut(folder.path, (str(folder.path.parent), int(folder.config().seed)), run.eval_error,
                                surrogate, bound))
    if out.skipped:
        report(f"held out: skipping {len(out.skipped)} run(s): " + "; ".join(
            f"{p} ({why})" for p, why in out.skipped[:3]) + (" ..." if len(out.skipped) > 3 else ""))
    if not out.runs:
        raise UserError(f"no usable held-out run under {held_out} (same rounds as the sweep, no dropped devices)")
    return out
