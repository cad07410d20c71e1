"""What the classification head reads: the architecture's own pooling, or the mean of the tokens.

`pooling: auto` reads a sentence-transformers checkpoint's own pooling module (`modules.json` ->
`1_Pooling/config.json`, in a local folder or a hub model): a checkpoint trained through mean pooling gets a head on the mean of its
token states (`modeling_mean_pooled`), because its [CLS] pooler was never trained. Anything else
keeps the architecture's head (BERT's [CLS] pooler, RoBERTa's first-token head, a decoder's last
token). docs/pooling.md has the measurements behind the default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedlodrop.errors import UserError

MEAN_POOLED_TYPES = ("bert",)  # model types with a mean-pooled head (modeling_mean_pooled)


@dataclass(frozen=True)
class Pooling:
    """What the classifier reads, resolved for a model: its kind and the phrase the run's first line shows."""
    kind: str  # "cls": the architecture's own head; "mean": modeling_mean_pooled
    why: str  # one phrase, printed with the run's header

    def model_class(self):
        """The transformers class that builds this head (loaded lazily: transformers is slow to import)."""
        if self.kind == "mean":
            from fedlodrop.model.modeling_mean_pooled import MeanPooledBertForSequenceClassification

            return MeanPooledBertForSequenceClassification
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification


def _model_file(path: str, name: str) -> Path | None:
    """`name` in a model folder, or in a hub model (from the cache, or downloaded with the config)."""
    if os.path.isdir(path):
        return Path(path) / name if (Path(path) / name).is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def checkpoint_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean", "cls", "max", ...), or None."""
    modules = _model_file(path, "modules.json")
    if modules is None:
        return None
    try:
        entry = next(e for e in json.loads(modules.read_text()) if str(e.get("type", "")).endswith(".Pooling"))
        config = _model_file(path, f"{entry['path']}/config.json")
        cfg = json.loads(config.read_text()) if config else {}
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None
    modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
             for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    return modes[0] if len(modes) == 1 else "+".join(modes) or None


def resolve_pooling(setting: str, path: str, model_type: str | None, head_modules: list[str] | None = None) -> Pooling:
    """`setting` (auto | cls | mean) for the model at `path` (a folder or a hub id) of `model_type`."""
    pooling = _resolve(setting, path, model_type)
    if pooling.kind == "mean" and "pooler" in (head_modules or []):
        raise UserError("invalid config: lora.head_modules: 'pooler' is not used by the mean-pooled head "
                        f"({pooling.why}); drop it or set pooling=cls")
    return pooling


def _resolve(setting: str, path: str, model_type: str | None) -> Pooling:
    if setting == "cls":
        return Pooling("cls", "the architecture's own head (pooling=cls)")
    if setting == "mean":
        if model_type not in MEAN_POOLED_TYPES:
            raise UserError(
                f"invalid config: pooling: mean is built for {', '.join(MEAN_POOLED_TYPES)} models, "
                f"not {model_type!r}; use pooling=cls"
            )
        return Pooling("mean", "mean of the token states (pooling=mean)")
    trained = checkpoint_pooling(path)
    if trained == "mean" and model_type in MEAN_POOLED_TYPES:
        return Pooling("mean", "mean of the token states, as the sentence-transformers checkpoint was trained")
    if trained is None:
        return Pooling("cls", "the architecture's own head")
    return Pooling("cls", f"the architecture's own head (the checkpoint's {trained} pooling has no head here)")
