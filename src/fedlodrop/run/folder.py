"""The run folder: the one module that reads and writes it.

    runs/<name>/
      config.yaml              the resolved configuration
      task.json                the task trained: columns, classes in id order, metrics (own data's
                               classes come from the data; evaluate, predict and export read them here)
      metrics.jsonl            one object per round
      checkpoint.json          the last complete round: {"rounds_done": n, "dir": "checkpoints/round-000n"}
      checkpoints/round-000n/  server state after round n: state.safetensors, state.json
      adapter.safetensors      final global LoRA factors (PEFT orientation) and head.*
      base_delta.safetensors   FedEx: the fold F added to each frozen base weight (its orientation)
      summary.json             written last: the run is finished

A checkpoint is written into a fresh folder, then `checkpoint.json` is replaced atomically: the
pointer is the mark that a round is complete, so a run killed at any instant resumes from the
last round whose pointer was written, and metrics lines past it are dropped on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlodrop.config import RunConfig, dump_config, read_config_tree
from fedlodrop.data.tasks import Task, task_from_config, task_from_json, task_to_json
from fedlodrop.errors import UserError
from fedlodrop.lora.adapter import AdapterLayout, State, to_base_orientation
from fedlodrop.lora.messages import FoldUpdate
from fedlodrop.round.records import RoundRecord, Summary
from fedlodrop.round.server import ServerState
from fedlodrop.run.settings import load_config

CONFIG, METRICS, POINTER, SUMMARY = "config.yaml", "metrics.jsonl", "checkpoint.json", "summary.json"
TASK = "task.json"
ADAPTER, BASE_DELTA = "adapter.safetensors", "base_delta.safetensors"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: State, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def default_run_dir(cfg: RunConfig, tag: str = "", kind: str = "") -> Path:
    """Where output goes when the user names no folder: runs/<task>-<rule>[-<tag>]-<time> for a
    run, runs/<kind>-<task>-<time> for a sweep or a comparison."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if kind:
        return Path("runs") / f"{kind}-{cfg.task}-{stamp}"
    return Path("runs") / "-".join([cfg.task, cfg.federation.aggregation] + ([tag] if tag else []) + [stamp])


class RunFolder:
    """A run folder: its config, task, round records, checkpoints, final model and summary; every read and
    write of one goes through here."""
    def __init__(self, path: Path):
        self.path = Path(path)

    # ---------------------------------------------------------------- what state is it in
    @property
    def finished(self) -> bool:
        """The run ended (summary.json is written last)."""
        return (self.path / SUMMARY).is_file()

    @property
    def started(self) -> bool:
        """A run was started here (`start` wrote its config.yaml): a run folder, finished or not."""
        return (self.path / CONFIG).is_file()

    def rounds_done(self) -> int:
        """Rounds whose checkpoint is committed (0 before the first)."""
        pointer = self.path / POINTER
        return json.loads(pointer.read_text())["rounds_done"] if pointer.is_file() else 0

    def check_new(self, force: bool) -> None:
        """A fresh run may go here: empty or absent, or `force` to replace what is there."""
        if self.path.exists() and any(self.path.iterdir()):
            if not force:
                what = "a finished run" if self.finished else "a run (resume it with --resume)"
                raise UserError(f"run folder {self.path} already holds {what}; use --force to overwrite it")

    def start(self, cfg: RunConfig, task: Task, force: bool = False) -> None:
        """Write a new run's task.json, config.yaml and an empty metrics.jsonl (replacing the folder with
        `force`)."""
        if force and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / TASK, json.dumps(task_to_json(task), indent=2))
        _write_atomic(self.path / CONFIG, dump_config(cfg))
        (self.path / METRICS).write_text("")

    def task(self) -> Task:
        """The task the run trains (a folder from before task.json: its built-in task)."""
        if (self.path / TASK).is_file():
            return task_from_json(json.loads((self.path / TASK).read_text()))
        found = task_from_config(self.config())
        if found is None:
            raise UserError(f"{self.path} has no {TASK}: its classes are unknown")
        return found

    # ---------------------------------------------------------------- config and metrics
    def config(self, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
        """The run's config.yaml. A folder written before `pooling` existed was trained with the
        architecture's own head, whatever `auto` resolves to today: it reads as `pooling: cls`."""
        if not (self.path / CONFIG).is_file():
            raise UserError(f"{self.path} is not a run folder (no {CONFIG})")
        tree = read_config_tree(self.path / CONFIG)
        before_pooling = "pooling" not in tree
        return load_config(overrides=(["pooling=cls"] if before_pooling else []) + list(overrides), tree=tree)

    def _rows(self) -> list[dict]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def records(self) -> list[RoundRecord]:
        """metrics.jsonl as typed round records."""
        return [RoundRecord.from_json(r) for r in self._rows()]

    def append_record(self, record: RoundRecord) -> None:
        """Append a round's record to metrics.jsonl, flushed to disk."""
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_records(self, rounds: int) -> list[RoundRecord]:
        """Keep the records of the first `rounds` rounds (those a checkpoint covers)."""
        rows = [r for r in self._rows() if r["round"] <= rounds]
        _write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
        return [RoundRecord.from_json(r) for r in rows]

    # ---------------------------------------------------------------- checkpoints
    def write_state(self, state: ServerState) -> Path:
        """The server's state after a round, in a fresh checkpoint folder (not yet committed)."""
        folder = self.path / "checkpoints" / f"round-{state.rounds_done:04d}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        tensors = {f"global/{k}": v for k, v in state.global_state.items()}
        tensors |= {f"fold/{k}": v for k, v in state.fold.items()}
        tensors |= {f"optimizer/{k}": v for k, v in state.optimizer.items()}
        for update in state.fold_log:
            tensors |= {f"log/{update.round}/{k}": v for k, v in update.tensors.items()}
        _save_tensors(tensors, folder / "state.safetensors")
        meta = {"rounds_done": state.rounds_done, "synced": state.synced, "log_rounds": [u.round for u in state.fold_log],
                "participations": state.participations, "ranks": state.ranks}
        _write_atomic(folder / "state.json", json.dumps(meta))
        return folder

    def commit(self, folder: Path, rounds_done: int) -> None:
        """Mark the round complete: replace checkpoint.json atomically, then drop older checkpoints."""
        pointer = {"rounds_done": rounds_done, "dir": str(folder.relative_to(self.path))}
        _write_atomic(self.path / POINTER, json.dumps(pointer))
        for old in (self.path / "checkpoints").iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> ServerState:
        """The server's state after the last committed round (one line if there is none)."""
        pointer = self.path / POINTER
        if not pointer.is_file():
            raise UserError(f"{self.path} holds no complete round to resume from (no {POINTER})")
        folder = self.path / json.loads(pointer.read_text())["dir"]
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
        log: dict[int, State] = {}
        for key, v in tensors.items():
            if key.startswith("log/"):
                _, r, name = key.split("/", 2)
                log.setdefault(int(r), {})[name] = v
        return ServerState(
            rounds_done=meta["rounds_done"],
            global_state={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("global/")},
            fold={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("fold/")},
            fold_log=[FoldUpdate(r, log[r]) for r in meta["log_rounds"]],
            synced=list(meta["synced"]),
            participations=list(meta.get("participations", [])),
            ranks=list(meta.get("ranks", [])),
            optimizer={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")},
        )

    # ---------------------------------------------------------------- the finished run
    def save_final(self, state: ServerState, layout: AdapterLayout, summary: Summary) -> None:
        """The global adapter, the fold in each base weight's orientation, then the summary (last)."""
        _save_tensors(state.global_state, self.path / ADAPTER)
        if state.fold:
            deltas = {name: to_base_orientation(layout.module(name), f) for name, f in state.fold.items()}
            _save_tensors(deltas, self.path / BASE_DELTA)
        _write_atomic(self.path / SUMMARY, json.dumps(summary.to_json(), indent=2))

    def summary(self) -> Summary:
        """The finished run's summary.json."""
        return Summary.from_json(json.loads((self.path / SUMMARY).read_text()))

    def load_final(self, layout: AdapterLayout) -> tuple[State, dict[str, torch.Tensor]]:
        """The global adapter and the fold F (out x in) of a finished run."""
        if not (self.path / ADAPTER).is_file():
            raise UserError(f"{self.path} is not a finished run folder (no {ADAPTER})")
        adapter = load_file(str(self.path / ADAPTER))
        fold = {}
        if (self.path / BASE_DELTA).is_file():
            for name, d in load_file(str(self.path / BASE_DELTA)).items():
                fold[name] = to_base_orientation(layout.module(name), d)  # a transpose is its own inverse
        return adapter, fold


def run_folders(root: Path) -> list[RunFolder]:
    """The run folders at or below `root` (those holding config.yaml and metrics.jsonl), by path."""
    found = {p.parent for p in Path(root).rglob(METRICS) if (p.parent / CONFIG).is_file()}
    return [RunFolder(p) for p in sorted(found)]


# -------------------------------------------------------------------- comparing two runs
VOLATILE = ("wall_s", "timing", "flower")  # time, and an engine's own details (Flower node ids, count_bytes)


def _comparable(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in VOLATILE}
        r["devices"] = [{k: v for k, v in d.items() if k != "train_s"} for d in r.get("devices", [])]
        out.append(r)
    return out


def compare(a: Path, b: Path) -> tuple[float, list[str]]:
    """Two finished runs of one config (e.g. in-process and on Flower): the largest |difference|
    over their adapter and base-delta tensors, and what differs beyond time (empty: the same run)."""
    fa, fb = RunFolder(Path(a)), RunFolder(Path(b))
    worst, problems = 0.0, []
    for name in (ADAPTER, BASE_DELTA):
        here, there = (fa.path / name).is_file(), (fb.path / name).is_file()
        if here != there:
            problems.append(f"{name} in one run only")
            continue
        if not here:
            continue
        x, y = load_file(str(fa.path / name)), load_file(str(fb.path / name))
        if x.keys() != y.keys():
            problems.append(f"{name}: different tensors")
            continue
        for key in x:
            diff = float((x[key].double() - y[key].double()).abs().max()) if x[key].numel() else 0.0
            worst = max(worst, diff)
            if not torch.equal(x[key], y[key]):
                problems.append(f"{name}: {key} differs (max {diff:.3g})")
    if _comparable(fa._rows()) != _comparable(fb._rows()):
        problems.append(f"{METRICS} differ beyond time")
    sa, sb = fa.summary().to_json(), fb.summary().to_json()
    sa.pop("wall_s", None), sb.pop("wall_s", None)
    if sa != sb:
        problems.append(f"{SUMMARY} differs beyond wall_s")
    return worst, problems
