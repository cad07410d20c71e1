"""Deployment on loopback with the `fedlodrop flower` wrappers: certificates and keys made here, a
SuperLink with TLS and SuperNode authentication, two registered SuperNodes (partition-id 0 and
1), runs submitted with `fedlodrop flower run`. The result equals `fedlodrop run` bit for bit; a
SuperNode killed mid-round is left out; with too few devices the run fails with one line.

The tests share one SuperLink and its SuperNodes; the fault test kills a SuperNode, so it comes
last. Every process is stopped by PID at the end and none may be left."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import learning_cfg
from flower_helpers import (
    assert_no_processes_left,
    assert_same_run,
    fedlodrop_cmd,
    metrics,
    subprocess_env,
    write_config,
)
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.flower import launch


@dataclass
class Federation:
    root: Path
    ws: launch.Workspace
    address: str
    ca: Path
    nodes: list[launch.Proc]

    def run(self, cfg_file: Path, out: Path) -> list[str]:
        return fedlodrop_cmd("flower", "run", "--config", cfg_file, "--superlink", self.address,
                             "--ca", self.ca, "--out", out)


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    ws = launch.Workspace.create(root)
    ws.env = launch.flower_env(ws.flwr_home, base=subprocess_env(root))
    try:
        _cli("flower", "certs", "--out", root / "certs", "--host", "127.0.0.1")
        _cli("flower", "keys", "--out", root / "keys", "--devices", 3)  # device2_key is never registered
        port = launch.free_port()
        link = ws.spawn("superlink", fedlodrop_cmd("flower", "superlink", "--certs", root / "certs",
                                                   "--host", "127.0.0.1", "--port", port))
        address, ca = f"127.0.0.1:{port}", root / "certs" / "ca.crt"
        launch.wait_http(address, ca, proc=link)
        keys = [root / "keys" / f"device{k}_key.pub" for k in range(2)]
        reg = subprocess.run(fedlodrop_cmd("flower", "register", "--superlink", address, "--ca", ca, *keys),
                             env=ws.env, capture_output=True, text=True, timeout=120, check=False)
        assert reg.returncode == 0 and reg.stderr.count("registered") == 2, reg.stderr
        nodes = [
            ws.spawn(f"node{k}", fedlodrop_cmd("flower", "supernode", "--superlink", address, "--ca", ca,
                                               "--key", root / "keys" / f"device{k}_key", "--device", k,
                                               "--devices", 2, "--port", launch.free_port()))
            for k in range(2)
        ]
        yield Federation(root, ws, address, ca, nodes)
    finally:
        left = ws.stop_all()
        assert not left, f"processes left running: {left}"
        assert_no_processes_left(root)


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.devices": 2, "federation.rounds": 2, "federation.local_epochs": 1,
            "federation.aggregation": "fedex", "dropout.rate": 0.3, "data.train_eval_samples": 16,
            "flower.round_timeout_s": 120.0, "flower.discovery_timeout_s": 120.0, "flower.poll_interval_s": 0.1}
    return learning_cfg(model, glue, **(base | over))


def test_deployment_with_tls_and_supernode_auth_equals_fedlodrop_run(federation, tiny_bert, polarity_dir, tmp_path):
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir), tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["run", "--quiet", "--config", str(cfg_file), "--out", str(tmp_path / "inproc")])
    assert result.exit_code == 0, result.output
    t0 = time.monotonic()
    res = subprocess.run(federation.run(cfg_file, tmp_path / "flower"), env=federation.ws.env,
                         capture_output=True, text=True, timeout=420, check=False)
    print(f"deployment run took {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    assert all(r["flower"]["uplink_count_bytes"] > r["uplink_bytes"] > 0 for r in rows)
    assert "submitted run" in res.stderr and "final accuracy" in res.stdout


def test_only_registered_supernodes_may_join(federation):
    """SuperNode authentication is on: a SuperNode with a key the SuperLink does not know, or with
    no key, is turned away (the two registered ones are serving the other tests)."""
    expected = {"unregistered": "Failed to activate SuperNode",
                "keyless": "SuperNode authentication is enabled. All SuperNodes must be registered"}
    for name, key in (("unregistered", federation.root / "keys" / "device2_key"), ("keyless", None)):
        cmd = launch.supernode_command(federation.address, 0, 2, launch.free_port(), federation.ca, key,
                                       max_retries=1)
        stranger = federation.ws.spawn(name, cmd)
        try:
            stranger.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {name} SuperNode stayed connected")
        log = stranger.log.read_text()
        assert stranger.popen.returncode != 0 and expected[name] in log, log


def _wait_for(text: str, log: Path, start: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text()[start:]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s")


def test_a_killed_supernode_is_left_out_then_too_few_devices_fail(federation, tiny_bert, polarity_dir, tmp_path):
    """Kill device 1's SuperNode (SIGKILL, by PID) once it has its round-2 message: round 2 ends
    at flower.round_timeout_s with device 0 alone. A second run, min_devices 2, finds no node for
    device 1: it fails with one line and exit code 1."""
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir, **{"flower.round_timeout_s": 15.0}), tmp_path / "cfg.yaml")
    node = federation.nodes[1]
    start = len(node.log.read_text())
    t0 = time.monotonic()
    proc = subprocess.Popen(federation.run(cfg_file, tmp_path / "flower"), env=federation.ws.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("ROUND 2]", node.log, start)
        _wait_for("Receiving: train message", node.log, start + node.log.read_text()[start:].index("ROUND 2]"))
        node.popen.send_signal(signal.SIGKILL)
        node.popen.wait(timeout=30)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"run with a killed SuperNode took {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, out + err
    r1, r2 = metrics(tmp_path / "flower")
    assert r1["failures"] == []
    assert r2["failures"] == [{"device": 1, "reason": "no reply within flower.round_timeout_s=15 s"}]
    assert [d["status"] for d in r2["devices"]] == ["ok", "left out"]
    assert r2["uplink_bytes"] == r2["devices"][0]["uplink_bytes"] > 0
    assert r2["wall_s"] < 15.0 + 25.0  # the round ended at its timeout (plus evaluation), not later
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["devices_left_out"] == 1

    strict = write_config(_cfg(tiny_bert, polarity_dir, **{"federation.min_devices": 2,
                                                          "flower.discovery_timeout_s": 8.0}), tmp_path / "strict.yaml")
    res = subprocess.run(federation.run(strict, tmp_path / "strict"), env=federation.ws.env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [("error: round 1: 1 of 2 devices returned a usable update, federation.min_devices is 2 "
                       "(device 1: no SuperNode online for this device)")], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "strict" / "summary.json").exists()
