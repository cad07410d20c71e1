"""`fedlodrop export`: merged and PEFT folders that transformers / PEFT load without fedlodrop and
that give the rebuilt global model's logits, for FedIT and FedEx, encoder and GPT-2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import MINILM, tiny_cfg, train
from export_helpers import dev_rows, job, reference_logits, run_hf_only
from fedlodrop.cli import app
from fedlodrop.run.folder import RunFolder
from fedlodrop.artifacts.export import exact_factors
from fedlodrop.model.backbone import resolve_model_path

ATOL = 1e-4

# the trained MiniLM runs (conftest fedit_run / fedex_run) are shared by both modules: one worker
pytestmark = [pytest.mark.precision, pytest.mark.xdist_group("minilm-runs")]


def export_cli(run_dir, out, *extra):
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


def final_accuracy(run_dir) -> float:
    return RunFolder(run_dir).summary().final["accuracy"]


def check_same_model(got: dict, ref: np.ndarray, accuracy: float, labels: list[int]) -> None:
    np.testing.assert_allclose(got["logits"], ref, atol=ATOL, rtol=0)
    assert (got["logits"].argmax(1) == ref.argmax(1)).all()
    assert np.mean(got["logits"].argmax(1) == np.asarray(labels)) == pytest.approx(accuracy)


@pytest.mark.slow  # trains the packaged MiniLM (fedit_run / fedex_run)
def test_fedit_exports_merged_and_peft_that_load_without_fedlodrop(fedit_run, glue, tmp_path):
    """The default head on MiniLM reads mean-pooled states: both formats ship the modeling file."""
    run_dir, cfg = fedit_run
    rows = dev_rows(glue, "SST-2")
    a, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    assert final_accuracy(run_dir) >= 0.75  # it learned
    ref = reference_logits(run_dir, a)
    assert np.abs(ref - reference_logits(run_dir, a, adapter=False)).max() > 100 * ATOL  # LoRA matters
    assert "trust_remote_code=True" in export_cli(run_dir, tmp_path / "merged").stdout
    assert "README.md" in export_cli(run_dir, tmp_path / "peft", "--format", "peft").stdout
    assert not (tmp_path / "peft" / "model.safetensors").exists()
    for kind in ("merged", "peft"):
        assert (tmp_path / kind / "modeling_mean_pooled.py").is_file()
    adapter_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == resolve_model_path(MINILM)
    assert adapter_cfg["r"] == 4 and not adapter_cfg["rank_pattern"]  # the run's own factors
    assert set(adapter_cfg["modules_to_save"]) >= {"classifier"}

    got = run_hf_only({
        "merged": job(tmp_path / "merged", "merged", cfg, a, remote_code=True),
        "peft": job(tmp_path / "peft", "peft", cfg, a, remote_code=True),
        "untrusted": job(tmp_path / "merged", "merged-untrusted", cfg, a),
    }, modules_cache=tmp_path / "hf-modules")
    for kind in ("merged", "peft"):
        check_same_model(got[kind], ref, final_accuracy(run_dir), labels)
    config = got["merged"]["config"]
    assert config["num_labels"] == 2 and config["problem_type"] == "single_label_classification"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["MeanPooledBertForSequenceClassification"]
    assert "trust_remote_code" in got["untrusted"]["refused"]  # never silently BERT's [CLS] head


@pytest.mark.slow  # trains the packaged MiniLM (fedit_run / fedex_run)
def test_fedex_exports_merged_and_exact_peft(fedex_run, glue, tmp_path):
    run_dir, cfg = fedex_run
    rows = dev_rows(glue, "SST-2")
    a, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    assert final_accuracy(run_dir) >= 0.75
    assert (run_dir / "base_delta.safetensors").is_file()
    ref = reference_logits(run_dir, a)
    assert np.abs(ref - reference_logits(run_dir, a, fold=False)).max() > 100 * ATOL  # the deltas matter
    export_cli(run_dir, tmp_path / "merged")
    result = export_cli(run_dir, tmp_path / "peft", "--format", "peft")
    assert "rank" in result.stdout
    adapter_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = adapter_cfg["rank_pattern"]
    assert len(ranks) == 12 and set(ranks.values()) and adapter_cfg["alpha_pattern"] == ranks
    # the folded residuals (one per round, rank <= (K+1) r) need more than the run's r = 4
    assert all(4 < k <= 384 for k in ranks.values())
    weights = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(k.endswith("classifier.modules_to_save.weight") or "classifier" in k for k in weights)

    got = run_hf_only({
        "merged": job(tmp_path / "merged", "merged", cfg, a),
        "peft": job(tmp_path / "peft", "peft", cfg, a),
    })
    for kind in ("merged", "peft"):
        check_same_model(got[kind], ref, final_accuracy(run_dir), labels)
    assert got["merged"]["config"]["architectures"] == ["BertForSequenceClassification"]
    assert not (tmp_path / "merged" / "modeling_mean_pooled.py").exists()


@pytest.mark.slow  # trains and reloads in a fresh process
def test_gpt2_fedex_export_keeps_conv1d_orientation_and_pad_token(tiny_gpt2, glue, tmp_path):
    cfg = tiny_cfg(tiny_gpt2, glue, **{"train.lr": 5e-2, "train.batch_size": 8, "federation.local_epochs": 3,
                                      "dropout.rate": 0.3, "federation.aggregation": "fedex"})
    run_dir = train(cfg, tmp_path / "run")
    rows = dev_rows(glue, "SST-2")
    a, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    assert final_accuracy(run_dir) > 0.5
    ref = reference_logits(run_dir, a)
    assert np.abs(ref - reference_logits(run_dir, a, fold=False)).max() > 100 * ATOL
    export_cli(run_dir, tmp_path / "merged")
    export_cli(run_dir, tmp_path / "peft", "--format", "peft")
    got = run_hf_only({
        "merged": job(tmp_path / "merged", "merged", cfg, a),
        "peft": job(tmp_path / "peft", "peft", cfg, a),
    })
    for kind in ("merged", "peft"):
        check_same_model(got[kind], ref, final_accuracy(run_dir), labels)
    assert got["merged"]["config"]["pad_token_id"] == 0  # the MiniLM tokenizer's [PAD]
    assert got["merged"]["config"]["architectures"] == ["GPT2ForSequenceClassification"]


def test_exact_factors_reproduce_the_delta_at_its_rank():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 7, generator=g) @ torch.randn(7, 30, generator=g)
    b, a = exact_factors(low)
    assert a.shape == (7, 30) and b.shape == (40, 7)
    torch.testing.assert_close(b @ a, low, atol=1e-5, rtol=1e-5)
    full = torch.randn(40, 30, generator=g)
    b, a = exact_factors(full)
    assert a.shape[0] == 30
    torch.testing.assert_close(b @ a, full, atol=1e-5, rtol=1e-5)
    b, a = exact_factors(torch.zeros(5, 4))
    assert a.shape[0] == 1 and (b @ a == 0).all()


def _one_error_line(result, needle):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


@pytest.mark.slow  # trains the packaged MiniLM (fedit_run / fedex_run)
def test_export_errors_are_one_line_and_write_nothing(fedit_run, tmp_path):
    run_dir, _ = fedit_run
    invoke = lambda *args: CliRunner().invoke(app, ["export", *map(str, args)])
    out = tmp_path / "out"
    _one_error_line(invoke(tmp_path, "--out", out), "not a finished run folder")
    _one_error_line(invoke(run_dir, "--out", out, "--format", "onnx"), "onnx")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_error_line(invoke(run_dir, "--out", full), "not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file.bin"
    a_file.write_text("x")
    _one_error_line(invoke(run_dir, "--out", a_file), "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "full"]


@pytest.mark.slow  # trains the packaged MiniLM (fedit_run / fedex_run)
def test_export_into_an_empty_folder_works_and_a_failure_leaves_nothing(fedit_run, tmp_path, monkeypatch):
    import fedlodrop.artifacts.export as export_mod

    run_dir, _ = fedit_run
    empty = tmp_path / "empty"
    empty.mkdir()
    export_cli(run_dir, empty, "--format", "peft")
    assert (empty / "adapter_model.safetensors").is_file()

    def half_then_fail(run, folder):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "write_merged", half_then_fail)
    with pytest.raises(OSError):
        export_mod.export(run_dir, tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no out, no temp folder


def test_peft_base_path_is_absolute_for_a_relative_folder(tiny_gpt2, monkeypatch):
    """adapter_config.json must name a backbone that loads from anywhere, not from the run's cwd."""
    from pathlib import Path

    from fedlodrop.run.settings import validate
    from fedlodrop.artifacts.export import base_model_id

    folder = Path(tiny_gpt2)
    monkeypatch.chdir(folder.parent)
    assert base_model_id(validate({"model": folder.name, "task": "sst2"})) == str(folder.resolve())
    hub = "bigscience/bloom-560m"
    assert base_model_id(validate({"model": hub, "task": "sst2"})) == hub
