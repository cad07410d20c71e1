"""One round between the server's two halves, as every engine runs it: what an engine is
(`RoundEngine`), and the server's half after the replies (`close_round`), shared by the in-process
engine and the Flower strategy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from fedlodrop.lora.messages import DeviceReply, DeviceTask, FoldCatchUp
from fedlodrop.round.records import RoundPrecision, RoundRecord, Timing, distinct
from fedlodrop.round.server import Server
from fedlodrop.run.evaluation import evaluate
from fedlodrop.run.experiment import Experiment


class RoundEngine(Protocol):
    """Runs round `round_` between `server.configure` and `close_round`, returns its record."""

    # Whether the devices still hold what they held before the run was interrupted (their copy of
    # the FedEx fold F). In-process devices do; a new Flower run starts device processes afresh.
    keeps_device_state: bool

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord:
        """Run round `round_` and return its record."""


EngineFactory = Callable[[Experiment], RoundEngine]


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
