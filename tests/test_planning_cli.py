"""The planning commands: outputs, plan.json, calibrate, plots, and exit code 2 on bad input."""

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.planning import load_plan, load_system, random_system, save_system
from fedlodrop.round.records import DeviceRecord, RoundRecord

runner = CliRunner()


def system_file(tmp_path, K=3, seed=1, edit=None):
    spec = random_system(K, seed=seed)
    if edit:
        edit(spec)
    path = tmp_path / "system.yaml"
    save_system(spec, path)
    return path


def test_system_random_prints_or_writes_a_valid_file(tmp_path):
    r = runner.invoke(app, ["system", "random", "--devices", "3", "--seed", "2", "--samples", "600"])
    assert r.exit_code == 0, r.output
    assert len(yaml.safe_load(r.stdout)["devices"]) == 3
    out = tmp_path / "s.yaml"
    r = runner.invoke(app, ["system", "random", "--devices", "5", "--seed", "2", "--model", "minilm-l6",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    spec = load_system(out)
    assert len(spec.devices) == 5 and spec.payload.model == "minilm-l6"


@pytest.mark.parametrize("args", [["--devices", "0"], ["--devices", "3", "--latency", "-1"],
                                  ["--devices", "3", "--model", "no-such-model"]])
def test_system_random_rejects_bad_options(tmp_path, args):
    out = tmp_path / "s.yaml"
    r = runner.invoke(app, ["system", "random", *args, "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and not out.exists()


def test_optimize_prints_the_table_and_writes_the_plan(tmp_path):
    system = system_file(tmp_path)
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["optimize", str(system), "--method", "bnb", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "gamma" in r.stdout and "binding" in r.stdout and "lower bound" in r.stdout
    tree = json.loads(out.read_text())
    assert {"method", "objective", "feasible", "devices", "solver", "system"} <= set(tree)
    assert tree["method"] == "bnb" and tree["feasible"] is True
    for d in tree["devices"]:
        assert {"gamma", "bandwidth_hz", "power_w", "frequency_hz", "latency_s", "energy_j", "binding"} <= set(d)
    assert {"iterations", "nodes", "gap", "seconds"} <= set(tree["solver"])
    assert tree["solver"]["gap"] <= 1e-4 * tree["objective"]
    plan = load_plan(out)  # self-contained: the system travels with it
    assert plan.system == load_system(system)
    assert plan.gammas == [d["gamma"] for d in tree["devices"]]


@pytest.mark.parametrize("method", ["psca", "fixed", "equal-bandwidth", "none"])
def test_optimize_methods_or_a_clear_infeasibility(tmp_path, method):
    system = system_file(tmp_path, edit=lambda s: setattr(s.round, "latency_s", s.round.latency_s * 1.5))
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["optimize", str(system), "--method", method, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["method"] == method


def _bad_yaml(tmp_path):
    (tmp_path / "system.yaml").write_text("devices: [\n")
    return tmp_path / "system.yaml"


def _unknown_key(tmp_path):
    return system_file(tmp_path, edit=lambda s: None).parent / "x.yaml"


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (lambda p: p / "missing.yaml", [], "cannot read"),
        (_bad_yaml, [], "not valid YAML"),
        (lambda p: _edit_yaml(p, lambda t: t["cell"].update(bandwith_hz=1)), [], "cell.bandwith_hz"),
        (lambda p: _edit_yaml(p, lambda t: t["devices"][1].update(energy_budget_j=-3)), [],
         "devices.1.energy_budget_j"),
        (lambda p: _edit_yaml(p, lambda t: t["devices"][2].update(energy_budget_j=1e-6)), [], "device 2"),
        (lambda p: _edit_yaml(p, lambda t: t["round"].update(latency_s=0.01)), [], "binding constraint"),
        (lambda p: system_file(p), ["--method", "magic"], "--method"),
        (lambda p: system_file(p), ["--method", "psca", "--gamma", "0.2"], "--gamma"),
        (lambda p: system_file(p), ["--method", "fixed", "--gamma", "abc"], "--gamma"),
        (lambda p: system_file(p), ["--method", "fixed", "--gamma", "0.97"], "gamma_max"),
        (lambda p: system_file(p), ["--tol", "0"], "--tol"),
    ],
)
def test_optimize_bad_input_is_one_line_exit_2_and_no_file(tmp_path, make, args, needle):
    system = make(tmp_path)
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["optimize", str(system), "--out", str(out), *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error:") and needle in r.stderr
    assert not out.exists()


def _edit_yaml(tmp_path, fn):
    path = system_file(tmp_path)
    tree = yaml.safe_load(path.read_text())
    fn(tree)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_infeasible_names_device_and_constraint_for_every_method(tmp_path):
    def starve(spec):
        spec.devices[1].energy_budget_j = 1e-6

    system = system_file(tmp_path, edit=starve)
    for method in ("bnb", "psca", "fixed", "equal-bandwidth", "none"):
        r = runner.invoke(app, ["optimize", str(system), "--method", method])
        assert r.exit_code == 2 and "device 1" in r.stderr
        # at gamma_max it is the energy; without dropout this device misses the latency first
        reason = "latency" if method == "none" else "energy"
        assert f"binding constraint: {reason}" in r.stderr


def _solver_raises(monkeypatch):
    import cvxpy as cp

    def broken(self, *args, **kwargs):
        raise cp.error.SolverError(f"Solver '{kwargs.get('solver')}' failed. Try another solver.")

    monkeypatch.setattr(cp.Problem, "solve", broken)


def _solver_fails_after_first_iteration(monkeypatch):
    from fedlodrop.planning import psca

    real, calls = psca._Surrogate.solve, []

    def flaky(self):
        calls.append(1)
        if len(calls) == 1:
            return real(self)
        self.failure = "CLARABEL: status infeasible"
        return "failed"

    monkeypatch.setattr(psca._Surrogate, "solve", flaky)


@pytest.mark.parametrize("break_solver", [_solver_raises, _solver_fails_after_first_iteration])
def test_psca_solver_failure_is_an_error_not_a_gamma_max_plan(tmp_path, monkeypatch, break_solver):
    system = system_file(tmp_path)
    break_solver(monkeypatch)
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["optimize", str(system), "--method", "psca", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: P-SCA failed") and len(r.stderr.strip().splitlines()) == 1
    assert "iteration" in r.stderr and not out.exists()
    # B&B only uses P-SCA as a warm start: it still plans, on its own
    r = runner.invoke(app, ["optimize", str(system), "--method", "bnb", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["method"] == "bnb"


def round_record(rnd, loss, accuracy, eval_accuracy=0.8, samples=(1,), limit=None):
    """One metrics.jsonl line: devices holding `samples` whose local training loss is `loss` (the
    round's train_loss); `limit`: device 0 was left out for missing one."""
    devs = [DeviceRecord(device=k, rate=0.0, downlink_bytes=0, kept_values=1, samples=n, steps=1, train_loss=loss,
                         uplink_bytes=0, train_s=0.0) for k, n in enumerate(samples)]
    if limit:
        devs[0].limit, devs[0].status = limit, "left out"
    return RoundRecord(round=rnd, participants=list(range(len(samples))), devices=devs, train={"accuracy": accuracy},
                       eval={"accuracy": eval_accuracy}).to_json()


def run_config(seed, rate, **data):
    tree = {"seed": seed, "dropout": {"rate": rate}}
    if isinstance(rate, list):
        tree["federation"] = {"devices": len(rate)}
    if data:
        tree["data"] = data
    return yaml.safe_dump(tree)


def make_sweep(root, e0, c, rates, seeds=(0, 1), noise=0.0, weights=None, val=None, limit=None, **data):
    """Run folders whose final training error is e0 + c sum_k w_k g_k/(1-g_k) (w_k from `weights`, the
    devices' samples); validation error val(rate) if given (else accuracy 0.8)."""
    rng = np.random.default_rng(0)
    for rate in rates:
        for seed in seeds:
            run = root / f"rate{json.dumps(rate)}-s{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(run_config(seed, rate, **data))
            r = np.atleast_1d(rate)
            n = np.asarray(weights if weights is not None and len(r) > 1 else [1] * len(r), float)
            loss = e0 + c * float((n / n.sum()) @ (r / (1 - r))) + noise * rng.standard_normal()
            ev = 0.8 if val is None else 1 - val(rate)
            samples = tuple(int(x) for x in n)
            lines = [round_record(i, 9.0, 0.0, samples=samples) for i in (1, 2)]
            lines.append(round_record(3, loss, 1 - loss, ev, samples=samples, limit=limit))
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


RATES4 = [0.0, 0.2, 0.4, 0.6]


def test_calibrate_recovers_constants_averaging_seeds_weighted_as_the_bound(tmp_path):
    """Per-device rates enter as sum_k w_k g_k/(1-g_k) with w_k = D_k / N: the plain mean would miss."""
    make_sweep(tmp_path / "sweep", 0.25, 0.08, [0.0, 0.2, [0.3, 0.5], 0.6], noise=0.0, weights=[100, 300])
    out = tmp_path / "bound.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    fitted = yaml.safe_load(out.read_text())["bound"]
    assert fitted["e0"] == pytest.approx(0.25, abs=1e-9) and fitted["c_emp"] == pytest.approx(0.08, abs=1e-9)
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--metric", "accuracy"])
    assert r.exit_code == 0 and "c_emp = 0.08" in r.stdout


def test_calibrate_updates_a_system_file(tmp_path):
    make_sweep(tmp_path / "sweep", 0.1, 0.3, RATES4)
    system = system_file(tmp_path)
    out = tmp_path / "new.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--system", str(system), "--out", str(out)])
    assert r.exit_code == 0, r.output
    spec = load_system(out)
    assert spec.bound.e0 == pytest.approx(0.1) and spec.bound.c_emp == pytest.approx(0.3)
    assert spec.devices == load_system(system).devices


@pytest.mark.parametrize("setup, needle", [
    (lambda p: make_sweep(p, 0.1, 0.1, [0.0, 0.3, 0.5]), "needs 4 or more"),
    (lambda p: p.mkdir(), "no run folders"),
    (lambda p: make_sweep(p, 0.1, 0.1, [0.0, 1.5]), "dropout.rate"),
    (lambda p: _break(make_sweep(p, 0.1, 0.1, RATES4) or p, "metrics.jsonl", "{not json\n"), "not JSON"),
    (lambda p: _break(make_sweep(p, 0.1, 0.1, RATES4) or p, "metrics.jsonl", '{"round": 1}\n'),
     "not a round record"),
    (lambda p: _break(make_sweep(p, 0.1, 0.1, RATES4) or p, "config.yaml", "dropout: [\n"), "not valid YAML"),
    (lambda p: _break(make_sweep(p, 0.1, 0.1, RATES4) or p, "config.yaml", "dropout: {rat: 0.1}\n"),
     "config.yaml: unknown config key"),
])
def test_calibrate_bad_sweeps_exit_2(tmp_path, setup, needle):
    setup(tmp_path / "sweep")
    out = tmp_path / "bound.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--out", str(out)])
    assert r.exit_code == 2 and needle in r.stderr and not out.exists()
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def _break(sweep, name, text):
    """Overwrite `name` in the first run folder of `sweep` with `text`."""
    (min(sweep.iterdir()) / name).write_text(text)


def test_plot_tradeoff_writes_a_png_and_its_data(tmp_path):
    system = system_file(tmp_path, K=2)
    out = tmp_path / "trade.png"
    r = runner.invoke(app, ["plot-tradeoff", str(system), "--out", str(out), "--points", "3",
                            "--methods", "bnb,psca", "--tol", "1e-3"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.with_suffix(".json").read_text())
    lat = data["latency"]["bnb"]
    assert len(lat["x"]) == 3 and lat["x"] == sorted(lat["x"])
    w = np.array(data["weights"])
    rates = [float(w @ np.array(g)) for g in lat["gamma"]]
    assert rates[0] >= rates[-1]  # tightest latency limit first: the highest rates
    r = runner.invoke(app, ["plot-tradeoff", str(system), "--out", str(tmp_path / "x.png"), "--methods", "nope"])
    assert r.exit_code == 2 and not (tmp_path / "x.png").exists()


def test_plot_tradeoff_energy_half_has_points_where_g_free_never_fits(tmp_path):
    import warnings

    system = tmp_path / "s.yaml"
    r = runner.invoke(app, ["system", "random", "--devices", "10", "--seed", "3", "--model", "roberta-large",
                            "--out", str(system)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "trade.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value" on an inf range
        r = runner.invoke(app, ["plot-tradeoff", str(system), "--out", str(out), "--points", "4",
                                "--methods", "psca"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "warning" not in r.stderr
    energy = json.loads(out.with_suffix(".json").read_text())["energy"]["psca"]
    x, objective = np.array(energy["x"]), np.array(energy["objective"])
    assert len(x) == 4 and np.all(np.isfinite(x)) and np.all(np.isfinite(objective))
    assert x[0] < 1.0 < x[-1]  # from the tightest budgets to past where energy stops binding
    assert objective[0] > objective[-1] and np.all(np.diff(objective) <= 1e-6)


@pytest.mark.parametrize("error", ["infeasible", "solver"])
def test_plot_tradeoff_empty_panels_say_why(tmp_path, monkeypatch, error):
    import matplotlib.figure

    from fedlodrop.planning import tradeoff
    from fedlodrop.planning.feasibility import InfeasibleError
    from fedlodrop.planning.psca import SolverFailedError

    def no_point(*args, **kwargs):
        if error == "infeasible":
            raise InfeasibleError("no", 0, "latency")
        raise SolverFailedError("P-SCA failed")

    texts = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(tradeoff, "solve", no_point)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    system = system_file(tmp_path, K=2)
    out = tmp_path / "trade.png"
    r = runner.invoke(app, ["plot-tradeoff", str(system), "--out", str(out), "--points", "2",
                            "--methods", "psca"])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("warning: nothing to draw")]
    assert len(notes) == 2 and "T_max" in notes[0] and "energy" in notes[1]
    assert len(texts) == 4 and all(t.startswith("nothing to draw") for t in texts)  # in every panel
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if error == "solver":
        assert r.stderr.count("left out: P-SCA failed") == 4  # 2 points x 2 sweeps


def test_calibrate_skips_interrupted_runs(tmp_path):
    make_sweep(tmp_path / "sweep", 0.2, 0.1, RATES4)
    short = tmp_path / "sweep" / "broken"
    short.mkdir()
    (short / "config.yaml").write_text(run_config(0, 0.8))
    (short / "metrics.jsonl").write_text(json.dumps(round_record(1, 5.0, 0.0)) + "\n")
    out = tmp_path / "bound.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipping 1 run" in r.stderr
    assert yaml.safe_load(out.read_text())["bound"]["c_emp"] == pytest.approx(0.1, abs=1e-9)


def test_calibrate_skips_runs_with_dropped_devices_and_refuses_a_small_train_sample(tmp_path):
    """Issue 29, item 5: a run whose device missed a limit did not train what its rate says (skipped,
    named); a train metric on fewer than 300 examples is +-6 points of noise (refused)."""
    make_sweep(tmp_path / "sweep", 0.2, 0.1, RATES4)
    make_sweep(tmp_path / "sweep" / "late", 0.9, 0.0, [[0.8, 0.8]], weights=[1, 1],
               limit="missed the latency limit: 2 s > 1 s")
    out = tmp_path / "bound.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipping 2 run(s) with devices dropped" in r.stderr
    assert yaml.safe_load(out.read_text())["bound"]["c_emp"] == pytest.approx(0.1, abs=1e-9)
    make_sweep(tmp_path / "few", 0.2, 0.1, RATES4, train_eval_samples=60)
    r = runner.invoke(app, ["calibrate", str(tmp_path / "few"), "--metric", "accuracy", "--out", str(out.with_name("x"))])
    assert r.exit_code == 2 and "data.train_eval_samples = 60" in r.stderr and not out.with_name("x").exists()


def test_calibrate_keeps_the_datas_sign_and_does_not_write_a_bound_that_cannot_hold_it(tmp_path):
    make_sweep(tmp_path / "sweep", 0.4, -0.1, RATES4)  # training error falls as the rate rises
    out = tmp_path / "bound.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--out", str(out)])
    assert "c_emp = -0.1" in r.stdout and "training error falls with the rate" in r.stdout
    assert r.exit_code == 2 and "c_emp = -0.1 < 0" in r.stderr and not out.exists()


def test_calibrate_fits_every_constant_and_says_where_the_bound_is_vacuous(tmp_path):
    """With a metric, the Gap term's constants come from the measured gaps (validation minus training
    error): the written bound's Gap at each rate is the fitted one; the default constants' bound at
    N = 4 samples is far above 1, and calibrate says so."""
    from fedlodrop.planning import system_model
    from fedlodrop.planning.bound import Bound, sparsity_feature

    gap = lambda g: 0.02 + 0.1 / (1 + 2 * sparsity_feature(g))  # noqa: E731
    make_sweep(tmp_path / "sweep", 0.1, 0.05, RATES4, seeds=(0,),
               val=lambda g: 0.1 + 0.05 * g / (1 - g) + gap(g))
    system = system_file(tmp_path)
    out = tmp_path / "fit.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--metric", "accuracy", "--system", str(system),
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "vacuous (G >= 1)" in r.stdout
    spec = load_system(out)
    bound = Bound.of(system_model(spec))  # mapped onto the system's N
    for g in RATES4:
        assert float(bound.gap([g] * len(spec.devices))) == pytest.approx(gap(g), abs=2e-3)
    assert spec.bound.c_emp == pytest.approx(0.05, abs=1e-9) and spec.bound.objective == "bound"


def test_a_surrogate_of_the_validation_error_is_what_the_planners_minimise(tmp_path):
    """--surrogate fits the validation error against the rates (here it falls, then rises: dropout
    regularises up to a point) and writes it as the bound's constants with objective: measured; B&B
    and P-SCA then plan the rate that minimises that curve wherever the limits allow."""
    from fedlodrop.planning import optimize
    from fedlodrop.planning.bound import Curve, emp_feature, sparsity_feature

    truth = Curve(0.15, 0.04, 0.0004, 0.03, 4.0)
    val = lambda g: float(truth(emp_feature(g), sparsity_feature(g)))  # noqa: E731
    rates = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75]
    make_sweep(tmp_path / "sweep", 0.1, 0.05, rates, seeds=(0,), val=val)
    system = tmp_path / "loose.yaml"
    spec = random_system(3, seed=1, samples_total=3)  # N = 3, as the sweep's runs: the curve maps exactly
    spec.round.latency_s *= 100
    for dev in spec.devices:
        dev.energy_budget_j *= 100
    save_system(spec, system)
    out = tmp_path / "measured.yaml"
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--metric", "accuracy", "--surrogate",
                            "--system", str(system), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "leave-one-rate-out rmse" in r.stdout
    fitted = load_system(out)
    assert fitted.bound.objective == "measured"
    grid = np.linspace(0.0, 0.85, 1701)
    best = float(grid[np.argmin([val(g) for g in grid])])
    assert 0.1 < best < 0.6  # an interior optimum: the planner has something to find
    for method in ("bnb", "psca"):
        plan = optimize(fitted, method)
        assert plan.gammas == pytest.approx([best] * 3, abs=0.02)
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--surrogate"])
    assert r.exit_code == 2 and "give --metric" in r.stderr


def test_calibrate_validates_the_fit_on_held_out_systems_and_rates(tmp_path):
    """Issue 29, item 5: --validate predicts runs the fit never saw (per-device rates, uneven data
    sizes) and says how many pairs of them it orders as measured. Where the held-out errors follow
    the truth the surrogate orders every pair and its error is small; where they run against it
    (an adversary's data) it orders none; a run of another length is skipped and named."""
    from fedlodrop.planning.bound import Curve, emp_feature, sparsity_feature

    truth = Curve(0.15, 0.04, 0.0004, 0.03, 4.0)
    val = lambda g, w=None: float(truth(emp_feature(g, w), sparsity_feature(g, w)))  # noqa: E731
    make_sweep(tmp_path / "sweep", 0.1, 0.05, [0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75], seeds=(0,), val=val)
    weights = [1, 3, 6]
    held = [[0.0, 0.1, 0.7], [0.5, 0.2, 0.05], [0.8, 0.6, 0.3], [0.3, 0.3, 0.6]]
    make_sweep(tmp_path / "held", 0.1, 0.05, held, seeds=(0,), weights=weights, val=lambda g: val(g, weights))
    make_sweep(tmp_path / "against", 0.1, 0.05, held, seeds=(0,), weights=weights,
               val=lambda g: 0.6 - val(g, weights))  # worse where the truth says better
    args = ["calibrate", str(tmp_path / "sweep"), "--metric", "accuracy", "--surrogate", "--validate"]
    r = runner.invoke(app, [*args, str(tmp_path / "held")])
    assert r.exit_code == 0, r.output
    assert "held out: 4 runs in 1 groups" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("surrogate: orders"))
    assert "orders 6 of 6 pairs" in line
    assert float(line.split("rmse ")[1].split(",")[0]) < 0.01
    r = runner.invoke(app, [*args, str(tmp_path / "against")])
    assert r.exit_code == 0 and "surrogate: orders 0 of 6 pairs" in r.stdout, r.output
    long = tmp_path / "held" / "longer"
    long.mkdir()
    (long / "config.yaml").write_text(run_config(0, 0.2))
    (long / "metrics.jsonl").write_text("\n".join(json.dumps(round_record(i, 0.5, 0.5)) for i in (1, 2, 3, 4)) + "\n")
    r = runner.invoke(app, [*args, str(tmp_path / "held")])
    flat = r.stderr.replace("\n", "")  # the console wraps long paths
    assert r.exit_code == 0 and "another number of rounds" in flat and "held/longer" in flat, r.output
    r = runner.invoke(app, ["calibrate", str(tmp_path / "sweep"), "--validate", str(tmp_path / "held")])
    assert r.exit_code == 2 and "give --metric" in r.stderr
