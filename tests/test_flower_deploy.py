"""Deployment on loopback with the `fedlodrop flower` wrappers: certificates and keys made here, a
SuperLink with TLS and SuperNode authentication, two registered SuperNodes (partition-id 0 and
1) each with its own training file (`--data`), runs submitted with `fedlodrop flower run`. With
`federation.partition: local` the devices train on their files and the server, which has none of
them, learns; the result equals `fedlodrop run`'s by_column split of the union bit for bit; a
SuperNode killed mid-round is left out; with too few devices the run fails with one line.

The tests share one SuperLink and its SuperNodes; the fault test kills a SuperNode, so it comes
last. Every process is stopped by PID at the end and none may be left."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import learning_cfg
from flower_helpers import (
    raising_env,
    HANG_S,
    LIVE_DEVICE_S,
    assert_same_run,
    cli_ok,
    metrics,
    run_and_kill_node,
    wait_for_text,
    write_config,
)
from flower_helpers import federation as start_federation

from fedlodrop.run.folder import RunFolder
from fedlodrop.flower import launch

# real SuperLink and SuperNodes; one xdist worker runs the whole module (its federation is shared)
# and test_flower_secagg_deploy, one federation at a time
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower-deploy")]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    """The polarity sentences of conftest.write_sst2 as two sites' files, their union with a site
    column, and a validation file that only the server gets."""
    import csv

    from conftest import write_sst2

    glue = write_sst2(tmp_path_factory.mktemp("sites-glue"))
    root = tmp_path_factory.mktemp("sites")

    def rows(name):
        return [line.rsplit("\t", 1) for line in (glue / "SST-2" / name).read_text().splitlines()[1:]]

    def write(path, table, header):
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(table)
        return path

    train = [(text.strip(), label, "north" if i % 3 else "south") for i, (text, label) in enumerate(rows("train.tsv"))]
    files = [write(root / f"{site}.csv", [r[:2] for r in train if r[2] == site], ("text", "label"))
             for site in ("north", "south")]
    return {"union": write(root / "union.csv", train, ("text", "label", "site")), "devices": files,
            "eval": write(root / "server-eval.csv", [(t.strip(), lab) for t, lab in rows("dev.tsv")], ("text", "label"))}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, site_data):
    """Devices 0 and 1 registered with their SuperNodes, each given its own file (`--data`: only
    runs with federation.partition local read it); device2_key exists but is never registered."""
    with start_federation(tmp_path_factory.mktemp("deploy"), devices=2, spare_keys=1,
                          data=site_data["devices"]) as fed:
        yield fed


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.devices": 2, "federation.rounds": 2, "federation.local_epochs": 1,
            "federation.aggregation": "fedex", "dropout.rate": 0.3, "data.train_eval_samples": 16,
            "flower.round_timeout_s": LIVE_DEVICE_S, "flower.discovery_timeout_s": LIVE_DEVICE_S,
            "flower.poll_interval_s": 0.1}
    return learning_cfg(model, glue, **(base | over))


def test_devices_with_their_own_files_learn_with_a_server_that_has_none(federation, tiny_bloom, site_data,
                                                                         tmp_path):
    """Each SuperNode trains on its own file; the ServerApp's config names only the validation
    file. The run learns (tiny BLOOM, the decoders' recipe), equals `fedlodrop run` on the union
    split by_column bit for bit, and its bytes are the messages'."""
    from test_decoders import DECODER

    common = {"task": "polarity", "model": tiny_bloom, "seed": 3, "lora.r": 4, "train.threads": 1,
              "train.max_length": 32, "federation.devices": 2, "federation.rounds": 2,
              "flower.round_timeout_s": LIVE_DEVICE_S, "flower.discovery_timeout_s": LIVE_DEVICE_S,
              "flower.poll_interval_s": 0.1, "data.eval": str(site_data["eval"]), "data.train_eval_samples": 0,
              **DECODER}
    union = {"data.train": str(site_data["union"]), "data.device_column": "site", "federation.partition": "by_column"}
    inproc = write_config(_tree(common | union), tmp_path / "inproc.yaml")
    local = write_config(_tree(common | {"federation.partition": "local"}), tmp_path / "local.yaml")
    assert all(str(f) not in local.read_text() for f in site_data["devices"])
    cli_ok("run", "--quiet", "--config", inproc, "--out", tmp_path / "inproc")
    res = subprocess.run(federation.run(local, tmp_path / "flower"), env=federation.ws.env,
                         capture_output=True, text=True, timeout=HANG_S, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    summary = RunFolder(tmp_path / "flower").summary()
    assert summary.final["accuracy"] >= 0.75 and summary.devices_never_used == {}
    rows = metrics(tmp_path / "flower")
    assert all(r.flower.uplink_count_bytes > r.uplink_bytes > 0 for r in rows)
    assert "submitted run" in res.stderr and "final accuracy" in res.stdout
    assert "each device's own choice" in res.stderr  # precision: decided on the devices


def _tree(flat: dict):
    from fedlodrop.run.settings import validate

    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return validate(tree)


def test_only_registered_supernodes_may_join(federation):
    """SuperNode authentication is on: a SuperNode with a key the SuperLink does not know, or with
    no key, is turned away (the two registered ones are serving the other tests)."""
    expected = {"unregistered": "Failed to activate SuperNode",
                "keyless": "SuperNode authentication is enabled. All SuperNodes must be registered"}
    for name, key in (("unregistered", federation.root / "keys" / "device2_key"), ("keyless", None)):
        cmd = launch.supernode_command(federation.address, 0, 2, launch.free_port(), federation.ca, key,
                                       max_retries=1)
        stranger = federation.ws.spawn(name, cmd)
        # with max_retries=1 it exits once refused; a SuperNode let in logs its node id
        deadline = time.monotonic() + HANG_S
        while stranger.popen.poll() is None and "SuperNode ID:" not in stranger.log.read_text():
            assert time.monotonic() < deadline, "a hang"
            time.sleep(0.2)
        log = stranger.log.read_text()
        assert "SuperNode ID:" not in log, f"the {name} SuperNode was let in: {log}"
        stranger.popen.wait(timeout=HANG_S)
        assert stranger.popen.returncode != 0 and expected[name] in log, log


def test_a_killed_supernode_is_left_out_then_too_few_devices_fail(federation, tiny_bert, polarity_dir, tmp_path):
    """Kill device 1's SuperNode (its process group, SIGKILL, by PID) once it has taken its round-1
    TRAIN message. Round 1 stands on device 0: the SuperLink reports the node unavailable once it
    has missed two heartbeats (HEARTBEAT_S each here, `--heartbeat-s`; the round timeout is far
    longer, so a live device is never cut off). Round 2 sends device 1 nothing, as no node of it is online; the run
    completes. Then device 1 is back with a ClientApp that raises: a run with min_devices 2 fails
    in round 1 with one line and exit code 1.

    Nothing here depends on speed: the kill waits for the node's log, the rounds end on replies
    or on the SuperLink's verdict, and the failing run on its first round."""
    cfg_file = write_config(_cfg(tiny_bert, polarity_dir), tmp_path / "cfg.yaml")
    node = federation.nodes[1]
    start = len(node.log.read_text())
    code, out, err = run_and_kill_node(federation.run(cfg_file, tmp_path / "flower"), federation.ws.env, node, start)
    assert code == 0, out + err
    assert "ROUND 2]" not in node.log.read_text()[start:]  # killed in round 1, before round 2
    r1, r2 = metrics(tmp_path / "flower")
    assert [d.status for d in r1.devices] == [d.status for d in r2.devices] == ["ok", "left out"]
    [f1], [f2] = r1.failures, r2.failures
    # the SuperLink's NODE_UNAVAILABLE for the message it had delivered, not the round timeout
    assert f1["device"] == 1 and f1["reason"].startswith("SuperNode unavailable: "), f1
    assert "heartbeat" in f1["reason"], f1
    assert r1.devices[1].downlink_bytes > 0  # its message went out before it died
    # round 2 did not wait for the dead node: no message to it at all
    assert f2 == {"device": 1, "reason": "no SuperNode online for this device"}
    assert r2.devices[1].downlink_bytes == 0 and list(r2.flower.nodes) == ["0"]
    for r in (r1, r2):
        assert r.uplink_bytes == r.devices[0].uplink_bytes > 0
    assert "(1 left out)" in err
    assert RunFolder(tmp_path / "flower").summary().devices_left_out == 2

    # device 1 is back (its node is offline now, so its key may activate again), but its
    # ClientApp raises: with min_devices 2 round 1 cannot stand
    federation.ws.env, env = federation.ws.env | raising_env("1", federation.ws.env), federation.ws.env
    try:
        back = federation.ws.spawn("node1-back", federation.node_cmd(1))
    finally:
        federation.ws.env = env
    wait_for_text(back.log, "SuperNode ID:", proc=back.popen)  # let in again (fails at once if refused)
    strict = write_config(_cfg(tiny_bert, polarity_dir, **{"federation.min_devices": 2}), tmp_path / "strict.yaml")
    res = subprocess.run(federation.run(strict, tmp_path / "strict"), env=federation.ws.env,
                         capture_output=True, text=True, timeout=HANG_S, check=False)
    assert back.popen.poll() is None, back.log.read_text()
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [("error: round 1: 1 of 2 devices returned a usable update, federation.min_devices is 2 "
                       "(device 1: ClientApp raised an exception: RuntimeError: test fault: device 1 raises "
                       "in round 1)")], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "strict" / "summary.json").exists()
