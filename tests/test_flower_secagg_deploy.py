"""Secure aggregation in a real deployment on loopback: a SuperLink with TLS and SuperNode
authentication, three registered SuperNodes, `fedlodrop flower run` with
`privacy.secure_aggregation`. Every SecAgg+ stage crosses the SuperLink as real messages (the
client mod keeps its keys in the SuperNode's context between them); the model equals the same
round in the clear (`fedlodrop run`) within the quantisation bound. Every process is stopped by
PID at the end."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import learning_cfg
from flower_helpers import HANG_S, assert_no_processes_left, fedlodrop_cmd, metrics, subprocess_env, write_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlodrop import secagg
from fedlodrop.cli import app
from fedlodrop.flower import launch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower-secagg-deploy")]


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_secure_aggregation_deployment_equals_the_plain_round(tiny_bert, polarity_dir, tmp_path):
    root = tmp_path
    ws = launch.Workspace.create(root)
    ws.env = launch.flower_env(ws.flwr_home, base=subprocess_env(root))
    try:
        _cli("flower", "certs", "--out", root / "certs", "--host", "127.0.0.1")
        _cli("flower", "keys", "--out", root / "keys", "--devices", 3)
        port = launch.free_port()
        link = ws.spawn("superlink", fedlodrop_cmd("flower", "superlink", "--certs", root / "certs",
                                                   "--host", "127.0.0.1", "--port", port))
        address, ca = f"127.0.0.1:{port}", root / "certs" / "ca.crt"
        launch.wait_http(address, ca, timeout=HANG_S, proc=link)
        keys = [root / "keys" / f"device{k}_key.pub" for k in range(3)]
        reg = subprocess.run(fedlodrop_cmd("flower", "register", "--superlink", address, "--ca", ca, *keys),
                             env=ws.env, capture_output=True, text=True, timeout=HANG_S, check=False)
        assert reg.returncode == 0, reg.stderr
        for k in range(3):
            ws.spawn(f"node{k}", fedlodrop_cmd("flower", "supernode", "--superlink", address, "--ca", ca,
                                               "--key", root / "keys" / f"device{k}_key", "--device", k,
                                               "--devices", 3, "--port", launch.free_port()))
        over = {"train.threads": 1, "federation.rounds": 1, "federation.local_epochs": 1,
                "federation.aggregation": "masked", "federation.weighting": "uniform", "dropout.rate": 0.3,
                "data.train_eval_samples": 16, "privacy.secagg_clip_range": 1.0,
                "flower.round_timeout_s": 600.0, "flower.discovery_timeout_s": 600.0, "flower.poll_interval_s": 0.1}
        plain = write_config(learning_cfg(tiny_bert, polarity_dir, **over), root / "plain.yaml")
        secure = write_config(learning_cfg(tiny_bert, polarity_dir, **over, **{"privacy.secure_aggregation": True}),
                              root / "secure.yaml")
        result = CliRunner().invoke(app, ["run", "--quiet", "--config", str(plain), "--out", str(root / "plain")])
        assert result.exit_code == 0, result.output
        res = subprocess.run(fedlodrop_cmd("flower", "run", "--config", secure, "--superlink", address, "--ca", ca,
                                           "--out", root / "secure"),
                             env=ws.env, capture_output=True, text=True, timeout=HANG_S, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        left = ws.stop_all()
        assert not left, f"processes left running: {left}"
        assert_no_processes_left(root)
    [row] = metrics(root / "secure")
    assert [d.status for d in row.devices] == ["ok"] * 3 and row.flower["secagg"]["devices_in_sum"] == 3
    assert all(d.uplink_bytes > 0 for d in row.devices)
    a, b = (load_file(str(root / name / "adapter.safetensors")) for name in ("plain", "secure"))
    bound, eps = secagg.error_bound(3, 1.0), torch.finfo(torch.float32).eps
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= bound + 8 * eps * float(a[k].abs().max()), k
