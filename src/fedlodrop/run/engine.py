"""The loop every engine shares, and the interface an engine states.

    exp = experiment.build(cfg)                        # before the run folder exists
    for each round:
        record = round_engine.run_round(exp, server, round)
            # tasks = server.configure(round); the devices' steps over some transport;
            # close_round(exp, server, tasks, replies): aggregate, fold, evaluate, the record
        checkpoint (atomically), append the record to metrics.jsonl, log, print its line

A `RoundEngine` (`run.step`) runs one round's device steps and transport between the server's two
halves: `run.inprocess.InProcessEngine` calls the devices in this process over one backbone,
`flower.strategy.FlowerEngine` sends Flower messages; both end the round with `step.close_round`.
`run` and `resume` take a factory `make_engine(exp) -> RoundEngine` (in process by default), so
every engine starts and resumes through the same code.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from fedlodrop.config import RunConfig
from fedlodrop.errors import UserError
from fedlodrop.round.records import RoundRecord, Summary, summarize
from fedlodrop.round.server import Server, ServerState
from fedlodrop.run.experiment import Experiment, build
from fedlodrop.run.folder import RunFolder
from fedlodrop.run.inprocess import in_process
from fedlodrop.run.logs import RunLogs, progress_bar
from fedlodrop.run.step import EngineFactory, RoundEngine

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
    return Server(exp.cfg, exp.fm.layout, state, exp.rates, exp.known, exp.plugins)


# ---------------------------------------------------------------------------- whole runs


def run(cfg: RunConfig, out: Path, make_engine: EngineFactory = in_process, console=None,
        show_progress: bool = True, force: bool = False) -> Summary:
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
           show_progress: bool = True) -> Summary:
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
          round_engine: RoundEngine, console=None, show_progress: bool = True) -> Summary:
    """The rounds from `state` on: each record is checkpointed, appended and logged before the
    next round starts; then the final model and the summary."""
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
