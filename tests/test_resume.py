"""Exact resume: a run killed with SIGKILL after round 2 of 4 and resumed ends bit-identical to an
uninterrupted one (metrics and weights); a finished run is not overwritten without --force."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.run.folder import RunFolder

VOLATILE = {"wall_s", "timing", "train_s"}
SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's fedlodrop
HANG_S = 1800  # only ends a hang


class Killed(BaseException):
    """Not an Exception: nothing between the engine and the test may catch it."""


def _strip(rows):
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in VOLATILE}
        r["devices"] = [{k: v for k, v in d.items() if k not in VOLATILE} for d in r["devices"]]
        out.append(r)
    return out


def _args(model, glue_dir, out, rounds=4):
    return ["run", "--quiet", "--out", str(out), "--set", "task=sst2", "--set", f"model={model}",
            "--set", "data.source=glue_dir", "--set", f"data.glue_dir={glue_dir}",
            "--set", "lora.r=4", "--set", "train.max_length=32", "--set", "train.batch_size=16",
            "--set", f"federation.rounds={rounds}", "--set", "dropout.rate=0.3",
            "--set", "dropout.variant=subadapter", "--set", "federation.devices=3",
            "--set", "federation.devices_per_round=2", "--set", "federation.comm_dtype=float16",
            "--set", "train.threads=1", "--set", "data.train_eval_samples=16"]


def _rows(folder):
    """The run's round records as their JSON lines, through the run folder's one reader."""
    return [r.to_json() for r in RunFolder(folder).records()]


# `fedlodrop run` in a process that SIGKILLs itself the instant round 2 is committed (its
# checkpoint pointer written): the kill lands at the same point on a fast or a slow machine
KILLED_AFTER_ROUND_2 = """
import os, signal, sys
from fedlodrop.run.folder import RunFolder
from fedlodrop.cli import main

commit = RunFolder.commit

def commit_then_die(self, folder, rounds_done):
    commit(self, folder, rounds_done)
    if rounds_done == 2:
        os.kill(os.getpid(), signal.SIGKILL)

RunFolder.commit = commit_then_die
sys.argv = ["fedlodrop", *sys.argv[1:]]
main()
"""


@pytest.mark.precision
@pytest.mark.slow  # a run killed in a fresh process, then resumed
def test_killed_run_resumes_bit_identical(tiny_bert, sst2_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = CliRunner().invoke(app, _args(tiny_bert, sst2_dir, whole))
    assert result.exit_code == 0, result.output
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_ROUND_2, *_args(tiny_bert, sst2_dir, killed)],
                          env=env, capture_output=True, text=True, timeout=HANG_S, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert RunFolder(killed).rounds_done() == 2
    assert len(_rows(killed)) == 2 and not (killed / "summary.json").exists()
    result = CliRunner().invoke(app, ["run", "--quiet", "--resume", str(killed)])
    assert result.exit_code == 0, result.output
    assert _strip(_rows(killed)) == _strip(_rows(whole))
    for name in ("adapter.safetensors", "base_delta.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(killed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (RunFolder(f).summary().to_json() for f in (whole, killed))
    assert {k: v for k, v in sa.items() if k != "wall_s"} == {k: v for k, v in sb.items() if k != "wall_s"}


@pytest.mark.parametrize("extra", [[], ["--set", "server.optimizer=adam"],
                                   ["--set", "lora.self_prune=0.5", "--set", "lora.prune_lambda=10",
                                    "--set", "federation.aggregation=hetlora"]],
                         ids=["fedavg", "fedadam", "self-pruning"])
def test_resume_after_a_partial_round_drops_its_metrics_line(tiny_bert, sst2_dir, tmp_path, monkeypatch, extra):
    """Killed between round 3's metrics line and its pointer: the line is dropped, the round redone,
    and the run ends as an uninterrupted one (a server optimiser's moments are in the checkpoint)."""
    from fedlodrop.run.folder import RunFolder

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert CliRunner().invoke(app, _args(tiny_bert, sst2_dir, whole, 3) + extra).exit_code == 0
    commit = RunFolder.commit

    def dies_at_round_3(self, folder, rounds_done):
        if rounds_done == 3:
            raise Killed  # stands in for SIGKILL at that instant
        commit(self, folder, rounds_done)

    monkeypatch.setattr(RunFolder, "commit", dies_at_round_3)
    with pytest.raises(Killed):
        CliRunner().invoke(app, _args(tiny_bert, sst2_dir, cut, 3) + extra, catch_exceptions=False)
    monkeypatch.setattr(RunFolder, "commit", commit)
    assert len(_rows(cut)) == 3 and RunFolder(cut).rounds_done() == 2
    result = CliRunner().invoke(app, ["run", "--quiet", "--resume", str(cut)])
    assert result.exit_code == 0, result.output
    assert _strip(_rows(cut)) == _strip(_rows(whole))
    for name in ("adapter.safetensors", "base_delta.safetensors"):
        assert (whole / name).exists() == (cut / name).exists(), name
        if (whole / name).exists():  # a rule that folds nothing writes no base delta
            a, b = load_file(str(whole / name)), load_file(str(cut / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_finished_run_is_not_overwritten_without_force(tiny_bert, sst2_dir, tmp_path):
    out = tmp_path / "r"
    assert CliRunner().invoke(app, _args(tiny_bert, sst2_dir, out, 1)).exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    result = CliRunner().invoke(app, _args(tiny_bert, sst2_dir, out, 1))
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before
    result = CliRunner().invoke(app, _args(tiny_bert, sst2_dir, out, 1) + ["--force"])
    assert result.exit_code == 0, result.output
    # resuming a finished run changes nothing
    result = CliRunner().invoke(app, ["run", "--quiet", "--resume", str(out)])
    assert result.exit_code == 0 and "final accuracy" in result.stdout


def test_resume_of_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.stderr


@pytest.mark.parametrize("rounds_folded", [1, 3])
def test_folded_base_is_one_definition(tiny_bert, rounds_folded):
    """W0 + F computed afresh equals a reload's: no in-place accumulation (((W0 + d1) + d2) ...)."""
    from fedlodrop.run.settings import validate
    from fedlodrop.data.tasks import TASKS
    from fedlodrop.lora.messages import FoldCatchUp, FoldUpdate
    from fedlodrop.model.backbone import build_model, load_tokenizer

    cfg = validate({"model": tiny_bert, "task": "sst2", "lora": {"r": 4}})
    a = build_model(cfg, TASKS["sst2"], load_tokenizer(cfg), 0)
    b = build_model(cfg, TASKS["sst2"], load_tokenizer(cfg), 0)
    g = torch.Generator().manual_seed(0)
    for r in range(rounds_folded):
        tensors = {f"{m.name}.dense": torch.randn(m.n_out, m.n_in, generator=g) * 1e-3 for m in a.layout.modules}
        a.sync_fold(FoldCatchUp(r, r + 1, [FoldUpdate(r + 1, tensors)]))
        a.set_view(None)  # the running engine sets the view every round
    b.set_fold(a.fold, a.fold_round)  # a resumed run loads F
    b.set_view(None)
    wa, wb = a.base_weights(), b.base_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
