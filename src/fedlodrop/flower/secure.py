"""Secure aggregation on Flower: Flower's SecAgg+ (`SecAggPlusWorkflow` on the server,
`secaggplus_mod` around the ClientApp's train) carries one round's sum; no algorithm lives here.

Flower 1.42 ships SecAgg+ only for legacy strategies: its workflow asks a strategy's
`configure_fit` for (proxy, FitIns) pairs and hands the unmasked aggregate to `aggregate_fit`.
`_Hooks` is those two hooks and nothing else; `_Workflow` swaps each node's FitIns for the
device's fedlodrop task once the setup stage has begun, so the device trains on exactly what
`Server.configure` made. The devices report weight 1 (`max_weight` 1), so Flower's weighted mean
is the plain mean of the n vectors in the sum; times n it is the sum.

Four message exchanges a round (setup, share keys, collect masked vectors, unmask), each through
`_MeteredGrid`: the project's polling, a timeout per stage (`flower.round_timeout_s`), and the
bytes each device's messages carried, both ways.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.workflow import SecAggPlusWorkflow

from fedlodrop.flower.transport import error_reason, send_and_receive

log = logging.getLogger("flwr")

CONFIGS = "secaggplus_configs"  # the ConfigRecord of every SecAgg+ message (Flower's name)
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def message_bytes(content: RecordDict) -> int:
    """Everything a message carries (SecAgg+ puts its vectors, keys and shares in ConfigRecords):
    arrays as Flower counts them; config values as Flower's `count_bytes` does (8 per number,
    1 per bool, the length of a str or bytes), which fails on an empty string."""
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            total += sum(len(k) + _value_bytes(v) for k, v in record.items())
        else:
            total += record.count_bytes()
    return total


def _value_bytes(value) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8


@dataclass
class SecureSum:
    """A round's secure sum: the sum (None if the protocol halted), who is in it with what each
    reported in the clear, who is not and why, and the bytes each device's messages carried."""

    vector: np.ndarray | None
    reported: dict[int, dict]  # device -> the scalars of its reply (fitres metrics)
    problems: dict[int, str]  # device -> why it is not in the sum
    down: dict[int, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=dict)
    levels: int = 0


class _Proxy:
    """What SecAggPlusWorkflow needs of a client proxy: its node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _Hooks:
    """The two legacy-strategy hooks SecAggPlusWorkflow calls."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes
        self.results: list[tuple[_Proxy, FitRes]] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return None, {}


class _Workflow(SecAggPlusWorkflow):
    def __init__(self, contents: dict[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        for node in state.nid_to_fitins:  # the collect stage sends these: the device's own task
            state.nid_to_fitins[node] = self.contents[node]
        return ok


class _MeteredGrid:
    """The Grid as SecAggPlusWorkflow uses it (`send_and_receive`), over the project's polling."""

    def __init__(self, grid, timeout: float, poll_s: float, device_of: dict[int, int]):
        self.grid, self.timeout, self.poll_s, self.device_of = grid, timeout, poll_s, device_of
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)
        self.stage = 0  # exchanges in this attempt so far
        self.lost: dict[int, tuple[int, str]] = {}  # device -> (stage index, why) of its first failure

    def send_and_receive(self, messages, *, timeout=None):
        stage = min(self.stage, len(STAGES) - 1)
        self.stage += 1
        messages = list(messages)
        for m in messages:
            self.down[self.device_of[m.metadata.dst_node_id]] += message_bytes(m.content)
        replies, unsent = send_and_receive(self.grid, messages, self.timeout, self.poll_s)
        answered = set()
        for i, reply in replies.items():  # by the message answered: the SuperLink signs a lost node's error
            device = self.device_of[messages[i].metadata.dst_node_id]
            answered.add(device)
            if reply.has_error():
                self._lose(device, stage, error_reason(reply))
            else:
                self.up[device] += message_bytes(reply.content)
        for i, m in enumerate(messages):
            device = self.device_of[m.metadata.dst_node_id]
            if i in unsent:
                self._lose(device, stage, "the SuperLink did not take the message")
            elif device not in answered:
                self._lose(device, stage, f"no reply within flower.round_timeout_s={self.timeout:g} s")
        return list(replies.values())

    def _lose(self, device: int, stage: int, why: str) -> None:
        self.lost.setdefault(device, (stage, f"SecAgg+ {STAGES[stage]}: {why}"))


def secure_sum(grid, tasks: dict[int, Message], device_of: dict[int, int], shares: int, threshold: int,
               clip_range: float, levels: int, timeout: float, poll_s: float, server_round: int) -> SecureSum:
    """Run SecAgg+ over the round's TRAIN messages (`tasks`: node id -> its message).

    SecAgg+ survives devices lost while updates are collected or unmasked, not those lost while
    keys are set up or shared (their neighbours miss their shares). No update has been computed
    by then, so the protocol restarts from its setup with the devices still answering, as long as
    at least `threshold` of them are left."""
    metered = _MeteredGrid(grid, timeout, poll_s, device_of)
    nodes = list(tasks)
    while True:
        metered.stage = 0
        hooks = _run(metered, {n: tasks[n] for n in nodes}, shares, threshold, clip_range, levels, timeout, server_round)
        early = [n for n in nodes if metered.lost.get(device_of[n], (9, ""))[0] < 2]
        if hooks.results is not None or not early or len(nodes) - len(early) < threshold:
            break
        nodes = [n for n in nodes if n not in early]
        log.warning("round %d: SecAgg+ restarts without devices %s", server_round, sorted(device_of[n] for n in early))
    out = SecureSum(None, {}, {}, dict(metered.down), dict(metered.up), levels)
    lost = {k: why for k, (_, why) in metered.lost.items()}
    if hooks.results is None:  # the protocol halted: too few devices at some stage
        why = f"SecAgg+ halted: fewer than {threshold} devices could continue"
        for device in device_of.values():
            out.problems[device] = lost.get(device, why)
        return out
    in_sum = {device_of[proxy.node_id]: res for proxy, res in hooks.results}
    [mean] = parameters_to_ndarrays(hooks.results[0][1].parameters)
    out.vector = np.asarray(mean, dtype=np.float64) * len(in_sum)
    out.reported = {k: dict(res.metrics) for k, res in in_sum.items()}
    for device in device_of.values():
        if device not in in_sum:
            out.problems[device] = lost.get(device, "SecAgg+: not in the secure sum")
    return out


def _run(metered: _MeteredGrid, tasks: dict[int, Message], shares: int, threshold: int, clip_range: float,
         levels: int, timeout: float, server_round: int) -> _Hooks:
    from flwr.app import ArrayRecord
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.legacy_context import LegacyContext

    hooks = _Hooks(list(tasks))
    workflow = _Workflow(
        {n: m.content for n, m in tasks.items()},
        num_shares=shares if shares < len(tasks) else 1.0,  # 1.0: every node holds a share of every other
        reconstruction_threshold=threshold, max_weight=1.0, clipping_range=clip_range,
        quantization_range=levels, modulus_range=2**32, timeout=timeout,
    )
    state = RecordDict({"config": ConfigRecord({"current_round": server_round}), "parameters": ArrayRecord()})
    context = LegacyContext(Context(0, 0, {}, state, {}), strategy=hooks, client_manager=SimpleClientManager())
    workflow(metered, context)
    return hooks


def fitres_reply(vector: np.ndarray, scalars: dict, msg: Message) -> Message:
    """The collect stage's reply as `secaggplus_mod` reads it: a FitRes with the vector, weight 1,
    and the device's scalars in the clear."""
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), 1, scalars)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)
