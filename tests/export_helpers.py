"""Helpers for the export and predict tests: a reference rebuilt without `fedlodrop.artifacts.export`, and
a subprocess that loads exported folders with transformers / PEFT while fedlodrop cannot be
imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fedlodrop.run.settings import load_config
from conftest import load_global

# Loads every job with transformers (merged) or PEFT (peft) and prints logits as JSON. The first
# lines make `import fedlodrop` fail, whatever PYTHONPATH or an editable install would allow.
HF_ONLY = r"""
import json, sys
sys.modules["fedlodrop"] = None
try:
    import fedlodrop
except ImportError:
    pass
else:
    raise SystemExit("fedlodrop is importable in the isolated process")
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

jobs = json.loads(sys.stdin.read())
out = {}
for name, job in jobs.items():
    tok = AutoTokenizer.from_pretrained(job["dir"])
    if job["kind"] == "merged-untrusted":  # a mean-pooled export must refuse, not load BERT's [CLS] head
        try:
            AutoModelForSequenceClassification.from_pretrained(job["dir"])
        except ValueError as err:
            out[name] = {"refused": str(err)}
            continue
        out[name] = {"refused": None}
        continue
    if job["kind"] == "merged":
        model = AutoModelForSequenceClassification.from_pretrained(job["dir"], trust_remote_code=job["remote_code"])
    else:
        from peft import PeftConfig, PeftModel
        base_path = PeftConfig.from_pretrained(job["dir"]).base_model_name_or_path
        if job["remote_code"]:  # the recipe of the exported README.md
            from transformers.dynamic_module_utils import get_class_from_dynamic_module
            cls = get_class_from_dynamic_module(
                "modeling_mean_pooled.MeanPooledBertForSequenceClassification", job["dir"])
            config = AutoConfig.from_pretrained(base_path, num_labels=job["num_labels"])
            base = cls.from_pretrained(base_path, config=config)
        else:
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=job["num_labels"])
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(base, job["dir"])
    model.eval()
    enc = tok(job["a"], job["b"], padding=True, truncation=True, max_length=job["max_length"],
              return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    cfg = model.config
    seen = {k: getattr(cfg, k, None) for k in ("num_labels", "problem_type", "pad_token_id", "architectures")}
    seen["id2label"] = {str(i): label for i, label in cfg.id2label.items()}
    out[name] = {"logits": logits.double().tolist(), "config": seen}
print("\n" + json.dumps(out))  # after any prompt transformers wrote
"""


def run_hf_only(jobs: dict[str, dict], modules_cache: Path | None = None) -> dict[str, dict]:
    """Run HF_ONLY on `jobs` ({name: {dir, kind, a, b, max_length, num_labels}}) in a clean process;
    `modules_cache`: where transformers copies an export's modeling file (default: the home cache)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    if modules_cache is not None:
        env["HF_MODULES_CACHE"] = str(modules_cache)
    proc = subprocess.run(
        [sys.executable, "-c", HF_ONLY],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for value in result.values():
        if "logits" in value:
            value["logits"] = np.asarray(value["logits"])
    return result


def job(folder: Path, kind: str, cfg, a: list[str], b: list[str] | None = None, remote_code: bool = False) -> dict:
    """`remote_code`: the export ships its modeling file (a mean-pooled head) and is loaded with it."""
    from fedlodrop.data.tasks import TASKS

    return {"dir": str(folder), "kind": kind, "a": a, "b": b, "max_length": cfg.train.max_length,
            "num_labels": TASKS[cfg.task].num_labels, "remote_code": remote_code}


@torch.no_grad()
def reference_logits(
    run_dir: Path, a: list[str], b: list[str] | None = None, fold: bool = True, adapter: bool = True
) -> np.ndarray:
    """Logits of the run's global model rebuilt the way `fedlodrop evaluate` does
    (experiment.load_run: build, the fold, the adapter), independently of fedlodrop.artifacts.export. `fold=False` skips
    the FedEx deltas and `adapter=False` zeroes every B: both show that a test would notice."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    exp, gs = load_global(Path(run_dir))
    if not fold:
        exp.fm.set_fold({}, 0)
    exp.fm.set_view(None)
    if not adapter:
        gs = {k: torch.zeros_like(v) if k.endswith(".lora_B") else v for k, v in gs.items()}
    exp.fm.set_state(gs)
    exp.fm.net.eval()
    enc = exp.fm.tokenizer(a, b, padding=True, truncation=True, max_length=cfg.train.max_length,
                           return_tensors="pt")
    return exp.fm.net(**enc).logits.double().numpy()


def dev_rows(glue_dir: Path, folder: str) -> list[dict[str, str]]:
    """The rows of a GLUE-layout dev.tsv (header names as keys)."""
    lines = (Path(glue_dir) / folder / "dev.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]
