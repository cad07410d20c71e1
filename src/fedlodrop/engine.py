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
from fedlodrop.errors import UserError
from fedlodrop.evaluation import evaluate
from fedlodrop.experiment import Experiment, build
from fedlodrop.messages import DeviceReply, DeviceTask, FoldCatchUp
from fedlodrop.records import RoundPrecision, RoundRecord, Timing, distinct, summarize
from fedlodrop.runs import RunFolder
from fedlodrop.server import Server, ServerState


class RoundEngine(Protocol):
    """Runs round `round_` between `server.configure` and `close_round`, returns its record."""

    # Whether the devices still hold what they held before the run was interrupted (their copy of
    # the FedEx fold F). In-process devices do; a new Flower run starts device processes afresh.
    keeps_device_state: bool

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord: ...


EngineFactory = Callable[[Experiment], RoundEngine]


IN_PROCESS_SECAGG = ("privacy.secure_aggregation runs on Flower (fedlodrop flower simulate | run): in one "
                     "process there is nobody to hide the updates from")


IN_PROCESS_LOCAL = ("federation.partition local is for a Flower deployment, where each SuperNode reads its own "
                    "file (fedlodrop flower supernode --data FILE); in one process split one file with by_column")


def in_process(exp: Experiment) -> RoundEngine:
    from fedlodrop.inprocess import InProcessEngine

    if exp.cfg.privacy.secure_aggregation:
        raise UserError(IN_PROCESS_SECAGG)
    if exp.cfg.federation.partition == "local":
        raise UserError(IN_PROCESS_LOCAL)
    return InProcessEngine()


# ---------------------------------------------------------------------------- the server after the replies


def close_round(exp: Experiment, server: Server, tasks: list[DeviceTask], replies: list[DeviceReply],
                t_round: float, summed=None) -> RoundRecord:
    """The server's half after the replies, in every engine: aggregate and fold (`server.finish`),
    bring the evaluating backbone's fold up to date, score the global model, complete the record.
    `summed`: the secure sum of the updates (secure aggregation; the replies then carry none)."""
    round_ = server.state.rounds_done
    t0 = time.perf_counter()
    result = server.finish(tasks, replies, summed)
    if result.fold_update is not None:  # the server's own copy of the backbone evaluates
        exp.fm.sync_fold(FoldCatchUp(round_, round_ + 1, [result.fold_update]))
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    record = result.record
    record.precision = RoundPrecision(distinct(r.precision for r in replies if not r.error), exp.fm.eval_precision)
    record.eval, record.eval_loss = evaluate(exp, exp.eval_set, server.state.global_state, round_)
    record.train, _ = evaluate(exp, exp.train_eval_set, server.state.global_state, round_)
    eval_s = time.perf_counter() - t0
    train_s = sum(r.train_s or 0.0 for r in replies)
    wall_s = time.perf_counter() - t_round
    record.wall_s = round(wall_s, 3)
    record.timing = Timing(
        train_s=round(train_s, 4),
        other_device_s=round(wall_s - train_s - aggregate_s - eval_s, 4),
        aggregate_s=round(aggregate_s, 4),
        eval_s=round(eval_s, 4),
    )
    return record


# ---------------------------------------------------------------------------- run budgets


def predicted_cost(exp: Experiment, server: Server, round_: int) -> tuple[float, float]:
    """Round `round_`'s simulated latency and energy if every participant replies: its masks,
    bytes and samples are known before it runs, so this is what the round will cost."""
    meter, latency, energy = exp.meter, 0.0, 0.0
    for task in server.configure(round_):
        samples = exp.shards.samples(task.device)
        if samples is None or exp.cfg.privacy.dp:  # not on this machine, or not reported: the system's D_k
            samples = meter.planned_samples(task.device)
        cost = meter.price(task.device, task.rate, samples, server.upload_bytes(task), task.nbytes)
        latency, energy = max(latency, cost.latency_s), energy + cost.energy_j
    if meter.enforce == "drop":
        latency = min(latency, meter.latency_limit_s)
    return latency, energy


def _over_budget(exp: Experiment, server: Server, round_: int, records: list[RoundRecord]) -> str | None:
    """The run budget (federation.time_budget_s / energy_budget_j) round `round_` would exceed."""
    fed = exp.cfg.federation
    if exp.meter is None or (fed.time_budget_s is None and fed.energy_budget_j is None):
        return None
    latency, energy = predicted_cost(exp, server, round_)
    spent = [r.system for r in records if r.system is not None]
    if fed.time_budget_s is not None and sum(x.latency_s for x in spent) + latency > fed.time_budget_s:
        return "time_budget_s"
    if fed.energy_budget_j is not None and sum(x.energy_j for x in spent) + energy > fed.energy_budget_j:
        return "energy_budget_j"
    return None


def _check_first_round_fits(exp: Experiment) -> None:

    server = _server(exp, ServerState(rounds_done=0, global_state=exp.fm.get_state()))
    limit = _over_budget(exp, server, 0, [])
    if limit is not None:
        latency, energy = predicted_cost(exp, server, 0)
        what = f"{latency:.4g} s" if limit == "time_budget_s" else f"{energy:.4g} J"
        raise UserError(f"federation.{limit} {getattr(exp.cfg.federation, limit):g} is below round 1's simulated "
                        f"cost ({what}): no round fits")


def _server(exp: Experiment, state: ServerState) -> Server:
    return Server(exp.cfg, exp.fm.layout, state, exp.rates, exp.known, exp.meter)


# ---------------------------------------------------------------------------- whole runs


def run(cfg: RunConfig, out: Path, make_engine: EngineFactory = in_process, console=None,
        show_progress: bool = True, force: bool = False) -> dict:
    """Build (may raise UserError, leaving nothing), make the engine, then train all rounds into `out`."""
    folder = RunFolder(out)
    folder.check_new(force)
    exp = build(cfg)
    _check_first_round_fits(exp)
    round_engine = make_engine(exp)
    folder.start(cfg, exp.task, force=force)
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
    exp = build(cfg, task=folder.task())
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
    server = _server(exp, state)
    logs = RunLogs(cfg, folder.path, state.rounds_done)
    main = exp.task.main_metric
    progress = progress_bar(console, show_progress)
    stopped_by = None
    try:
        with progress:
            bar = progress.add_task("rounds", total=cfg.federation.rounds, completed=state.rounds_done)
            for round_ in range(state.rounds_done, cfg.federation.rounds):
                stopped_by = _over_budget(exp, server, round_, records)
                if stopped_by is not None:
                    console.print(f"stopped before round {round_ + 1}: it would exceed federation.{stopped_by}",
                                  highlight=False)
                    break
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
    summary = summarize(cfg, main, exp.rates, layout.adapter_values, layout.head_values, records, stopped_by)
    folder.save_final(server.state, layout, summary)
    return summary
