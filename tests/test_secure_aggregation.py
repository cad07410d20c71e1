"""Secure aggregation over Flower (SecAgg+: Flower's workflow and client mod) without Flower's
processes: the ServerApp's `serve` over a Grid that runs the ClientApp in this process. The
server learns only the sum; the model equals the plain run's within SecAgg+'s quantisation bound;
a device that drops out while the updates are collected is survived; bad settings are refused."""

from __future__ import annotations

import pytest
from fault_inject import patch as patch_faults

import fedlodrop.round.client as client
import torch
from conftest import learning_cfg
from flower_helpers import FakeGrid, metrics, serve
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlodrop.run import engine

from fedlodrop.round import secagg
from fedlodrop.cli import app
from fedlodrop.flower import app as flower_app

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


def _cfg(model, glue, **over):
    base = {"train.threads": 1, "federation.rounds": 1, "federation.local_epochs": 1,
            "federation.aggregation": "masked", "federation.weighting": "uniform", "dropout.rate": 0.3,
            "data.train_eval_samples": 16, "flower.discovery_timeout_s": 1.0, "flower.round_timeout_s": 5.0,
            "flower.poll_interval_s": 0.01}
    return learning_cfg(model, glue, **(base | over))


def _adapter(run):
    return load_file(str(run / "adapter.safetensors"))


DP = {"privacy.dp": True, "privacy.noise_multiplier": 0.5, "privacy.clip_norm": 0.05}


@pytest.mark.slow  # SecAgg+'s four exchanges and its crypto: out of the quick check
@pytest.mark.parametrize("aggregation,variant,extra", [("masked", "subadapter", {}), ("fedit", "reset", {}),
                                                       ("ffa", "update", {}), ("masked", "update", DP)])
def test_secure_sum_gives_the_plain_model_within_the_quantisation_bound(tiny_bert, polarity_dir, tmp_path,
                                                                        aggregation, variant, extra, seeded_dp_noise):
    """One round with SecAgg+ against the same round in the clear: every adapter value within the
    bound the quantisation allows (n x 2c / T on the sum, divided by the devices the rule averages
    over), and the server's messages carried no device's update in a readable form. With central
    DP the server noises the secure sum as it noises the plain one."""
    over = {"federation.aggregation": aggregation, "dropout.variant": variant, "privacy.secagg_clip_range": 1.0,
            **extra}
    plain = _cfg(tiny_bert, polarity_dir, **over)
    secure = _cfg(tiny_bert, polarity_dir, **over, **{"privacy.secure_aggregation": True})
    engine.run(plain, tmp_path / "plain", show_progress=False)
    grid = serve(secure, tmp_path / "secure")
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "secure")
    bound = secagg.error_bound(3, 1.0)  # on the sum; every mean divides it by at least 1
    eps = torch.finfo(torch.float32).eps
    for k in a:  # plus float32 rounding in the update arithmetic: a few ulps of the tensor's largest value
        worst, scale = float((a[k] - b[k]).abs().max()), float(a[k].abs().max())
        assert worst <= bound + 8 * eps * scale, (k, worst, bound, scale)
    [row] = metrics(tmp_path / "secure")
    info = row.flower.secagg
    assert info.devices_in_sum == 3 and info.error_bound == pytest.approx(bound)
    assert [d.status for d in row.devices] == ["ok"] * 3
    # four exchanges, every one a TRAIN message to each device; none carries an ArrayRecord back
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert len(train) == 4 * 3
    assert all(d.uplink_bytes > 0 and d.downlink_bytes > 0 for d in row.devices)


@pytest.mark.slow
def test_a_device_lost_while_updates_are_collected_is_survived(tiny_bert, polarity_dir, tmp_path, monkeypatch):
    """Device 1's ClientApp raises in the collect stage (after the keys were shared): SecAgg+
    unmasks the other two from the shares, and the model is the plain Flower round's, which
    leaves device 1 out too."""
    patch_faults(client, "1", monkeypatch.setattr)
    serve(_cfg(tiny_bert, polarity_dir), tmp_path / "plain")
    serve(_cfg(tiny_bert, polarity_dir, **{"privacy.secure_aggregation": True}), tmp_path / "secure")
    [p], [s] = metrics(tmp_path / "plain"), metrics(tmp_path / "secure")
    assert [d.status for d in p.devices] == [d.status for d in s.devices] == ["ok", "left out", "ok"]
    assert s.devices[1].reason.startswith("SecAgg+ collect_masked_vectors: ") and "test fault" in s.devices[1].reason
    assert s.flower.secagg.devices_in_sum == 2
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "secure")
    bound, eps = secagg.error_bound(2, 8.0), torch.finfo(torch.float32).eps
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= bound + 8 * eps * float(a[k].abs().max()), k


@pytest.mark.slow
@pytest.mark.parametrize("lost,why", [("offline", "no reply within flower.round_timeout_s=1 s"),
                                      ("unavailable", "SuperNode unavailable: Node is unavailable.")])
def test_a_device_lost_from_the_start_is_left_out_and_the_protocol_restarts(tiny_bert, polarity_dir, tmp_path,
                                                                              lost, why):
    """SecAgg+ cannot survive a device lost while keys are set up (its neighbours miss its
    shares); nothing was trained yet, so the round restarts the protocol without it and the other
    two make the round: the plain Flower round with that device lost, within the bound. A silent
    node (offline) and one the SuperLink declares gone (unavailable: its error comes signed by
    the SuperLink, not by the node) are both told apart by the message they answer."""
    over = {"flower.round_timeout_s": 1.0}
    grids = {}
    for name, secure in (("plain", False), ("secure", True)):
        cfg = _cfg(tiny_bert, polarity_dir, **over, **{"privacy.secure_aggregation": secure})
        rc = {"config-json": cfg.model_dump_json(), "run-dir": str(tmp_path / name)}
        grids[name] = grid = FakeGrid(3, rc)
        getattr(grid, lost).add(grid.node_ids[2])
        flower_app.serve(grid, rc)
    [p], [s] = metrics(tmp_path / "plain"), metrics(tmp_path / "secure")
    assert [d.status for d in s.devices] == [d.status for d in p.devices] == ["ok", "ok", "left out"]
    assert s.devices[2].reason == f"SecAgg+ setup: {why}"
    assert s.flower.secagg.devices_in_sum == 2
    setups = [m for m in grids["secure"].pushed if m.metadata.message_type == "train"
              and m.content.config_records["secaggplus_configs"].get("stage") == "setup"]
    assert len(setups) == 3 + 2  # the first setup to all three, the restart to the two that answered
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "secure")
    bound, eps = secagg.error_bound(2, 8.0), torch.finfo(torch.float32).eps
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= bound + 8 * eps * float(a[k].abs().max()), k


@pytest.mark.parametrize(
    "sets,needle",
    [
        (["federation.aggregation=fedex"], "cannot carry federation.aggregation 'fedex'"),
        (["federation.weighting=samples"], "needs federation.weighting uniform"),
        (["federation.devices=2"], "at least 3 devices a round"),
        (["federation.devices=4", "federation.devices_per_round=2"], "at least 3 devices a round"),
        (["privacy.secagg_threshold=4"], "privacy.secagg_threshold 4 must be at least 2 and below the 3 shares"),
        (["privacy.secagg_shares=5"], "privacy.secagg_shares 5 exceeds the 3 devices"),
        (["privacy.secagg_clip_range=0"], "privacy.secagg_clip_range"),
        ([], "privacy.secure_aggregation runs on Flower"),  # `fedlodrop run` is the in-process engine
    ],
)
def test_bad_secure_aggregation_settings_one_line_exit_2_nothing_written(tiny_bert, sst2_dir, tmp_path, sets, needle):
    out = tmp_path / "out"
    base = ["task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={sst2_dir}",
            "privacy.secure_aggregation=true", "federation.weighting=uniform", "federation.aggregation=masked"]
    args = [x for item in base + sets for x in ("--set", item)]
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_secure_aggregation_learns(mini2, polarity_dir, tmp_path):
    """Several rounds through SecAgg+ on the learnable task, dropout on: loss falls, accuracy ends
    well above the majority class."""
    cfg = learning_cfg(mini2, polarity_dir, **{
        "train.threads": 1, "dropout.rate": 0.3, "federation.aggregation": "masked",
        "federation.weighting": "uniform", "privacy.secure_aggregation": True,
        "flower.discovery_timeout_s": 1.0, "flower.round_timeout_s": 60.0, "flower.poll_interval_s": 0.01})
    serve(cfg, tmp_path / "r")
    rows = metrics(tmp_path / "r")
    losses = [r.train_loss for r in rows]
    assert losses[-1] < 0.75 * losses[0], losses
    assert rows[-1].eval["accuracy"] >= 0.85, [r.eval["accuracy"] for r in rows]
    assert all(r.flower.secagg.devices_in_sum == 3 for r in rows)


_NO_TORCH_STAGES = r'''
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from fedlodrop.flower.app import client_app

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # what a SuperLink sets
context = Context(7, 1017, {"partition-id": 0, "num-partitions": 3}, RecordDict(), {})
query = client_app(Message(RecordDict(), dst_node_id=1017, message_type="query"), context)
setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
                      Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 20, Key.MOD_RANGE: 1 << 30, Key.MAX_WEIGHT: 1.0})
keys = client_app(Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=1017, message_type="train"), context)
print(sorted(query.content.config_records["node"]), sorted(keys.content.config_records[RECORD_KEY_CONFIGS]))
print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
'''


def test_a_clientapp_process_that_does_not_train_does_not_load_torch():
    """Flower starts a ClientApp process per message: discovery and SecAgg+'s setup (like its key
    sharing and unmasking) never train, so they must not pay for importing torch and the model."""
    import subprocess
    import sys

    from flower_helpers import HANG_S

    out = subprocess.run([sys.executable, "-c", _NO_TORCH_STAGES], capture_output=True, text=True, timeout=HANG_S,
                         check=False)
    assert out.returncode == 0, out.stderr
    answered, loaded = out.stdout.strip().splitlines()
    assert answered == "['num-partitions', 'partition-id', 'version'] ['pk1', 'pk2']", out.stdout
    assert loaded == "[]", out.stdout
