"""The round as a Flower strategy: `configure_train` and `aggregate_train` around fedlodrop's Server.

No algorithm lives here. `configure_train` asks `Server.configure` for the round's tasks and puts
each in a Message for its device's SuperNode; `aggregate_train` turns what came back into
`DeviceReply`s and hands them to `step.close_round` (which calls `Server.finish`, syncs the
evaluating backbone's fold, evaluates and completes the round's record), exactly as the in-process
round does. A device the round could not reach (no online SuperNode, an error reply, no reply in
time, a malformed reply) reaches the Server as a reply with `error` set, so it is left out and
logged under `failures` with the reason, and `federation.min_devices` decides whether the round
stands. Bytes in the record are measured from the messages that travelled.

`FlowerEngine` is the `engine.RoundEngine` the ServerApp hands to `engine.run`/`engine.resume`:
driven by `run_round` from the shared loop, not by `Strategy.start`, because the run folder,
checkpoints and evaluation belong to the loop, and rounds wait with our own fast polling.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlodrop.config import FlowerConfig
from fedlodrop.data.tasks import task_to_json
from fedlodrop.flower.secure import secure_sum
from fedlodrop.flower.transport import RUN_TASK, Discovery, error_reason, send_and_receive
from fedlodrop.flower.wire import content_bytes, content_reply, task_content
from fedlodrop.lora.messages import DeviceReply, DeviceTask
from fedlodrop.round import secagg
from fedlodrop.round.records import FlowerRound, RoundRecord, SecAggRound
from fedlodrop.round.server import Server
from fedlodrop.run.experiment import Experiment
from fedlodrop.run.step import close_round

log = logging.getLogger("flwr")


@dataclass
class _Round:
    t_round: float
    tasks: list[DeviceTask]
    sent: dict[int, Message] = field(default_factory=dict)  # device -> the message pushed
    down: dict[int, tuple[int, int]] = field(default_factory=dict)  # device -> (payload, count_bytes)
    problems: dict[int, str] = field(default_factory=dict)  # device -> why it has no reply
    record: RoundRecord | None = None


class FedLoDropStrategy(FedAvg):
    """The round as a Flower strategy: `configure_train` packs the Server's tasks into TRAIN messages,
    `aggregate_train` turns the replies into DeviceReplies and closes the round as every engine does;
    evaluation stays on the server."""
    def __init__(self, exp: Experiment, discovery: Discovery, settings: FlowerConfig):
        super().__init__(min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1)
        self.exp = exp
        self.discovery = discovery
        self.settings = settings
        self.server: Server | None = None  # the loop makes it; `run_round` binds it
        self._rounds: dict[int, _Round] = {}

    # ------------------------------------------------------------------ one round
    def run_round(self, grid: Grid, exp: Experiment, server: Server, round_: int) -> RoundRecord:
        """One round: configure, push and pull, aggregate; the round's record."""
        self.exp, self.server = exp, server
        server_round = round_ + 1
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        if exp.cfg.privacy.secure_aggregation:
            return self._secure_round(grid, server_round)
        replies, unsent = send_and_receive(
            grid, messages, self.settings.round_timeout_s, self.settings.poll_interval_s
        )
        state = self._rounds[server_round]
        for i in unsent:
            device = next(k for k, m in state.sent.items() if m is messages[i])
            state.problems[device] = "the SuperLink did not take the message"
            del state.sent[device], state.down[device]  # nothing went down
        self.aggregate_train(server_round, list(replies.values()))
        return self._rounds.pop(server_round).record

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """One TRAIN message per task of `Server.configure`, to the device's SuperNode
        (`arrays` and `config` are unused: the Server holds the global model)."""
        t_round = time.perf_counter()
        online = self.discovery.online(grid)
        self.discovery.refresh(grid, online)
        tasks = self.server.configure(server_round - 1)
        state = _Round(t_round, tasks)
        nodes = self.discovery.nodes_for([t.device for t in tasks], online)
        for task in tasks:
            node = nodes[task.device]
            if node is None:
                state.problems[task.device] = "no SuperNode online for this device"
                continue
            content = task_content(task, self.settings.pack_arrays)
            if self.exp.cfg.federation.partition == "local":  # devices read their own files in the run's classes
                content[RUN_TASK] = ConfigRecord({"json": json.dumps(task_to_json(self.exp.task))})
            state.sent[task.device] = Message(content, node, MessageType.TRAIN, group_id=str(server_round))
            state.down[task.device] = content_bytes(content)
        self._rounds[server_round] = state
        log.info("round %d: devices %s to SuperNodes %s", server_round, [t.device for t in tasks],
                 [nodes[t.device] for t in tasks])
        return list(state.sent.values())

    def aggregate_train(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies (matched to what was sent by message id) -> DeviceReply, then the engine's
        `step.close_round`; a device without a usable reply becomes an error reply, which the
        Server leaves out. The round's record is kept for `run_round`."""
        state = self._rounds[server_round]
        round_ = server_round - 1
        device_of = {m.metadata.message_id: k for k, m in state.sent.items()}
        up: dict[int, tuple[int, int]] = {}
        got: dict[int, DeviceReply] = {}
        for msg in replies:
            device = device_of.get(msg.metadata.reply_to_message_id)
            if device is None:
                log.warning("round %d: a reply to a message this round did not send", server_round)
                continue
            if msg.has_error():
                state.problems[device] = error_reason(msg)
                continue
            try:
                reply = content_reply(msg.content)
            except (KeyError, TypeError, ValueError) as err:
                state.problems[device] = f"malformed reply: {err}"
                continue
            if (reply.device, reply.round) != (device, round_):
                state.problems[device] = (
                    f"its SuperNode answered for device {reply.device}, round {reply.round + 1}"
                )
                continue
            got[device] = reply
            up[device] = content_bytes(msg.content)
        for device in state.sent:
            if device not in got and device not in state.problems:
                state.problems[device] = f"no reply within flower.round_timeout_s={self.settings.round_timeout_s:g} s"
        for device, problem in state.problems.items():
            got[device] = DeviceReply(device, round_, {}, 0, math.nan, 0, 0.0, error=problem)
        if state.problems:
            log.warning("round %d: left out %s", server_round, state.problems)
        record = close_round(self.exp, self.server, state.tasks, [got[k] for k in sorted(got)], state.t_round)
        state.record = self._measured(record, state, up)
        ok = len(record.ok_devices)
        return None, MetricRecord({"devices-ok": ok, "devices-left-out": len(record.devices) - ok})

    def _secure_round(self, grid: Grid, server_round: int) -> RoundRecord:
        """The round's TRAIN messages go through SecAgg+ (flower/secure.py): the Server gets the sum
        of the updates of the devices in it and what each reported in the clear."""
        state = self._rounds.pop(server_round)
        round_, p = server_round - 1, self.exp.cfg.privacy
        device_of = {m.metadata.dst_node_id: k for k, m in state.sent.items()}
        shares, threshold = secagg.shares_and_threshold(p, len(state.tasks))
        levels = secagg.quantization_levels(len(state.tasks))
        result = secure_sum(grid, {n: state.sent[k] for n, k in device_of.items()}, device_of, shares, threshold,
                            p.secagg_clip_range, levels, self.settings.round_timeout_s,
                            self.settings.poll_interval_s, server_round)
        got: dict[int, DeviceReply] = {}
        for device, problem in (state.problems | result.problems).items():
            got[device] = DeviceReply(device, round_, {}, 0, math.nan, 0, 0.0, error=problem)
        for device, scalars in result.reported.items():
            reply = DeviceReply.from_flat({}, scalars)
            if (reply.device, reply.round) != (device, round_):
                raise RuntimeError(f"SecAgg+: the reply of device {device} says device {reply.device}, round {reply.round + 1}")
            got[device] = reply
        summed = None if result.vector is None else secagg.split_vector(
            result.vector, self.exp.fm.layout, self.server.state.global_state)
        if any(r.error for r in got.values()):
            log.warning("round %d: left out %s", server_round, {k: r.error for k, r in got.items() if r.error})
        record = close_round(self.exp, self.server, state.tasks, [got[k] for k in sorted(got)], state.t_round, summed)
        for entry in record.devices:
            entry.downlink_bytes = result.down.get(entry.device, 0)
            if entry.reported:
                entry.uplink_bytes = result.up.get(entry.device, 0)
        in_sum = len(result.reported)
        bound = secagg.error_bound(in_sum, p.secagg_clip_range, levels) if in_sum else 0.0
        record.flower = _flower_round(state, sum(result.up.values()), sum(result.down.values()),
                                      SecAggRound(shares, threshold, p.secagg_clip_range, levels, in_sum, bound))
        return record

    def _measured(self, record: RoundRecord, state: _Round, up: dict[int, tuple[int, int]]) -> RoundRecord:
        """The record with the bytes of the messages that travelled, and the Flower details."""
        for entry in record.devices:
            entry.downlink_bytes = state.down.get(entry.device, (0, 0))[0]
            if entry.device in up:
                entry.uplink_bytes = up[entry.device][0]
        record.flower = _flower_round(state, sum(c for _, c in up.values()), sum(c for _, c in state.down.values()))
        return record

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Nothing to send: the global model is evaluated centrally on the server, inside
        `step.close_round`, exactly as the in-process engine does."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: list[Message]) -> MetricRecord | None:
        """No device evaluates (see `configure_evaluate`): nothing to aggregate."""
        return None


def _flower_round(state: _Round, up: int, down: int, secagg_round: SecAggRound | None = None) -> FlowerRound:
    """The round's Flower details: Flower's byte counts and the node each device's message went to."""
    nodes = {str(k): m.metadata.dst_node_id for k, m in sorted(state.sent.items())}
    return FlowerRound(up, down, nodes, secagg_round)


class FlowerEngine:
    """The `engine.RoundEngine` of the ServerApp: the strategy's round over this run's Grid.
    A new Flower run starts its device processes afresh: they hold no fold from before."""

    keeps_device_state = False

    def __init__(self, strategy: FedLoDropStrategy, grid: Grid):
        self.strategy, self.grid = strategy, grid

    def run_round(self, exp: Experiment, server: Server, round_: int) -> RoundRecord:
        """One round over Flower, between the server's two halves (the shared loop calls it)."""
        return self.strategy.run_round(self.grid, exp, server, round_)
