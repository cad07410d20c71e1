"""Decoders end to end: tiny BLOOM and LLaMA train with FedLoDrop on PEFT's default targets, pool
the last non-pad token, export merged, and predict the same as the rebuilt global model."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from export_helpers import dev_rows, job, reference_logits, run_hf_only
from fedlodrop.cli import app
from fedlodrop.run.experiment import load_run
from conftest import read_metrics, tiny_cfg, train

pytestmark = pytest.mark.precision  # CI runs these again on the other CPU path

# tiny random decoders learn the polarity task in 2 rounds with these (accuracy >= 0.9 at seeds 3-6)
DECODER = {"train.lr": 5e-2, "train.batch_size": 8, "federation.local_epochs": 3, "dropout.rate": 0.3}


@pytest.mark.parametrize(
    "fixture,targets,block",
    [("tiny_bloom", {"query_key_value"}, "transformer.h."), ("tiny_llama", {"q_proj", "v_proj"}, "model.layers.")],
)
@pytest.mark.slow  # trains, exports and reloads in a fresh process
def test_decoder_learns_exports_merged_and_predicts(request, fixture, targets, block, sst2_dir, tmp_path):
    cfg = tiny_cfg(request.getfixturevalue(fixture), sst2_dir, **DECODER)
    run_dir = train(cfg, tmp_path / "run")
    rounds = read_metrics(run_dir)
    assert rounds[1].train_loss < rounds[0].train_loss
    assert rounds[-1].eval["accuracy"] >= 0.75  # the dev set is half positive
    assert cfg.federation.aggregation == "fedex" and (run_dir / "base_delta.safetensors").is_file()

    loaded = load_run(run_dir)
    names = [m.name for m in loaded.fm.layout.modules]
    assert {n.rsplit(".", 1)[-1] for n in names} == targets and all(n.startswith(block) for n in names)
    assert loaded.fm.layout.head_keys == ["head.score.weight"]
    pad = loaded.fm.tokenizer.pad_token_id
    assert loaded.fm.net.config.pad_token_id == pad == 0

    rows = dev_rows(sst2_dir, "SST-2")
    a = [r["sentence"] for r in rows]
    ref = reference_logits(run_dir, a)
    # pooling reads the last non-pad token: a sentence alone and padded in a batch agree
    enc = loaded.fm.tokenizer(a[:1], return_tensors="pt")
    with torch.no_grad():
        alone = loaded.fm.net(**enc).logits.double().numpy()
    np.testing.assert_allclose(alone, ref[:1], atol=1e-5, rtol=0)

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == pad
    got = run_hf_only({"merged": job(out, "merged", cfg, a)})["merged"]
    np.testing.assert_allclose(got["logits"], ref, atol=1e-4, rtol=0)

    (tmp_path / "in.csv").write_text("sentence\n" + "\n".join(f'"{s}"' for s in a) + "\n")
    result = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "in.csv"), "--quiet"])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["prediction"]) for r in table] == ref.argmax(1).tolist()
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in table])
    expected = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe,fixture", [("bloom-560m-sst2", "tiny_bloom"), ("llama-2-7b-rte", "tiny_llama")])
def test_gpu_recipe_lora_settings_fit_the_architecture(request, recipe, fixture):
    """The GPU recipe's LoRA settings on a tiny model of the same architecture: the targets exist
    and every attention block gets one LoRA per target."""
    from pathlib import Path

    from fedlodrop.run.settings import load_config
    from fedlodrop.data.tasks import TASKS
    from fedlodrop.model.backbone import build_model, load_tokenizer

    path = Path(__file__).resolve().parents[1] / "configs" / "gpu" / f"{recipe}.yaml"
    cfg = load_config(path, [f"model={request.getfixturevalue(fixture)}", "train.device=cpu",
                             "train.precision=fp32", "train.gradient_checkpointing=false"])
    fm = build_model(cfg, TASKS[cfg.task], load_tokenizer(cfg), init_seed=0)
    names = [m.name for m in fm.layout.modules]
    assert len(names) == 2 * len(cfg.lora.target_modules)  # 2 layers in the tiny model
    assert {n.rsplit(".", 1)[-1] for n in names} == set(cfg.lora.target_modules)
    assert all(m.r == cfg.lora.r and m.scaling == cfg.lora.alpha / cfg.lora.r for m in fm.layout.modules)
