"""Features that plug into the round at named points, instead of branches in the server and the
device step (the way Flower wraps a strategy with its DP wrappers).

A plug-in overrides the hooks it needs; every hook's default leaves the round as it is. The
server's half (`Server`) calls, in this order:

    participants(round_)          who takes part (the first plug-in that answers decides)
    device_update(start, end, sent)   the update a device's reply amounts to, as the server trusts it
    admit(entry)                  after a reply is recorded: a reason to leave the device out
    required_updates(configured)  how many usable updates the round needs to stand
    aggregate(server, updates)    replaces the rule's weighted mean (the first that answers)
    on_record(record, server)     adds to the round's record

and the device's half (`client.device_step`):

    privatize(start, end, sent, round_, device)   what leaves the device
    reply(reply)                  the reply as sent

Built-in plug-ins: client-level differential privacy (`round.privacy.DifferentialPrivacy`) and the
simulated clock and meter (`run.meter.Meter`); `plugins(cfg)` composes the ones a config asks
for, in one place. Secure aggregation changes how replies reach the server (Flower's SecAgg+ sum,
`Server.finish(..., summed)`), not what the round does with them; its refusals are
`round.secagg.check`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlodrop.lora.adapter import State

if TYPE_CHECKING:
    from fedlodrop.lora.messages import DeviceReply
    from fedlodrop.round.records import DeviceRecord, RoundRecord
    from fedlodrop.round.server import Server


class RoundPlugin:
    """The hooks a feature may implement; each default does nothing."""

    # ------------------------------------------------------------------ the server's half
    def participants(self, round_: int) -> list[int] | None:
        """The devices of `round_`, or None to leave the choice to the next plug-in / the seed."""
        return None

    def device_update(self, start: State, end: State, sent: State) -> State:
        """Device k's end state as the server takes it (`sent`: 1 where it sends values)."""
        return end

    def admit(self, entry: DeviceRecord) -> str | None:
        """Called for every device of the round once its reply is recorded: why to leave it out."""
        return None

    def required_updates(self, configured: int) -> int:
        """How many usable updates a round needs to stand (`federation.min_devices`, `configured`)."""
        return configured

    def aggregate(self, server: Server, updates: list) -> tuple[State, dict] | None:
        """The new global state and residuals instead of the rule's weighted mean, or None."""
        return None

    def on_record(self, record: RoundRecord, server: Server) -> None:
        """Add this feature's part to the round's record."""

    # ------------------------------------------------------------------ the device's half
    def privatize(self, start: State, end: State, sent: State, round_: int, device: int) -> State:
        """What the device's trained state becomes before it is packed and sent."""
        return end

    def reply(self, reply: DeviceReply) -> DeviceReply:
        """The reply as it leaves the device."""
        return reply
