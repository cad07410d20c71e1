"""SPEC 3-5: constraints re-checked by hand, baselines against B&B, CLI behaviour (B&B against brute force: test_planning_solvers.py)."""

import json
import math

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.planning import plan_system as solve
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.system import system_model
from fedlodrop.round.records import DeviceRecord, RoundRecord


def recheck(plan, m):
    """Latency, energy and resource limits recomputed from SPEC 3's formulas, not the solver's."""
    assert sum(d.bandwidth_hz for d in plan.devices) <= m.B_tot * (1 + 1e-9)
    for k, d in enumerate(plan.devices):
        g, B, p, f = d.gamma, d.bandwidth_hz, d.power_w, d.frequency_hz
        assert 0 <= g <= m.gamma_max and 0 <= p <= m.P[k] * (1 + 1e-9) and 0 < f <= m.fmax[k] * (1 + 1e-9)
        bits = (1 - g) * m.Q * m.bits + m.head * m.bits
        rate = B * math.log2(1 + p * m.h[k] / (m.N0 * B))
        cycles = m.tau * m.D[k] * (m.c0 + (1 - g) * m.c1)
        t = cycles / f + bits / rate
        e = m.kappa * cycles * f**2 + p * bits / rate
        assert t <= m.T * (1 + 1e-6), (k, t, m.T)
        assert e <= m.E[k] * (1 + 1e-6), (k, e, m.E[k])
        assert d.latency_s == pytest.approx(t, rel=1e-6) and d.energy_j == pytest.approx(e, rel=1e-6)


def test_baselines_respect_constraints_and_are_no_better_than_bnb():
    spec = random_system(3, seed=1, latency_s=None)
    m = system_model(spec)
    best = solve(spec, "bnb").objective
    for method in ("fixed", "psca"):
        plan = solve(spec, method)
        recheck(plan, m)
        assert plan.objective >= best * (1 - 1e-4)
    fixed = solve(spec, "fixed")
    assert len({round(d.gamma, 9) for d in fixed.devices}) == 1


def test_rates_rise_as_the_latency_limit_tightens():
    spec = random_system(3, seed=2)
    loose, tight = spec.model_copy(deep=True), spec.model_copy(deep=True)
    loose.round.latency_s = spec.round.latency_s * 1.5
    g_loose = np.mean([d.gamma for d in solve(loose, "psca").devices])
    g_tight = np.mean([d.gamma for d in solve(tight, "psca").devices])
    assert g_tight > g_loose


def _write(tmp_path, spec):
    from fedlodrop.planning.spec import save_system

    path = tmp_path / "system.yaml"
    save_system(spec, path)
    return path


def test_optimize_writes_plan_json_schema(tmp_path):
    system = _write(tmp_path, random_system(3, seed=1))
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["optimize", str(system), "--method", "psca", "--out", str(out)])
    assert r.exit_code == 0, r.output
    plan = json.loads(out.read_text())
    assert {"method", "objective", "feasible", "devices", "solver", "system"} <= set(plan)
    assert plan["method"] == "psca" and plan["feasible"] is True
    for d in plan["devices"]:
        assert {"gamma", "bandwidth_hz", "power_w", "frequency_hz", "latency_s", "energy_j"} <= set(d)
    assert {"iterations", "nodes", "gap", "seconds"} <= set(plan["solver"])


@pytest.mark.parametrize("method", ["bnb", "psca", "none", "fixed", "equal-bandwidth"])
def test_infeasible_system_names_device_and_constraint(tmp_path, method):
    spec = random_system(3, seed=1)
    spec.devices[1].distance_m = 499.0
    spec.devices[1].energy_budget_j = 1e-6  # cannot even compute within this
    system = _write(tmp_path, spec)
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["optimize", str(system), "--method", method, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert "device 1" in r.stderr and "binding constraint:" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("args", [["--method", "magic"], ["--method", "psca", "--gamma", "0.2"]])
def test_optimize_bad_options_exit_2(tmp_path, args):
    system = _write(tmp_path, random_system(2, seed=1))
    r = CliRunner().invoke(app, ["optimize", str(system), *args])
    assert r.exit_code == 2 and r.stderr.startswith("error:")


def test_system_random_writes_a_loadable_file_and_rejects_zero_devices(tmp_path):
    out = tmp_path / "s.yaml"
    r = CliRunner().invoke(app, ["system", "random", "--devices", "4", "--seed", "3", "--model", "roberta-large",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    tree = yaml.safe_load(out.read_text())
    assert len(tree["devices"]) == 4 and tree["round"]["latency_s"] > 0
    bad = tmp_path / "bad.yaml"
    r = CliRunner().invoke(app, ["system", "random", "--devices", "0", "--out", str(bad)])
    assert r.exit_code == 2 and not bad.exists()


def final_round(loss):
    """A metrics.jsonl line of round 1 whose train_loss is `loss` (one device with one sample)."""
    dev = DeviceRecord(device=0, rate=0.0, downlink_bytes=0, kept_values=1, samples=1, steps=1, train_loss=loss,
                       uplink_bytes=0, train_s=0.0)
    return json.dumps(RoundRecord(round=1, participants=[0], devices=[dev]).to_json()) + "\n"


def test_calibrate_recovers_constants_from_a_sweep(tmp_path):
    e0, c = 0.2, 0.05
    for i, rate in enumerate([0.0, 0.3, 0.5, 0.7]):
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"dropout": {"rate": rate}}))
        loss = e0 + c * rate / (1 - rate)
        (run / "metrics.jsonl").write_text(final_round(loss))
    out = tmp_path / "bound.yaml"
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    fitted = yaml.safe_load(out.read_text())["bound"]
    assert fitted["e0"] == pytest.approx(e0, abs=1e-9) and fitted["c_emp"] == pytest.approx(c, abs=1e-9)


def test_calibrate_needs_four_rates(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"dropout": {"rate": 0.3}}))
    (run / "metrics.jsonl").write_text(final_round(0.4))
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path)])
    assert r.exit_code == 2 and "needs 4 or more" in r.stderr


