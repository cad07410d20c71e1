"""The int8 uplink (`federation.uplink: int8`, issue 29 item 2): a device's update travels as int8 with a
float32 scale per tensor, stochastically rounded; the server adds it to what it sent. Unbiased, within
one quantisation step, the same on both engines, priced by the planner and the meter at the bytes
that travel, and the federation still learns."""

from __future__ import annotations

import pytest
import torch
from conftest import learning_cfg, run_system
from flower_helpers import FakeGrid
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.flower import app as flower_app
from fedlodrop.lora.messages import SCALE, Int8Update
from fedlodrop.run import engine
from fedlodrop.run.folder import RunFolder, compare

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    start = {"m.lora_A": torch.randn(4, 12, generator=g), "m.lora_B": torch.zeros(10, 4), "head": torch.randn(2, 8, generator=g)}
    end = {"m.lora_A": start["m.lora_A"] + 0.01 * torch.randn(4, 12, generator=g),
           "m.lora_B": 0.02 * torch.randn(10, 4, generator=g), "head": start["head"] + 0.3 * torch.randn(2, 8, generator=g)}
    return start, end


def test_int8_update_is_within_one_step_and_unbiased():
    """Each value comes back within one step (max |update| / 127) of what the device trained; over
    many draws the mean error vanishes, where rounding to nearest would keep a fixed bias."""
    u = Int8Update()
    start, end = _tensors()
    sent = u.encode(end, start, seed=3)
    assert sent.keys() == {k for key in end for k in (key, key + SCALE)}
    assert all(sent[k].dtype == torch.int8 for k in end)
    assert u.nbytes(end) == sum(t.numel() * t.element_size() for t in sent.values()) == sum(t.numel() for t in end.values()) + 4 * 3
    assert all(torch.equal(sent[k], v) for k, v in u.encode(end, start, seed=3).items())  # the seed decides
    back = u.decode(sent, start)
    for key in end:
        step = float((end[key] - start[key]).abs().max()) / 127
        assert float((back[key] - end[key]).abs().max()) <= step * (1 + 1e-5)
    # a value a third of a step from a grid point: nearest rounding always lands on the grid point
    start = {"x": torch.zeros(1000)}
    end = {"x": torch.full((1000,), 1 / 3)}
    end["x"][0] = 127.0  # the scale: one step is 1
    mean = torch.stack([u.decode(u.encode(end, start, seed=s), start)["x"][1:] for s in range(50)]).mean()
    assert float(mean) == pytest.approx(1 / 3, abs=0.01)


def test_the_int8_uplink_is_refused_with_privacy(tiny_bert, polarity_dir, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--out", str(out), "--set", "task=sst2", "--set", f"model={tiny_bert}",
                                 "--set", "data.source=glue_dir", "--set", f"data.glue_dir={polarity_dir}",
                                 "--set", "federation.uplink=int8", "--set", "privacy.dp=true",
                                 "--set", "privacy.noise_multiplier=1.0"])
    assert r.exit_code == 2, r.output
    assert "federation.uplink int8" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_system_priced_for_float32_uplink_refuses_an_int8_run(tiny_bert, polarity_dir, tmp_path):
    """A plan made for 32-bit uploads would be wrong about every int8 round: refused in one line."""
    cfg = learning_cfg(tiny_bert, polarity_dir)
    system = run_system(tmp_path / "sys.yaml", cfg)
    r = CliRunner().invoke(app, ["run", "--config", _write(cfg, tmp_path), "--out", str(tmp_path / "run"),
                                 "--set", f"system.file={system}", "--set", "federation.uplink=int8"])
    assert r.exit_code == 2, r.output
    assert "uplink bits a value 32 but the run sends 8" in r.output
    assert not (tmp_path / "run").exists()


def _write(cfg, tmp_path):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def test_int8_uploads_are_priced_and_identical_on_both_engines(tiny_bert, polarity_dir, tmp_path):
    """The same int8 run in process and on Flower (its wire carries int8) ends bit-identical; every
    device's recorded upload is one byte a value and four a tensor, and the clock prices those bytes."""
    import math

    from fedlodrop.planning import load_system, system_model

    cfg = learning_cfg(tiny_bert, polarity_dir, **{"federation.uplink": "int8", "federation.rounds": 2,
                                                    "dropout.rate": 0.3, "train.threads": 1,
                                                    "data.train_eval_samples": 16})
    system = run_system(tmp_path / "system.yaml", cfg, latency_s=1e3, energy_j=1e3)
    spec = load_system(system)
    assert spec.payload.uplink_bits_per_value == 8 and spec.payload.uplink_extra_bits == 32 * 10  # 4 modules x (A, B), the head's weight and bias
    from fedlodrop.run.settings import with_overrides

    cfg = with_overrides(cfg, {"system.file": str(system), "flower.discovery_timeout_s": 1.0,
                               "flower.round_timeout_s": 1.0, "flower.poll_interval_s": 0.01})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    rc = {"config-json": cfg.model_dump_json(), "run-dir": str(tmp_path / "flower")}
    flower_app.serve(FakeGrid(cfg.federation.devices, rc), rc)
    assert compare(tmp_path / "inproc", tmp_path / "flower") == (0.0, [])
    m = system_model(spec)
    for r in RunFolder(tmp_path / "inproc").records():
        for d in r.devices:
            assert d.uplink_bytes == d.kept_values + m.head + 4 * 10
            assert d.downlink_bytes >= 4 * (d.kept_values + m.head)  # float32 down
            b, p, k = m.B_tot / m.K, m.P[d.device], d.device
            up = 8 * d.uplink_bytes / (b * math.log2(1 + p * m.h[k] / (m.N0 * b)))
            assert d.system.upload_s == pytest.approx(up, rel=1e-9)


@pytest.mark.slow  # trains the 2-layer MiniLM 5 rounds, twice
def test_a_federation_learns_with_an_int8_uplink(mini2, polarity_dir, tmp_path):
    """Several rounds with dropout and int8 uploads: the loss falls and accuracy ends well above the
    majority class, within a few points of the same run with float32 uploads."""
    cfg = learning_cfg(mini2, polarity_dir, **{"dropout.rate": 0.3, "federation.uplink": "int8"})
    summary = engine.run(cfg, tmp_path / "int8", show_progress=False)
    rows = RunFolder(tmp_path / "int8").records()
    assert rows[-1].train_loss < 0.75 * rows[0].train_loss
    assert summary.final["accuracy"] >= 0.8
    full = engine.run(learning_cfg(mini2, polarity_dir, **{"dropout.rate": 0.3}), tmp_path / "fp32", show_progress=False)
    assert abs(summary.final["accuracy"] - full.final["accuracy"]) <= 0.06
    assert sum(d.uplink_bytes for r in rows for d in r.devices) < 0.3 * full.uplink_bytes_total
