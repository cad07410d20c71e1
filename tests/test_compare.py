"""`fedlodrop compare`: every method's plan trained on the same task and system, one table."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
from conftest import learning_cfg, run_system
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.planning import load_plan, load_system, save_system, system_model
from fedlodrop.planning.plan import as_is_plan
from fedlodrop.studies.comparison import MethodResult, round_cost, rows
from fedlodrop.run.folder import RunFolder


def _system(path, tiny_bert, glue, devices=3):
    """A cell at the latency limit `system random` picks (between what gamma_max and the bound's
    free optimum need), around the run `_args` trains: the tiny BERT's real payload (rank 4 on
    query/value, 32-bit values), 2 local epochs, 192 samples. Latency is the limit that binds."""
    cfg = learning_cfg(tiny_bert, glue, **{"federation.devices": devices})
    run_system(path, cfg)
    spec = load_system(path)
    for dev in spec.devices:
        dev.energy_budget_j *= 10
    save_system(spec, path)
    return path


def _args(tiny_bert, glue, out, system, *extra):
    sets = ["task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={glue}", "lora.r=4", "lora.alpha=8",
            "federation.rounds=2", "federation.local_epochs=2", "train.max_length=32", "data.train_eval_samples=16",
            "train.threads=1"]
    return ["compare", str(system), "--seeds", "1", "--out", str(out), "--quiet",
            *[x for s in sets for x in ("--set", s)], *extra]


@pytest.mark.slow  # plans and trains 9 runs
def test_every_method_is_planned_trained_and_tabulated(tiny_bert, polarity_dir, tmp_path):
    system = _system(tmp_path / "system.yaml", tiny_bert, polarity_dir)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, _args(tiny_bert, polarity_dir, out, system))
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in csv.DictReader(open(out / "compare.csv"))}
    assert list(rows) == ["bnb", "psca", "fixed", "equal-bandwidth", "none", "fit-only", "longer-rounds", "bf16",
                          "int8", "bnb-int8", "unplanned"]
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
        assert rows[method]["never_met"] == "True"  # the table says so instead of the untrained model's score
        line = next(ln for ln in (out / "compare.md").read_text().splitlines() if ln.startswith(f"| {method} |"))
        assert line.count("cannot meet the limit") == 6  # final, equal time, equal energy, to target (s, J), gap
    bnb = RunFolder(out / "runs" / "bnb__seed=0").records()
    assert all(not r.failures for r in bnb)  # the planned devices keep the deadline with the bytes really sent
    assert float(rows["bnb"]["simulated_s_mean"]) == sum(r.system.latency_s for r in bnb)
    unplanned = RunFolder(out / "runs" / "unplanned__seed=0").records()[0]
    assert {d.rate for d in unplanned.devices} == {0.0}


def test_compare_refuses_what_cannot_be_compared(tiny_bert, polarity_dir, tmp_path):
    system = _system(tmp_path / "system.yaml", tiny_bert, polarity_dir)
    two = _system(tmp_path / "two.yaml", tiny_bert, polarity_dir, devices=2)
    cases = [(two, ["--set", "federation.devices=3"], "describes 2 devices but federation.devices is 3"),
             (system, ["--methods", "bnb,magic"], "--methods: unknown magic"),
             (system, ["--set", "federation.comm_dtype=float16"], "prices bits a value 32 but the run sends 16"),
             (system, ["--set", "data.max_train_samples=100"], "plans 192 training samples"),
             (system, ["--set", f"plan={tmp_path / 'p.json'}"], "drop plan from the config"),
             (system, ["--set", "privacy.dp=true", "--set", "privacy.noise_multiplier=1.0", "--set", "federation.weighting=uniform",
                      "--set", "privacy.mode=local",
                      "--methods", "bnb,int8"],
              "--methods int8 cannot run with this config")]
    for i, (sys_file, extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(app, _args(tiny_bert, polarity_dir, out, sys_file, *extra))
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
        assert not out.exists()


def test_a_newcomers_random_system_compares_with_a_time_budget(tiny_bert, polarity_dir, tmp_path):
    """Issue 29, item 0: `fedlodrop system random --devices 6 --out sys.yaml`, then `fedlodrop compare
    sys.yaml --set federation.time_budget_s=...` as docs/planning.md documents it: the same run keys on
    both commands, no dtype, device count or sample count said twice, nothing refused."""
    sets = [x for s in ("task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={polarity_dir}",
                        "train.max_length=32", "train.threads=1") for x in ("--set", s)]
    system = tmp_path / "sys.yaml"
    r = CliRunner().invoke(app, ["system", "random", "--devices", "6", "--out", str(system), *sets])
    assert r.exit_code == 0, r.output
    spec = load_system(system)
    assert len(spec.devices) == 6 and sum(d.samples for d in spec.devices) == 192
    assert len({d.samples for d in spec.devices}) > 1  # a spread in data sizes, not an equal split
    budget = 2.5 * spec.round.latency_s
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare", str(system), "--methods", "bnb,unplanned", "--seeds", "1", "--quiet",
                                 "--out", str(out), *sets, "--set", f"federation.time_budget_s={budget}",
                                 "--set", "federation.rounds=50"])
    assert r.exit_code == 0, r.output
    m = system_model(spec)
    for method in ("bnb", "unplanned"):
        run = RunFolder(out / "runs" / f"{method}__seed=0")
        summary = run.summary()
        # rounds uncapped: the budget decides (federation.rounds=50 is not what stopped it), and no
        # further round of the plan's cost would have fitted
        plan = load_plan(out / "plans" / "bnb.json") if method == "bnb" else as_is_plan(spec, [0.0] * 6, method, "", m)
        seconds, _ = round_cost(plan, m, "drop")
        assert summary.rounds == math.floor(budget / seconds) < 50 and run.config().federation.rounds == summary.rounds
        assert summary.system.simulated_time_s <= budget < summary.system.simulated_time_s + seconds
        assert [d.samples for d in run.records()[0].devices] == [d.samples for d in spec.devices]


def _fake(curve, dropped=0):
    """A run's summary as the table reads it, for a metric curve of (s, J, accuracy)."""
    system = SimpleNamespace(simulated_time_s=curve[-1][0], energy_j=curve[-1][1], devices_dropped_for_limits=dropped)
    return SimpleNamespace(final={"accuracy": curve[-1][2]}, generalization_gap={"accuracy": 0.01}, rounds=len(curve),
                           system=system, uplink_bytes_total=1e6, downlink_bytes_total=1e6)


def test_equal_time_equal_energy_and_time_to_target_are_read_off_the_curves():
    """Hand-made curves: equal time is the least time a method that trained spent (3 s), equal energy
    the least energy (10 J); a method whose every device missed the limit says so and sets neither."""
    a = [(1.0, 10.0, 0.60), (2.0, 20.0, 0.70), (3.0, 30.0, 0.80)]
    b = [(2.0, 5.0, 0.65), (4.0, 10.0, 0.75)]
    stuck = [(0.5, 1.0, 0.50)]  # every device missed: it never moved (and spent little)
    results = [MethodResult("a", True, 0.1, 0.3, [_fake(a)], [a], [6]),
               MethodResult("b", True, 0.2, 0.5, [_fake(b)], [b], [4]),
               MethodResult("none", False, 0.9, 0.0, [_fake(stuck, dropped=2)], [stuck], [2])]
    table = {r["method"]: r for r in rows(results, "accuracy", target=0.7)}
    assert table["a"]["at_time"][0] == 0.80 and table["b"]["at_time"][0] == 0.65
    assert table["a"]["at_energy"][0] == 0.60 and table["b"]["at_energy"][0] == 0.75
    assert (table["a"]["to_target_s"][0], table["a"]["to_target_j"][0]) == (2.0, 20.0)
    assert (table["b"]["to_target_s"][0], table["b"]["to_target_j"][0]) == (4.0, 10.0)
    assert table["none"]["never_met"] and not table["a"]["never_met"]
    assert math.isnan(table["none"]["to_target_s"][0])
    assert rows(results, "accuracy")[0]["target"] == pytest.approx(0.95 * 0.80)  # the default: 0.95 x the best


def test_the_baselines_that_meet_the_limit_without_dropout(tiny_bert, polarity_dir, tmp_path):
    """Issue 29, item 2, at a limit rate 0 cannot meet with every device: fit-only asks only the devices
    the latency model says fit (the others never train, spend nothing, get no band); longer-rounds
    meets a longer round limit of its own with every device; bf16 sends half the bytes of float32; int8
    sends a quarter of them up (and a scale a tensor), planned and priced at those bytes."""
    system = _system(tmp_path / "system.yaml", tiny_bert, polarity_dir)
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, _args(tiny_bert, polarity_dir, out, system, "--methods", "none,fit-only,longer-rounds,bf16,int8"))
    assert r.exit_code == 0, r.output
    spec = load_system(system)
    fit = load_plan(out / "plans" / "fit-only.json")
    members = fit.members
    assert members is not None and 0 < len(members) < 3  # some, not all, devices fit at rate 0
    assert sum(d.bandwidth_hz for d in fit.devices) == pytest.approx(spec.cell.bandwidth_hz)  # theirs alone
    for rec in RunFolder(out / "runs" / "fit-only__seed=0").records():
        assert rec.participants == members and not rec.failures
        assert all(d.system.latency_s <= spec.round.latency_s * (1 + 1e-9) for d in rec.devices)
    longer = load_plan(out / "plans" / "longer-rounds.json")
    assert longer.feasible and longer.system.round.latency_s > spec.round.latency_s and longer.members is None
    for rec in RunFolder(out / "runs" / "longer-rounds__seed=0").records():
        assert len(rec.participants) == 3 and not rec.failures and {d.rate for d in rec.devices} == {0.0}
    none = RunFolder(out / "runs" / "none__seed=0").records()[0]
    half = RunFolder(out / "runs" / "bf16__seed=0").records()[0]
    assert RunFolder(out / "runs" / "bf16__seed=0").config().federation.comm_dtype == "bfloat16"
    assert [2 * d.uplink_bytes for d in half.devices] == pytest.approx([d.uplink_bytes for d in none.devices], rel=0.01)
    int8 = RunFolder(out / "runs" / "int8__seed=0")
    assert int8.config().federation.uplink == "int8"
    plan = load_plan(out / "plans" / "int8.json")
    assert plan.system.payload.uplink_bits_per_value == 8 and plan.system.payload.uplink_extra_bits == 32 * 10
    for rec in int8.records():
        for d, p, n in zip(rec.devices, plan.devices, none.devices):
            assert d.uplink_bytes == d.kept_values + 10 * 4 + (n.uplink_bytes // 4 - n.kept_values)  # + the head
            assert d.downlink_bytes == n.downlink_bytes or rec.round > 1  # float32 down, as none's first round
            assert 8 * d.uplink_bytes == pytest.approx(p.uplink_bits, rel=1e-12)  # the plan's bytes are the sent ones


def test_fit_only_prices_each_device_on_its_own_channel(tiny_bert, polarity_dir, tmp_path):
    """The devices left in keep the full cell's channel gains: each member's planned latency and energy
    are what the meter charges it on the whole system (a sub-cell redraws fading by position in the list)."""
    import numpy as np

    from fedlodrop.run.meter import Meter, Resources
    from fedlodrop.studies.comparison import REGISTRY

    spec = load_system(_system(tmp_path / "system.yaml", tiny_bert, polarity_dir))
    spec.round.latency_s *= 3
    spec.devices[0].f_max_hz /= 1000  # the first device cannot compute in time: the others shift places
    m = system_model(spec)
    plan = REGISTRY["fit-only"].plan(spec, m, lambda line: None)
    assert plan.members == [1, 2]
    meter = Meter(m, Resources(np.array([d.bandwidth_hz for d in plan.devices]), np.array([d.power_w for d in plan.devices]),
                               np.array([d.frequency_hz for d in plan.devices]), "fit-only"), spec.round.local_epochs)
    for k in plan.members:
        d = plan.devices[k]
        cost = meter.price(k, 0.0, int(m.D[k]), float(m.uplink_bits(0.0, k)) / 8, 0)
        assert (cost.latency_s, cost.energy_j) == pytest.approx((d.latency_s, d.energy_j), rel=1e-9)
