"""`fedlodrop flower` without a run: bad input is one line and exit 2 with nothing started or
written; certificates and keys are what Flower's TLS and authentication flags take; the app
folder passes Flower's own check; a workspace stops every process it started."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
import time
import tomllib

import pytest
import yaml
from flower_helpers import HANG_S
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.flower.federation import FlowerFailure, outcome
from fedlodrop.run.settings import load_config
from fedlodrop.errors import RoundFailed, UserError
from fedlodrop.flower import launch
from fedlodrop.flower.app import ROUND_FAILED, USER_ERROR
from fedlodrop.studies.sweep import config_differences


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(result, code=2):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """The CLI's temporary workspaces go to tmp_path/tmp, so a test can see none was made."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def test_simulate_refuses_bad_input_before_starting_anything(tmp_path, tmpdir_here):
    line = _one_error_line(_invoke("flower", "simulate", "--set", "flower.round_timeout_s=0", "--out", tmp_path / "r"))
    assert "flower.round_timeout_s" in line
    line = _one_error_line(_invoke("flower", "simulate", "--set", "flower.nope=1", "--out", tmp_path / "r"))
    assert "unknown config key 'flower.nope'" in line
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    line = _one_error_line(_invoke("flower", "simulate", "--out", tmp_path / "done"))
    assert "already holds a finished run" in line
    assert not (tmp_path / "r").exists() and list(tmpdir_here.iterdir()) == []


def test_run_and_the_wrappers_refuse_bad_input(tmp_path, tmpdir_here):
    line = _one_error_line(_invoke("flower", "run", "--superlink", "127.0.0.1:1", "--ca", tmp_path / "no.crt",
                                   "--out", tmp_path / "r"))
    assert "--ca: file not found" in line
    line = _one_error_line(_invoke("flower", "superlink", "--certs", tmp_path))
    assert "--certs: file not found" in line and "ca.crt" in line
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "k").write_text("x")
    line = _one_error_line(_invoke("flower", "supernode", "--superlink", "127.0.0.1:1", "--ca", tmp_path / "ca.crt",
                                   "--key", tmp_path / "k", "--device", 2, "--devices", 2))
    assert "--device 2 is not below --devices 2" in line
    line = _one_error_line(_invoke("flower", "supernode", "--superlink", "127.0.0.1:1", "--ca", tmp_path / "ca.crt",
                                   "--key", tmp_path / "k", "--device", 0, "--devices", 2, "--heartbeat-s", 5))
    assert "--heartbeat-s 5 is outside [10, 1800]" in line
    node = ["flower", "supernode", "--superlink", "127.0.0.1:1", "--ca", tmp_path / "ca.crt", "--key", tmp_path / "k",
            "--device", 0, "--devices", 2]
    line = _one_error_line(_invoke(*node, "--data", tmp_path / "mine.csv"))
    assert "--data: no such file or folder" in line and "mine.csv" in line
    (tmp_path / "mine.csv").write_text("")
    assert "--data" in (line := _one_error_line(_invoke(*node, "--data", tmp_path / "mine.csv"))) and "is empty" in line
    # a second SuperNode on this machine without its own --port: one line, not Flower's traceback
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(_invoke(*node, "--port", port))
    assert f"--port {port} on 127.0.0.1 is in use" in line and "give each its own --port" in line
    # a deployment with device-local data has no simulation
    line = _one_error_line(_invoke("flower", "simulate", "--set", "task=mine", "--set", f"data.eval={tmp_path / 'k'}",
                                   "--set", "federation.partition=local", "--out", tmp_path / "r"))
    assert "federation.partition local is for a deployment" in line
    assert not (tmp_path / "r").exists() and list(tmpdir_here.iterdir()) == []


def test_the_supernode_heartbeat_is_the_one_asked_for(monkeypatch):
    """`--heartbeat-s` runs Flower's SuperNode through our entry point, which points both places
    Flower reads the interval from (what the node announces, how often it beats) at the value."""
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection

    from fedlodrop.flower import supernode

    cmd = launch.supernode_command("127.0.0.1:1", 0, 2, 9, None, None, heartbeat_s=12)
    from flwr.common.config import parse_config_args

    for path in ('/data/my "own" file.csv', "/data/it's mine.csv", "C:\\data\\mine.csv"):
        with_data = launch.supernode_command("127.0.0.1:1", 0, 2, 9, None, None, data=Path(path))
        config = parse_config_args([with_data[with_data.index("--node-config") + 1]])
        assert config == {"partition-id": 0, "num-partitions": 2, "data": path}
    assert cmd[:4] == [sys.executable, "-m", "fedlodrop.flower.supernode", "12.0"] and "--superlink" in cmd
    assert launch.supernode_command("127.0.0.1:1", 0, 2, 9, None, None)[0].endswith("flower-supernode")
    for module in (sender, connection):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    supernode.set_heartbeat(12.0)
    assert sender.HEARTBEAT_DEFAULT_INTERVAL == connection.HEARTBEAT_DEFAULT_INTERVAL == 12.0


def test_certificates_and_keys_are_what_flower_takes(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert _invoke("flower", "certs", "--out", tmp_path / "certs", "--host", "10.0.0.5",
                   "--host", "link.example").exit_code == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example"]
    assert oct((tmp_path / "certs" / "server.key").stat().st_mode)[-3:] == "600"

    assert _invoke("flower", "keys", "--out", tmp_path / "keys", "--devices", 3).exit_code == 0
    for k in range(3):
        private = load_ssh_private_key((tmp_path / "keys" / f"device{k}_key").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / "keys" / f"device{k}_key.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert public.curve.name == "secp384r1"
    before = (tmp_path / "keys" / "device0_key").read_bytes()
    line = _one_error_line(_invoke("flower", "keys", "--out", tmp_path / "keys", "--devices", 1))
    assert "already exists" in line and (tmp_path / "keys" / "device0_key").read_bytes() == before
    line = _one_error_line(_invoke("flower", "certs", "--out", tmp_path / "certs"))
    assert "already exists" in line


def test_the_app_folder_passes_flowers_component_check(tmp_path):
    from flwr.supercore.object_ref import validate

    folder = launch.write_app(tmp_path / launch.APP_NAME)
    components = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for ref in components.values():
        assert validate(ref, project_dir=folder) == (True, None), ref
    assert sorted(p.name for p in folder.iterdir()) == ["pyproject.toml"]


def test_flower_processes_import_this_checkout(monkeypatch):
    env = launch.flower_env(base={"PYTHONPATH": f"/elsewhere{os.pathsep}{launch.source_root()}", "PATH": "/bin"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(launch.source_root()), "/elsewhere"]
    assert env["PATH"].split(os.pathsep)[0] == str(launch.VENV_BIN)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    out = subprocess.run([sys.executable, "-c", "import fedlodrop.flower.app as a; print(a.__file__)"], check=False, env=env,
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.stdout.strip().startswith(str(launch.source_root())), out.stderr


def test_a_failed_run_becomes_the_right_error(tmp_path):
    failed = {"run-id": "9", "status": "finished:failed"}
    with pytest.raises(UserError, match="^GLUE folder missing$"):
        outcome(failed | {"status-details": f"ServerApp failed with exception: {USER_ERROR}GLUE folder missing"},
                tmp_path, "")
    with pytest.raises(RoundFailed, match="^round 2: 0 of 2"):
        outcome(failed | {"status-details": f"Simulation failed with exception: {ROUND_FAILED}round 2: 0 of 2"},
                tmp_path, "")
    said = []
    with pytest.raises(FlowerFailure, match="Flower run 9 ended finished:failed: Simulation failed with exception: boom"):
        outcome(failed | {"status-details": "Simulation failed with exception: boom"}, tmp_path, "a\nlast log line",
                said.append)
    assert said == ["a\nlast log line"]
    done = outcome({"run-id": "9", "status": "finished:completed"}, tmp_path / "elsewhere", "")
    assert done.summary is None and "on the SuperLink's machine" in done.note


def test_a_workspace_stops_every_process_it_started(tmp_path, monkeypatch):
    """Also a grandchild in its own session (as Flower's SuperExec is), found by FLWR_HOME: it
    outlives SIGTERM to the group and the grace (1 s here, not 10: it only waits), then is killed."""
    ws = launch.Workspace.create(tmp_path)
    ws.spawn("tree", ["sh", "-c", "sleep 300 & setsid sleep 301 & wait"])
    deadline = time.monotonic() + HANG_S
    while len(ws.leftovers()) < 3:
        assert time.monotonic() < deadline, ws.leftovers()
        time.sleep(0.1)
    assert len(ws.leftovers()) == 3
    monkeypatch.setattr(launch.Workspace, "stop_all", functools.partialmethod(launch.Workspace.stop_all, grace=1.0))
    assert ws.close() == {} and launch.processes_of(str(tmp_path)) == {}
    assert not ws.dir.exists()


def test_a_sweep_reuses_runs_saved_before_the_flower_section(tmp_path):
    cfg = load_config(None, ["task=sst2", "data.glue_dir=x"])
    saved = cfg.model_dump(mode="json")
    del saved["flower"]
    assert config_differences(saved, cfg) == []
    saved["flower"] = {"round_timeout_s": 5.0}
    assert config_differences(saved, cfg) == []
    saved["train"]["lr"] = 0.1
    assert config_differences(saved, cfg) == ["train.lr"]


def test_default_yaml_documents_the_flower_section():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text()
    tree = yaml.safe_load(text)
    assert set(tree["flower"]) == {"round_timeout_s", "discovery_timeout_s", "poll_interval_s", "client_cpus",
                                   "client_gpus", "simulation_cpus", "pack_arrays"}
    assert "fedlodrop run` ignores this section" in text.replace("\n# ", " ")


@pytest.mark.slow  # a real `flwr run`
def test_run_without_a_superlink_fails_in_one_line(tmp_path, tmpdir_here):
    """Flower's own failure (`flwr run` answers "success": false) is one line and exit 1."""
    launch.make_certificates(tmp_path / "certs", ["127.0.0.1"])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"task": "sst2", "data": {"glue_dir": str(tmp_path)}}))
    result = _invoke("flower", "run", "--superlink", f"127.0.0.1:{launch.free_port()}", "--ca",
                     tmp_path / "certs" / "ca.crt", "--config", cfg, "--out", tmp_path / "r")
    assert result.exit_code == 1
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "`flwr run` failed" in errors[0] and "SuperLink is unavailable" in errors[0]
    assert result.output.rstrip().endswith(errors[0]) and "Traceback" not in result.output
    assert not (tmp_path / "r").exists() and list(tmpdir_here.iterdir()) == []


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    """A port from bind(0) is in the range outgoing connections take their local ends from, so
    another connection can take it before the server binds it; free_port stays below it."""
    import socket

    low = launch._ephemeral_low()
    for _ in range(20):
        port = launch.free_port()
        assert 10000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
