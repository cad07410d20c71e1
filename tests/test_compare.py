"""`fedlodrop compare`: every method's plan trained on the same task and system, one table."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.planning import load_plan, random_system, save_system
from fedlodrop.run.folder import RunFolder


def _system(path, tiny_bert, devices=3):
    """A cell at the latency limit `system random` picks (between what gamma_max and the bound's
    free optimum need), for the tiny BERT's real payload: rank 4 on query/value, 32-bit values."""
    spec = random_system(devices, seed=1, model=tiny_bert, samples_total=192, local_epochs=2.0)
    spec.payload.bits_per_value = 32
    for dev in spec.devices:
        dev.energy_budget_j *= 10  # latency is the limit that binds here
    save_system(spec, path)
    return path


def _args(tiny_bert, glue, out, system, *extra):
    sets = ["task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={glue}", "lora.r=4",
            "federation.rounds=2", "federation.local_epochs=2", "train.max_length=32", "data.train_eval_samples=16",
            "train.threads=1"]
    return ["compare", str(system), "--seeds", "1", "--out", str(out), "--quiet",
            *[x for s in sets for x in ("--set", s)], *extra]


@pytest.mark.slow  # plans and trains 6 runs
def test_every_method_is_planned_trained_and_tabulated(tiny_bert, polarity_dir, tmp_path):
    system = _system(tmp_path / "system.yaml", tiny_bert)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, _args(tiny_bert, polarity_dir, out, system))
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert list(rows) == ["bnb", "psca", "fixed", "equal-bandwidth", "none", "unplanned"]
    assert (out / "compare.png").stat().st_size > 0 and "| bnb |" in (out / "compare.md").read_text()
    # each run trained with its method's rates and was priced with its resources
    for method in ("bnb", "fixed", "none"):
        plan = load_plan(out / "plans" / f"{method}.json")
        run = RunFolder(out / "runs" / f"{method}__seed=0")
        assert [d.rate for d in run.records()[0].devices] == plan.gammas
        assert run.config().plan is not None and run.config().system.file == system.resolve()
    # at this limit rate 0 does not fit: "none" is trained as it would behave, its late devices
    # dropped every round, and so is the unplanned federation (rate 0, equal band, full power)
    assert not load_plan(out / "plans" / "none.json").feasible and rows["none"]["feasible"] == "False"
    assert rows["unplanned"]["feasible"] == "False"  # its resources are not a plan, but they do not fit either
    for method in ("none", "unplanned"):
        assert float(rows[method]["dropped_mean"]) > 0
        records = RunFolder(out / "runs" / f"{method}__seed=0").records()
        assert all(r.failures and r.failures[0]["reason"].startswith("missed the latency limit") for r in records)
    bnb = RunFolder(out / "runs" / "bnb__seed=0").records()
    assert all(not r.failures for r in bnb)  # the planned devices keep the deadline with the bytes really sent
    assert float(rows["bnb"]["simulated_s_mean"]) == sum(r.system.latency_s for r in bnb)
    unplanned = RunFolder(out / "runs" / "unplanned__seed=0").records()[0]
    assert {d.rate for d in unplanned.devices} == {0.0}


def test_compare_refuses_what_cannot_be_compared(tiny_bert, polarity_dir, tmp_path):
    system = _system(tmp_path / "system.yaml", tiny_bert)
    two = _system(tmp_path / "two.yaml", tiny_bert, devices=2)
    cases = [(two, [], "describes 2 devices but federation.devices is 3"),
             (system, ["--methods", "bnb,magic"], "--methods: unknown magic"),
             (system, ["--set", "federation.comm_dtype=float16"], "plans 32 bits a value"),
             (system, ["--set", f"plan={tmp_path / 'p.json'}"], "drop plan from the config")]
    for i, (sys_file, extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, _args(tiny_bert, polarity_dir, out, sys_file, *extra))
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
        assert not out.exists()
