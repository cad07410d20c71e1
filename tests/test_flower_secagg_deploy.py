"""Secure aggregation in a real deployment on loopback: a SuperLink with TLS and SuperNode
authentication, three registered SuperNodes, `fedlodrop flower run` with
`privacy.secure_aggregation`. Every SecAgg+ stage crosses the SuperLink as real messages (the
client mod keeps its keys in the SuperNode's context between them); the model equals the same
round in the clear (`fedlodrop run`) within the quantisation bound, here with one device whose
SuperNode is killed mid-protocol, as Flower's SecAgg+ allows. Every process is stopped by PID at
the end."""

from __future__ import annotations


import pytest
import torch
from conftest import diverging, learning_cfg
from flower_helpers import cli_ok, federation, metrics, run_and_kill_node, write_config
from safetensors.torch import load_file

from fedlodrop.run import inprocess

from fedlodrop.round import secagg

# real SuperLink and SuperNodes: the same xdist group as test_flower_deploy, so that one worker runs
# the deployments one at a time
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower-deploy")]


def test_secure_aggregation_deployment_survives_a_killed_device_and_equals_the_plain_round(
    tiny_bert, polarity_dir, tmp_path, monkeypatch
):
    """Device 2's SuperNode is killed (its process group, SIGKILL, by PID) once it has taken the
    collect stage's message, after the keys were shared. The SuperLink reports it unavailable
    after two missed heartbeats (HEARTBEAT_S each here); Flower's protocol unmasks the two others from
    the shares, and the model is the plain round's with device 2 left out."""
    root = tmp_path
    with federation(root, devices=3) as fed:
        over = {"train.threads": 1, "federation.rounds": 1, "federation.local_epochs": 1,
                "federation.aggregation": "masked", "federation.weighting": "uniform", "dropout.rate": 0.3,
                "data.train_eval_samples": 16, "privacy.secagg_clip_range": 1.0,
                "flower.round_timeout_s": 600.0, "flower.discovery_timeout_s": 600.0, "flower.poll_interval_s": 0.1}
        plain = write_config(learning_cfg(tiny_bert, polarity_dir, **over), root / "plain.yaml")
        secure = write_config(learning_cfg(tiny_bert, polarity_dir, **over, **{"privacy.secure_aggregation": True}),
                              root / "secure.yaml")
        with monkeypatch.context() as m:  # the plain round with device 2 left out
            m.setattr(inprocess, "device_step", diverging({2}))
            cli_ok("run", "--quiet", "--config", plain, "--out", root / "plain")
        # SecAgg+'s stages: setup, share keys, collect (then unmask); killed once it has the third
        code, out, err = run_and_kill_node(fed.run(secure, root / "secure"), fed.ws.env, fed.nodes[2], nth=3)
    assert code == 0, out + err
    [ref], [row] = metrics(root / "plain"), metrics(root / "secure")
    assert [d.status for d in ref.devices] == [d.status for d in row.devices] == ["ok", "ok", "left out"]
    reason = row.devices[2].reason
    assert reason.startswith("SecAgg+ collect_masked_vectors: SuperNode unavailable"), reason
    assert row.flower.secagg.devices_in_sum == 2
    assert all(d.uplink_bytes > 0 for d in row.devices[:2])
    a, b = (load_file(str(root / name / "adapter.safetensors")) for name in ("plain", "secure"))
    bound, eps = secagg.error_bound(2, 1.0), torch.finfo(torch.float32).eps
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= bound + 8 * eps * float(a[k].abs().max()), k
