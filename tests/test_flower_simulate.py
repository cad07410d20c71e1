"""`fedlodrop flower simulate` end to end: Flower's simulation engine (own SuperLink on 127.0.0.1,
Ray actors as devices) gives the run folder and, bit for bit, the model and metrics of
`fedlodrop run`; a ClientApp that raises is left out; nothing is left running.

Each test starts real Flower processes (30-60 s on 2 shared cores); train.threads=1 on both sides,
as Ray gives its actors one thread, so float reductions add up in the same order."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import learning_cfg
from flower_helpers import (
    SRC,
    assert_no_processes_left,
    assert_same_run,
    fedlodrop_cmd,
    metrics,
    subprocess_env,
    write_config,
)
from typer.testing import CliRunner

from fedlodrop.cli import app


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.devices": 2, "federation.rounds": 2, "federation.local_epochs": 1,
            "federation.aggregation": "fedex", "dropout.rate": 0.3, "data.train_eval_samples": 16,
            "flower.round_timeout_s": 120.0, "flower.discovery_timeout_s": 120.0}
    return learning_cfg(model, glue, **(base | over))


def _in_process(cfg_file, out):
    result = CliRunner().invoke(app, ["run", "--quiet", "--config", str(cfg_file), "--out", str(out)])
    assert result.exit_code == 0, result.output


def _simulate(tmp_path, cfg_file, out, timeout=420, **env):
    t0 = time.monotonic()
    # no PYTHONPATH: `python -m` imports this checkout from the working directory, and the
    # command must hand it on to every Flower process (the venv's fedlodrop may be another copy)
    res = subprocess.run(fedlodrop_cmd("flower", "simulate", "--config", cfg_file, "--out", out),
                         env=subprocess_env(tmp_path, pythonpath=False, **env), cwd=SRC,
                         capture_output=True, text=True, timeout=timeout, check=False)
    print(f"simulate took {time.monotonic() - t0:.1f} s")
    assert_no_processes_left(tmp_path)
    assert not list((tmp_path / "tmp").glob("fedlodrop-flower-*")), "the Flower workspace was not removed"
    return res


def test_simulate_equals_fedlodrop_run(tiny_bert, polarity_dir, tmp_path):
    """2 devices, 2 rounds, FedEx, dropout 0.3: same adapter, fold, metrics and bytes."""
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir), tmp_path / "cfg.yaml")
    _in_process(cfg_file, tmp_path / "inproc")
    res = _simulate(tmp_path, cfg_file, tmp_path / "flower")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    for r in rows:  # bytes measured from the messages equal the in-process counts (assert_same_run)
        assert r["uplink_bytes"] > 0 and r["flower"]["uplink_count_bytes"] > r["uplink_bytes"]
        assert sorted(r["flower"]["nodes"]) == ["0", "1"]
    assert rows[1]["downlink_bytes"] > rows[0]["downlink_bytes"]  # round 2 carries round 1's fold
    assert "round   2" in res.stderr and "final accuracy" in res.stdout


def test_simulate_partial_participation_with_fedex_equals_fedlodrop_run(tiny_bert, polarity_dir, tmp_path):
    """3 devices, 2 sampled a round, 3 rounds: a device that sat a round out is brought up to
    date by a catch-up of folds over the fold F its node kept in context.state."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices": 3, "federation.devices_per_round": 2,
                                          "federation.rounds": 3, "federation.comm_dtype": "bfloat16"})
    cfg_file = write_config(cfg, tmp_path / "cfg.yaml")
    _in_process(cfg_file, tmp_path / "inproc")
    res = _simulate(tmp_path, cfg_file, tmp_path / "flower")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    sat_out = [set(range(3)) - set(r["participants"]) for r in rows]
    assert all(len(s) == 1 for s in sat_out)
    back = [k for k in range(3) if any(k in sat_out[i] and k in rows[i + 1]["participants"] for i in range(2))]
    assert back, "no device came back after sitting a round out"


def test_a_raising_clientapp_is_left_out(tiny_bert, polarity_dir, tmp_path):
    """Device 1's ClientApp raises in round 2: left out with the exception (from Ray's traceback),
    the round stands on device 0. (Too few devices: test_flower_deploy, test_flower_round.)"""
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir), tmp_path / "cfg.yaml")
    _in_process(cfg_file, tmp_path / "inproc")
    res = _simulate(tmp_path, cfg_file, tmp_path / "flower", FEDLODROP_FLOWER_TEST_RAISE="1@2")
    assert res.returncode == 0, res.stdout + res.stderr
    r1, r2 = metrics(tmp_path / "flower")
    assert r1["failures"] == [] and r1["eval"] == metrics(tmp_path / "inproc")[0]["eval"]
    assert r2["failures"] == [{"device": 1, "reason": "ClientApp raised an exception: RuntimeError: "
                                                      "test fault: device 1 raises in round 2"}]
    assert [d["status"] for d in r2["devices"]] == ["ok", "left out"]
    assert r2["uplink_bytes"] == r2["devices"][0]["uplink_bytes"]
    assert "(1 left out)" in res.stderr
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["devices_left_out"] == 1


def test_interrupting_simulate_stops_every_process(tiny_bert, polarity_dir, tmp_path):
    """Ctrl-C (SIGINT) once round 1 is written: the command ends, no Flower or Ray process stays."""
    import signal

    cfg_file = write_config(_cfg(tiny_bert, polarity_dir, **{"federation.rounds": 50}), tmp_path / "cfg.yaml")
    out = tmp_path / "flower"
    proc = subprocess.Popen(fedlodrop_cmd("flower", "simulate", "--config", cfg_file, "--out", out),
                            env=subprocess_env(tmp_path, pythonpath=False), cwd=SRC,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background (`pytest &`) passes SIGINT on ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: stopping the Flower processes" in err and "Traceback" not in err, err
    assert_no_processes_left(tmp_path)
    assert not list((tmp_path / "tmp").glob("fedlodrop-flower-*"))
    assert not (out / "summary.json").exists()
