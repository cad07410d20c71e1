"""The result of `fedlodrop optimize`: per-device rates and resources, self-contained in plan.json.

A plan carries the whole system description (key `system`), so the training engine can take the
rates (`plan.devices[k].gamma`) and, each round, price the bytes it really sent with
`round_costs(plan.system, plan.devices, uplink_bits, downlink_bits)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import allocate, min_bandwidth
from fedlodrop.planning.spec import SystemSpec, load_file, validate
from fedlodrop.planning.system import SystemModel, as_model, system_model

_BIND_TOL = 1e-6  # a constraint counts as binding within this relative distance of its limit


class PlanDevice(BaseModel):
    """One device's plan: its rate, bandwidth, power and frequency, and the latency and energy they cost;
    `takes_part: false` for a device the plan leaves out of every round (a baseline that only asks the
    devices that fit: no band, no energy)."""
    model_config = ConfigDict(extra="ignore")

    index: int
    name: str
    gamma: float = Field(ge=0, lt=1)
    bandwidth_hz: float = Field(ge=0)
    power_w: float = Field(ge=0)
    frequency_hz: float = Field(gt=0)
    latency_s: float
    energy_j: float
    compute_s: float = 0.0
    upload_s: float = 0.0
    downlink_s: float = 0.0
    uplink_bits: float = 0.0
    min_bandwidth_hz: float = 0.0
    binding: list[str] = Field(default_factory=list)
    takes_part: bool = True

    @model_validator(mode="after")
    def _band_if_taking_part(self) -> PlanDevice:
        if self.takes_part and self.bandwidth_hz <= 0:
            raise ValueError(f"device {self.index} takes part with bandwidth_hz {self.bandwidth_hz:g}: give it a band")
        return self


class SolverStats(BaseModel):
    """How a plan was found: iterations, time, status, and whatever else the solver reports."""
    model_config = ConfigDict(extra="allow")

    iterations: int = 0
    nodes: int = 0
    gap: float = 0.0  # final upper - lower bound (0 for methods without a bound)
    rel_gap: float = 0.0
    lower_bound: float | None = None
    seconds: float = 0.0
    status: str = "optimal"


class Plan(BaseModel):
    """A plan for a system (plan.json): its method, bound value and terms, each device's rate and resources,
    the system itself, and how it was found."""
    model_config = ConfigDict(extra="ignore")

    method: str
    objective: float
    feasible: bool
    emp: float
    gap: float  # the bound's stability term Gap(gamma), not the solver's gap
    sparsity: float
    devices: list[PlanDevice]
    solver: SolverStats
    totals: dict[str, Any] = Field(default_factory=dict)
    system: SystemSpec

    @property
    def gammas(self) -> list[float]:
        """Each device's dropout rate."""
        return [d.gamma for d in self.devices]

    @property
    def members(self) -> list[int] | None:
        """The devices that take part, or None when all do."""
        inside = [d.index for d in self.devices if d.takes_part]
        return None if len(inside) == len(self.devices) else inside

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (what `fedlodrop run --set plan=FILE` reads)."""
        Path(path).write_text(self.to_json() + "\n")

    def model(self) -> SystemModel:
        """The plan's system as a model (the formulas the planner and the meter use)."""
        return system_model(self.system)


def load_plan(path: str | Path) -> Plan:
    """Read plan.json (from `fedlodrop optimize`); a bad file is a one-line UserError."""
    return load_file(path, "plan", "JSON", lambda tree, source: validate(Plan, tree, source, "a plan object"))


def _binding(m: SystemModel, k: int, gamma: float, p: float, f: float, lat: float, en: float) -> list[str]:
    out = []
    if lat >= m.T * (1 - _BIND_TOL):
        out.append("latency")
    if en >= m.E[k] * (1 - _BIND_TOL):
        out.append("energy")
    if p >= m.P[k] * (1 - _BIND_TOL):
        out.append("p_max")
    if f >= m.fmax[k] * (1 - _BIND_TOL):
        out.append("f_max")
    if gamma >= m.gamma_max - 1e-9:
        out.append("gamma_max")
    return out


def make_plan(
    spec: SystemSpec,
    gamma: Sequence[float],
    method: str,
    stats: SolverStats,
    bandwidth: Sequence[float] | None = None,
    m: SystemModel | None = None,
) -> Plan:
    """Resources for the rates: B_k = beta_k(gamma_k) plus a pro-rata share of any spare band
    (or the given `bandwidth`), then the energy-minimal p_k, f_k; latency and energy recomputed
    from SPEC 3's formulas. The caller guarantees that the rates fit."""
    m = m or system_model(spec)
    ks = np.arange(m.K)
    g = np.asarray(gamma, dtype=float)
    beta = min_bandwidth(m, ks, g)
    if bandwidth is None:
        spare = m.B_tot - float(beta.sum())
        if not np.all(np.isfinite(beta)) or spare < -1e-9 * m.B_tot:
            raise RuntimeError(f"{method}: rates do not fit the band (sum beta = {beta.sum():.6g} Hz)")
        B = beta + max(spare, 0.0) * beta / beta.sum()
    else:
        B = np.asarray(bandwidth, dtype=float)
    alloc = allocate(m, ks, g, B)
    if not np.all(alloc.feasible):
        k = int(np.flatnonzero(~alloc.feasible)[0])
        raise RuntimeError(f"{method}: device {k} infeasible after allocation ({alloc.limit[k]})")
    lat, en = m.latency_energy(g, B, alloc.power, alloc.frequency)
    bound = Bound.of(m)
    devices = []
    for k in range(m.K):
        t_dn = float(m.downlink_time(g[k], k))
        devices.append(PlanDevice(
            index=k, name=m.names[k], gamma=float(g[k]), bandwidth_hz=float(B[k]),
            power_w=float(alloc.power[k]), frequency_hz=float(alloc.frequency[k]),
            latency_s=float(lat[k]), energy_j=float(en[k]),
            compute_s=float(m.cycles(g[k], k) / alloc.frequency[k]),
            upload_s=float(lat[k]) - float(m.cycles(g[k], k) / alloc.frequency[k]) - t_dn,
            downlink_s=t_dn, uplink_bits=float(m.uplink_bits(g[k], k)),
            min_bandwidth_hz=float(beta[k]),
            binding=_binding(m, k, float(g[k]), float(alloc.power[k]), float(alloc.frequency[k]),
                             float(lat[k]), float(en[k])),
        ))
    totals = {
        "bandwidth_used_hz": float(B.sum()),
        "bandwidth_needed_hz": float(beta.sum()),
        "bandwidth_total_hz": m.B_tot,
        # rates from a convex solver carry its ~1e-6 tolerance: count 1e-4 of spare band as none
        "bandwidth_binding": bool(beta.sum() >= m.B_tot * (1 - 1e-4)),
        "latency_limit_s": m.T,
        "round_latency_s": float(lat.max()),
        "energy_total_j": float(en.sum()),
        "adapter_values": m.Q,
        **({"rank_share": [float(x) for x in m.share]} if m.share is not None else {}),
        "head_values": m.head,
        "cycles_per_sample": [m.c0, m.c1],
    }
    return Plan(
        method=method, objective=float(bound.value(g)), feasible=True, emp=float(bound.emp(g)),
        gap=float(bound.gap(g)), sparsity=float(bound.sparsity(g)), devices=devices, solver=stats,
        totals=totals, system=spec,
    )


def _get(dev: Any, key: str) -> float:
    return float(dev[key] if isinstance(dev, dict) else getattr(dev, key))


def round_costs(
    system: SystemSpec | SystemModel | dict,
    plan_devices: Sequence[Any],
    uplink_bits: Sequence[float],
    downlink_bits: Sequence[float] | None = None,
) -> list[tuple[float, float]]:
    """(latency_s, energy_j) of each device for the bits it really moved this round.

    Uses the plan's gamma_k (compute cycles), B_k, p_k and f_k. Downlink time counts only when
    the system models a downlink (cell.downlink_bandwidth_hz); without `downlink_bits` it uses
    the modelled sub-adapter size.
    """
    m = as_model(system)
    if len(plan_devices) != m.K or len(uplink_bits) != m.K:
        raise ValueError(f"round_costs: system has {m.K} devices, got {len(plan_devices)} plan devices "
                         f"and {len(uplink_bits)} uplink counts")
    out = []
    for k, dev in enumerate(plan_devices):
        g, B, p, f = (_get(dev, key) for key in ("gamma", "bandwidth_hz", "power_w", "frequency_hz"))
        W = float(m.cycles(g, k))
        t_up = float(uplink_bits[k]) / float(m.rate(B, p, k)) if uplink_bits[k] > 0 else 0.0
        t_dn = 0.0
        if m.dl_rate is not None:
            bits = float(downlink_bits[k]) if downlink_bits is not None else float(m.downlink_bits(g, k))
            t_dn = bits / float(m.dl_rate[k])
        latency = t_dn + W / f + t_up
        energy = m.kappa * W * f**2 + p * t_up
        out.append((latency, energy if math.isfinite(energy) else math.inf))
    return out


def as_is_plan(spec: SystemSpec, gamma: Sequence[float], method: str, reason: str,
               m: SystemModel | None = None) -> Plan:
    """What a method does when its rates cannot meet the limits: its rates with an equal share of
    the band, full power and full CPU frequency (the fastest a device can go without a plan that
    fits), marked infeasible. Trained as is, the devices that still miss a limit are dropped each
    round (`system.enforce: drop`), as in a real deployment."""
    m = m or system_model(spec)
    g = np.asarray(gamma, dtype=float)
    B = np.full(m.K, m.B_tot / m.K)
    lat, en = m.latency_energy(g, B, m.P, m.fmax)
    bound = Bound.of(m)
    devices = []
    for k in range(m.K):
        compute = float(m.cycles(g[k], k) / m.fmax[k])
        t_dn = float(m.downlink_time(g[k], k))
        devices.append(PlanDevice(
            index=k, name=m.names[k], gamma=float(g[k]), bandwidth_hz=float(B[k]), power_w=float(m.P[k]),
            frequency_hz=float(m.fmax[k]), latency_s=float(lat[k]), energy_j=float(en[k]), compute_s=compute,
            upload_s=float(lat[k]) - compute - t_dn, downlink_s=t_dn, uplink_bits=float(m.uplink_bits(g[k], k)),
            binding=[name for name, broken in (("latency", lat[k] > m.T), ("energy", en[k] > m.E[k])) if broken],
        ))
    totals = {"bandwidth_used_hz": float(B.sum()), "bandwidth_total_hz": m.B_tot, "latency_limit_s": m.T,
              "round_latency_s": float(lat.max()), "energy_total_j": float(en.sum()),
              "devices_over_limits": [d.index for d in devices if d.binding]}
    return Plan(
        method=method, objective=float(bound.value(g)), feasible=False, emp=float(bound.emp(g)),
        gap=float(bound.gap(g)), sparsity=float(bound.sparsity(g)), devices=devices,
        solver=SolverStats(status=f"infeasible: {reason}"), totals=totals, system=spec,
    )


def subset_plan(spec: SystemSpec, sub_plan: Plan, members: Sequence[int], method: str) -> Plan:
    """A plan of the whole system from `sub_plan`, made for the devices `members` alone (the band is
    theirs): the others do not take part (no band, no energy, rate 0)."""
    m = system_model(spec)
    planned = dict(zip(members, sub_plan.devices))
    devices = []
    for k in range(m.K):
        if k in planned:
            devices.append(planned[k].model_copy(update={"index": k, "name": m.names[k]}))
        else:
            devices.append(PlanDevice(index=k, name=m.names[k], gamma=0.0, bandwidth_hz=0.0, power_w=0.0,
                                      frequency_hz=float(m.fmax[k]), latency_s=0.0, energy_j=0.0, takes_part=False))
    left = [m.names[k] for k in range(m.K) if k not in planned]
    stats = sub_plan.solver.model_copy(update={"status": f"{sub_plan.solver.status}; left out: {', '.join(left) or 'none'}"})
    return sub_plan.model_copy(update={"method": method, "devices": devices, "solver": stats, "system": spec,
                                       "totals": {**sub_plan.totals, "devices_left_out": [k for k in range(m.K)
                                                                                          if k not in planned]}})
