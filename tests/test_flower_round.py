"""The Flower round without Flower's processes: the ServerApp's `serve` over a Grid that runs the
ClientApp in this process. The same run as `fedlodrop run`, bit for bit, and faults left out."""

from __future__ import annotations

import math

import pytest
from fault_inject import patch as patch_faults

import fedlodrop.round.client as client
import torch
from conftest import learning_cfg
from flower_helpers import FakeGrid, assert_same_run, metrics, serve

from fedlodrop.run import engine
from fedlodrop.run.settings import validate
from fedlodrop.errors import RoundFailed
from fedlodrop.run.folder import RunFolder
from fedlodrop.flower import app as flower_app
from fedlodrop.flower import strategy as flower_strategy
from fedlodrop.flower.wire import content_task, payload_bytes
from fedlodrop.flower.transport import Discovery, DiscoveryError

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.rounds": 3, "federation.local_epochs": 1,
            "federation.aggregation": "fedex", "dropout.rate": 0.3, "data.train_eval_samples": 16,
            "flower.discovery_timeout_s": 1.0, "flower.round_timeout_s": 1.0, "flower.poll_interval_s": 0.01}
    return learning_cfg(model, glue, **(base | over))


@pytest.mark.precision
@pytest.mark.parametrize("pack,dtype", [(True, "bfloat16"), (False, "float16")])
def test_partial_participation_fedex_equals_in_process(tiny_bert, polarity_dir, tmp_path, pack, dtype):
    """3 devices, 2 a round, 3 rounds: a device that sat out gets a two-round catch-up of folds, so
    its fold F must have persisted in context.state; node ids do not follow device order."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices_per_round": 2, "federation.comm_dtype": dtype,
                                          "flower.pack_arrays": pack})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    grid = serve(cfg, tmp_path / "flower", node_ids=[9_000_000_001, 42, 7_777])
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    assert [len(r.participants) for r in rows] == [2, 2, 2]
    assert any(d.downlink_bytes > rows[0].devices[0].downlink_bytes for r in rows[1:] for d in r.devices)
    # the bytes logged are those of the messages pushed (one TRAIN message per participant)
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert sum(r.downlink_bytes for r in rows) == sum(payload_bytes(m.content["arrays"]) for m in train)
    arrays_per_msg = {len(m.content["arrays"]) for m in train}
    assert arrays_per_msg == {1} if pack else min(arrays_per_msg) > 1
    for r in rows:
        assert r.flower.downlink_count_bytes > r.downlink_bytes
        assert r.flower.uplink_count_bytes > r.uplink_bytes


def test_ffa_equals_in_process(tiny_bert, polarity_dir, tmp_path):
    """FFA-LoRA's A never travels: each device rebuilds it from the seed, as `fedlodrop run` does
    (the only Flower run in which the ClientApp's own seeded initial adapter matters)."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices": 2, "federation.rounds": 2,
                                          "federation.aggregation": "ffa"})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    grid = serve(cfg, tmp_path / "flower")
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    tasks = [content_task(m.content) for m in grid.pushed if m.metadata.message_type == "train"]
    assert len(tasks) == 4 and not any(k.endswith("lora_A") for t in tasks for k in t.adapter), "an A travelled"


@pytest.mark.slow  # two 3-round runs each
@pytest.mark.parametrize("aggregation,prune", [("flora", None), ("flexlora", 0.5)])
def test_mixed_ranks_equal_in_process(tiny_bert, polarity_dir, tmp_path, aggregation, prune):
    """Devices of ranks 1, 2 and 4, pruning themselves where asked (HetLoRA's self-pruning): the
    rank a task carries and the rank a reply decides travel in Flower's records; FLoRA's download
    is the head and the fold alone, FlexLoRA's the device's first r_k components."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.aggregation": aggregation, "lora.ranks": [1, 2, 4],
                                          "lora.self_prune": prune, "lora.prune_lambda": 10.0,
                                          "federation.local_epochs": 3})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    serve(cfg, tmp_path / "flower")
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    ranks = [[d.rank for d in r.devices] for r in metrics(tmp_path / "flower")]
    assert ranks[0] == [1, 2, 4] and (ranks[-1] != ranks[0]) == (prune is not None), ranks


@pytest.mark.slow
@pytest.mark.parametrize("mode,aggregation", [("central", "masked"), ("local", "fedex")])
def test_differential_privacy_equals_in_process(tiny_bert, polarity_dir, tmp_path, mode, aggregation, seeded_dp_noise):
    """With the same noise draws (production takes them from the OS's entropy; here from a key
    per draw), both engines train the same noised model, draw the same participants and report the
    same epsilon: the noise and the sampling happen in the same places on both."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.rounds": 2, "federation.devices_per_round": 2,
                                          "federation.aggregation": aggregation, "federation.weighting": "uniform",
                                          "privacy.dp": True, "privacy.mode": mode, "privacy.clip_norm": 0.05,
                                          "privacy.target_epsilon": 50.0})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    serve(cfg, tmp_path / "flower")
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    rows = metrics(tmp_path / "flower")
    assert all(r.privacy.mode == mode and 0 < r.privacy.epsilon <= 50.0 for r in rows)
    assert rows[0].privacy.epsilon < rows[1].privacy.epsilon


def test_bytes_are_counted_from_the_messages(tiny_bert, polarity_dir, tmp_path, monkeypatch):
    """Whatever a message carries is counted, not what the task holds: add a tensor to each
    TRAIN message (the device ignores it) and the downlink grows by its bytes."""
    from flwr.app import ConfigRecord, RecordDict

    from fedlodrop.flower.wire import ARRAYS, LAYOUT, TASK, to_records

    def with_extra(task, pack):
        tensors, scalars = task.to_flat()
        tensors["index/extra"] = torch.zeros(10)
        arrays, layout = to_records(tensors, pack)
        return RecordDict({ARRAYS: arrays, LAYOUT: layout, TASK: ConfigRecord(scalars)})

    monkeypatch.setattr(flower_strategy, "task_content", with_extra)
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.rounds": 1})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    serve(cfg, tmp_path / "flower")
    a, b = metrics(tmp_path / "inproc")[0], metrics(tmp_path / "flower")[0]
    assert [d.downlink_bytes for d in b.devices] == [d.downlink_bytes + 40 for d in a.devices]
    assert b.downlink_bytes == a.downlink_bytes + 40 * len(a.devices)
    assert b.uplink_bytes == a.uplink_bytes


def test_failed_devices_are_left_out_with_their_reason(tiny_bert, polarity_dir, tmp_path, monkeypatch):
    """Round 1: device 1's node never answers, device 2's is gone (the SuperLink's error, signed by
    the SuperLink's node id), device 3 raises, device 4's message is refused; round 2: device 3's
    node is not listed at all."""
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices": 5, "federation.rounds": 2})
    rc = {"config-json": cfg.model_dump_json(), "run-dir": str(tmp_path / "flower")}
    grid = FakeGrid(5, rc, node_ids=[50, 40, 30, 20, 10])
    grid.offline.add(40)
    grid.unavailable.add(30)
    grid.refused.add(10)
    patch_faults(client, "3@1", monkeypatch.setattr)
    real = grid.push_messages

    def push(messages):  # after round 1's messages, device 3's node is no longer listed
        ids = real(messages)
        if any(m.metadata.group_id == "1" for m in messages):
            grid.hidden.add(20)
        return ids

    grid.push_messages = push
    serve(cfg, tmp_path / "flower", grid=grid)
    r1, r2 = metrics(tmp_path / "flower")
    reasons = {f["device"]: f["reason"] for f in r1.failures}
    assert reasons[1] == "no reply within flower.round_timeout_s=1 s"
    assert reasons[2].startswith("SuperNode unavailable")
    assert reasons[3] == "ClientApp raised an exception: RuntimeError: test fault: device 3 raises in round 1"
    assert reasons[4] == "the SuperLink did not take the message"
    assert {f["device"]: f["reason"] for f in r2.failures}[3] == "no SuperNode online for this device"
    for r in (r1, r2):
        assert [d.status for d in r.devices] == ["ok"] + ["left out"] * 4
        assert r.devices[4].downlink_bytes == 0
        ok, *left = r.devices
        assert ok.uplink_bytes > 0 and r.uplink_bytes == ok.uplink_bytes
        for d in left:
            assert set(d.to_json()) == {"device", "rate", "downlink_bytes", "status", "reason"}
        assert math.isfinite(r.train_loss) and r.train_loss == ok.train_loss
    assert r2.devices[3].downlink_bytes == 0  # nothing was sent to a node that is not there
    assert RunFolder(tmp_path / "flower").summary().devices_left_out == 8


def test_too_few_devices_fail_the_run_with_the_reasons(tiny_bert, polarity_dir, tmp_path, monkeypatch):
    cfg = _cfg(tiny_bert, polarity_dir, **{"federation.devices": 2, "federation.min_devices": 2})
    patch_faults(client, "1@2", monkeypatch.setattr)
    with pytest.raises(RoundFailed, match=r"round 2: 1 of 2 devices .*federation.min_devices is 2 .*device 1: ClientApp raised"):
        serve(cfg, tmp_path / "flower")
    assert RunFolder(tmp_path / "flower").rounds_done() == 1


def _answer(partition, parts):
    from flwr.app import ConfigRecord

    return ConfigRecord({"partition-id": partition, "num-partitions": parts})


def test_discovery_rejects_contradicting_supernodes():
    d = Discovery(3)
    d._learn(11, _answer(0, 3), {11, 12})
    with pytest.raises(DiscoveryError, match="both say partition-id=0"):
        d._learn(12, _answer(0, 3), {11, 12})
    d._learn(13, _answer(0, 3), {13})  # the first node is gone: the device moved
    assert d.node_of == {0: 13}
    with pytest.raises(DiscoveryError, match="outside 0..2"):
        d._learn(14, _answer(3, 3), {14})
    with pytest.raises(DiscoveryError, match="num-partitions=4"):
        d._learn(15, _answer(1, 4), {15})


def test_the_serverapp_refuses_a_relative_run_dir(tmp_path):
    from fedlodrop.errors import UserError

    cfg = validate({"task": "sst2", "data": {"glue_dir": str(tmp_path)}})
    with pytest.raises(UserError, match="absolute"):
        flower_app.serve(None, {"config-json": cfg.model_dump_json(), "run-dir": "runs/x"})
    with pytest.raises(UserError, match="config-json"):
        flower_app.serve(None, {"run-dir": str(tmp_path)})
