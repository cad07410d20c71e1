"""`fedlodrop predict`: CSV, TSV and JSONL in, CSV out, equal to the rebuilt global model's
predictions; sentence pairs, regression, and the user's mistakes."""

from __future__ import annotations

import csv
import io
import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import MINILM, NEGATIVE, POSITIVE, tiny_cfg, train
from export_helpers import dev_rows, reference_logits
from fedlodrop.cli import app
from test_export import final_accuracy

# the trained MiniLM runs (conftest fedit_run / fedex_run) are shared by both modules: one worker
pytestmark = [pytest.mark.precision, pytest.mark.xdist_group("minilm-runs")]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def predict_cli(run_dir, path, *extra):
    return CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(path), "--quiet", *extra])


def write_input(path, rows: list[dict]) -> None:
    kind = path.suffix
    if kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    with open(path, "w", newline="") as fh:
        if kind == ".tsv":  # as GLUE writes it: tabs, no quoting
            fh.write("\t".join(rows[0]) + "\n")
            fh.writelines("\t".join(str(v) for v in r.values()) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_each_format_gives_the_rebuilt_models_predictions(fedit_run, glue, tmp_path, ext):
    run_dir, _ = fedit_run
    rows = [{"id": i, "sentence": r["sentence"], "label": int(r["label"])} for i, r in enumerate(dev_rows(glue, "SST-2"))]
    rows[0]["sentence"] = '"so-called" delight , said nobody'  # quotes and a comma survive each format
    path = tmp_path / f"in{ext}"
    write_input(path, rows)
    out = tmp_path / "pred.csv"
    result = predict_cli(run_dir, path, "--out", out, "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["id", "sentence", "label", "prediction", "predicted_label", "prob_negative",
                              "prob_positive"]
    assert [r["predicted_label"] for r in table] == [["negative", "positive"][int(r["prediction"])] for r in table]
    assert [r["sentence"] for r in table] == [r["sentence"] for r in rows]
    assert [int(r["id"]) for r in table] == list(range(len(rows)))
    ref = reference_logits(run_dir, [r["sentence"] for r in rows])
    assert [int(r["prediction"]) for r in table] == ref.argmax(1).tolist()
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in table])
    np.testing.assert_allclose(probs, softmax(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    assert probs.min() < 0.2 and probs.max() > 0.8  # a learned model, not a coin
    # on the dev rows, prediction accuracy is the run's own final accuracy
    hits = [int(r["prediction"]) == int(r["label"]) for r in table[1:]]
    n = len(rows)
    assert abs(sum(hits) / n - final_accuracy(run_dir)) <= 1 / n


def test_without_out_the_csv_goes_to_stdout(fedit_run, tmp_path):
    run_dir, _ = fedit_run
    path = tmp_path / "in.jsonl"
    write_input(path, [{"sentence": POSITIVE[0], "extra": {"k": 1}}, {"sentence": NEGATIVE[0], "extra": None}])
    result = predict_cli(run_dir, path)
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["prediction"] for r in table] == ["1", "0"]
    assert table[0]["extra"] == '{"k": 1}' and table[1]["extra"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def write_rte(folder, n_train=96, n_dev=24, seed=0):
    """A GLUE-layout RTE folder: the pair entails when both sentences have the same polarity."""
    rng = random.Random(seed)
    (folder / "RTE").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            p1, p2 = rng.random() < 0.5, rng.random() < 0.5
            s1, s2 = rng.choice(POSITIVE if p1 else NEGATIVE), rng.choice(POSITIVE if p2 else NEGATIVE)
            lines.append(f"{i}\t{s1}\t{s2}\t{'entailment' if p1 == p2 else 'not_entailment'}")
        (folder / "RTE" / name).write_text("\n".join(lines) + "\n")
    return folder


def test_pair_task_reads_both_sentences(tmp_path):
    glue_dir = write_rte(tmp_path / "glue")
    cfg = tiny_cfg(MINILM, glue_dir, task="rte", **{"federation.rounds": 1, "federation.aggregation": "fedit"})
    run_dir = train(cfg, tmp_path / "run")
    rows = dev_rows(glue_dir, "RTE")
    path = tmp_path / "pairs.csv"
    write_input(path, [{"sentence1": r["sentence1"], "sentence2": r["sentence2"]} for r in rows])
    result = predict_cli(run_dir, path)
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["sentence1", "sentence2", "prediction", "predicted_label", "prob_entailment",
                              "prob_not_entailment"]
    ref = reference_logits(run_dir, [r["sentence1"] for r in rows], [r["sentence2"] for r in rows])
    probs = np.array([[float(r["prob_entailment"]), float(r["prob_not_entailment"])] for r in table])
    np.testing.assert_allclose(probs, softmax(ref), atol=1e-5, rtol=0)
    assert [int(r["prediction"]) for r in table] == ref.argmax(1).tolist()

    missing = tmp_path / "one.csv"
    write_input(missing, [{"sentence1": "a", "text": "b"}])
    result = predict_cli(run_dir, missing)
    assert result.exit_code == 2 and "'sentence2'" in result.stderr


def write_stsb(folder, n_train=64, n_dev=16, seed=0):
    """A GLUE-layout STS-B folder (score in the last column): similar when polarities agree."""
    rng = random.Random(seed)
    (folder / "STS-B").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["index\tgenre\tsentence1\tsentence2\tscore"]
        for i in range(n):
            p1, p2 = rng.random() < 0.5, rng.random() < 0.5
            s1, s2 = rng.choice(POSITIVE if p1 else NEGATIVE), rng.choice(POSITIVE if p2 else NEGATIVE)
            lines.append(f"{i}\tnews\t{s1}\t{s2}\t{4.0 if p1 == p2 else 1.0}")
        (folder / "STS-B" / name).write_text("\n".join(lines) + "\n")
    return folder


def test_regression_predicts_the_score_and_no_probabilities(tiny_llama, tmp_path):
    glue_dir = write_stsb(tmp_path / "glue")
    cfg = tiny_cfg(tiny_llama, glue_dir, task="stsb", **{"federation.rounds": 1})
    run_dir = train(cfg, tmp_path / "run")
    rows = dev_rows(glue_dir, "STS-B")
    path = tmp_path / "pairs.tsv"
    write_input(path, [{"sentence1": r["sentence1"], "sentence2": r["sentence2"]} for r in rows])
    result = predict_cli(run_dir, path)
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["sentence1", "sentence2", "prediction"]
    ref = reference_logits(run_dir, [r["sentence1"] for r in rows], [r["sentence2"] for r in rows])
    np.testing.assert_allclose([float(r["prediction"]) for r in table], ref[:, 0], atol=1e-5, rtol=0)
    assert np.ptp(ref[:, 0]) > 1e-3  # the scores differ between rows


def _one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert result.stdout == ""


def test_bad_input_is_one_line_exit_2_and_no_output(fedit_run, tmp_path):
    run_dir, _ = fedit_run
    out = tmp_path / "out" / "pred.csv"
    cases = {
        "wrong.csv": ("text,label\ngood film,1\n", ["'sentence'", "wrong.csv"]),
        "in.parquet": ("x", ["unknown extension", ".parquet"]),
        "latin1.csv": (b"sentence\ncaf\xe9 noir\n", ["cannot read", "latin1.csv"]),
        "broken.jsonl": ('{"sentence": "fine"}\n{"sentence": \n', ["broken.jsonl", "line 2"]),
        "ragged.tsv": ("sentence\tlabel\ngood\t1\textra\n", ["ragged.tsv", "line 2"]),
        "empty.csv": ("sentence\n", ["no rows"]),
        "clash.csv": ("sentence,prediction\ngood,1\n", ["'prediction'"]),
        "nulltext.jsonl": ('{"sentence": null}\n', ["row 1", "'sentence'"]),
    }
    for name, (content, needles) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        _one_error_line(predict_cli(run_dir, path, "--out", out), *needles)
    _one_error_line(predict_cli(run_dir, tmp_path / "none.csv", "--out", out), "none.csv")
    _one_error_line(predict_cli(tmp_path, tmp_path / "wrong.csv", "--out", out), "not a finished run folder")
    assert not (tmp_path / "out").exists()
    # an existing output file is left as it was
    out.parent.mkdir()
    out.write_text("old")
    _one_error_line(predict_cli(run_dir, tmp_path / "wrong.csv", "--out", out), "'sentence'")
    assert out.read_text() == "old" and [p.name for p in out.parent.iterdir()] == ["pred.csv"]
