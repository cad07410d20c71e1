"""Getting messages to SuperNodes and replies back, and knowing which device a node serves.

Flower's node ids are random; a device is the `partition-id` in its SuperNode's node config (set
by the simulation runtime, or by `flower-supernode --node-config "partition-id=K ..."`). The
ServerApp never sees node configs, so it asks each node once with a QUERY message (`Discovery`).

`send_and_receive` pushes and then pulls every `poll_s` itself: Flower's own `send_and_receive`
sleeps 3 s between pulls in deployment. Replies are matched to what was sent by
`reply_to_message_id`, never by `src_node_id`: errors the SuperLink makes for a vanished node
(NODE_UNAVAILABLE) come from the SuperLink's own node id.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("flwr")

NODE = "node"  # the ConfigRecord of a QUERY reply
RUN_TASK = "fedlodrop.task"  # the run's task (classes in id order), sent to devices that bring their own data
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_NAMES = {
    0: "unknown error",
    1: "ClientApp could not be loaded",
    2: "ClientApp raised an exception",
    3: "message unavailable",
    4: "reply unavailable",
    5: "SuperNode unavailable",
    6: "mod failed",
    7: "invalid app bundle",
    8: "ClientApp crashed",
}


_CLASS_REASON = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.DOTALL)  # a SuperNode's: type and str()
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def error_reason(msg: Message) -> str:
    """One line for an error reply: its kind and the exception, e.g. "ClientApp raised an
    exception: ValueError: ...". A SuperNode reports "<class 'ValueError'>:<'...'>"; the
    simulation engine a Ray traceback, whose first exception line is the ClientApp's own."""
    code = int(msg.error.code)
    text = _ANSI.sub("", msg.error.reason or "").strip()
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    raised = [m for ln in lines if (m := _EXCEPTION_LINE.match(ln)) and "ClientAppException" not in m.group(1)]
    if len(lines) > 1 and raised:
        detail = f"{raised[0].group(1).rsplit('.', 1)[-1]}: {raised[0].group(2)}"
    elif match := _CLASS_REASON.match(text):
        detail = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    else:
        detail = lines[-1] if lines else ""
    if len(detail) > 300:
        detail = detail[:297] + "..."
    kind = _ERROR_NAMES.get(code, f"error code {code}")
    return f"{kind}: {detail}" if detail else kind


def send_and_receive(
    grid: Grid, messages: list[Message], timeout: float, poll_s: float
) -> tuple[dict[int, Message], list[int]]:
    """Push `messages`, pull until every reply is in or `timeout` s passed.

    Returns ({index in `messages`: its reply}, [indices of messages the SuperLink did not take]).
    A message whose reply has not come is in neither."""
    if not messages:
        return {}, []
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):  # e.g. the payload was too large: nothing went
        ids = [None] * len(messages)
    index = {mid: i for i, mid in enumerate(ids) if mid}
    unsent = [i for i, mid in enumerate(ids) if not mid]
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    pending = set(index)
    while pending:
        for reply in grid.pull_messages(sorted(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[index[mid]] = reply
                pending.discard(mid)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return replies, unsent


class DiscoveryError(Exception):
    """The SuperNodes' partitions contradict the configuration (a deployment mistake)."""


@dataclass
class Discovery:
    """node id <-> device index, learnt by asking each node once for its partition-id."""

    devices: int
    node_of: dict[int, int] = field(default_factory=dict)  # device -> node id
    asked: dict[int, str] = field(default_factory=dict)  # node id -> message id of its QUERY
    silent: set[int] = field(default_factory=set)  # nodes that did not answer (or not usefully)

    def online(self, grid: Grid) -> set[int]:
        """The node ids the SuperLink lists as online now."""
        return set(grid.get_node_ids())

    def refresh(self, grid: Grid, online: set[int] | None = None) -> None:
        """Ask nodes not asked yet; take in the answers that have come."""
        online = self.online(grid) if online is None else online
        known = set(self.node_of.values()) | set(self.asked) | self.silent
        new = sorted(n for n in online if n not in known)
        if new:
            msgs = [Message(RecordDict(), n, MessageType.QUERY, group_id="fedlodrop-discovery") for n in new]
            ids = list(grid.push_messages(msgs))
            for n, mid in zip(new, ids if len(ids) == len(new) else [None] * len(new)):
                if mid:
                    self.asked[n] = mid
                else:
                    self.silent.add(n)
        pending = {mid: n for n, mid in self.asked.items()}
        if not pending:
            return
        for reply in grid.pull_messages(sorted(pending)):
            node = pending.get(reply.metadata.reply_to_message_id)
            if node is None:
                continue
            del self.asked[node]
            if reply.has_error():
                log.warning("SuperNode %d did not say which device it is: %s", node, error_reason(reply))
                self.silent.add(node)
                continue
            self._learn(node, reply.content.config_records[NODE], online)

    def _learn(self, node: int, answer: ConfigRecord, online: set[int]) -> None:
        device, parts = int(answer["partition-id"]), int(answer.get("num-partitions", -1))
        if parts not in (-1, self.devices):
            raise DiscoveryError(
                f"SuperNode {node} says num-partitions={parts}, but federation.devices is {self.devices}"
            )
        if not 0 <= device < self.devices:
            raise DiscoveryError(
                f"SuperNode {node} says partition-id={device}, outside 0..{self.devices - 1} "
                f"(federation.devices is {self.devices})"
            )
        other = self.node_of.get(device)
        if other is not None and other != node and other in online:
            raise DiscoveryError(
                f"SuperNodes {other} and {node} both say partition-id={device}: give each SuperNode "
                "its own partition-id"
            )
        if other is not None and other != node:
            log.info("device %d moved from SuperNode %d (offline) to %d", device, other, node)
        self.node_of[device] = node
        log.info("SuperNode %d serves device %d (fedlodrop %s)", node, device, answer.get("version", "?"))

    def wait(self, grid: Grid, timeout: float, poll_s: float) -> None:
        """Until every device has a node, or `timeout` s passed (then the missing ones are left out)."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh(grid)
            if len(self.node_of) == self.devices or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        missing = [k for k in range(self.devices) if k not in self.node_of]
        if missing:
            log.warning("no SuperNode answered for devices %s after %.0f s: they are left out", missing, timeout)

    def nodes_for(self, devices: Iterable[int], online: set[int]) -> dict[int, int | None]:
        """The online node of each device, or None."""
        return {k: (n if (n := self.node_of.get(k)) in online else None) for k in devices}
