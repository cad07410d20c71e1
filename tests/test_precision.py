"""Which precision runs, and that inference gives the exported model's outputs whatever trained.

`train.precision auto` takes bf16 autocast on a CPU with AMX-BF16 (or a GPU with bf16), and
FEDLODROP_CPU_AMX makes any CPU take either path, so both are tested on one machine. Evaluation,
`evaluate` and `predict` run in `train.eval_precision` (fp32 by default): the same numbers as the
merged export loaded by transformers alone, on any CPU.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import POSITIVE, NEGATIVE, read_metrics, read_summary, tiny_cfg, train
from export_helpers import dev_rows, job, run_hf_only
from fedlodrop.model import backbone as model_mod
from fedlodrop.cli import app
from fedlodrop.round.client import predict_outputs
from fedlodrop.data import make_loader
from fedlodrop.run.experiment import load_run
from fedlodrop.model.backbone import CPU_AMX_ENV, resolve_precision
from test_decoders import DECODER

pytestmark = pytest.mark.precision


@pytest.mark.parametrize("hardware", [True, False])
def test_auto_follows_the_cpu_and_the_switch_overrides_it(monkeypatch, hardware):
    monkeypatch.setattr(model_mod, "_cpu_has_amx_bf16", lambda: hardware)
    cpu = torch.device("cpu")
    monkeypatch.delenv(CPU_AMX_ENV, raising=False)
    p = resolve_precision("auto", cpu, "train.precision")
    assert p.dtype == ("bf16" if hardware else "fp32")
    assert p.why == f"train.precision auto: the CPU has {'' if hardware else 'no '}AMX-BF16"
    for forced, dtype in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv(CPU_AMX_ENV, forced)
        p = resolve_precision("auto", cpu, "train.precision")
        assert (p.dtype, p.why) == (dtype, f"train.precision auto: {CPU_AMX_ENV}={forced}")
        # an explicit setting is never overridden, by the hardware or the switch
        assert resolve_precision("fp32", cpu, "train.precision").dtype == "fp32"
        assert resolve_precision("bf16", cpu, "train.precision").dtype == "bf16"
    monkeypatch.setenv(CPU_AMX_ENV, "yes")
    with pytest.raises(Exception, match=f"{CPU_AMX_ENV}='yes'"):
        resolve_precision("auto", cpu, "train.precision")


def test_auto_on_a_gpu_asks_the_gpu(monkeypatch):
    monkeypatch.setenv(CPU_AMX_ENV, "1")  # a CPU switch: no say on a GPU
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        p = resolve_precision("auto", torch.device("cuda"), "train.precision")
        assert p.dtype == ("bf16" if supported else "fp32") and "GPU" in p.why


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _probabilities(csv_text: str) -> np.ndarray:
    rows = list(csv.DictReader(csv_text.splitlines()))
    return np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in rows])


def test_bf16_training_learns_is_recorded_and_inference_gives_the_exports_outputs(tiny_bloom, sst2_dir, tmp_path):
    """Train in bf16 (on any CPU): it learns and the run says so; evaluate, predict and the merged
    export loaded by transformers alone agree to 1e-5 (each round's score too), and `--precision
    bf16` really changes predict's numbers. A tiny decoder: bf16 is emulated, slowly, on most CPUs."""
    cfg = tiny_cfg(tiny_bloom, sst2_dir, **DECODER, **{"train.precision": "bf16"})
    run_dir = train(cfg, tmp_path / "run")
    summary, rounds = read_summary(run_dir), read_metrics(run_dir)
    assert rounds[-1].train_loss < 0.75 * rounds[0].train_loss and summary.final["accuracy"] >= 0.75
    assert summary.precision == {"train": [{"dtype": "bf16", "why": "train.precision bf16"}],
                                    "eval": {"dtype": "fp32", "why": "train.eval_precision fp32"}}
    for record in rounds:
        assert [d.precision for d in record.devices] == ["bf16"] * 3
        assert [p.dtype for p in record.precision.train] == ["bf16"] and record.precision.eval.dtype == "fp32"

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    rescored = json.loads(result.stdout)
    assert rescored["eval"] == summary.final and rescored["precision"]["dtype"] == "fp32"

    texts = POSITIVE + NEGATIVE
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    fp32 = runner.invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--quiet"])
    bf16 = runner.invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--quiet",
                               "--precision", "bf16"])
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    assert runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "merged")]).exit_code == 0
    dev = dev_rows(sst2_dir, "SST-2")
    got = run_hf_only({
        "texts": job(tmp_path / "merged", "merged", cfg, texts),
        "dev": job(tmp_path / "merged", "merged", cfg, [r["sentence"] for r in dev]),
    })
    exported = _softmax(got["texts"]["logits"])
    np.testing.assert_allclose(_probabilities(fp32.stdout), exported, atol=1e-5, rtol=0)
    # each round's scores come from the export's outputs too: what the server's evaluation computes
    run = load_run(run_dir, eval_data=True)
    assert run.fm.train_precision.dtype == "bf16"
    logits, labels, _ = predict_outputs(run.fm, make_loader(run.exp.eval_set, run.fm.tokenizer, 8, False, 0))
    assert labels.tolist() == [int(r["label"]) for r in dev]
    np.testing.assert_allclose(logits, got["dev"]["logits"], atol=1e-5, rtol=0)
    # the option is live: bf16 inference is close to, and measurably not, the export's numbers
    gap = np.abs(_probabilities(bf16.stdout) - exported).max()
    assert 1e-5 < gap < 0.1, gap
    bad = runner.invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision 'fp16'" in bad.stderr and bad.stdout == ""


def test_the_switch_makes_auto_train_in_bf16_on_any_cpu(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    """FEDLODROP_CPU_AMX=1 takes the AMX path (bf16, other numbers), 0 the fp32 path, on this CPU
    whatever it has; the run line names the choice and why; a bad value is one line, exit 2."""
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"federation.rounds": 1})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    runner, losses = CliRunner(), {}
    for forced, dtype in (("1", "bf16"), ("0", "fp32")):
        monkeypatch.setenv(CPU_AMX_ENV, forced)
        out = tmp_path / f"run{forced}"
        result = runner.invoke(app, ["run", "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        assert f"training {dtype} (train.precision auto: {CPU_AMX_ENV}={forced}), evaluation fp32" in result.stderr
        assert f"(trained {dtype}, evaluated fp32)" in result.stdout
        assert read_summary(out).precision["train"] == [
            {"dtype": dtype, "why": f"train.precision auto: {CPU_AMX_ENV}={forced}"}]
        losses[dtype] = read_metrics(out)[0].train_loss
    assert losses["bf16"] != losses["fp32"]  # the other path really ran
    monkeypatch.setenv(CPU_AMX_ENV, "2")
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and f"{CPU_AMX_ENV}='2'" in result.stderr
    assert not (tmp_path / "bad").exists()
