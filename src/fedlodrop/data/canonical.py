"""The canonical form every source's data takes (`text_a`, `text_b` for pairs, `label`), and what
reading it shares: the column types, the fixed seed of evaluation subsamples and held-out rows,
and `datasets` without its progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fedlodrop.data.tasks import Task

if TYPE_CHECKING:
    from datasets import Features

EVAL_SUBSAMPLE_SEED = 0  # evaluation subsamples and held-out rows: the same for every run's seed


def canonical_features(task: Task) -> Features:
    """Column types every source produces for `task`."""
    from datasets import ClassLabel, Features, Value

    cols = {"text_a": Value("string")}
    if task.is_pair:
        cols["text_b"] = Value("string")
    cols["label"] = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features(cols)



@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars from `datasets` internals (map, flatten): the engine reports progress."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
