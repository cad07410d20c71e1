"""The simulated clock and meter: every round priced on the system model the planner uses.

With a system (`system.file`, or the one a plan carries), each device's round is priced from what
it really did: the samples it trained, its dropout rate, and the bytes that travelled (not the
planner's estimate), with SPEC 3's formulas and the device's resources (the plan's bandwidth,
power and CPU frequency; without a plan, no planning at all: an equal share of the band, full
power, full frequency):

    compute  T_cmp = tau D c(gamma) / f              E_cmp = kappa tau D c(gamma) f^2
             c(gamma) = c0 + (1 - gamma) c1 r_k / r,  tau D = local epochs x the device's samples
    upload   T_up  = 8 x uplink bytes / R(B, p)      E_up  = p T_up
    downlink T_dn  = 8 x downlink bytes / R_dn       (when the cell models a downlink)
    latency  T_dn + T_cmp + T_up                     energy E_cmp + E_up

A device over the latency limit or its energy budget is what a deployment would see: with
`system.enforce: drop` the server leaves its update out (the server waited until the deadline, so
the round lasts T_max), with `report` it is only logged. `federation.time_budget_s` and
`energy_budget_j` end a run before the round that would exceed them; a round's cost is known
before it runs (masks, bytes and samples are), so the check is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlodrop.errors import UserError
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.round.records import DeviceRecord, RoundRecord, RoundSim, SimCost
from fedlodrop.run.systems import check_system

LATENCY, ENERGY = "latency", "energy"


@dataclass(frozen=True)
class DeviceCost:
    """A device's round on the simulated clock and meter: compute, upload and download seconds, and the energy."""
    compute_s: float
    upload_s: float
    downlink_s: float
    energy_j: float

    @property
    def latency_s(self) -> float:
        """Download, compute and upload, one after another."""
        return self.downlink_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class Resources:
    """Per-device bandwidth [Hz], transmit power [W] and CPU frequency [Hz]."""

    bandwidth_hz: np.ndarray
    power_w: np.ndarray
    frequency_hz: np.ndarray
    source: str  # "plan <method>" or "no planning"


class Meter(RoundPlugin):
    """Prices rounds on a `SystemModel` with fixed per-device resources; a plug-in of the round
    (`round.plugin`): it prices each device that replied (`admit`, which under `enforce: drop`
    leaves a late or over-budget device out) and the round (`on_record`)."""

    def __init__(self, model, resources: Resources, local_epochs: float, enforce: str = "drop",
                 members: list[int] | None = None):
        self.members = members  # a plan that asks only these devices (None: all)
        self.m = model
        self.res = resources
        self.local_epochs = float(local_epochs)
        self.enforce = enforce

    def participants(self, round_: int) -> list[int] | None:
        """The plan's devices when it leaves some out (they are never asked: no band, no energy)."""
        return None if self.members is None else list(self.members)

    @property
    def latency_limit_s(self) -> float:
        """T_max: the round's deadline."""
        return float(self.m.T)

    def energy_budget_j(self, k: int) -> float:
        """Device k's energy budget a round."""
        return float(self.m.E[k])

    def planned_samples(self, k: int) -> int:
        """The system's D_k: what a device that reports no sample count (under DP) is priced on."""
        return int(self.m.D[k])

    def price(self, k: int, rate: float, samples: int, uplink_bytes: int, downlink_bytes: int) -> DeviceCost:
        """Device k's round: `samples` trained at `rate`, these bytes up and down, on its resources."""
        m, f = self.m, float(self.res.frequency_hz[k])
        p, b = float(self.res.power_w[k]), float(self.res.bandwidth_hz[k])
        cycles = self.local_epochs * samples * (m.c0 + (1.0 - rate) * float(m.c1k[k]))  # c1 of its rank
        up = 8.0 * uplink_bytes / float(m.rate(b, p, k)) if uplink_bytes > 0 else 0.0
        down = 8.0 * downlink_bytes / float(m.dl_rate[k]) if m.dl_rate is not None else 0.0
        energy = m.kappa * cycles * f**2 + p * up
        return DeviceCost(cycles / f, up, down, energy if math.isfinite(energy) else math.inf)

    # ------------------------------------------------------------------ the round's plug-in hooks
    def admit(self, entry: DeviceRecord) -> str | None:
        """Price the device's round, on the samples it trained or (under DP, where devices report
        none) the system's D_k; the limit it broke, when that leaves it out."""
        if not entry.reported:
            return None
        samples = entry.samples if entry.samples is not None else self.planned_samples(entry.device)
        cost = self.price(entry.device, entry.rate, samples, entry.uplink_bytes, entry.downlink_bytes)
        entry.system = SimCost(cost.compute_s, cost.upload_s, cost.downlink_s, cost.latency_s, cost.energy_j)
        entry.limit = self.violation(entry.device, cost)
        return entry.limit if self.enforce == "drop" else None

    def on_record(self, record: RoundRecord, server) -> None:
        """The round waits for every reply; under `enforce: drop` no longer than the deadline."""
        priced = [d for d in record.devices if d.system is not None]
        latency = max((d.system.latency_s for d in priced), default=0.0)
        if self.enforce == "drop":
            latency = min(latency, self.latency_limit_s)
        record.system = RoundSim(latency, sum(d.system.energy_j for d in priced), self.latency_limit_s)

    def violation(self, k: int, cost: DeviceCost) -> str | None:
        """Why a device's round breaks a limit (latency first), or None."""
        if cost.latency_s > self.latency_limit_s * (1 + 1e-9):
            return f"missed the latency limit: {cost.latency_s:.4g} s > {self.latency_limit_s:.4g} s"
        if cost.energy_j > self.energy_budget_j(k) * (1 + 1e-9):
            return f"over its energy budget: {cost.energy_j:.4g} J > {self.energy_budget_j(k):.4g} J"
        return None


def meter_for(cfg, plan, spec) -> Meter:
    """The run's meter on system `spec` (system.file, or the plan's): the plan's resources, or no
    planning's. Checks that the system describes this federation."""
    check_system(cfg, spec, cfg.system.file or cfg.plan)
    from fedlodrop.planning import system_model  # scipy and cvxpy: only a run with a system pays for them

    model = system_model(spec)
    if plan is not None:
        res = Resources(np.array([d.bandwidth_hz for d in plan.devices]), np.array([d.power_w for d in plan.devices]),
                        np.array([d.frequency_hz for d in plan.devices]), f"plan {plan.method}")
    else:
        res = Resources(np.full(model.K, model.B_tot / model.K), model.P.copy(), model.fmax.copy(), "no planning")
    members = plan.members if plan is not None else None
    if members is not None and (cfg.federation.devices_per_round is not None or cfg.privacy.dp):
        raise UserError(f"plan {cfg.plan} leaves devices out of every round: it decides who takes part, so "
                        "federation.devices_per_round and privacy.dp (which sample participants) cannot be used with it")
    if members is not None and not members:
        raise UserError(f"plan {cfg.plan} leaves every device out")
    return Meter(model, res, cfg.federation.local_epochs, cfg.system.enforce, members)
