"""Predictions of a run's global model for new text in a CSV, TSV or JSONL file.

The file needs the task's text columns: for a built-in task as the Hugging Face GLUE datasets
name them (`sentence`; `sentence1` and `sentence2`; `question` and `sentence`, ...; `text` for
rotten_tomatoes), for your own data its `data.text_columns`. The output is CSV: the input's
columns, then `prediction` (label index, or the score for regression) and, for classification,
`predicted_label` (the class's name) and `prob_<label name>` per label. Texts are tokenised by the same function
as training (`data.tokenize`), so truncation is the run's `train.max_length`.

Reading: CSV with the usual quoting; TSV as GLUE writes it (tab-separated, no quoting, so a `"` is
just a character); JSONL one object per line. A UTF-8 BOM is tolerated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlodrop.data import length_order, make_loader, restore_order, tokenize
from fedlodrop.data.tasks import Task
from fedlodrop.errors import UserError
from fedlodrop.run.experiment import check_finished, load_run
from fedlodrop.run.logs import progress_bar

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


@dataclass
class Table:
    """An input file's rows as read (every value as it was), with its columns in order."""
    columns: list[str]
    rows: list[dict[str, object]]


def text_columns(task: Task) -> list[str]:
    """The input columns a task's model reads: its first text, and its second for a pair task."""
    return [task.text_a] + ([task.text_b] if task.text_b else [])


def output_columns(task: Task) -> list[str]:
    """The columns `predict` adds: the prediction, and for classes the label's name and one probability per
    class."""
    if task.is_regression:
        return ["prediction"]
    return ["prediction", "predicted_label"] + [f"prob_{name}" for name in task.label_names]


def read_table(path: Path) -> Table:
    """Rows of a CSV, TSV or JSONL file (by extension), every value as read."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"--input {path}: unknown extension {path.suffix!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            table = _read_jsonl(fh, path) if kind == "jsonl" else _read_delimited(fh, path, kind)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read --input {path}: {err}") from None
    if not table.rows:
        raise UserError(f"--input {path} holds no rows")
    return table


def _read_delimited(fh, path: Path, kind: str) -> Table:
    if kind == "tsv":
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(fh)
    header = next(reader, None)
    if not header:
        raise UserError(f"--input {path} is empty (no header line)")
    if len(set(header)) != len(header):
        raise UserError(f"--input {path}: the header repeats a column name")
    rows = []
    for values in reader:
        if not values:  # blank line
            continue
        if len(values) != len(header):
            raise UserError(
                f"--input {path} line {reader.line_num}: {len(values)} fields, the header has {len(header)}"
            )
        rows.append(dict(zip(header, values)))
    return Table(header, rows)


def _read_jsonl(fh, path: Path) -> Table:
    columns: dict[str, None] = {}
    rows = []
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--input {path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"--input {path} line {number}: expected a JSON object, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return Table(list(columns), rows)


def texts(table: Table, task: Task, path: Path) -> tuple[list[str], list[str] | None]:
    """The task's text columns as strings; one line naming a missing column or value."""
    found = []
    for col in text_columns(task):
        if col not in table.columns:
            raise UserError(
                f"--input {path} has no column {col!r} (task {task.name} reads "
                f"{' and '.join(map(repr, text_columns(task)))}; columns: {', '.join(table.columns)})"
            )
        values = []
        for i, row in enumerate(table.rows, 1):
            value = row.get(col)
            if value is None or isinstance(value, (dict, list)):
                raise UserError(f"--input {path} row {i}: no text in column {col!r}")
            values.append(str(value))
        found.append(values)
    clash = [c for c in output_columns(task) if c in table.columns]
    if clash:
        raise UserError(f"--input {path} already has a column {clash[0]!r}, which the output adds")
    return found[0], (found[1] if len(found) > 1 else None)


@torch.no_grad()
def logits_for(run, texts_a: list[str], texts_b: list[str] | None, batch_size: int, progress=None) -> np.ndarray:
    """Logits (n x num_labels) of the loaded global model, in input order."""
    from datasets import Dataset


    fm, task = run.fm, run.task
    cols: dict[str, list] = {"text_a": texts_a, "label": [0.0 if task.is_regression else 0] * len(texts_a)}
    if texts_b is not None:
        cols["text_b"] = texts_b
    data = tokenize(Dataset.from_dict(cols), fm.tokenizer, task, run.cfg.train.max_length)
    loader = make_loader(data, fm.tokenizer, batch_size, False, 0, sort_by_length=True)
    bar = progress.add_task("predict", total=len(data)) if progress is not None else None
    fm.net.eval()
    out = []
    for batch in loader:
        batch = {k: v.to(fm.device) for k, v in batch.items() if k != "labels"}
        with fm.eval_autocast():
            logits = fm.net(**batch).logits.float()
        out.append(logits.cpu().numpy())
        if bar is not None:
            progress.advance(bar, logits.shape[0])
    return restore_order(np.concatenate(out).astype(np.float64), length_order(data))


def prediction_columns(task: Task, logits: np.ndarray) -> dict[str, np.ndarray]:
    """The added columns from the model's logits: the argmax class (its id and name) and softmax probabilities,
    or the regression score."""
    if task.is_regression:
        return {"prediction": logits[:, 0]}
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    ids = logits.argmax(axis=1)
    cols = {"prediction": ids, "predicted_label": np.array(task.label_names, dtype=object)[ids]}
    for j, name in enumerate(task.label_names):
        cols[f"prob_{name}"] = probs[:, j]
    return cols


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value)
    return value


def write_csv(table: Table, predictions: dict[str, np.ndarray], fh) -> None:
    """Write the input's rows with the prediction columns appended (a value that is a list or dict as JSON)."""
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(table.columns + list(predictions))
    for i, row in enumerate(table.rows):
        added = [p[i].item() if hasattr(p[i], "item") else p[i] for p in predictions.values()]
        writer.writerow([_cell(row.get(c)) for c in table.columns] + added)


def predict_file(
    run_dir: Path,
    input_path: Path,
    out: Path | None,
    device: str | None = None,
    batch_size: int | None = None,
    console=None,
    show_progress: bool = True,
    precision: str | None = None,
) -> int:
    """Read, check, predict, write CSV to `out` (atomically) or stdout; returns the row count.

    Everything that can fail on the user's input is checked before the model is loaded, and
    nothing is written unless all rows were predicted.
    """

    task = check_finished(run_dir).task()
    input_path = Path(input_path)
    table = read_table(input_path)
    texts_a, texts_b = texts(table, task, input_path)
    if out is not None and Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as predictions.csv")
    run = load_run(run_dir, device=device, precision=precision)
    progress = progress_bar(console, show_progress)
    with progress:
        logits = logits_for(run, texts_a, texts_b, batch_size or 2 * run.cfg.train.batch_size, progress)
    predictions = prediction_columns(task, logits)
    if out is None:
        buf = io.StringIO()
        write_csv(table, predictions, buf)
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    else:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                write_csv(table, predictions, fh)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return len(table.rows)
