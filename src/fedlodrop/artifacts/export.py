"""Take a finished run out of fedlodrop: a plain transformers model folder, or a PEFT adapter.

`experiment.load_run` rebuilds a run's global model (backbone, FedEx deltas folded into it,
global adapter and head set); `export`, `predict` and `evaluate` all start from it.

Formats:

* `merged`: `merge_and_unload` of that model, so the folded FedEx deltas, s * B @ A and the
  trained head are all in the weights; loads with `AutoModelForSequenceClassification` alone
  (see below for a mean-pooled head).
* `peft`: `adapter_config.json` + `adapter_model.safetensors` for the ORIGINAL backbone, head in
  `modules_to_save`. For FedEx runs the base weights moved too (base_delta), which a LoRA adapter
  on the original backbone can only carry as a larger LoRA: per module, the SVD of
  `base_delta + s * B @ A` truncated at float32 round-off, so `B' @ A'` equals the whole change to
  float tolerance, with the rank of each module in `rank_pattern` (alpha = rank, scaling 1). Its
  size is rank * (n_in + n_out) per module, up to 2x the dense matrix when the accumulated delta
  is full rank (many rounds); `merged` is never larger than the backbone.

A run whose head reads the mean of the token states (`pooling`, the default on the packaged
MiniLM) needs a class BERT does not have: both formats ship `modeling_mean_pooled.py`; `merged`
loads with `trust_remote_code=True`, `peft` on a base built from that file (its README.md).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlodrop.config import RunConfig
from fedlodrop.data.tasks import Task
from fedlodrop.errors import UserError
from fedlodrop.model import modeling_mean_pooled
from fedlodrop.model.backbone import resolve_model_path
from fedlodrop.model.modeling_mean_pooled import MeanPooledBertConfig
from fedlodrop.run.experiment import LoadedRun, check_finished, load_run

FORMATS = ("merged", "peft")


@dataclass
class ExportResult:
    """What an export wrote: the folder, its format, its size in bytes, the rank of each module's LoRA (a FedEx
    PEFT export) and the lines that load it where plain transformers would not."""
    folder: Path
    format: str
    bytes: int
    ranks: dict[str, int] = field(default_factory=dict)  # peft of a FedEx run: rank per module
    how_to_load: str = ""  # for a head transformers does not have: one sentence


def export(run_dir: Path, out: Path, fmt: str = "merged", device: str | None = "cpu") -> ExportResult:
    """Write `fmt` of the run's global model to `out`, all or nothing (temp folder, then rename)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_finished(run_dir)
    out = Path(out)
    _check_out(out)
    run = load_run(run_dir, device=device)
    with _staged(out) as tmp:
        ranks = write_merged(run, tmp) if fmt == "merged" else write_peft(run, tmp)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    how = ""
    if run.fm.pooling.kind == "mean":
        how = ("the head reads mean-pooled token states: load with trust_remote_code=True" if fmt == "merged"
               else f"the head reads mean-pooled token states: build the base as {out / 'README.md'} shows")
    return ExportResult(out, fmt, size, ranks or {}, how)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose another folder")


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temp folder beside `out`, renamed to `out` only when everything was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _check_out(out)  # nobody filled it meanwhile
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def label_config(config, task: Task, pad_token_id: int | None) -> None:
    """What `from_pretrained` needs to rebuild the head and name the labels without fedlodrop."""
    config.num_labels = task.num_labels  # resets id2label: set the names after it
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    if task.label_names:
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: i for i, name in enumerate(task.label_names)}
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id


def write_merged(run: LoadedRun, folder: Path) -> None:
    """PEFT folds s * B @ A into each weight and puts the trained head in place of the original.

    A mean-pooled head (`pooling`) is saved with its modeling file and config under their own model
    type: it loads with `trust_remote_code=True`, and without it transformers refuses to load
    rather than build BERT's [CLS] head."""
    model = run.fm.net.merge_and_unload(safe_merge=True)
    if run.fm.pooling.kind == "mean":

        model.config = MeanPooledBertConfig.from_dict(model.config.to_dict())
    label_config(model.config, run.task, run.fm.tokenizer.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    run.fm.tokenizer.save_pretrained(folder)


def base_model_id(cfg: RunConfig) -> str:
    """What `from_pretrained` should load the backbone from: a hub name, or an absolute folder."""

    path = resolve_model_path(cfg.model)
    return str(Path(path).resolve()) if os.path.isdir(path) else path


def write_peft(run: LoadedRun, folder: Path) -> dict[str, int]:
    """The adapter and head in PEFT's own layout; a FedEx run's deltas as an exact larger LoRA."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    net = run.fm.net
    config = copy.deepcopy(net.peft_config["default"])
    config.base_model_name_or_path = base_model_id(run.cfg)
    config.inference_mode = True
    weights = get_peft_model_state_dict(net, save_embedding_layers=False)
    ranks = _fold_deltas_into_lora(run, config, weights) if run.fold else {}
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    run.fm.tokenizer.save_pretrained(folder)  # decoders: the pad token fedlodrop trained with
    if run.fm.pooling.kind == "mean":
        _write_mean_pooled_base(run, folder, config.base_model_name_or_path)
    return ranks


MEAN_POOLED_PEFT = """\
# A FedLoDrop adapter for a mean-pooled head

The classifier of this adapter reads tanh(mean of the token states), the pooling the backbone was
trained with, not BERT's [CLS] pooler. Build the base model with `modeling_mean_pooled.py` (in
this folder; it needs only torch and transformers), then load the adapter:

```python
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

folder = "."  # this folder
base_path = PeftConfig.from_pretrained(folder).base_model_name_or_path  # {base}
cls = get_class_from_dynamic_module("modeling_mean_pooled.MeanPooledBertForSequenceClassification", folder)
config = AutoConfig.from_pretrained(base_path, num_labels={num_labels})
model = PeftModel.from_pretrained(cls.from_pretrained(base_path, config=config), folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
```

`AutoPeftModelForSequenceClassification` would build BERT's [CLS] head instead: do not use it here.
"""


def _write_mean_pooled_base(run: LoadedRun, folder: Path, base: str) -> None:
    """A PEFT adapter loads onto a base model the user builds: ship the class that builds it."""

    shutil.copyfile(modeling_mean_pooled.__file__, folder / "modeling_mean_pooled.py")
    (folder / "README.md").write_text(MEAN_POOLED_PEFT.format(base=base, num_labels=run.task.num_labels))


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A == delta up to float32 round-off, of the smallest such rank (>= 1)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tol = s[0] * max(delta.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(1, int((s > tol).sum()))
    root = s[:k].sqrt()
    return (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()


def _fold_deltas_into_lora(run: LoadedRun, config, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """Replace each module's (B, A) by exact factors of F + s * B @ A; scaling 1."""
    ranks: dict[str, int] = {}
    for m in run.fm.modules:
        shape = m.shape
        key_a = f"base_model.model.{shape.name}.lora_A.weight"
        key_b = f"base_model.model.{shape.name}.lora_B.weight"
        if key_a not in weights or key_b not in weights:  # PEFT changed its layout: fail loudly
            raise RuntimeError(f"PEFT state dict has no {key_a}")
        a = run.adapter[shape.key_a].double()
        b = run.adapter[shape.key_b].double()
        delta = shape.scaling * (b @ a)
        if shape.name in run.fold:
            delta = delta + run.fold[shape.name].double()  # both (out x in)
        weights[key_b], weights[key_a] = exact_factors(delta)
        ranks[shape.name] = weights[key_a].shape[0]
    pattern = {re.escape(name): k for name, k in ranks.items()}
    config.r = max(ranks.values())
    config.lora_alpha = config.r
    config.rank_pattern = dict(pattern)
    config.alpha_pattern = dict(pattern)  # alpha = r: scaling 1, the factors carry the scale
    config.use_rslora = False
    return ranks
