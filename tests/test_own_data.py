"""Your own data: every file format reads the same, classes and regression come from the labels,
natural partitions by a column, the hub by path (offline, on a local folder), every downstream
command on a custom task, and one line, exit 2, nothing written for each kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import read_metrics, read_summary, train
from fedlodrop.cli import app
from fedlodrop.run.settings import validate
from fedlodrop.data import load_task
from fedlodrop.data.partitions import device_groups, partition
from fedlodrop.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # text, label, site: the classes are the sorted distinct labels
    ("refund for my invoice", "billing", "oslo"), ("the parcel arrived late", "shipping", "oslo"),
    ("the app crashes at login", "technical", "lisbon"), ("charged twice this month", "billing", "lisbon"),
    ("tracking number is wrong", "shipping", "berlin"), ("password reset fails", "technical", "berlin"),
    ("need a receipt please", "billing", "berlin"), ("courier lost the package", "shipping", "lisbon"),
]


def own(tmp_path, **data):
    tree = {"task": "tickets", "data": {"text_columns": ["message"], "label_column": "team", **data}}
    return validate(tree)


def write_csv(path: Path, rows, header=("message", "team", "site"), delimiter=","):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows, header=("message", "team", "site")):
    path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows))
    return path


def canonical(ds) -> list[tuple]:
    return list(zip(*(ds[c] for c in ds.column_names)))


# ---------------------------------------------------------------------------- reading


def test_every_format_reads_the_same_task_and_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    columns = {"message": [r[0] for r in ROWS], "team": [r[1] for r in ROWS], "site": [r[2] for r in ROWS]}
    files = {
        "csv": write_csv(tmp_path / "t.csv", ROWS),
        "tsv": write_csv(tmp_path / "t.tsv", ROWS, delimiter="\t"),
        "jsonl": write_jsonl(tmp_path / "t.jsonl", ROWS),
    }
    Dataset.from_dict(columns).to_parquet(tmp_path / "t.parquet")
    files["parquet"] = tmp_path / "t.parquet"
    Dataset.from_dict(columns).save_to_disk(tmp_path / "saved")
    files["save_to_disk"] = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(columns), "validation": Dataset.from_dict(columns)}).save_to_disk(
        tmp_path / "saved_dict")
    files["save_to_disk splits"] = tmp_path / "saved_dict"
    seen = {}
    for kind, path in files.items():
        task, train_set, eval_set = load_task(own(tmp_path, train=str(path), eval=str(path)))
        assert task.label_names == ("billing", "shipping", "technical"), kind
        assert task.metrics == ("accuracy", "macro_f1", "mcc") and task.text_a == "message" and task.text_b is None
        seen[kind] = (canonical(train_set), canonical(eval_set))
    first = seen["csv"]
    assert sorted(first[0]) == sorted((t, ["billing", "shipping", "technical"].index(lab)) for t, lab, _ in ROWS)
    assert all(v == first for v in seen.values()), {k: v == first for k, v in seen.items()}


def test_the_labels_decide_classes_or_regression(tmp_path):
    def task_of(rows, **data):
        path = write_jsonl(tmp_path / "l.jsonl", rows, header=("message", "team"))
        task, train_set, _ = load_task(own(tmp_path, train=str(path), eval=str(path), **data))
        return task, train_set["label"]

    words = ["a", "b", "c", "d"]
    task, labels = task_of([(w, s) for w, s in zip(words, [5, 1, 10, 1])])  # integers: classes, sorted as numbers
    assert task.label_names == ("1", "5", "10") and labels == [1, 0, 2, 0] and not task.is_regression
    task, labels = task_of([(w, s) for w, s in zip(words, [0.5, 1.0, 4.25, 1.0])])  # floats: regression
    assert task.is_regression and task.metrics == ("pearson", "spearman") and labels == [0.5, 1.0, 4.25, 1.0]
    task, labels = task_of([(w, s) for w, s in zip(words, [0.5, 1.0, 4.25, 1.0])], regression=False)
    assert task.label_names == ("0.5", "1.0", "4.25") and labels == [0, 1, 2, 1]
    task, labels = task_of([(w, s) for w, s in zip(words, [3, 1, 2, 1])], regression=True)
    assert task.is_regression and labels == [3.0, 1.0, 2.0, 1.0]
    task, labels = task_of([(w, s) for w, s in zip(words, [True, False, False, True])])
    assert task.label_names == ("False", "True") and labels == [1, 0, 0, 1]
    # given names fix the order; labels name them, or are their ids
    task, labels = task_of([(w, s) for w, s in zip(words, ["pos", "neg", "neg", "pos"])], label_names=["pos", "neg"])
    assert task.label_names == ("pos", "neg") and labels == [0, 1, 1, 0] and task.metrics == ("accuracy", "f1", "mcc")
    task, labels = task_of([(w, s) for w, s in zip(words, [1, 0, 0, 1])], label_names=["neg", "pos"])
    assert labels == [1, 0, 0, 1]
    task, _ = task_of([(w, s) for w, s in zip(words, [1, 0, 0, 1])], metrics=["mcc", "accuracy"])
    assert task.main_metric == "mcc"


def test_a_classlabel_keeps_its_names_and_a_missing_eval_is_held_out(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"message": Value("string"), "team": ClassLabel(names=["zeta", "alpha"])})
    Dataset.from_dict({"message": [f"m{i}" for i in range(40)], "team": [i % 2 for i in range(40)]},
                      features=features).save_to_disk(tmp_path / "saved")
    cfg = own(tmp_path, train=str(tmp_path / "saved"), eval_fraction=0.25)
    task, train_set, eval_set = load_task(cfg)
    assert task.label_names == ("zeta", "alpha")  # the dataset's own order, not sorted
    assert (len(train_set), len(eval_set)) == (30, 10)
    assert not set(train_set["text_a"]) & set(eval_set["text_a"])
    again = load_task(validate({**cfg.model_dump(mode="json"), "seed": 5}))[2]
    assert again["text_a"] == eval_set["text_a"]  # the held-out rows do not follow the run's seed


def test_the_hub_by_path_reads_a_local_folder_of_splits(tmp_path):
    folder = tmp_path / "hubfolder"
    folder.mkdir()
    write_csv(folder / "train.csv", ROWS)
    write_csv(folder / "validation.csv", ROWS[:4])
    write_csv(folder / "test.csv", ROWS[4:])
    task, train_set, eval_set = load_task(own(tmp_path, hub_path=str(folder)))
    assert task.label_names == ("billing", "shipping", "technical") and (len(train_set), len(eval_set)) == (8, 4)
    _, _, test_set = load_task(own(tmp_path, hub_path=str(folder), eval_split="test"))
    assert test_set["text_a"] == [r[0] for r in ROWS[4:]]
    with pytest.raises(UserError, match="no split 'dev'"):
        load_task(own(tmp_path, hub_path=str(folder), eval_split="dev"))
    with pytest.raises(UserError, match="could not load data.hub_path someone/no-such-dataset"):
        load_task(own(tmp_path, hub_path="someone/no-such-dataset"))  # HF_HUB_OFFLINE=1: no network


# ---------------------------------------------------------------------------- natural partitions


def test_by_column_gives_each_site_a_device_or_groups_them(tmp_path):
    import random

    sites = ["a"] * 10 + ["b"] * 7 + ["c"] * 6 + ["d"] * 4 + ["e"] * 3
    random.Random(3).shuffle(sites)  # the file meets the sites in another order than their names'
    assert sites[0] != "a"
    rows = [(f"message {i}", ["billing", "shipping"][i % 2], site) for i, site in enumerate(sites)]
    path = write_csv(tmp_path / "t.csv", rows)
    cfg = validate({"task": "tickets", "federation": {"partition": "by_column", "devices": 5},
                    "data": {"train": str(path), "eval": str(path), "text_columns": ["message"],
                             "label_column": "team", "device_column": "site"}})
    _, train_set, _ = load_task(cfg)
    shards = partition(train_set, 5, "by_column", 0.5, 0, False)
    texts = {t: site for t, _, site in rows}
    assert [{texts[t] for t in s["text_a"]} for s in shards] == [{"a"}, {"b"}, {"c"}, {"d"}, {"e"}]
    assert all("device" not in s.column_names for s in shards)
    # grouped: largest first, each to the lighter device: a (10) | b (7), c -> 7 < 10, d -> 10 < 13, e -> 13 < 14
    shards = partition(train_set, 2, "by_column", 0.5, 0, False)
    assert [sorted({texts[t] for t in s["text_a"]}) for s in shards] == [["a", "d"], ["b", "c", "e"]]
    assert sorted(t for s in shards for t in s["text_a"]) == sorted(texts)
    assert device_groups(["10", "9", "2", "10"], 3) == {"2": 0, "9": 1, "10": 2}  # numbers as numbers
    with pytest.raises(UserError, match="5 distinct values .* federation.devices is 6"):
        partition(train_set, 6, "by_column", 0.5, 0, False)


# ---------------------------------------------------------------------------- bad input

BAD = {  # file name, content, what the one line must name
    "missing": (None, ["data.train", "no such file", "missing.csv"]),
    "empty": ("", ["data.train", "empty.csv", "is empty"]),
    "header": ("message,team\n", ["header.csv", "holds no rows"]),
    "nocolumn": ("text,team\nhello,billing\n", ["nocolumn.csv", "no column 'message'", "columns: text, team"]),
    "nolabelcol": ("message,kind\nhello,billing\n", ["no column 'team'", "data.label_column"]),
    "oneclass": ("message,team\na,billing\nb,billing\n", ["oneclass.csv", "'team'", "one class", "billing"]),
    "mixedcsv": ("message,team\na,1\nb,billing\n", ["mixedcsv.csv", "mixes label types", "row 2", "data.label_names"]),
    "emptytext": ("message,team\na,billing\n,shipping\n", ["emptytext.csv", "row 2", "'message'", "no text"]),
    "blanktext": ("message,team\na,billing\n   ,shipping\n", ["row 2", "no text"]),
    "nolabel": ("message,team\na,billing\nb,\n", ["nolabel.csv", "row 2", "no label"]),
    "ragged": ("message,team\na,billing\nb,shipping,extra\n", ["cannot read data.train", "ragged.csv", "line 3"]),
    "wrong.txt": ("message,team\n", ["unknown extension", "'.txt'"]),
}


def _one_line(result, *needles):
    """Exit 2 and one error line (after, at most, the run's opening line), naming every needle."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert lines and lines[-1].startswith("error:") and all(ln.startswith("fedlodrop run:") for ln in lines[:-1]), lines
    text = re.sub(r"\s+", " ", lines[-1])
    assert all(n in text for n in needles), (needles, text)


def _run(*sets, out, model):
    args = ["run", "--quiet", "--out", str(out), "--set", "task=tickets", "--set", "data.text_columns=[message]",
            "--set", "data.label_column=team", "--set", f"model={model}"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def test_bad_data_is_one_line_naming_file_column_and_row_exit_2_nothing_written(tmp_path, tiny_bert):
    good = write_csv(tmp_path / "good.csv", [r[:2] for r in ROWS], header=("message", "team"))
    out = tmp_path / "out"
    for name, (content, needles) in BAD.items():
        path = tmp_path / (name if "." in name else f"{name}.csv")
        if content is not None:
            path.write_text(content)
        _one_line(_run(f"data.train={path}", f"data.eval={good}", out=out, model=tiny_bert), *needles)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"message": "a", "team": 1}\n{"message": "b", "team": "billing"}\n')
    _one_line(_run(f"data.train={mixed}", f"data.eval={good}", out=out, model=tiny_bert), "mixed.jsonl", "mixes label types", "1", "'billing'")
    nulltext = tmp_path / "nulltext.jsonl"
    nulltext.write_text('{"message": "a", "team": "billing"}\n{"message": null, "team": "shipping"}\n')
    _one_line(_run(f"data.train={nulltext}", f"data.eval={good}", out=out, model=tiny_bert), "nulltext.jsonl", "row 2", "no text")
    unseen = write_csv(tmp_path / "unseen.csv", [("hello", "billing"), ("where is it", "returns")], header=("message", "team"))
    _one_line(_run(f"data.train={good}", f"data.eval={unseen}", out=out, model=tiny_bert),
              "data.eval", "unseen.csv", "row 2", "'returns'", "not a class", "billing, shipping, technical")
    floats = write_csv(tmp_path / "floats.csv", [("a", 0.5), ("b", 1.5)], header=("message", "team"))
    _one_line(_run(f"data.train={floats}", f"data.eval={good}", out=out, model=tiny_bert), "data.eval", "row 1", "'refund for my invoice'"[:0],
              "not a number")
    _one_line(_run(f"data.train={good}", "data.metrics=[pearson]", out=out, model=tiny_bert), "pearson needs regression", "3 classes")
    _one_line(_run(f"data.train={good}", "data.metrics=[f1]", out=out, model=tiny_bert), "f1 needs two classes")
    _one_line(_run("task=sst2", f"data.train={good}", out=out, model=tiny_bert), "task 'sst2' is a built-in task")
    _one_line(CliRunner().invoke(app, ["run", "--out", str(out), "--set", "task=imdb"]),
              "unknown task 'imdb'", "data.train", "data.hub_path")
    _one_line(_run(f"data.train={good}", "federation.partition=by_column", out=out, model=tiny_bert),
              "by_column and data.device_column go together")
    _one_line(_run(f"data.train={good}", "data.device_column=site", "federation.partition=by_column", out=out, model=tiny_bert),
              "good.csv", "no column 'site'", "data.device_column")
    _one_line(_run(f"data.train={good}", "data.metrics=[auc]", out=out, model=tiny_bert), "unknown metric 'auc'")
    assert not out.exists()


# ---------------------------------------------------------------------------- end to end


def readme_own_data_commands() -> list[str]:
    """The commands of the README's "On your own data" block, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On your own data"):]
    block = re.search(r"```bash\n(.+?)\n```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("fedlodrop ")]


@pytest.mark.slow  # trains the packaged MiniLM on the example, exports it and loads it in a fresh process
def test_the_readme_example_learns_exports_and_predicts_team_names(tmp_path, monkeypatch):
    import shlex

    from export_helpers import run_hf_only

    commands = readme_own_data_commands()
    assert [c.split()[1] for c in commands] == ["run", "export", "predict"]
    monkeypatch.chdir(ROOT)  # the README's paths are the repository's
    moved = {"runs/tickets": str(tmp_path / "run"), "models/tickets": str(tmp_path / "model")}
    results = []
    for command in commands:
        args = [moved.get(a, a) for a in shlex.split(command)[1:]]
        results.append(CliRunner().invoke(app, args + (["--quiet"] if args[0] != "export" else [])))
        assert results[-1].exit_code == 0, results[-1].output
    run_dir, model_dir = tmp_path / "run", tmp_path / "model"
    summary, rounds = read_summary(run_dir), read_metrics(run_dir)
    with open(ROOT / "examples" / "tickets" / "train.csv", newline="") as fh:
        train_rows = list(csv.DictReader(fh))
    majority = max(sum(r["team"] == t for r in train_rows) for t in ("billing", "shipping", "technical")) / len(train_rows)
    assert rounds[-1].train_loss < 0.5 * rounds[0].train_loss
    assert summary.final["accuracy"] >= majority + 0.4, (summary.final, majority)
    # each site is a device, holding that site's tickets
    sites = sorted({r["site"] for r in train_rows})
    assert [d.samples for d in rounds[0].devices] == [sum(r["site"] == s for r in train_rows) for s in sites]
    names = ["billing", "shipping", "technical"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "billing", "1": "shipping", "2": "technical"}
    # new.csv was written as billing, shipping, technical, shipping (examples/tickets/make_tickets.py)
    expected = ["billing", "shipping", "technical", "shipping"]
    table = list(csv.DictReader(io.StringIO(results[2].stdout)))
    assert [r["predicted_label"] for r in table] == expected
    assert list(table[0]) == ["message", "prediction", "predicted_label", *(f"prob_{n}" for n in names)]
    messages = [r["message"] for r in table]
    got = run_hf_only({"m": {"dir": str(model_dir), "kind": "merged", "a": messages, "b": None, "max_length": 128,
                             "num_labels": 3, "remote_code": True}})["m"]
    assert [got["config"]["id2label"][str(i)] for i in got["logits"].argmax(1)] == expected


def _write_pairs(path: Path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["question", "answer", "score"])
        writer.writerows(rows)
    return path


def test_a_regression_pair_task_predicts_scores_from_both_columns(tiny_bert, tmp_path):
    from export_helpers import reference_logits

    rows = [(f"is {a} good", f"{b} is fine", float(i % 5)) for i, (a, b) in
            enumerate(zip(["tea", "coffee", "milk", "juice"] * 6, ["water", "soda", "wine", "beer"] * 6))]
    path = _write_pairs(tmp_path / "pairs.csv", rows)
    cfg = validate({"task": "scores", "model": tiny_bert, "federation": {"devices": 2, "rounds": 1},
                    "lora": {"r": 4}, "train": {"max_length": 32},
                    "data": {"train": str(path), "eval": str(path), "text_columns": ["question", "answer"],
                             "label_column": "score"}})
    run_dir = train(cfg, tmp_path / "run")
    task = json.loads((run_dir / "task.json").read_text())
    assert task["is_regression"] and task["metrics"] == ["pearson", "spearman"] and task["text_b"] == "answer"
    assert set(read_summary(run_dir).final) == {"pearson", "spearman"}
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a, _ in rows[:5]))
    result = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "in.jsonl"), "--quiet"])
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["question", "answer", "prediction"]
    ref = reference_logits(run_dir, [r[0] for r in rows[:5]], [r[1] for r in rows[:5]])
    np.testing.assert_allclose([float(r["prediction"]) for r in table], ref[:, 0], atol=1e-5, rtol=0)
    missing = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(path.with_name("none.csv"))])
    assert missing.exit_code == 2
    (tmp_path / "one.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    result = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "one.jsonl")])
    assert result.exit_code == 2 and "'answer'" in result.stderr


def test_own_data_resumes_and_refuses_data_that_changed(tiny_bert, tmp_path, monkeypatch):
    """An interrupted run on a CSV resumes to the uninterrupted run's end; if the file gained a
    class meanwhile, resuming says so instead of training a different task."""
    from test_resume import Killed, _strip
    from fedlodrop.run.folder import RunFolder

    path = write_csv(tmp_path / "t.csv", ROWS * 3)
    args = ["run", "--quiet", "--set", "task=tickets", "--set", f"model={tiny_bert}", "--set", f"data.train={path}",
            "--set", "data.text_columns=[message]", "--set", "data.label_column=team", "--set", "lora.r=4",
            "--set", "federation.rounds=2", "--set", "train.max_length=32", "--set", "dropout.rate=0.3"]
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")]).exit_code == 0
    commit = RunFolder.commit

    def dies_after_round_1(self, folder, rounds_done):
        commit(self, folder, rounds_done)
        if rounds_done == 1:
            raise Killed

    monkeypatch.setattr(RunFolder, "commit", dies_after_round_1)
    for name in ("cut", "changed"):
        with pytest.raises(Killed):
            CliRunner().invoke(app, [*args, "--out", str(tmp_path / name)], catch_exceptions=False)
    monkeypatch.setattr(RunFolder, "commit", commit)
    assert CliRunner().invoke(app, ["run", "--quiet", "--resume", str(tmp_path / "cut")]).exit_code == 0
    rows = [[r.to_json() for r in RunFolder(tmp_path / f).records()] for f in ("whole", "cut")]
    assert _strip(rows[0]) == _strip(rows[1])
    write_csv(path, ROWS * 3 + [("my voucher expired", "promotions", "oslo")])
    result = CliRunner().invoke(app, ["run", "--quiet", "--resume", str(tmp_path / "changed")])
    _one_line(result, "no longer gives the run's task", "label_names", "promotions")


def test_own_data_on_flower_is_the_in_process_run(tiny_bert, tmp_path, fresh_client_cache):
    """The ServerApp and each ClientApp read the CSV and partition it by site as `fedlodrop run`
    does: the same run, bit for bit."""
    from flower_helpers import assert_same_run, serve
    from fedlodrop.run import engine

    rows = [(t, lab, site) for t, lab, site in ROWS] * 3
    path = write_csv(tmp_path / "t.csv", rows)
    cfg = validate({"task": "tickets", "model": tiny_bert, "seed": 1, "lora": {"r": 4},
                    "federation": {"devices": 3, "rounds": 2, "partition": "by_column"},
                    "train": {"max_length": 32, "threads": 1},
                    "flower": {"discovery_timeout_s": 1.0, "round_timeout_s": 1.0, "poll_interval_s": 0.01},
                    "data": {"train": str(path), "text_columns": ["message"], "label_column": "team",
                             "device_column": "site", "eval_fraction": 0.2}})
    engine.run(cfg, tmp_path / "inproc", show_progress=False)
    serve(cfg, tmp_path / "flower")
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    assert (tmp_path / "flower" / "task.json").read_text() == (tmp_path / "inproc" / "task.json").read_text()


def test_sweep_and_report_on_own_data(tiny_bert, tmp_path):
    path = write_csv(tmp_path / "t.csv", ROWS * 3)
    result = CliRunner().invoke(app, [
        "sweep", "--quiet", "--rates", "0,0.5", "--out", str(tmp_path / "sweep"), "--set", "task=tickets",
        "--set", f"model={tiny_bert}", "--set", f"data.train={path}", "--set", "data.text_columns=[message]",
        "--set", "data.label_column=team", "--set", "federation.rounds=1", "--set", "lora.r=4",
        "--set", "train.max_length=32"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "sweep" / "sweep.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["dropout.rate"]) for r in table] == [0.0, 0.5]
    assert {r["task"] for r in table} == {"tickets"} and {r["main_metric"] for r in table} == {"accuracy"}


def test_system_random_from_a_run_prices_its_own_partition_and_payload(tiny_bert, tmp_path):
    """`system random --config`: one system device per run device, holding that device's samples of
    the run's own split, and the payload the run's model really sends in its comm dtype."""
    import yaml

    from fedlodrop.run.experiment import build

    sites = ["oslo"] * 9 + ["lisbon"] * 6 + ["berlin"] * 3
    path = write_csv(tmp_path / "t.csv", [(f"ticket {i}", ["billing", "shipping"][i % 2], s) for i, s in enumerate(sites)])
    sets = ["task=tickets", f"model={tiny_bert}", f"data.train={path}", f"data.eval={path}",
            "data.text_columns=[message]", "data.label_column=team", "data.device_column=site",
            "federation.partition=by_column", "federation.devices=3", "federation.comm_dtype=float16",
            "federation.local_epochs=2", "lora.r=4"]
    args = ["system", "random", "--out", str(tmp_path / "sys.yaml")] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load((tmp_path / "sys.yaml").read_text())
    assert [d["samples"] for d in spec["devices"]] == [3, 6, 9]  # berlin, lisbon, oslo
    from fedlodrop.run.settings import load_config

    exp = build(load_config(overrides=sets), eval_data=False)
    assert [len(exp.shards.raw[k]) for k in range(3)] == [3, 6, 9]
    payload = spec["payload"]
    assert (payload["adapter_values"], payload["head_values"]) == (exp.fm.layout.adapter_values, exp.fm.layout.head_values)
    assert payload["bits_per_value"] == 16 and payload["rank"] == 4 and spec["round"]["local_epochs"] == 2
    for extra, needle in ((["--samples", "100"], "--model and --samples make a planning-only system"),
                          (["--devices", "5"], "--devices 5 but the run's federation.devices is 3")):
        bad = CliRunner().invoke(app, args + extra)
        assert bad.exit_code == 2 and needle in bad.stderr, bad.output


# ---------------------------------------------------------------------------- device-local data


def _site_files(tmp_path, rows):
    """The union file with a site column, and each site's own file without it (same row order)."""
    union = write_csv(tmp_path / "all.csv", rows)
    sites = sorted({r[2] for r in rows})
    files = [write_csv(tmp_path / f"{s}.csv", [r[:2] for r in rows if r[2] == s], header=("message", "team"))
             for s in sites]
    return union, files


def test_devices_with_their_own_files_train_as_by_column_does(tiny_bert, tmp_path, fresh_client_cache):
    """federation.partition local over Flower (in process): each device reads only its own file,
    the server only the validation file and never a device's; the run is `fedlodrop run`'s by_column
    split of the union, bit for bit. A device whose file lacks a column is left out with the reason,
    in every round, and the run's last line says so."""
    from flower_helpers import assert_same_run, serve

    from fedlodrop.run import engine
    from fedlodrop.cli.common import print_summary
    from fedlodrop.run.folder import RunFolder

    rows = [(t, lab, site) for t, lab, site in ROWS] * 3
    union, files = _site_files(tmp_path, rows)
    dev = write_csv(tmp_path / "dev.csv", [r[:2] for r in ROWS], header=("message", "team"))
    common = {"task": "tickets", "model": tiny_bert, "seed": 2, "lora": {"r": 4},
              "train": {"max_length": 32, "threads": 1},
              "flower": {"discovery_timeout_s": 1.0, "round_timeout_s": 1.0, "poll_interval_s": 0.01}}
    data = {"text_columns": ["message"], "label_column": "team", "eval": str(dev), "train_eval_samples": 0}
    inproc = validate(common | {"federation": {"devices": 3, "rounds": 2, "partition": "by_column"},
                                "data": data | {"train": str(union), "device_column": "site"}})
    local = validate(common | {"federation": {"devices": 3, "rounds": 2, "partition": "local"}, "data": data})
    engine.run(inproc, tmp_path / "inproc", show_progress=False)
    serve(local, tmp_path / "flower", data=files)
    assert_same_run(tmp_path / "inproc", tmp_path / "flower")
    config = (tmp_path / "flower" / "config.yaml").read_text()
    assert all(str(f) not in config and f.name not in config for f in files)  # the server never names them
    with pytest.raises(UserError, match="federation.partition local is for a Flower deployment"):
        engine.run(local, tmp_path / "nowhere", show_progress=False)

    (tmp_path / "bad.csv").write_text("text,team\nhello,billing\n")
    serve(local, tmp_path / "bad", data=[files[0], tmp_path / "bad.csv", files[2]])
    summary = RunFolder(tmp_path / "bad").summary()
    assert list(summary.devices_never_used) == ["1"]
    assert "bad.csv has no column 'message'" in summary.devices_never_used["1"]
    assert all(r.device(1).status == "left out" for r in read_metrics(tmp_path / "bad"))
    from fedlodrop.cli.common import err_console

    with err_console.capture() as captured:
        print_summary(summary, tmp_path / "bad")
    assert "warning: device 1 took part in no round of 2" in captured.get()
