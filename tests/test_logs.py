"""TensorBoard and Weights & Biases (offline) logs mirror metrics.jsonl, read back from their own files."""

import json
import struct

from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.run.logs import round_scalars
from fedlodrop.run.folder import RunFolder


def _wandb_history(run_dir):
    """History rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of
    protobuf records in 32 KiB blocks, after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    rows, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += left - 7 - length
            continue
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_tensorboard_and_wandb_mirror_the_metrics(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing outside the test's folder
    out = tmp_path / "r"
    result = CliRunner().invoke(app, [
        "run", "--quiet", "--out", str(out), "--set", "task=sst2", "--set", f"model={tiny_bert}",
        "--set", "data.source=glue_dir", "--set", f"data.glue_dir={sst2_dir}", "--set", "federation.rounds=3",
        "--set", "dropout.rate=0.3", "--set", "train.max_length=32", "--set", "log.tensorboard=true",
        "--set", "log.wandb=true"])
    assert result.exit_code == 0, result.output
    assert "wandb:" not in result.output  # our output, not W&B's
    rows = RunFolder(out).records()
    expected = [round_scalars(r) for r in rows]
    assert {"eval/accuracy", "train/accuracy", "loss/train", "loss/eval", "bytes/uplink", "bytes/downlink",
            "time/round_s", "device/0/loss", "device/2/uplink_bytes"} <= set(expected[0])

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for name in ("eval/accuracy", "loss/train", "bytes/uplink", "device/1/loss"):
        events = acc.Scalars(name)
        assert [e.step for e in events] == [1, 2, 3]
        for e, x in zip(events, expected):  # TensorBoard keeps float32
            assert abs(e.value - x[name]) <= 1e-6 * max(1.0, abs(x[name])), name

    history = _wandb_history(out)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, x in zip(history, expected):
        assert {k: h[k] for k in x} == x
