"""The simulated clock and meter (fedlodrop.run.meter): every round of a run with a system is priced
on SPEC 3's formulas from what each device really did; limits are enforced like a deployment
would; run budgets end training before the round that would exceed them; bad input is refused."""

from __future__ import annotations

import math

import pytest
from conftest import learning_cfg, run_system
from flower_helpers import FakeGrid
from typer.testing import CliRunner

from fedlodrop.run import engine
from fedlodrop.cli import app
from fedlodrop.run.experiment import build
from fedlodrop.flower import app as flower_app
from fedlodrop.run.folder import RunFolder, compare
from fedlodrop.round.server import Server, ServerState

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


def write_system(path, model, glue, devices=3, latency_s=1e3, energy_j=1e3, samples=(20, 60, 112), local_epochs=2.0):
    """A random cell (seed 1) around `learning_cfg`'s run of `model` (its payload; 2 local epochs), with
    the given limits and per-device sample counts (192 examples in all)."""
    cfg = learning_cfg(model, glue, **{"federation.devices": devices, "federation.local_epochs": local_epochs})
    return run_system(path, cfg, samples=samples, latency_s=latency_s, energy_j=energy_j)


def _cfg(model, glue, system, **over):
    return learning_cfg(model, glue, **({"system.file": str(system), "train.threads": 1, "dropout.rate": 0.3,
                                        "federation.rounds": 3, "data.train_eval_samples": 16} | over))


def device_latencies(cfg) -> list[float]:
    """Round 1's simulated latency of each device, priced before anything trains."""
    exp = build(cfg)
    server = Server(cfg, exp.fm.layout, ServerState(0, exp.fm.get_state()), exp.rates, exp.known, exp.plugins)
    return [exp.meter.price(t.device, t.rate, len(exp.shards[t.device]), server.upload_bytes(t), t.nbytes).latency_s
            for t in server.configure(0)]


def test_every_round_is_priced_from_what_travelled_on_both_engines(tiny_bert, polarity_dir, tmp_path):
    system = write_system(tmp_path / "system.yaml", tiny_bert, polarity_dir)
    cfg = _cfg(tiny_bert, polarity_dir, system, **{"flower.discovery_timeout_s": 1.0,
                                                   "flower.round_timeout_s": 1.0, "flower.poll_interval_s": 0.01})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    rc = {"config-json": cfg.model_dump_json(), "run-dir": str(tmp_path / "flower")}
    flower_app.serve(FakeGrid(cfg.federation.devices, rc), rc)
    assert compare(tmp_path / "inproc", tmp_path / "flower") == (0.0, [])  # the costs included

    from fedlodrop.planning import load_system, system_model

    m = system_model(load_system(system))
    rows = RunFolder(tmp_path / "inproc").records()
    # the devices train on the system's sample counts (192 examples split 20 : 60 : 112)
    assert [d.samples for d in rows[0].devices] == [20, 60, 112]
    for r in rows:
        for d in r.devices:  # no planning: an equal share of the band, full power, full frequency
            k, b, p, f = d.device, m.B_tot / m.K, m.P[d.device], m.fmax[d.device]
            cycles = 2 * d.samples * (m.c0 + (1 - d.rate) * m.c1)  # 2 local epochs
            up = 8 * d.uplink_bytes / (b * math.log2(1 + p * m.h[k] / (m.N0 * b)))
            assert d.system.compute_s == pytest.approx(cycles / f, rel=1e-9)
            assert d.system.upload_s == pytest.approx(up, rel=1e-9)
            assert d.system.energy_j == pytest.approx(m.kappa * cycles * f**2 + p * up, rel=1e-9)
            assert d.system.latency_s == pytest.approx(d.system.compute_s + d.system.upload_s, rel=1e-12)
        assert r.system.latency_s == max(d.system.latency_s for d in r.devices)
        assert r.system.energy_j == pytest.approx(sum(d.system.energy_j for d in r.devices))
    # round 2 carries the fold down and uploads other masks: the clock follows the bytes
    assert rows[0].devices[0].system.upload_s != rows[1].devices[0].system.upload_s
    summary = RunFolder(tmp_path / "inproc").summary().system
    assert summary.simulated_time_s == pytest.approx(sum(r.system.latency_s for r in rows))
    assert summary.stopped_by is None and summary.devices_dropped_for_limits == 0


@pytest.mark.slow  # trains the 2-layer MiniLM
def test_a_device_over_the_latency_limit_is_dropped_and_the_run_still_learns(mini2, polarity_dir, tmp_path):
    loose = write_system(tmp_path / "loose.yaml", mini2, polarity_dir)
    late = device_latencies(_cfg(mini2, polarity_dir, loose))
    slow = max(range(3), key=late.__getitem__)
    limit = (max(late) + sorted(late)[-2]) / 2  # between the slowest device and the next
    tight = write_system(tmp_path / "tight.yaml", mini2, polarity_dir, latency_s=limit)
    summary = engine.run(_cfg(mini2, polarity_dir, tight, **{"federation.rounds": 5}), tmp_path / "drop",
                         show_progress=False)
    rows = RunFolder(tmp_path / "drop").records()
    for r in rows:
        assert [f["device"] for f in r.failures] == [slow]
        assert r.failures[0]["reason"].startswith("missed the latency limit")
        assert r.system.latency_s == pytest.approx(limit)  # the server waited until the deadline
        assert r.device(slow).system.energy_j > 0  # the late device spent its energy all the same
    assert summary.system.devices_dropped_for_limits == 5
    # learning goes on with the devices that keep the deadline
    assert rows[-1].train_loss < 0.75 * rows[0].train_loss and summary.final["accuracy"] >= 0.8

    report = _cfg(mini2, polarity_dir, tight, **{"system.enforce": "report", "federation.rounds": 1})
    engine.run(report, tmp_path / "report", show_progress=False)
    (row,) = RunFolder(tmp_path / "report").records()
    assert row.failures == [] and row.device(slow).limit.startswith("missed the latency limit")
    assert row.system.latency_s > limit


def test_a_time_budget_ends_the_run_before_the_round_that_would_exceed_it(tiny_bert, polarity_dir, tmp_path):
    system = write_system(tmp_path / "system.yaml", tiny_bert, polarity_dir)
    # no dropout and no fold: every round moves the same bytes, so it costs the same
    over = {"federation.rounds": 5, "dropout.rate": 0.0, "federation.aggregation": "masked"}
    per_round = max(device_latencies(_cfg(tiny_bert, polarity_dir, system, **over)))
    cfg = _cfg(tiny_bert, polarity_dir, system, **over, **{"federation.time_budget_s": 2.5 * per_round})
    summary = engine.run(cfg, tmp_path / "r", show_progress=False)
    assert summary.rounds == 2 and summary.system.stopped_by == "time_budget_s"
    assert summary.system.simulated_time_s <= 2.5 * per_round
    result = CliRunner().invoke(app, ["run", "--quiet", "--out", str(tmp_path / "none"), "--set", "task=sst2",
                                      "--set", f"model={tiny_bert}", "--set", "data.source=glue_dir",
                                      "--set", f"data.glue_dir={polarity_dir}", "--set", f"system={system}",
                                      "--set", "federation.local_epochs=2", "--set", "lora.r=4", "--set", "lora.alpha=8",
                                      "--set", f"federation.energy_budget_j={1e-12}"])
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "energy_budget_j" in lines[0] and "no round fits" in lines[0]
    assert not (tmp_path / "none").exists()


def test_a_system_or_plan_that_does_not_fit_the_federation_is_refused(tiny_bert, polarity_dir, tmp_path):
    two = write_system(tmp_path / "two.yaml", tiny_bert, polarity_dir, devices=2, samples=(80, 112))
    other = write_system(tmp_path / "other.yaml", tiny_bert, polarity_dir, latency_s=5e2)
    epochs = write_system(tmp_path / "epochs.yaml", tiny_bert, polarity_dir, local_epochs=1.0)
    plan = tmp_path / "plan.json"
    runner = CliRunner()
    system = write_system(tmp_path / "mine.yaml", tiny_bert, polarity_dir)
    r = runner.invoke(app, ["optimize", str(system), "--method", "none", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    base = ["run", "--quiet", "--set", "task=sst2", "--set", f"model={tiny_bert}", "--set", "data.source=glue_dir",
            "--set", f"data.glue_dir={polarity_dir}", "--set", "federation.local_epochs=2", "--set", "lora.r=4",
            "--set", "lora.alpha=8", "--set", "train.max_length=32", "--set", "federation.devices=3"]
    cases = [(["--set", f"system={two}"], "describes 2 devices but federation.devices is 3"),
             (["--set", f"system={other}", "--set", f"plan={plan}"], "was made for another system"),
             (["--set", f"system={epochs}"], "prices 1 local epochs a round but federation.local_epochs is 2"),
             (["--set", "federation.time_budget_s=10"], "need a system"),
             (["--set", f"system={tmp_path / 'missing.yaml'}"], "missing.yaml"),
             # the plan, the clock and the run must speak of the same samples and bytes (issue 29, item 7)
             (["--set", f"system={system}", "--set", "data.max_train_samples=100"],
              "plans 192 training samples (20-112 a device) but the run trains on 100"),
             (["--set", f"system={system}", "--set", "federation.partition=dirichlet"],
              "plans 20 samples on device 0 but the dirichlet split gives it"),
             (["--set", f"system={system}", "--set", "lora.r=8"], "prices adapter values Q"),
             (["--set", f"system={system}", "--set", "federation.comm_dtype=bfloat16"],
              "prices bits a value 32 but the run sends 16")]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = runner.invoke(app, [*base, "--out", str(out), *extra])
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], (extra, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()


def test_a_system_fills_what_the_config_leaves_unsaid_and_the_config_wins(tiny_bert, polarity_dir, tmp_path):
    """`fedlodrop compare system.yaml` and `run --set system=...` take the system's devices, local
    epochs and training samples where the config says nothing; a value the config gives is kept
    (and then checked against the system)."""
    from fedlodrop.run.settings import load_config

    two = write_system(tmp_path / "two.yaml", tiny_bert, polarity_dir, devices=2, samples=(80, 112),
                       local_epochs=3.0)
    base = ["task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={polarity_dir}"]
    cfg = load_config(overrides=[*base, f"system={two}"])
    assert (cfg.federation.devices, cfg.federation.local_epochs, cfg.data.max_train_samples) == (2, 3.0, 192)
    same = load_config(overrides=base, system=two)  # compare's way: the system as an argument
    assert same.system.file == cfg.system.file and same.federation.devices == 2
    mine = load_config(overrides=[*base, f"system={two}", "federation.devices=5", "data.max_train_samples=50"])
    assert (mine.federation.devices, mine.data.max_train_samples, mine.federation.local_epochs) == (5, 50, 3.0)
    plain = load_config(overrides=base)
    assert plain.federation.devices != 2 and plain.system.file is None
    # a whole config (a run folder's) does not read its system: a moved system file leaves it readable
    whole = cfg.model_dump(mode="json")
    two.unlink()
    assert load_config(tree=whole) == cfg


def _hand_system(**cell):
    """Two devices with their channel gains, cycles and payload given: every number of a round is
    then a hand computation."""
    from fedlodrop.planning.spec import SystemSpec

    return SystemSpec.model_validate({
        "devices": [{"samples": 100, "channel_gain": 1e-10, "p_max_w": 0.2, "f_max_hz": 1e9, "energy_budget_j": 5.0},
                    {"samples": 300, "channel_gain": 4e-12, "p_max_w": 0.1, "f_max_hz": 2e9, "energy_budget_j": 5.0}],
        "cell": {"bandwidth_hz": 4e6, "noise_dbm_per_hz": -174.0, **cell},
        "round": {"latency_s": 10.0, "local_epochs": 2.0, "cycles_per_sample": 1e6, "adapter_cycles_per_sample": 2e5,
                  "kappa": 1e-28},
        "payload": {"model": None, "adapter_values": 10_000, "head_values": 500, "bits_per_value": 32},
    })


@pytest.mark.parametrize("downlink", [False, True])
def test_every_term_of_a_devices_round_is_the_hand_computation(downlink):
    """Issue 29, item 8: compute, uplink and downlink time, and the energy of each, from the system's
    raw numbers (not the planner's helpers), for a device at rate 0.25 on 2 MHz at 0.15 W and 0.8 GHz."""
    import numpy as np

    from fedlodrop.planning import system_model
    from fedlodrop.run.meter import Meter, Resources

    spec = _hand_system(**({"downlink_bandwidth_hz": 6e6, "server_power_w": 10.0} if downlink else {}))
    meter = Meter(system_model(spec), Resources(np.array([2e6, 2e6]), np.array([0.15, 0.1]), np.array([8e8, 2e9]),
                                                "test"), local_epochs=2.0)
    cost = meter.price(0, 0.25, 100, uplink_bytes=31_000, downlink_bytes=45_000)
    n0 = 10 ** ((-174.0 - 30) / 10)  # W/Hz
    cycles = 2.0 * 100 * (1e6 + 0.75 * 2e5)  # tau D (c0 + (1 - gamma) c1) = 2.3e8
    assert cost.compute_s == pytest.approx(cycles / 8e8, rel=1e-12) and cycles / 8e8 == pytest.approx(0.2875)
    up_rate = 2e6 * math.log2(1 + 0.15 * 1e-10 / (n0 * 2e6))
    assert cost.upload_s == pytest.approx(8 * 31_000 / up_rate, rel=1e-12)
    dn = 8 * 45_000 / (6e6 / 2 * math.log2(1 + 10.0 * 1e-10 / (n0 * 6e6))) if downlink else 0.0
    assert cost.downlink_s == pytest.approx(dn, rel=1e-12)
    assert cost.latency_s == pytest.approx(dn + cycles / 8e8 + 8 * 31_000 / up_rate, rel=1e-12)
    # energy: kappa cycles f^2 for compute, p T_up for the upload; receiving costs the device nothing here
    assert cost.energy_j == pytest.approx(1e-28 * cycles * 8e8**2 + 0.15 * 8 * 31_000 / up_rate, rel=1e-12)


def test_a_device_of_a_lower_rank_is_priced_for_its_share():
    """Device classes (issue 30): a rank-1 device of a rank-4 adapter sends and computes a quarter of
    the adapter's part, by hand; the head and the backbone's cycles stay whole."""
    import numpy as np

    from fedlodrop.planning import system_model
    from fedlodrop.run.meter import Meter, Resources

    spec = _hand_system()
    spec.devices[1].rank = 1  # payload.rank is 4
    m = system_model(spec)
    assert float(m.uplink_bits(0.25, 0)) == (0.75 * 10_000 + 500) * 32
    assert float(m.uplink_bits(0.25, 1)) == (0.75 * 10_000 / 4 + 500) * 32
    assert float(m.cycles(0.25, 1)) == pytest.approx(2.0 * 300 * (1e6 + 0.75 * 2e5 / 4), rel=1e-12)
    meter = Meter(m, Resources(np.array([2e6, 2e6]), np.array([0.15, 0.1]), np.array([8e8, 2e9]), "hand"),
                  local_epochs=2.0)
    cost = meter.price(1, 0.25, 300, 1_000, 0)
    assert cost.compute_s == pytest.approx(2.0 * 300 * (1e6 + 0.75 * 2e5 / 4) / 2e9, rel=1e-12)
    with pytest.raises(Exception, match="exceeds payload.rank"):
        spec.model_validate({**spec.model_dump(), "devices": [{**spec.devices[0].model_dump(), "rank": 8}]})


@pytest.mark.parametrize("method", ["bnb", "psca", "fixed"])
@pytest.mark.parametrize("ranks", [None, (4, 1)])
def test_the_meter_prices_a_plan_as_the_planner_does(method, ranks):
    """The planner's latency and energy of each device and the meter's on the same plan (its rates,
    bandwidth, power and frequency, the bytes it planned) agree to 1e-9, downlink included."""
    import numpy as np

    from fedlodrop.planning import optimize, system_model
    from fedlodrop.run.meter import Meter, Resources

    spec = _hand_system(downlink_bandwidth_hz=6e6, server_power_w=10.0)
    spec.round.latency_s = 0.6
    spec.devices[1].energy_budget_j = 0.25  # the far device's energy binds
    for dev, rank in zip(spec.devices, ranks or ()):  # device classes: the far device holds rank 1 of 4
        dev.rank = rank
    plan = optimize(spec, method, **({"gamma": "best"} if method == "fixed" else {}))
    m = system_model(spec)
    meter = Meter(m, Resources(np.array([d.bandwidth_hz for d in plan.devices]), np.array([d.power_w for d in plan.devices]),
                               np.array([d.frequency_hz for d in plan.devices]), method), local_epochs=2.0)
    assert plan.feasible and any(d.binding for d in plan.devices)
    for k, d in enumerate(plan.devices):
        up_bytes = float(m.uplink_bits(d.gamma, k)) / 8
        cost = meter.price(k, d.gamma, int(m.D[k]), up_bytes, float(m.downlink_bits(d.gamma, k)) / 8)
        assert cost.latency_s == pytest.approx(d.latency_s, rel=1e-9)
        assert cost.energy_j == pytest.approx(d.energy_j, rel=1e-9)
        assert (cost.compute_s, cost.upload_s, cost.downlink_s) == pytest.approx(
            (d.compute_s, d.upload_s, d.downlink_s), rel=1e-9)
        assert meter.violation(k, cost) is None  # a plan that fits fits on the meter too


@pytest.mark.slow  # trains the 2-layer MiniLM
def test_a_plan_that_asks_only_the_devices_that_fit_still_learns(mini2, polarity_dir, tmp_path):
    """compare's fit-only baseline on the engine: a limit below what the 112-sample device needs to
    compute alone, so the plan leaves it out; the other two train every round, and the model learns."""
    from fedlodrop.planning import load_system, system_model
    from fedlodrop.studies.comparison import REGISTRY

    from fedlodrop.planning.feasibility import min_latency_limit

    from fedlodrop.planning import save_system

    spec = load_system(write_system(tmp_path / "tight.yaml", mini2, polarity_dir, samples=(90, 90, 12)))
    spec.devices[2].f_max_hz = spec.devices[2].f_max_hz / 100  # an old phone: its compute alone takes long
    pair = min_latency_limit(system_model(spec.model_copy(update={"devices": spec.devices[:2]})), 0.0)
    alone = float(system_model(spec).cycles(0.0, 2) / spec.devices[2].f_max_hz)
    assert pair < alone  # devices 0 and 1 sharing the band fit where device 2 alone cannot
    spec.round.latency_s = (pair + alone) / 2
    tight = tmp_path / "tight.yaml"
    save_system(spec, tight)
    spec = load_system(tight)
    plan = REGISTRY["fit-only"].plan(spec, system_model(spec), print)
    assert plan.members == [0, 1]  # the 112-sample device cannot compute its round in time
    plan.save(tmp_path / "plan.json")
    cfg = _cfg(mini2, polarity_dir, tight, **{"plan": str(tmp_path / "plan.json"), "dropout.rate": 0.0,
                                              "federation.rounds": 5})
    summary = engine.run(cfg, tmp_path / "run", show_progress=False)
    rows = RunFolder(tmp_path / "run").records()
    assert all(r.participants == [0, 1] and not r.failures for r in rows)
    assert summary.system.devices_dropped_for_limits == 0
    assert rows[-1].train_loss < 0.75 * rows[0].train_loss and summary.final["accuracy"] >= 0.8


@pytest.mark.parametrize("method", ["bnb", "psca", "none"])
def test_an_int8_uplink_is_priced_at_its_own_bits(method):
    """federation.uplink int8 (issue 29, item 2): 8 bits a value up plus the scales, the downlink still
    at the communication dtype's 32, by hand. A limit float32 uploads cannot meet at rate 0 is met
    with int8 ones; the plans need less dropout than float32's and the meter prices them as the
    planner does."""
    import numpy as np

    from fedlodrop.planning import InfeasibleError, optimize, system_model
    from fedlodrop.run.meter import Meter, Resources

    def spec_of(int8: bool, latency_s: float):
        spec = _hand_system(downlink_bandwidth_hz=6e6, server_power_w=10.0)
        spec.round.cycles_per_sample, spec.round.adapter_cycles_per_sample = 1e4, 2e3  # the radio dominates
        spec.round.latency_s = latency_s
        if int8:
            spec.payload.uplink_bits_per_value, spec.payload.uplink_extra_bits = 8, 320
        return spec

    m = system_model(spec_of(True, 0.025))
    assert float(m.uplink_bits(0.25, 1)) == (0.75 * 10_000 + 500) * 8 + 320
    assert float(m.downlink_bits(0.25, 1)) == (0.75 * 10_000 + 500) * 32
    limit = 0.025 if method == "none" else 0.015
    if method == "none":  # rate 0 meets 0.025 s only with int8 uploads
        with pytest.raises(InfeasibleError):
            optimize(spec_of(False, limit), method)
    else:
        wide = optimize(spec_of(False, limit), method)
    plan = optimize(spec_of(True, limit), method)
    m = system_model(spec_of(True, limit))
    assert plan.feasible
    if method != "none":
        assert max(plan.gammas) < min(wide.gammas) - 0.05  # fewer bytes up: less to drop
    meter = Meter(m, Resources(np.array([d.bandwidth_hz for d in plan.devices]), np.array([d.power_w for d in plan.devices]),
                               np.array([d.frequency_hz for d in plan.devices]), method), local_epochs=2.0)
    for k, d in enumerate(plan.devices):
        up_bytes = ((1 - d.gamma) * 10_000 + 500) * 8 / 8 + 40  # one byte a value, 4 a scale
        cost = meter.price(k, d.gamma, int(m.D[k]), up_bytes, float(m.downlink_bits(d.gamma, k)) / 8)
        assert (cost.latency_s, cost.energy_j) == pytest.approx((d.latency_s, d.energy_j), rel=1e-9)
        assert meter.violation(k, cost) is None
