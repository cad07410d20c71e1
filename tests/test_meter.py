"""The simulated clock and meter (fedlodrop.run.meter): every round of a run with a system is priced
on SPEC 3's formulas from what each device really did; limits are enforced like a deployment
would; run budgets end training before the round that would exceed them; bad input is refused."""

from __future__ import annotations

import math

import pytest
from conftest import learning_cfg
from flower_helpers import FakeGrid
from typer.testing import CliRunner

from fedlodrop.run import engine
from fedlodrop.cli import app
from fedlodrop.run.experiment import build
from fedlodrop.flower import app as flower_app
from fedlodrop.planning import random_system, save_system
from fedlodrop.run.folder import RunFolder, compare
from fedlodrop.round.server import Server, ServerState

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


def write_system(path, model, devices=3, latency_s=1e3, energy_j=1e3, samples=(20, 60, 112), local_epochs=2.0):
    """A random cell (seed 1) for `model`, with the given limits and per-device sample counts;
    2 local epochs, as `learning_cfg` trains."""
    spec = random_system(devices, seed=1, model=model, samples_total=sum(samples), latency_s=latency_s,
                         local_epochs=local_epochs)
    for dev, n in zip(spec.devices, samples):
        dev.samples, dev.energy_budget_j = n, energy_j
    save_system(spec, path)
    return path


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
    system = write_system(tmp_path / "system.yaml", tiny_bert)
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
    loose = write_system(tmp_path / "loose.yaml", mini2)
    late = device_latencies(_cfg(mini2, polarity_dir, loose))
    slow = max(range(3), key=late.__getitem__)
    limit = (max(late) + sorted(late)[-2]) / 2  # between the slowest device and the next
    tight = write_system(tmp_path / "tight.yaml", mini2, latency_s=limit)
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
    system = write_system(tmp_path / "system.yaml", tiny_bert)
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
                                      "--set", "federation.local_epochs=2",
                                      "--set", f"federation.energy_budget_j={1e-12}"])
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "energy_budget_j" in lines[0] and "no round fits" in lines[0]
    assert not (tmp_path / "none").exists()


def test_a_system_or_plan_that_does_not_fit_the_federation_is_refused(tiny_bert, polarity_dir, tmp_path):
    two = write_system(tmp_path / "two.yaml", tiny_bert, devices=2, samples=(40, 50))
    other = write_system(tmp_path / "other.yaml", tiny_bert, latency_s=5e2)
    epochs = write_system(tmp_path / "epochs.yaml", tiny_bert, local_epochs=1.0)
    plan = tmp_path / "plan.json"
    runner = CliRunner()
    r = runner.invoke(app, ["optimize", str(write_system(tmp_path / "mine.yaml", tiny_bert)), "--method", "none",
                            "--out", str(plan)])
    assert r.exit_code == 0, r.output
    base = ["run", "--quiet", "--set", "task=sst2", "--set", f"model={tiny_bert}", "--set", "data.source=glue_dir",
            "--set", f"data.glue_dir={polarity_dir}", "--set", "federation.local_epochs=2"]
    cases = [(["--set", f"system={two}"], "describes 2 devices but federation.devices is 3"),
             (["--set", f"system={other}", "--set", f"plan={plan}"], "was made for another system"),
             (["--set", f"system={epochs}"], "prices 1 local epochs a round but federation.local_epochs is 2"),
             (["--set", "federation.time_budget_s=10"], "need a system"),
             (["--set", f"system={tmp_path / 'missing.yaml'}"], "missing.yaml")]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = runner.invoke(app, [*base, "--out", str(out), *extra])
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], (extra, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()
