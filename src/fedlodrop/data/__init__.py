"""Data layer: tasks, loading (hub, GLUE TSV, offline Rotten Tomatoes, your own files),
partitions, batching, metrics.

Only `tasks` is imported eagerly: the validator (`run.settings`) reads the task table on paths
that must not pay for torch, datasets or flwr (a Flower ClientApp answering a query). Everything
else loads on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlodrop.data.tasks import TASKS, Task

if TYPE_CHECKING:
    from fedlodrop.data.canonical import canonical_features
    from fedlodrop.data.collate import (
        length_order,
        make_loader,
        pad_token_fix,
        restore_order,
        tokenize,
    )
    from fedlodrop.data.loaders import load_splits, load_task, subsample
    from fedlodrop.data.partitions import partition

_LAZY = {
    "load_splits": "loaders",
    "load_task": "loaders",
    "subsample": "loaders",
    "canonical_features": "canonical",
    "partition": "partitions",
    "tokenize": "collate",
    "make_loader": "collate",
    "length_order": "collate",
    "restore_order": "collate",
    "pad_token_fix": "collate",
}

__all__ = [
    "TASKS",
    "Task",
    "canonical_features",
    "length_order",
    "load_splits",
    "load_task",
    "make_loader",
    "pad_token_fix",
    "partition",
    "restore_order",
    "subsample",
    "tokenize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"fedlodrop.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedlodrop.data' has no attribute {name!r}")
