"""The in-process engine: every device's step runs here, on the one shared backbone.

A device is its adapter state: `device_step` loads what the server sent into the backbone, trains
its data shard and packs the reply; nothing is copied per device but the small adapter tensors.
"""

from __future__ import annotations

import time

from fedlodrop.config import RunConfig
from fedlodrop.errors import UserError
from fedlodrop.round.client import device_step
from fedlodrop.round.records import RoundRecord
from fedlodrop.round.server import Server
from fedlodrop.run.experiment import Experiment
from fedlodrop.run.step import RoundEngine, close_round

IN_PROCESS_SECAGG = ("privacy.secure_aggregation runs on Flower (fedlodrop flower simulate | run): in one "
                     "process there is nobody to hide the updates from")
IN_PROCESS_LOCAL = ("federation.partition local is for a Flower deployment, where each SuperNode reads its own "
                    "file (fedlodrop flower supernode --data FILE); in one process split one file with by_column")


def refuse(cfg: RunConfig) -> None:
    """What one process cannot run, one line each: secure aggregation, devices with their own files."""
    if cfg.privacy.secure_aggregation:
        raise UserError(IN_PROCESS_SECAGG)
    if cfg.federation.partition == "local":
        raise UserError(IN_PROCESS_LOCAL)


def in_process(exp: Experiment) -> RoundEngine:
    """The in-process engine for `exp` (after `refuse`)."""
    refuse(exp.cfg)
    return InProcessEngine()


class InProcessEngine:
    """`order`: the order devices train in (as replies may arrive over a network); the server
    aggregates in device order, so it cannot change the round."""

    keeps_device_state = True

    def __init__(self, order: list[int] | None = None):
        self.order = order

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord:
        """One round: the server's tasks, each device's step on the shared backbone, then `close_round`."""
        t_round = time.perf_counter()
        tasks = server.configure(round_)
        run_order = tasks if self.order is None else [t for k in self.order for t in tasks if t.device == k]
        replies = [device_step(exp.fm, task, exp.shards[task.device], exp.cfg, exp.known) for task in run_order]
        return close_round(exp, server, tasks, replies, t_round)
