"""The loop every engine shares, and the interface an engine states.

    exp = experiment.build(cfg)                        # before the run folder exists
    for each round:
        record = round_engine.run_round(exp, server, round)
            # tasks = server.configure(round); the devices' steps over some transport;
            # close_round(exp, server, tasks, replies): aggregate, fold, evaluate, the record
        checkpoint (atomically), append the record to metrics.jsonl, log, print its line

A `RoundEngine` runs one round's device steps and transport between the server's two halves:
`fedlodrop.inprocess.InProcessEngine` calls the devices in this process over one backbone,
`fedlodrop.flower.strategy.FlowerEngine` sends Flower messages. `run` and `resume` take a factory
`make_engine(exp) -> RoundEngine`, so every engine starts and resumes through the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fedlodrop.config import RunConfig
from fedlodrop.evaluation import evaluate
from fedlodrop.experiment import Experiment, build
from fedlodrop.messages import DeviceReply, DeviceTask, FoldCatchUp
from fedlodrop.records import RoundRecord, Timing, summarize
from fedlodrop.runs import RunFolder
from fedlodrop.server import Server, ServerState


class RoundEngine(Protocol):
    """Runs round `round_` between `server.configure` and `close_round`, returns its record."""

    # Whether the devices still hold what they held before the run was interrupted (their copy of
    # the FedEx fold F). In-process devices do; a new Flower run starts device processes afresh.
    keeps_device_state: bool

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord: ...


EngineFactory = Callable[[Experiment], RoundEngine]


def in_process(exp: Experiment) -> RoundEngine:
    from fedlodrop.inprocess import InProcessEngine

    return InProcessEngine()


# ---------------------------------------------------------------------------- the server after the replies


def close_round(exp: Experiment, server: Server, tasks: list[DeviceTask], replies: list[DeviceReply],
                t_round: float) -> RoundRecord:
    """The server's half after the replies, in every engine: aggregate and fold (`server.finish`),
    bring the evaluating backbone's fold up to date, score the global model, complete the record."""
    round_ = server.state.rounds_done
    t0 = time.perf_counter()
    result = server.finish(tasks, replies)
    if result.fold_update is not None:  # the server's own copy of the backbone evaluates
        exp.fm.sync_fold(FoldCatchUp(round_, round_ + 1, [result.fold_update]))
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = result.record
    record.eval, record.eval_loss = evaluate(exp, exp.eval_set, server.state.global_state, round_)
    record.train, _ = evaluate(exp, exp.train_eval_set, server.state.global_state, round_)
    eval_s = time.perf_counter() - t0
    train_s = sum(r.train_s for r in replies)
    wall_s = time.perf_counter() - t_round
    record.wall_s = round(wall_s, 3)
    record.timing = Timing(
        train_s=round(train_s, 4),
        other_device_s=round(wall_s - train_s - aggregate_s - eval_s, 4),
        aggregate_s=round(aggregate_s, 4),
        eval_s=round(eval_s, 4),
    )
    if exp.plan is not None:
        record.model = _model_costs(exp.plan, record, exp.cfg.federation.devices)
    return record


def _model_costs(plan, record: RoundRecord, n: int) -> dict:
    """The system model's latency and energy for the bytes this round really sent."""
    from fedlodrop.planning.plan import round_costs

    up, down = [0.0] * n, [0.0] * n
    for d in record.devices:
        up[d.device], down[d.device] = 8.0 * (d.uplink_bytes or 0), 8.0 * d.downlink_bytes
    costs = round_costs(plan.system, plan.devices, up, down)
    active = [c for k, c in enumerate(costs) if k in record.participants]
    return {
        "latency_s": max(c[0] for c in active),
        "energy_j": sum(c[1] for c in active),
        "device_latency_s": [c[0] for c in costs],
        "device_energy_j": [c[1] for c in costs],
    }


# ---------------------------------------------------------------------------- whole runs


def run(cfg: RunConfig, out: Path, make_engine: EngineFactory = in_process, console=None,
        show_progress: bool = True, force: bool = False) -> dict:
    """Build (may raise UserError, leaving nothing), make the engine, then train all rounds into `out`."""
    folder = RunFolder(out)
    folder.check_new(force)
    exp = build(cfg)
    round_engine = make_engine(exp)
    folder.start(cfg, force=force)
    state = ServerState(rounds_done=0, global_state=exp.fm.get_state())
    return train(exp, folder, state, [], round_engine, console, show_progress)


def resume(run_dir: Path, make_engine: EngineFactory = in_process, console=None,
           show_progress: bool = True) -> dict:
    """Continue an interrupted run from its last complete round, on any engine; the model and
    the metrics end as an uninterrupted run's (on an engine whose devices start afresh, the first
    round after resuming sends each device the whole fold F instead of the rounds it missed)."""
    folder = RunFolder(run_dir)
    cfg = folder.config()
    if folder.finished:
        return folder.summary()
    state = folder.load_checkpoint()
    exp = build(cfg)
    round_engine = make_engine(exp)
    exp.fm.set_fold(state.fold, state.rounds_done)
    if not round_engine.keeps_device_state:
        state.synced = [0] * cfg.federation.devices
    records = folder.truncate_records(state.rounds_done)
    return train(exp, folder, state, records, round_engine, console, show_progress)


def train(exp: Experiment, folder: RunFolder, state: ServerState, records: list[RoundRecord],
          round_engine: RoundEngine, console=None, show_progress: bool = True) -> dict:
    """The rounds from `state` on: each record is checkpointed, appended and logged before the
    next round starts; then the final model and the summary."""
    from rich.console import Console

    from fedlodrop.logs import RunLogs, progress_bar

    cfg = exp.cfg
    console = console or Console(stderr=True)
    server = Server(cfg, exp.fm.layout, state, exp.rates, exp.known)
    logs = RunLogs(cfg, folder.path, state.rounds_done)
    main = exp.task.main_metric
    progress = progress_bar(console, show_progress)
    try:
        with progress:
            bar = progress.add_task("rounds", total=cfg.federation.rounds, completed=state.rounds_done)
            for round_ in range(state.rounds_done, cfg.federation.rounds):
                record = round_engine.run_round(exp, server, round_)
                t0 = time.perf_counter()
                written = folder.write_state(server.state)
                record.timing.checkpoint_s = round(time.perf_counter() - t0, 4)
                folder.append_record(record)
                folder.commit(written, server.state.rounds_done)
                records.append(record)
                logs.round(record)
                progress.advance(bar)
                console.print(record.line(main), highlight=False)
    finally:
        logs.close()
    layout = exp.fm.layout
    summary = summarize(cfg, main, exp.rates, layout.adapter_values, layout.head_values, records)
    folder.save_final(server.state, layout, summary)
    return summary
