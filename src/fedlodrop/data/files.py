"""Your own data: files (CSV, TSV, JSONL/JSON, Parquet, a `save_to_disk` folder) or a dataset on
the Hugging Face Hub by path, read by `datasets` and mapped to the canonical columns.

    data.train / data.eval       files, or data.hub_path (+ hub_name, train_split, eval_split)
    data.text_columns            one column, or two for sentence pairs  -> text_a, text_b
    data.label_column            the class or the number to predict     -> label
    data.device_column           with federation.partition by_column    -> device (a string)

The classes: `data.label_names` in id order, else a `ClassLabel`'s names, else the sorted distinct
values of the training labels (numbers sorted as numbers, each named by its text). A label is
matched to its class by its text ("1" and 1 are the class named "1"); integer labels that name no
class are ids when every one of them is a valid id. Floats mean regression unless
`data.regression` is false. What the data decides is returned as the run's `Task`, which the run
folder keeps (`task.json`), so evaluate, predict and export use the same ids and names.

Every problem of the user's data is one `UserError` line naming the key, the file, the column and,
where it helps, the row (1-based, counting examples, not the header), raised before anything is
written.
"""

from __future__ import annotations

import csv
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlodrop.data.canonical import EVAL_SUBSAMPLE_SEED, canonical_features, quiet_datasets
from fedlodrop.data.tasks import Task, custom_task
from fedlodrop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlodrop.config import RunConfig

READERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HOLDOUT_SEED = EVAL_SUBSAMPLE_SEED  # the held-out validation rows do not depend on the run's seed


def load_own(cfg: RunConfig) -> tuple[Task, Dataset | None, Dataset]:
    """The task and its (train, eval) splits in canonical columns, before any subsampling. With
    `federation.partition: local` (a deployment whose devices bring their own files) the server
    reads only data.eval: train is None, and the classes come from the config or from data.eval."""
    data = cfg.data
    if cfg.federation.partition == "local":
        where = f"data.eval {data.eval}"
        eval_raw = read_table(data.eval, "data.eval", data.eval_split or "validation")
        columns = _Columns(data, by_device=False)
        columns.check(eval_raw, where, train=False)
        texts, labels, _ = columns.read(eval_raw, where, train=False)
        task, ids = _task(cfg, eval_raw, labels, where)
        return task, None, _canonical(task, texts, ids, None)
    if data.train is not None:
        train_raw, where = read_table(data.train, "data.train", data.train_split), f"data.train {data.train}"
        eval_raw = read_table(data.eval, "data.eval", data.eval_split or "validation") if data.eval is not None else None
        eval_where = f"data.eval {data.eval}"
    else:
        train_raw, eval_raw = _from_hub(data)
        where = f"data.hub_path {data.hub_path} split {data.train_split}"
        eval_where = f"data.hub_path {data.hub_path} split {data.eval_split}"
    columns = _Columns(data, by_device=cfg.federation.partition == "by_column")
    columns.check(train_raw, where, train=True)
    texts, labels, devices = columns.read(train_raw, where, train=True)
    task, ids = _task(cfg, train_raw, labels, where)
    train = _canonical(task, texts, ids, devices)
    if eval_raw is None:
        if len(train) < 2:
            raise UserError(f"{where} holds {len(train)} example: too few to hold out validation data")
        with quiet_datasets():
            parts = train.train_test_split(test_size=data.eval_fraction, seed=HOLDOUT_SEED, shuffle=True)
        return task, parts["train"], parts["test"].remove_columns([c for c in ("device",) if c in train.column_names])
    columns.check(eval_raw, eval_where, train=False)
    texts, labels, _ = columns.read(eval_raw, eval_where, train=False)
    return task, train, _canonical(task, texts, _label_ids(task, labels, eval_where, data.label_column), None)


def load_device_file(cfg: RunConfig, task: Task, path: Path) -> Dataset:
    """A device's own training file in a deployment (`federation.partition: local`), in the run's
    columns and classes (`task`: the server's, sent with every round: a device cannot see the
    others' classes). One line naming the file, column and row for anything wrong with it."""
    where = f"this device's data {path}"
    ds = read_table(path, "--data", cfg.data.train_split)
    columns = _Columns(cfg.data, by_device=False)
    columns.check(ds, where, train=False)
    texts, labels, _ = columns.read(ds, where, train=False)
    return _canonical(task, texts, _label_ids(task, labels, where, cfg.data.label_column), None)


# ---------------------------------------------------------------------------- reading


@contextmanager
def _quiet_logs():
    """`datasets` logs a reader's error before raising it: the user gets our one line instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(err: BaseException) -> str:
    """The innermost message of an exception chain, first line (datasets wraps pandas / arrow)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_table(path: Path, key: str, split: str) -> Dataset:
    """One file, or a `save_to_disk` folder (its `split` if it holds several), as a Dataset."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{key}: no such file or folder: {path}")
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise UserError(f"{key} {path} is a folder but not one written by datasets' save_to_disk; give a "
                            "file, or a folder of data files as data.hub_path")
        try:
            with _quiet_logs(), quiet_datasets():
                ds = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any reader failure is the user's file
            raise UserError(f"cannot read {key} {path}: {_reason(err)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"{key} {path} holds the splits {', '.join(ds)}, not {split!r} "
                                "(data.train_split / data.eval_split)")
            ds = ds[split]
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise UserError(f"{key} {path}: unknown extension {path.suffix!r}; use .csv, .tsv, .jsonl, .json, "
                            ".parquet or a save_to_disk folder")
        if path.stat().st_size == 0:
            raise UserError(f"{key} {path} is empty")
        options: dict[str, Any] = {}
        if reader == "csv":  # only an empty field is missing ("NA", "null" are text)
            options = {"keep_default_na": False, "na_values": [""]}
            if path.suffix.lower() == ".tsv":  # as GLUE writes it: tabs, no quoting
                options |= {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        try:
            with _quiet_logs(), quiet_datasets():
                ds = datasets.load_dataset(reader, data_files=str(path), split="train", **options)
        except ValueError as err:
            if "corresponds to no data" in str(err):
                raise UserError(f"{key} {path} holds no rows") from None
            raise UserError(f"cannot read {key} {path}: {_reason(err)}") from None
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot read {key} {path}: {_reason(err)}") from None
    if len(ds) == 0:
        raise UserError(f"{key} {path} holds no rows")
    return ds


def _from_hub(data) -> tuple[Dataset, Dataset | None]:
    """The train and eval splits of `data.hub_path` (a hub name, or a local folder of data files);
    eval None when `data.eval_split` is null (held out)."""
    import datasets

    shown = data.hub_path + (f" ({data.hub_name})" if data.hub_name else "")

    def split(name: str) -> Dataset:
        try:
            with _quiet_logs(), quiet_datasets():
                return datasets.load_dataset(data.hub_path, data.hub_name, split=name)
        except ValueError as err:
            if "Unknown split" in str(err) or "Bad split" in str(err):
                raise UserError(f"data.hub_path {shown} has no split {name!r} ({_reason(err)}); set "
                                "data.train_split / data.eval_split (null: hold out data.eval_fraction)") from None
            raise UserError(f"cannot read data.hub_path {shown}: {_reason(err)}") from None
        except Exception as err:  # noqa: BLE001 - offline, no such dataset, no network, a bad file
            raise UserError(f"could not load data.hub_path {shown} ({_reason(err)}); offline, give your files "
                            "as data.train / data.eval or a local folder as data.hub_path") from None

    train = split(data.train_split)
    if len(train) == 0:
        raise UserError(f"data.hub_path {shown} split {data.train_split!r} holds no rows")
    return train, (split(data.eval_split) if data.eval_split else None)


# ---------------------------------------------------------------------------- columns


class _Columns:
    """The user's column names and how a split's rows become texts, labels and devices."""

    def __init__(self, data, by_device: bool):
        self.texts = list(data.text_columns)
        self.label = data.label_column
        self.device = data.device_column if by_device else None

    def check(self, ds: Dataset, where: str, train: bool) -> None:
        wanted = [*self.texts, self.label] + ([self.device] if train and self.device else [])
        for col in wanted:
            if col not in ds.column_names:
                key = ("data.device_column" if col == self.device else
                       "data.label_column" if col == self.label else "data.text_columns")
                raise UserError(f"{where} has no column {col!r} ({key}); its columns: {', '.join(ds.column_names)}")

    def read(self, ds: Dataset, where: str, train: bool) -> tuple[list[list[str]], list, list[str] | None]:
        texts = []
        for col in self.texts:
            values = []
            for row, value in enumerate(ds[col], 1):
                if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
                    raise UserError(f"{where} row {row}: column {col!r} has no text")
                if isinstance(value, (dict, list)):
                    raise UserError(f"{where} row {row}: column {col!r} holds {type(value).__name__}, not text")
                values.append(str(value))
            texts.append(values)
        labels = list(ds[self.label])
        for row, value in enumerate(labels, 1):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise UserError(f"{where} row {row}: column {self.label!r} has no label")
            if isinstance(value, (dict, list)):
                raise UserError(f"{where} row {row}: label {value!r} in column {self.label!r} is not a class or a number")
        devices = None
        if train and self.device:
            devices = []
            for row, value in enumerate(ds[self.device], 1):
                if value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == "":
                    raise UserError(f"{where} row {row}: column {self.device!r} (data.device_column) is empty")
                devices.append(value)
        return texts, labels, devices


# ---------------------------------------------------------------------------- labels


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "text"


def _task(cfg: RunConfig, ds: Dataset, labels: list, where: str) -> tuple[Task, list]:
    """The task the training labels say (or the config gives), and each label's id or value."""
    from datasets import ClassLabel

    data, col = cfg.data, cfg.data.label_column
    kinds = {}
    for row, value in enumerate(labels, 1):
        kinds.setdefault(_kind(value), (row, value))
    if data.regression:
        bad = next(((r, v) for k, (r, v) in kinds.items() if k in ("text", "bool")), None)
        if bad is not None:
            raise UserError(f"{where} row {bad[0]}: label {bad[1]!r} in column {col!r} is not a number "
                            "(data.regression is true)")
        regression = True
    else:
        regression = data.regression is None and "float" in kinds and "text" not in kinds and "bool" not in kinds
    if regression:
        values = [float(v) for v in labels]
        if len(set(values)) < 2:
            raise UserError(f"{where}: column {col!r} holds one value ({values[0]:g}) in every row: nothing to learn")
        return _make(cfg, None, True), values
    feature = ds.features.get(col)
    if data.label_names:
        names = tuple(data.label_names)
    elif isinstance(feature, ClassLabel):
        names = tuple(feature.names)
    else:
        if "text" in kinds and len(kinds) > 1:
            (row_t, text), (row_n, number) = kinds["text"], next(v for k, v in kinds.items() if k != "text")
            raise UserError(f"{where}: column {col!r} mixes label types: {number!r} (row {row_n}) and {text!r} "
                            f"(row {row_t}); make them one type, or name the classes with data.label_names")
        if "text" in kinds:
            numeric = [(r, v) for r, v in enumerate(labels, 1) if _is_number(v)]
            if numeric and len(numeric) < len(labels):
                row_t = next(r for r, v in enumerate(labels, 1) if not _is_number(v))
                raise UserError(f"{where}: column {col!r} mixes label types: {numeric[0][1]!r} (row {numeric[0][0]}) "
                                f"and {labels[row_t - 1]!r} (row {row_t}); make them one type, or name the classes "
                                "with data.label_names")
        distinct = sorted(set(labels), key=lambda v: (float(v), str(v)) if _is_number(v) else (math.inf, str(v)))
        names = tuple(str(v) for v in distinct)
    if len(set(map(str, labels))) < 2:
        raise UserError(f"{where}: column {col!r} holds one class ({labels[0]!r}) in every row: nothing to learn")
    task = _make(cfg, names, False)
    return task, _label_ids(task, labels, where, col, feature=feature)


def _make(cfg: RunConfig, names: tuple[str, ...] | None, regression: bool) -> Task:
    try:
        return custom_task(cfg.task, cfg.data, names, regression)
    except ValueError as err:
        raise UserError(str(err)) from None


def _is_number(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _label_ids(task: Task, labels: list, where: str, col: str, feature=None) -> list:
    """Each label as its class id (or a float for regression); one line for a label that is not a
    class of the task (an eval label the training data never had, say)."""
    from datasets import ClassLabel

    if task.is_regression:
        for row, value in enumerate(labels, 1):
            if not _is_number(value) or isinstance(value, bool):
                raise UserError(f"{where} row {row}: label {value!r} in column {col!r} is not a number (the task "
                                "is a regression)")
        return [float(v) for v in labels]
    if isinstance(feature, ClassLabel) and tuple(feature.names) == task.label_names:
        return list(labels)  # already ids of these very names
    index = {name: i for i, name in enumerate(task.label_names)}
    texts = [str(v) for v in labels]
    if all(t in index for t in texts):
        return [index[t] for t in texts]
    as_ids = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(index) for v in labels)
    if as_ids and not any(t in index for t in texts):
        return list(labels)
    row = next(r for r, t in enumerate(texts, 1) if t not in index)
    raise UserError(f"{where} row {row}: label {labels[row - 1]!r} in column {col!r} is not a class of the task "
                    f"({', '.join(task.label_names)})")


def _canonical(task: Task, texts: list[list[str]], labels: list, devices: list | None) -> Dataset:
    from datasets import Dataset, Value

    columns: dict[str, list] = {"text_a": texts[0]}
    if task.is_pair:
        columns["text_b"] = texts[1]
    columns["label"] = labels
    features = canonical_features(task)
    if devices is not None:
        columns["device"] = [str(v) for v in devices]
        features["device"] = Value("string")
    return Dataset.from_dict(columns, features=features)
