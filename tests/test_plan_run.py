"""From a system file to a plan to a training run that uses the plan's per-device rates."""

import json

import pytest

from typer.testing import CliRunner

from fedlodrop.cli import app

from conftest import read_metrics


def _sets(model, glue):
    return [x for s in ("task=sst2", f"model={model}", "data.source=glue_dir", f"data.glue_dir={glue}",
                        "train.max_length=32") for x in ("--set", s)]


def _plan(tmp_path, model, glue, devices=3):
    """`system random` around the run (its devices, samples and payload), then a P-SCA plan."""
    runner = CliRunner()
    system = tmp_path / "system.yaml"
    plan = tmp_path / "plan.json"
    r = runner.invoke(app, ["system", "random", "--devices", str(devices), "--seed", "1", "--out", str(system),
                            *_sets(model, glue)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["optimize", str(system), "--method", "psca", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    return plan, json.loads(plan.read_text())


def test_run_takes_the_plans_rates_and_prices_rounds_with_its_resources(tiny_bert, sst2_dir, tmp_path):
    plan, tree = _plan(tmp_path, tiny_bert, sst2_dir)
    gammas = [d["gamma"] for d in tree["devices"]]
    out = tmp_path / "run"
    # the budget sampler: a device never sends more than its plan priced (Bernoulli masks would send
    # more than the expected bytes about half the time, and a plan sits on its latency limit)
    args = ["run", "--quiet", "--out", str(out), *_sets(tiny_bert, sst2_dir), "--set", "federation.rounds=1",
            "--set", "dropout.sampler=budget", "--set", f"plan={plan}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    row = read_metrics(out)[0]
    assert [d.rate for d in row.devices] == gammas
    # priced with the plan's bandwidth, power and frequency on the samples the plan priced: each device
    # trains its D_k, and its compute time and energy are the plan's
    for d, planned in zip(row.devices, tree["devices"]):
        assert d.samples == tree["system"]["devices"][d.device]["samples"]
        assert d.system.compute_s == pytest.approx(planned["compute_s"], rel=1e-9)
        assert d.system.energy_j > 0 and d.system.latency_s <= planned["latency_s"] * (1 + 1e-9)
    assert row.system.latency_s == max(d.system.latency_s for d in row.devices)


def test_plan_for_other_device_count_is_refused(tiny_bert, sst2_dir, tmp_path):
    plan, _ = _plan(tmp_path, tiny_bert, sst2_dir, devices=2)
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out), *_sets(tiny_bert, sst2_dir), "--set", "federation.devices=3",
            "--set", f"plan={plan}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "2 devices" in r.stderr and not out.exists()
