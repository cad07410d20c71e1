"""The in-process engine: every device's step runs here, on the one shared backbone.

A device is its adapter state: `device_step` loads what the server sent into the backbone, trains
its data shard and packs the reply; nothing is copied per device but the small adapter tensors.
"""

from __future__ import annotations

import time

from fedlodrop.client import device_step
from fedlodrop.engine import close_round
from fedlodrop.experiment import Experiment
from fedlodrop.records import RoundRecord
from fedlodrop.server import Server


class InProcessEngine:
    """`order`: the order devices train in (as replies may arrive over a network); the server
    aggregates in device order, so it cannot change the round."""

    keeps_device_state = True

    def __init__(self, order: list[int] | None = None):
        self.order = order

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord:
        t_round = time.perf_counter()
        tasks = server.configure(round_)
        run_order = tasks if self.order is None else [t for k in self.order for t in tasks if t.device == k]
        replies = [device_step(exp.fm, task, exp.shards[task.device], exp.cfg, exp.known) for task in run_order]
        return close_round(exp, server, tasks, replies, t_round)
