"""`fedlodrop flower simulate` end to end: Flower's simulation engine (own SuperLink on 127.0.0.1,
Ray actors as devices) gives the run folder and, bit for bit, the model and metrics of
`fedlodrop run`; a ClientApp that raises is left out; Ctrl-C stops every process.

Each test starts real Flower processes, and most of its time (30-60 s on 2 shared cores) is
that start and stop, not the rounds: so there are two runs, each checking several properties.
What the strategy does with replies, failures and partial participation is checked in
test_flower_round without Flower's processes; these check what only the real engine can break
(node state kept between messages, Ray's error replies, the CLI's processes). train.threads=1 on
both sides, as Ray gives its actors one thread, so float reductions add up in the same order."""

from __future__ import annotations

import signal
import subprocess

import pytest
from conftest import learning_cfg
from flower_helpers import raising_env
from flower_helpers import (
    HANG_S,
    LIVE_DEVICE_S,
    SRC,
    assert_no_processes_left,
    assert_same_run,
    fedlodrop_cmd,
    metrics,
    subprocess_env,
    wait_for_text,
    write_config,
)
from typer.testing import CliRunner

from fedlodrop.cli import app

pytestmark = pytest.mark.slow  # real SuperLink, SuperExec and Ray


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.devices": 2, "federation.rounds": 2, "federation.local_epochs": 1,
            "federation.aggregation": "fedex", "dropout.rate": 0.3, "data.train_eval_samples": 16,
            "flower.round_timeout_s": LIVE_DEVICE_S, "flower.discovery_timeout_s": LIVE_DEVICE_S,
            "flower.simulation_cpus": 1}  # one Ray actor serves every device: one backbone to build
    return learning_cfg(model, glue, **(base | over))


def _assert_nothing_left(tmp_path):
    assert_no_processes_left(tmp_path)
    assert not list((tmp_path / "tmp").glob("fedlodrop-flower-*")), "the Flower workspace was not removed"


def test_simulate_with_partial_participation_equals_fedlodrop_run(tiny_bert, polarity_dir, tmp_path):
    """3 devices, 2 sampled a round, 3 rounds, FedEx, dropout 0.3, bfloat16 on the wire: the same
    adapter, fold, metrics and bytes as `fedlodrop run`. A device sampled in rounds 2 and 3 (there
    is always one) is sent only round 2's fold in round 3, to add to the fold F (round 1's) its
    node kept in context.state; a device back after sitting a round out gets a catch-up of folds."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices": 3, "federation.devices_per_round": 2,
                                          "federation.rounds": 3, "federation.comm_dtype": "bfloat16"})
    cfg_file = write_config(cfg, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["run", "--quiet", "--config", str(cfg_file), "--out", str(tmp_path / "inproc")])
    assert result.exit_code == 0, result.output
    # no PYTHONPATH: `python -m` imports this checkout from the working directory, and the
    # command must hand it on to every Flower process (the venv's fedlodrop may be another copy)
    res = subprocess.run(fedlodrop_cmd("flower", "simulate", "--config", cfg_file, "--out", tmp_path / "flower"),
                         env=subprocess_env(tmp_path, pythonpath=False), cwd=SRC,
                         capture_output=True, text=True, timeout=HANG_S, check=False)
    _assert_nothing_left(tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    for r in rows:  # bytes measured from the messages equal the in-process counts (assert_same_run)
        assert r.failures == [] and len(r.participants) == 2
        assert sorted(r.flower.nodes) == sorted(str(k) for k in r.participants)
        assert r.uplink_bytes > 0 and r.flower.uplink_count_bytes > r.uplink_bytes
    assert rows[1].downlink_bytes > rows[0].downlink_bytes  # round 2 carries round 1's fold
    assert set(rows[1].participants) & set(rows[2].participants)  # state kept across messages
    sat_out = [set(range(3)) - set(r.participants) for r in rows]
    assert any(k in sat_out[i] and k in rows[i + 1].participants for i in range(2) for k in range(3)), \
        "no device came back after sitting a round out"
    assert "round   3" in res.stderr and "final accuracy" in res.stdout


def test_a_raising_clientapp_is_left_out_and_ctrl_c_stops_every_process(tiny_bert, polarity_dir, tmp_path):
    """Device 1's ClientApp raises in round 2: it is left out with the exception (read from Ray's
    traceback), the round stands on device 0, and device 1 is back in round 3. Then Ctrl-C
    (SIGINT; the run has 1000 rounds, so it is still running): the command ends with 130, no
    Flower or Ray process stays, the workspace is gone, no summary is written."""
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir, **{"federation.rounds": 1000}), tmp_path / "cfg.yaml")
    out, log = tmp_path / "flower", tmp_path / "stderr.txt"
    with open(log, "w") as err_file:
        proc = subprocess.Popen(fedlodrop_cmd("flower", "simulate", "--config", cfg_file, "--out", out),
                                env=subprocess_env(tmp_path, pythonpath=False, **raising_env("1@2")), cwd=SRC,
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True,
                                # a suite started in the background (`pytest &`) passes SIGINT on ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        wait_for_text(log, "round   3  ", proc=proc)  # printed once round 3 is in metrics.jsonl
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130, err
    assert "interrupted: stopping the Flower processes" in err and "Traceback" not in err, err
    _assert_nothing_left(tmp_path)
    assert not (out / "summary.json").exists()

    r1, r2, r3 = metrics(out)[:3]
    assert r1.failures == r3.failures == []
    assert r2.failures == [{"device": 1, "reason": "ClientApp raised an exception: RuntimeError: "
                                                      "test fault: device 1 raises in round 2"}]
    assert [d.status for d in r2.devices] == ["ok", "left out"]
    assert [d.status for d in r3.devices] == ["ok", "ok"]
    assert r2.uplink_bytes == r2.devices[0].uplink_bytes > 0
    assert "(1 left out)" in err
