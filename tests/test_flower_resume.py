"""Resume works for every engine through `engine.resume`: a run interrupted after round 2 and
resumed on Flower (its device processes start afresh, holding no fold) ends with the model and
the scores of an uninterrupted run; only the first resumed round's downlink differs (each device
is sent the whole fold F instead of the rounds it missed)."""

from __future__ import annotations

import pytest
from conftest import learning_cfg
from flower_helpers import FakeGrid

from fedlodrop.run import engine
from fedlodrop.flower import app as flower_app
from fedlodrop.run.inprocess import InProcessEngine
from fedlodrop.run.folder import RunFolder, compare
from fedlodrop.data import TASKS

pytestmark = pytest.mark.usefixtures("fresh_client_cache")


class _Interrupted(Exception):
    pass


class _StopsAfter(InProcessEngine):
    """The in-process engine, killed when round `after` + 1 starts (the checkpoint of round
    `after` is written)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def run_round(self, exp, server, round_):
        if round_ == self.after:
            raise _Interrupted
        return super().run_round(exp, server, round_)


def test_an_interrupted_run_resumes_on_flower_as_an_uninterrupted_run(tiny_bert, polarity_dir, tmp_path):
    cfg = learning_cfg(tiny_bert, polarity_dir, **{
        "train.threads": 1, "federation.rounds": 4, "federation.local_epochs": 1, "dropout.rate": 0.3, "lora.r": 2,
        "data.train_eval_samples": 16, "flower.discovery_timeout_s": 1.0, "flower.round_timeout_s": 1.0,
        "flower.poll_interval_s": 0.01})
    # fedex: a fold the resumed devices do not hold; rank 2: each round's fold travels as factors, smaller
    # than F dense, so the catch-up a fresh device needs is larger than the one round a kept one needs
    assert cfg.federation.aggregation == "fedex"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    engine.run(cfg, whole, show_progress=False)
    with pytest.raises(_Interrupted):
        engine.run(cfg, cut, lambda exp: _StopsAfter(2), show_progress=False)
    assert RunFolder(cut).rounds_done() == 2 and not RunFolder(cut).finished

    rc = {"config-json": cfg.model_dump_json(), "run-dir": str(cut), "resume": True}
    flower_app.serve(FakeGrid(cfg.federation.devices, rc), rc)

    worst, problems = compare(whole, cut)
    assert worst == 0.0 and problems == ["metrics.jsonl differ beyond time", "summary.json differs beyond wall_s"]
    a, b = RunFolder(whole).records(), RunFolder(cut).records()
    assert [r.eval for r in a] == [r.eval for r in b] and [r.train_loss for r in a] == [r.train_loss for r in b]
    # round 3: in process the devices hold round 1's fold and are sent round 2's; the new Flower
    # device processes hold none and are sent rounds 1 and 2 (or F whole); the rest is the same
    assert b[2].downlink_bytes > a[2].downlink_bytes
    assert [r.downlink_bytes for i, r in enumerate(a) if i != 2] == [r.downlink_bytes for i, r in enumerate(b) if i != 2]
    assert RunFolder(whole).summary().final == RunFolder(cut).summary().final


def test_resume_options_are_checked_before_anything_starts(tiny_bert, polarity_dir, tmp_path):
    from typer.testing import CliRunner

    from fedlodrop.cli import app

    cfg = learning_cfg(tiny_bert, polarity_dir, **{"train.threads": 1, "federation.rounds": 1,
                                                   "data.train_eval_samples": 0})
    done = tmp_path / "done"
    engine.run(cfg, done, show_progress=False)
    empty = tmp_path / "empty"
    RunFolder(empty).start(cfg, TASKS[cfg.task])  # a run killed before its first round
    for args, needle in ((["--resume", str(done)], "finished run: nothing to resume"),
                         (["--resume", str(empty)], "no complete round to resume from"),
                         (["--resume", str(done), "--set", "seed=1"], "drop --config, --set and --out"),
                         (["--resume", str(tmp_path / "nowhere")], "is not a run folder")):
        result = CliRunner().invoke(app, ["flower", "simulate", *args])
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "nowhere").exists() and RunFolder(done).finished


def test_the_flower_app_declares_every_key_the_cli_sends(tmp_path):
    """Flower refuses a run config key its app does not declare ("Invalid run configuration"):
    the keys `flower simulate` and `flower run` send are exactly the app's."""
    import tomllib

    from fedlodrop.flower.federation import run_config
    from fedlodrop.run.settings import load_config
    from fedlodrop.flower import launch

    app = launch.write_app(tmp_path / "app")
    declared = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for resume in (False, True):
        sent = run_config(load_config(None, []), tmp_path / "run", False, resume)
        assert set(sent) == set(declared)
        assert all(type(sent[k]) is type(declared[k]) for k in sent)
