"""Faults in the in-process engine: a device that diverges is left out of the round and logged;
a round in which too few devices succeed fails with one line, exit 1, the checkpoint intact."""

import math

import torch
from conftest import diverging
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlodrop.run import inprocess
from fedlodrop.cli import app
from fedlodrop.round.client import device_step
from fedlodrop.run.folder import RunFolder


def _args(model, glue_dir, out, rounds=2, *extra):
    return ["run", "--quiet", "--out", str(out), "--set", "task=sst2", "--set", f"model={model}",
            "--set", "data.source=glue_dir", "--set", f"data.glue_dir={glue_dir}", "--set", "lora.r=4",
            "--set", "train.max_length=32", "--set", f"federation.rounds={rounds}",
            "--set", "dropout.rate=0.3", "--set", "data.train_eval_samples=16", *extra]


def test_a_diverging_device_is_left_out_and_logged(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(inprocess, "device_step", diverging({1}))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, _args(tiny_bert, sst2_dir, out))
    assert result.exit_code == 0, result.output
    rows = RunFolder(out).records()
    for row in rows:
        assert [f["device"] for f in row.failures] == [1]
        assert "non-finite" in row.failures[0]["reason"]
        assert [d.status for d in row.devices] == ["ok", "left out", "ok"]
        assert math.isfinite(row.train_loss) and math.isfinite(row.eval_loss)
    adapter = load_file(str(out / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert RunFolder(out).summary().devices_left_out == 2
    assert "left out" in result.stderr


def test_a_round_with_too_few_devices_fails_and_keeps_the_checkpoint(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(inprocess, "device_step", diverging({0, 1}, from_round=1))
    out = tmp_path / "r"
    result = CliRunner().invoke(app, _args(tiny_bert, sst2_dir, out, 3, "--set", "federation.min_devices=2"))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "round 2" in lines[0] and "min_devices is 2" in lines[0], result.stderr
    assert "Traceback" not in result.output
    folder = RunFolder(out)
    assert folder.rounds_done() == 1 and len(folder.records()) == 1 and not folder.finished
    # the fault gone, the run continues from round 2
    monkeypatch.setattr(inprocess, "device_step", device_step)
    result = CliRunner().invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert folder.summary().rounds == 3
