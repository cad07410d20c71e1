"""From a system file to a plan to a training run that uses the plan's per-device rates."""

import json

import pytest

from typer.testing import CliRunner

from fedlodrop.cli import app

from conftest import read_metrics


def _plan(tmp_path, devices=3):
    runner = CliRunner()
    system = tmp_path / "system.yaml"
    plan = tmp_path / "plan.json"
    r = runner.invoke(app, ["system", "random", "--devices", str(devices), "--seed", "1", "--out", str(system)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["optimize", str(system), "--method", "psca", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    return plan, json.loads(plan.read_text())


def test_run_takes_the_plans_rates_and_prices_rounds_with_its_resources(tiny_bert, sst2_dir, tmp_path):
    plan, tree = _plan(tmp_path)
    gammas = [d["gamma"] for d in tree["devices"]]
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out), "--set", "task=sst2", "--set", f"model={tiny_bert}",
            "--set", "data.source=glue_dir", "--set", f"data.glue_dir={sst2_dir}", "--set", "federation.rounds=1",
            "--set", "train.max_length=32", "--set", f"plan={plan}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = read_metrics(out)[0]
    assert [d.rate for d in row.devices] == gammas
    # priced with the plan's bandwidth, power and frequency: its compute time is the plan's for
    # the samples each device trained (the plan's system sizes the shards)
    devices = tree["devices"]
    for d, planned in zip(row.devices, devices):
        assert d.system.compute_s == pytest.approx(planned["compute_s"] * d.samples / tree["system"]["devices"][d.device]["samples"], rel=1e-6)
        assert d.system.energy_j > 0
    assert row.system.latency_s == max(d.system.latency_s for d in row.devices)


def test_plan_for_other_device_count_is_refused(tiny_bert, sst2_dir, tmp_path):
    plan, _ = _plan(tmp_path, devices=2)
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out), "--set", "task=sst2", "--set", f"model={tiny_bert}",
            "--set", "data.source=glue_dir", "--set", f"data.glue_dir={sst2_dir}", "--set", f"plan={plan}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "2 devices" in r.stderr and not out.exists()
