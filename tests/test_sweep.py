"""Sweeps and reports: grid expansion and naming, validation before any run, reuse of finished runs,
re-running interrupted ones, and tables/CSV/plots that agree with the runs' summaries.

Most tests replace `engine.run` by a fake that writes a config and a summary, so they test the
sweep's own logic in milliseconds; `tiny_sweep` runs the real engine on a tiny BERT once.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import write_sst2
from fedlodrop.run import engine
from fedlodrop.cli import app
from fedlodrop.config import RunConfig, dump_config
from fedlodrop.run.settings import load_config, with_overrides
from fedlodrop.run.folder import RunFolder
from fedlodrop.errors import UserError
from fedlodrop.round.records import Summary
from fedlodrop.studies.report import build_report, collect, plot
from fedlodrop.studies.sweep import (
    expand_grid,
    format_value,
    make_axes,
    parse_vary,
    point_name,
    run_sweep,
    split_values,
)

runner = CliRunner()
SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=~-]+$")


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------- a fake engine


def fake_summary(cfg: RunConfig) -> Summary:
    """Deterministic numbers that depend on the rate, rank, aggregation and seed."""
    rate = cfg.device_rates()[0]
    agg = ["fedit", "masked", "fedex", "ffa"].index(cfg.federation.aggregation)
    val = 0.8 - 0.2 * rate + 0.01 * cfg.seed + 0.001 * cfg.lora.r + 0.02 * agg
    train = val + 0.1 - 0.1 * rate + 0.003 * cfg.seed**2
    rounds = cfg.federation.rounds
    up = int(1000 * cfg.lora.r * (1 - rate)) * rounds + cfg.seed
    return Summary(
        task=cfg.task, model=cfg.model, rounds=rounds, devices=cfg.federation.devices,
        aggregation=cfg.federation.aggregation, variant=cfg.dropout.variant, rates=cfg.device_rates(),
        main_metric="accuracy", final={"accuracy": val}, best={"accuracy": val + 0.05}, best_round=rounds,
        final_train={"accuracy": train}, generalization_gap={"accuracy": train - val},
        uplink_bytes_total=up, downlink_bytes_total=3 * up, devices_left_out=0, adapter_values=0,
        head_values=0, wall_s=1.0,
    )


class FakeEngine:
    def __init__(self):
        self.calls: list[Path] = []

    def __call__(self, cfg, out, console=None, show_progress=True):
        out = Path(out)
        assert not out.exists() or not any(out.iterdir()), "engine.run needs an empty folder"
        self.calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        summary = fake_summary(cfg)
        (out / "summary.json").write_text(json.dumps(summary.to_json()))
        return summary


@pytest.fixture
def fake_engine(monkeypatch) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(engine, "run", fake)
    return fake


@pytest.fixture
def no_engine(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("engine.run must not be called")

    monkeypatch.setattr(engine, "run", fail)


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    """A config that validates without touching data or models (the fake engine never loads them)."""
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({"task": "sst2", "data": {"glue_dir": str(tmp_path / "glue")}, "seed": 3}))
    return path


# ---------------------------------------------------------------------------- parsing and grid


def test_split_values_keeps_brackets_and_quotes():
    assert split_values("0,0.1, 0.3") == ["0", "0.1", "0.3"]
    assert split_values("[0.1,0.2,0.3],0.5") == ["[0.1,0.2,0.3]", "0.5"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_parse_vary_parses_values_as_yaml_and_rejects_bad_items():
    axis = parse_vary("dropout.rate=0,0.5,[0.1,0.2,0.3]")
    assert axis.key == "dropout.rate"
    assert axis.values == (0, 0.5, [0.1, 0.2, 0.3])
    assert parse_vary("federation.aggregation=fedit,fedex").values == ("fedit", "fedex")
    for bad in ("dropout.rate", "=1,2", "lora.r=4,,8", "seed=1,2", "a..b=1"):
        with pytest.raises(UserError):
            parse_vary(bad)
    with pytest.raises(UserError, match="varied twice"):
        make_axes("0,0.1", ["dropout.rate=0.3"])


def test_rates_is_vary_dropout_rate():
    base = load_config(None, ["task=sst2", "data.glue_dir=x"])
    by_rates = expand_grid(base, make_axes("0,0.1,0.3", []), seeds=2)
    by_vary = expand_grid(base, make_axes(None, ["dropout.rate=0,0.1,0.3"]), seeds=2)
    assert [p.name for p in by_rates] == [p.name for p in by_vary]
    assert [p.cfg for p in by_rates] == [p.cfg for p in by_vary]


def test_grid_is_the_product_with_readable_names():
    base = load_config(None, ["task=sst2", "data.glue_dir=x", "seed=3"])
    axes = make_axes("0,0.5", ["federation.aggregation=fedit,fedex", "lora.r=4"])
    points = expand_grid(base, axes, seeds=2)
    assert len(points) == 2 * 2 * 1 * 2
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    # seeds outermost, then the axes in the order given
    assert names[:4] == [
        "dropout.rate=0.0__federation.aggregation=fedit__lora.r=4__seed=3",
        "dropout.rate=0.0__federation.aggregation=fedex__lora.r=4__seed=3",
        "dropout.rate=0.5__federation.aggregation=fedit__lora.r=4__seed=3",
        "dropout.rate=0.5__federation.aggregation=fedex__lora.r=4__seed=3",
    ]
    assert [p.seed for p in points] == [3] * 4 + [4] * 4
    for p in points:
        assert p.cfg.seed == p.seed
        assert p.cfg.dropout.rate == p.values["dropout.rate"]
        assert p.cfg.federation.aggregation == p.values["federation.aggregation"]
        assert p.cfg.lora.r == 4
        assert p.cfg.train.lr == base.train.lr  # untouched keys stay as in the base
        assert SAFE_NAME.match(p.name)


def test_names_are_filesystem_safe_and_distinct():
    odd = ["/data/glue v2", "/data/glue:v2", "x" * 200, "x" * 199 + "y", "a/b", "a_b"]
    names = [point_name({"data.glue_dir": v}, 0) for v in odd]
    assert len(set(names)) == len(names)
    for n in names:
        assert SAFE_NAME.match(n) and len(n) < 100
    assert point_name({"dropout.rate": [0.1, 0.2, 0.3]}, 1) == "dropout.rate=0.1-0.2-0.3__seed=1"
    name = point_name({"train.lr": 1e-05, "lora.rslora": True}, 0)
    assert name == "train.lr=1e-05__lora.rslora=true__seed=0"
    assert format_value(None) == "null"


def test_values_are_named_after_validation():
    base = load_config(None, ["task=sst2", "data.glue_dir=x"])
    points = expand_grid(base, make_axes(None, ["train.lr=1e-3,2.0e-3", "dropout.rate=0"]), seeds=1)
    assert [p.name for p in points] == [
        "train.lr=0.001__dropout.rate=0.0__seed=0",
        "train.lr=0.002__dropout.rate=0.0__seed=0",
    ]
    with pytest.raises(UserError, match="given twice"):
        expand_grid(base, make_axes("0.3,0.30", []), seeds=1)


# ---------------------------------------------------------------------------- validation before running


@pytest.mark.parametrize(
    "args, named",
    [
        (["--vary", "lora.rr=4,8"], "lora.rr"),
        (["--vary", "lora.r=4,0"], "lora.r=0"),
        (["--rates", "0,0.3,1.5"], "--rates 1.5"),
        (["--vary", "federation.aggregation=fedex,fedavg"], "fedavg"),
        (["--vary", "federation.devices=2,3", "--vary", "dropout.rate=[0.1,0.2]",
          "--set", "federation.devices=2"], "federation.devices=3"),
        (["--rates", "0,0.3", "--vary", "dropout.rate=0.5"], "dropout.rate"),
        (["--vary", "seed=1,2"], "--seeds"),
        ([], "nothing to sweep"),
    ],
)
def test_bad_grid_exits_2_and_writes_nothing(tmp_path, cfg_file, fake_engine, args, named):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1  # one line
    assert not out.exists()
    assert fake_engine.calls == []


def test_finished_run_with_another_config_is_not_reused(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5",
                  "--set", "federation.rounds=3")
    assert result.exit_code == 2
    assert "federation.rounds" in result.output
    assert len(fake_engine.calls) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == before


def test_foreign_folder_is_not_removed(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    foreign = out / "dropout.rate=0.5__seed=3"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5")
    assert result.exit_code == 2 and "not a run folder" in result.output
    assert (foreign / "notes.txt").read_text() == "mine"
    assert fake_engine.calls == []


# ---------------------------------------------------------------------------- reuse (fake engine)


def test_second_call_reuses_and_an_interrupted_run_is_redone(tmp_path, cfg_file, fake_engine, monkeypatch):
    out = tmp_path / "sweep"
    args = ("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5", "--seeds", "2")
    assert _cli(*args).exit_code == 0
    assert sorted(p.name for p in fake_engine.calls) == sorted(
        f"dropout.rate={r}__seed={s}" for r in ("0.0", "0.5") for s in (3, 4)
    )
    # an interrupted run: a folder with a config and partial metrics, no summary
    broken = out / "dropout.rate=0.5__seed=4"
    (broken / "summary.json").unlink()
    (broken / "metrics.jsonl").write_text('{"round": 1}\n')
    fake_engine.calls.clear()
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert fake_engine.calls == [broken]
    assert not (broken / "metrics.jsonl").exists()  # the old folder was removed, not written into
    # nothing left to do: the engine is not called at all
    monkeypatch.setattr(engine, "run", lambda *a, **k: pytest.fail("engine.run called"))
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 4


def test_extending_a_sweep_runs_only_the_new_points(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5").exit_code == 0
    fake_engine.calls.clear()
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.3,0.5").exit_code == 0
    assert [p.name for p in fake_engine.calls] == ["dropout.rate=0.3__seed=3"]
    rows = _read_csv(out / "sweep.csv")
    assert [r["dropout.rate"] for r in rows] == ["0.0", "0.3", "0.5"]


# ---------------------------------------------------------------------------- report (fake engine)


def test_error_bars_are_the_sample_std_across_seeds(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.2,0.5", "--seeds", "3")
    assert result.exit_code == 0, result.output
    rows = _read_csv(out / "sweep.csv")
    assert len(rows) == 3
    base = load_config(cfg_file)
    for row in rows:
        rate = float(row["dropout.rate"])
        sums = [fake_summary(with_overrides(base, {"seed": s, "dropout.rate": rate})) for s in (3, 4, 5)]
        finals = [s.final["accuracy"] for s in sums]
        gaps = [s.generalization_gap["accuracy"] for s in sums]
        ups = [s.uplink_bytes_total / s.rounds for s in sums]
        assert float(row["final_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(row["final_std"]) == pytest.approx(statistics.stdev(finals))
        assert float(row["gap_mean"]) == pytest.approx(statistics.fmean(gaps))
        assert float(row["gap_std"]) == pytest.approx(statistics.stdev(gaps))
        assert float(row["gap_std"]) > 0
        assert float(row["uplink_bytes_per_round_std"]) == pytest.approx(statistics.stdev(ups))
        assert row["runs"] == "3" and row["seeds"] == "3 4 5"

    # the plotted error bars are the same numbers
    rep = collect(out)
    fig = plot(rep, tmp_path / "p.png")
    ax_metric, ax_gap, _ = fig.axes[:3]
    final_bars = ax_metric.containers[0]  # first errorbar drawn: final metric
    xs, ys = final_bars.lines[0].get_data()
    assert list(xs) == [0.0, 0.2, 0.5]
    assert list(ys) == pytest.approx([float(r["final_mean"]) for r in rows])
    segments = final_bars.lines[2][0].get_segments()
    half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert half == pytest.approx([float(r["final_std"]) for r in rows])
    gap_segments = ax_gap.containers[0].lines[2][0].get_segments()
    gap_half = [(s[1][1] - s[0][1]) / 2 for s in gap_segments]
    assert gap_half == pytest.approx([float(r["gap_std"]) for r in rows])


def test_single_seed_has_zero_std(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5").exit_code == 0
    rows = _read_csv(out / "sweep.csv")
    assert [float(r["final_std"]) for r in rows] == [0.0, 0.0]


def test_categorical_grid_plots_one_line_per_other_combination(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out,
                  "--vary", "federation.aggregation=fedit,fedex,ffa", "--vary", "lora.r=4,16")
    assert result.exit_code == 0, result.output
    rep = collect(out)
    assert rep.keys == ["federation.aggregation", "lora.r"]
    fig = plot(rep, tmp_path / "p.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fedit", "fedex", "ffa"]  # the order given
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["lora.r=4", "lora.r=16"]
    rows = _read_csv(out / "sweep.csv")
    assert [(r["federation.aggregation"], r["lora.r"]) for r in rows] == [
        (a, r) for a in ("fedit", "fedex", "ffa") for r in ("4", "16")
    ]


def test_report_infers_varied_keys_without_manifest(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--vary", "lora.r=16,4", "--seeds", "2")
    assert result.exit_code == 0
    (out / "sweep.json").unlink()
    rep = collect(out)
    assert rep.keys == ["lora.r"]  # seed is a repetition, not a varied key
    assert [g.values["lora.r"] for g in rep.groups] == [4, 16]  # numeric order without the manifest


def test_report_command_rebuilds_outputs(tmp_path, cfg_file, fake_engine):
    out = tmp_path / "sweep"
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5").exit_code == 0
    prefix = tmp_path / "again" / "rates"
    result = _cli("report", out, "--out-prefix", prefix)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "rates.csv").read_text() == (out / "sweep.csv").read_text()
    assert (tmp_path / "again" / "rates_runs.csv").read_text() == (out / "sweep_runs.csv").read_text()
    assert (tmp_path / "again" / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dropout.rate" in result.output and "final" in result.output
    # an empty folder is a user error
    (tmp_path / "empty").mkdir()
    result = _cli("report", tmp_path / "empty")
    assert result.exit_code == 2 and "no finished run folders" in result.output


# ---------------------------------------------------------------------------- the real engine, tiny


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_bert):
    """2 rates x 2 seeds, one round each, on a tiny BERT and a tiny SST-2 folder."""
    root = tmp_path_factory.mktemp("tiny-sweep")
    glue = write_sst2(root / "glue")
    threads = torch.get_num_threads()
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "task": "sst2",
        "model": tiny_bert,
        "federation": {"devices": 2, "rounds": 1},
        "train": {"batch_size": 16, "max_length": 32, "threads": 1},
        "data": {"source": "glue_dir", "glue_dir": str(glue), "max_train_samples": 48,
                 "max_eval_samples": 16, "train_eval_samples": 16},
    }))
    out = root / "sweep"
    result = _cli("sweep", "--config", cfg_path, "--rates", "0,0.5", "--seeds", "2", "--out", out, "--quiet")
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return cfg_path, out, result.output


def test_tiny_sweep_writes_run_folders_table_csv_and_png(tiny_sweep):
    _, out, output = tiny_sweep
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["dropout.rate=0.0__seed=0", "dropout.rate=0.0__seed=1",
                     "dropout.rate=0.5__seed=0", "dropout.rate=0.5__seed=1"]
    for name in names:
        cfg = load_config(out / name / "config.yaml")
        assert cfg.dropout.rate == float(name.split("=")[1].split("__")[0])
        assert cfg.seed == int(name.rsplit("=", 1)[1])
        assert (out / name / "metrics.jsonl").is_file()
    assert "final" in output and "gap" in output
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    runs = _read_csv(out / "sweep_runs.csv")
    assert [r["run"] for r in runs] == names
    for r in runs:
        s = RunFolder(out / r["run"]).summary()
        main = s.main_metric
        assert r["main_metric"] == main == "accuracy"
        assert float(r["final"]) == s.final[main]
        assert float(r["best"]) == s.best[main]
        assert float(r["train"]) == s.final_train[main]
        assert float(r["gap"]) == pytest.approx(s.generalization_gap[main])
        assert float(r["gap"]) == pytest.approx(s.final_train[main] - s.final[main])
        assert float(r["uplink_bytes_per_round"]) == s.uplink_bytes_total / s.rounds
        assert float(r["downlink_bytes_per_round"]) == s.downlink_bytes_total / s.rounds
        assert int(r["seed"]) == load_config(out / r["run"] / "config.yaml").seed
    # dropout sends less
    up = {r["run"]: float(r["uplink_bytes_per_round"]) for r in runs}
    assert up["dropout.rate=0.5__seed=0"] < up["dropout.rate=0.0__seed=0"]

    grouped = _read_csv(out / "sweep.csv")
    assert [g["dropout.rate"] for g in grouped] == ["0.0", "0.5"]
    for g in grouped:
        finals = [float(r["final"]) for r in runs if r["dropout.rate"] == g["dropout.rate"]]
        assert float(g["final_mean"]) == pytest.approx(statistics.fmean(finals))
        assert float(g["final_std"]) == pytest.approx(statistics.stdev(finals))


def test_tiny_sweep_second_call_does_not_retrain(tiny_sweep, tmp_path, no_engine):
    cfg_path, out, _ = tiny_sweep
    copy = shutil.copytree(out, tmp_path / "sweep")
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.parent != copy}
    result = _cli("sweep", "--config", cfg_path, "--rates", "0,0.5", "--seeds", "2", "--out", copy)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 4
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.parent != copy} == before


def test_tiny_sweep_reruns_an_interrupted_run(tiny_sweep, tmp_path, monkeypatch):
    cfg_path, out, _ = tiny_sweep
    copy = shutil.copytree(out, tmp_path / "sweep")
    victim = copy / "dropout.rate=0.5__seed=1"
    (victim / "summary.json").unlink()
    (victim / "checkpoint.json").unlink()  # killed before its first round was checkpointed
    calls = []
    real = engine.run

    def counting(cfg, path, **kw):
        calls.append(Path(path).name)
        return real(cfg, path, **kw)

    monkeypatch.setattr(engine, "run", counting)
    threads = torch.get_num_threads()
    result = _cli("sweep", "--config", cfg_path, "--rates", "0,0.5", "--seeds", "2", "--out", copy, "--quiet")
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert calls == [victim.name]
    assert (victim / "summary.json").is_file()
    # same seed, same config: the re-run reproduces the interrupted run's numbers
    again = RunFolder(victim).summary()
    first = RunFolder(out / victim.name).summary()
    assert again.final == first.final and again.uplink_bytes_total == first.uplink_bytes_total


class Killed(BaseException):
    """Stands in for SIGKILL: nothing between the engine and the test catches it."""


def test_interrupted_run_resumes_from_its_checkpoint(tiny_bert, tmp_path, monkeypatch):
    from fedlodrop.run.folder import RunFolder

    glue = write_sst2(tmp_path / "glue")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "task": "sst2", "model": tiny_bert, "federation": {"devices": 2, "rounds": 3},
        "train": {"batch_size": 16, "max_length": 32, "threads": 1},
        "data": {"source": "glue_dir", "glue_dir": str(glue), "max_train_samples": 48,
                 "max_eval_samples": 16, "train_eval_samples": 16},
    }))
    args = ("sweep", "--config", cfg_path, "--rates", "0.5", "--quiet")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    threads = torch.get_num_threads()
    assert _cli(*args, "--out", whole).exit_code == 0
    commit = RunFolder.commit

    def dies_at_round_2(self, folder, rounds_done):
        commit(self, folder, rounds_done)
        if rounds_done == 2:
            raise Killed

    monkeypatch.setattr(RunFolder, "commit", dies_at_round_2)
    with pytest.raises(Killed):
        runner.invoke(app, [str(a) for a in (*args, "--out", cut)], catch_exceptions=False)
    monkeypatch.setattr(RunFolder, "commit", commit)
    monkeypatch.setattr(engine, "run", lambda *a, **k: pytest.fail("a run with a checkpoint was started over"))
    result = _cli(*args, "--out", cut)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "interrupted after round 2, resuming" in result.output
    name = "dropout.rate=0.5__seed=0"
    a = json.loads((whole / name / "summary.json").read_text())
    b = json.loads((cut / name / "summary.json").read_text())
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def test_run_sweep_api_returns_outcomes(tmp_path, fake_engine):
    base = load_config(None, ["task=sst2", "data.glue_dir=x"])
    outcomes = run_sweep(base, make_axes("0,0.3", []), 1, tmp_path / "s", show_progress=False)
    assert [o.reused for o in outcomes] == [False, False]
    outcomes = run_sweep(base, make_axes("0,0.3", []), 1, tmp_path / "s", show_progress=False)
    assert [o.reused for o in outcomes] == [True, True]
    assert outcomes[1].summary == fake_summary(outcomes[1].point.cfg)
    rep = build_report(tmp_path / "s")
    assert rep.png_path.stat().st_size > 0


def test_missing_data_found_by_the_first_run_leaves_no_sweep_folder(tmp_path, cfg_file, monkeypatch):
    def missing(cfg, out, **kw):
        raise UserError("GLUE folder for sst2 not found: x")  # prepare fails before writing

    monkeypatch.setattr(engine, "run", missing)
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5")
    assert result.exit_code == 2 and "GLUE folder" in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------- parallel runs (--jobs)


@pytest.mark.parametrize("args, named", [
    (["--jobs", "0"], "--jobs"), (["--jobs", "-2"], "--jobs"),
    (["--threads", "0"], "--threads"), (["--jobs", "2", "--threads", "-1"], "--threads"),
])
def test_bad_jobs_or_threads_exit_2_and_write_nothing(tmp_path, cfg_file, fake_engine, args, named):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.output
    assert not out.exists()
    assert fake_engine.calls == []
    base = load_config(cfg_file)
    with pytest.raises(UserError, match="must be at least 1"):
        run_sweep(base, make_axes("0", []), 1, out, jobs=int(args[1]) if args[0] == "--jobs" else 1,
                  threads=int(args[-1]) if args[-2] == "--threads" else None)
    assert not out.exists()


def test_threads_set_train_threads_and_do_not_stop_reuse(tmp_path, cfg_file, fake_engine):
    from fedlodrop.studies.sweep import cpu_count, run_threads

    base = load_config(cfg_file)
    assert run_threads(base, 1, None).train.threads is None  # one job: torch's own choice
    assert run_threads(base, 2, None).train.threads == max(1, cpu_count() // 2)
    assert run_threads(base, 64 * cpu_count(), None).train.threads == 1
    assert run_threads(with_overrides(base, {"train.threads": 3}), 2, None).train.threads == 3  # the config's
    assert run_threads(with_overrides(base, {"train.threads": 3}), 2, 5).train.threads == 5  # --threads wins
    out = tmp_path / "sweep"
    assert _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5", "--threads", "2").exit_code == 0
    for name in ("dropout.rate=0.0__seed=3", "dropout.rate=0.5__seed=3"):
        assert load_config(out / name / "config.yaml").train.threads == 2
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 2 and len(fake_engine.calls) == 2


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # spawns worker processes and trains 6 runs
def test_jobs_2_gives_the_runs_of_jobs_1_and_resumes_and_reuses(tiny_bert, tmp_path, monkeypatch):
    """The same sweep with one job and with two processes: bit-identical adapters and metrics
    (time aside); an interrupted run resumes in a worker; a finished sweep is reused."""
    from fedlodrop.run.folder import RunFolder, compare

    glue = write_sst2(tmp_path / "glue")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "task": "sst2", "model": tiny_bert, "federation": {"devices": 2, "rounds": 2},
        "train": {"batch_size": 16, "max_length": 32, "threads": 1},
        "data": {"source": "glue_dir", "glue_dir": str(glue), "max_train_samples": 48,
                 "max_eval_samples": 16, "train_eval_samples": 16},
    }))
    args = ("sweep", "--config", cfg_path, "--rates", "0,0.5", "--quiet")
    names = ["dropout.rate=0.0__seed=0", "dropout.rate=0.5__seed=0"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    threads = torch.get_num_threads()
    assert _cli(*args, "--out", one).exit_code == 0

    result = _cli(*args, "--out", two, "--jobs", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(": running" in line for line in lines) == 2
    assert sum(": final accuracy" in line for line in lines) == 2
    assert not any(line.startswith("round ") for line in lines)  # parallel runs print no round lines

    def same_runs(a: Path, b: Path) -> None:
        assert sorted(p.name for p in b.iterdir() if p.is_dir()) == names
        for name in names:
            worst, problems = compare(a / name, b / name)
            assert (worst, problems) == (0.0, []), name
            assert (a / name / "config.yaml").read_text() == (b / name / "config.yaml").read_text()
            assert _folder_files(a / name)["adapter.safetensors"] == _folder_files(b / name)["adapter.safetensors"]
        for report_file in ("sweep.json", "sweep.csv"):
            assert (a / report_file).read_text() == (b / report_file).read_text()

    same_runs(one, two)

    # killed after round 1 of the first run, in one process; then continued with two
    commit = RunFolder.commit

    def dies_at_round_1(self, folder, rounds_done):
        commit(self, folder, rounds_done)
        if rounds_done == 1:
            raise Killed

    monkeypatch.setattr(RunFolder, "commit", dies_at_round_1)
    with pytest.raises(Killed):
        runner.invoke(app, [str(a) for a in (*args, "--out", cut)], catch_exceptions=False)
    monkeypatch.setattr(RunFolder, "commit", commit)
    torch.set_num_threads(threads)
    assert RunFolder(cut / names[0]).rounds_done() == 1 and not (cut / names[1]).exists()
    result = _cli(*args, "--out", cut, "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert "interrupted after round 1, resuming" in result.output and ": running" in result.output
    same_runs(one, cut)

    # nothing left to do: reused, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in two.rglob("*") if p.parent != two}
    result = _cli(*args, "--out", two, "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 2
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*") if p.parent != two} == before


def test_arms_set_several_keys_at_once_and_the_report_names_them(tmp_path, cfg_file, fake_engine):
    """Three settings at equal uplink bytes as arms, crossed with a --vary axis: each run's config
    has its arm's keys, and the table, CSV and plot name the arm, not the keys it sets."""
    out = tmp_path / "sweep"
    arms = ["--arm", "full={lora.ranks: [4,8,16]}",  # its keys are a part of the next arm's: named, not matched
            "--arm", "dropout={dropout.rate: 0.5, dropout.sampler: budget, lora.ranks: [4,8,16]}",
            "--arm", "rank={lora.ranks: [2,4,8]}", "--arm", "bf16={federation.comm_dtype: bfloat16, lora.ranks: [4,8,16]}"]
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--set", "lora.r=16", *arms,
                  "--vary", "federation.partition=iid,dirichlet")
    assert result.exit_code == 0, result.output
    by_arm = {}
    for path in sorted(p for p in out.iterdir() if p.is_dir()):
        cfg = RunFolder(path).config()
        by_arm.setdefault(path.name.split("__")[0], []).append(cfg)
    assert sorted(by_arm) == ["arm=bf16", "arm=dropout", "arm=full", "arm=rank"]
    assert all(c.dropout.rate == 0.5 and c.dropout.sampler == "budget" and c.lora.ranks == [4, 8, 16]
               for c in by_arm["arm=dropout"])
    assert all(c.dropout.rate == 0.0 and c.lora.ranks == [2, 4, 8] for c in by_arm["arm=rank"])
    assert all(c.federation.comm_dtype == "bfloat16" for c in by_arm["arm=bf16"])
    rep = collect(out)
    assert rep.keys == ["arm", "federation.partition"]  # the keys the arms set are not columns of their own
    assert [g.values["arm"] for g in rep.groups][::2] == ["full", "dropout", "rank", "bf16"]  # the order given
    assert all(len(g.rows) == 1 for g in rep.groups)
    rows = _read_csv(out / "sweep.csv")
    assert [(r["arm"], r["federation.partition"]) for r in rows][:2] == [("full", "iid"), ("full", "dirichlet")]
    labels = [t.get_text() for t in plot(rep, tmp_path / "p.png").axes[0].get_xticklabels()]
    assert labels == ["full", "dropout", "rank", "bf16"]


@pytest.mark.parametrize("arm,words", [
    ("rank", "expected NAME={key: value"), ("x={lora.ranks: [1,2,99]}", "--arm x"),
    ("x={seed: 1}", "--seeds"), ("x={dropout.rate: 0.3}", "which --vary or --rates varies too"),
])
def test_bad_arms_exit_2_and_write_nothing(tmp_path, cfg_file, fake_engine, arm, words):
    out = tmp_path / "sweep"
    result = _cli("sweep", "--config", cfg_file, "--out", out, "--rates", "0,0.5", "--arm", arm)
    assert result.exit_code == 2 and words in result.stderr, result.output
    assert not out.exists()
