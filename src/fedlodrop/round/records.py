"""What a round leaves behind: one typed record per round, and the run's summary.

`RoundRecord` is built in one place (`Server.finish` makes it from the tasks and replies, the
engine's loop adds the evaluation and timing), written as one line of `metrics.jsonl` by
`to_json` and read back by `from_json`; every reader (logs, the round line, the summary, report,
calibrate, compare, the tests) goes through these fields. The JSON keeps the names and shape that
run folders have always had, so folders written before this class read the same.

Totals (`uplink_bytes`, `downlink_bytes`, `failures`, `train_loss`) are derived from the devices,
never stored twice: an engine that measures bytes on its wire sets them on the device entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlodrop.lora.messages import Precision

OK, LEFT_OUT = "ok", "left out"


@dataclass
class SimCost:
    """A device's round on the simulated clock and meter (fedlodrop.run.meter)."""

    compute_s: float
    upload_s: float
    downlink_s: float
    latency_s: float
    energy_j: float

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> SimCost:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class RoundSim:
    """A round on the simulated clock and meter: its latency (the slowest device the server kept,
    or the deadline if it dropped a late one) and the energy every priced device spent."""

    latency_s: float
    energy_j: float
    latency_limit_s: float

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> RoundSim:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class PrivacySpent:
    """Client-level DP after a round (fedlodrop.round.privacy): the epsilon spent so far at `delta`,
    under `relation`, for the `sampling` used, by `accountant`; `noise` says where the noise came
    from (not reproducible). `epsilon_known_participation`: central DP with sampling, against
    someone who also knows who took part each round (metrics.jsonl lists it); None otherwise."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    mode: str
    relation: str = "add/remove one device"
    sampling: str = ""
    accountant: str = ""
    noise: str = ""
    epsilon_known_participation: float | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> PrivacySpent:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def __str__(self) -> str:
        known = (f"; {self.epsilon_known_participation:.3g} against someone who knows who took part"
                 if self.epsilon_known_participation is not None else "")
        return (f"({self.epsilon:.3g}, {self.delta:.2g})-DP per device ({self.mode}, {self.relation}, "
                f"{self.sampling}){known}")


@dataclass
class RoundPrecision:
    """What a round ran in: the devices' training (distinct values among the replies; devices on
    different hardware may differ) and the server's evaluation."""

    train: list[Precision]
    eval: Precision

    def to_json(self) -> dict:
        return {"train": [p.to_json() for p in self.train], "eval": self.eval.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> RoundPrecision:
        return cls([Precision.from_json(p) for p in d["train"]], Precision.from_json(d["eval"]))


def distinct(precisions) -> list[Precision]:
    """Each precision once, in first-seen order."""
    return list(dict.fromkeys(p for p in precisions if p is not None))


@dataclass
class SecAggRound:
    """Secure aggregation's settings in a round, and its error bound per value (flower/secure.py)."""

    shares: int
    threshold: int
    clip_range: float
    levels: int
    devices_in_sum: int
    error_bound: float

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> SecAggRound:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class FlowerRound:
    """The Flower engine's own view of a round: Flower's `count_bytes()` of what travelled (the
    payload and each array's header and key), and which SuperNode served which device."""

    uplink_count_bytes: int
    downlink_count_bytes: int
    nodes: dict[str, int]  # device -> node id
    secagg: SecAggRound | None = None

    def to_json(self) -> dict:
        out = {"uplink_count_bytes": self.uplink_count_bytes, "downlink_count_bytes": self.downlink_count_bytes,
               "nodes": self.nodes}
        if self.secagg is not None:
            out["secagg"] = self.secagg.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> FlowerRound:
        return cls(int(d["uplink_count_bytes"]), int(d["downlink_count_bytes"]), dict(d["nodes"]),
                   SecAggRound.from_json(d["secagg"]) if d.get("secagg") else None)


@dataclass
class DeviceRecord:
    """One participant of a round. The fields from `kept_values` on are what the device reported;
    they are None for a device that sent no usable message (no reply, an error reply)."""

    device: int
    rate: float
    downlink_bytes: int
    status: str = OK
    reason: str | None = None
    kept_values: int | None = None
    samples: int | None = None
    steps: int | None = None
    train_loss: float | None = None
    uplink_bytes: int | None = None
    train_s: float | None = None
    lr: list[float] | None = None
    precision: str | None = None  # the dtype the device trained in (why: the round's `precision`)
    rank: int | None = None  # with lora.ranks or lora.self_prune: the rank it trained at
    system: SimCost | None = None  # with a system: the device's simulated time and energy
    limit: str | None = None  # with a system: the limit its round broke (left out under enforce: drop)

    @property
    def ok(self) -> bool:
        """Its update was used."""
        return self.status == OK

    @property
    def reported(self) -> bool:
        """The device replied with an update (under DP it reports nothing else)."""
        return self.uplink_bytes is not None

    _REPORTED = ("kept_values", "samples", "steps", "train_loss", "uplink_bytes", "train_s", "lr", "precision")

    def to_json(self) -> dict:
        out: dict[str, Any] = {"device": self.device, "rate": self.rate, "downlink_bytes": self.downlink_bytes}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.reported:
            out |= {k: getattr(self, k) for k in self._REPORTED if getattr(self, k) is not None}
        out["status"] = self.status
        if self.reason is not None:
            out["reason"] = self.reason
        if self.system is not None:
            out["system"] = self.system.to_json()
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    @classmethod
    def from_json(cls, d: dict) -> DeviceRecord:
        record = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "system"})
        record.system = SimCost.from_json(d["system"]) if d.get("system") else None
        return record


@dataclass
class Timing:
    """Wall-clock seconds of a round's parts (this machine's time, not the simulated clock)."""

    train_s: float = 0.0  # the devices' local phases, summed
    other_device_s: float = 0.0  # the rest of the devices' steps and the transport
    aggregate_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float | None = None

    def to_json(self) -> dict:
        out = {"train_s": self.train_s, "other_device_s": self.other_device_s,
               "aggregate_s": self.aggregate_s, "eval_s": self.eval_s}
        if self.checkpoint_s is not None:
            out["checkpoint_s"] = self.checkpoint_s
        return out

    @classmethod
    def from_json(cls, d: dict) -> Timing:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class RoundRecord:
    """One round: who took part and what each sent, the aggregate, and the global model's scores."""

    round: int  # 1-based
    participants: list[int]
    devices: list[DeviceRecord]
    fold_bytes: int = 0
    fold_error: float | None = None  # federation.residual_rank: |R - R_k|_F summed over modules
    fold_error_rel: float | None = None
    truncation: dict[int, float] | None = None  # flexlora: per rank r, |dW - dW_r| / |dW| of the round's mean product
    train: dict[str, float] = field(default_factory=dict)  # metrics on a sample of the training data
    eval: dict[str, float] = field(default_factory=dict)
    eval_loss: float = math.nan
    wall_s: float = 0.0
    timing: Timing = field(default_factory=Timing)
    system: RoundSim | None = None  # with a system: the round on the simulated clock and meter
    flower: FlowerRound | None = None  # the Flower engine's own details (Flower's byte counts, node ids)
    privacy: PrivacySpent | None = None  # with privacy.dp: the epsilon spent after this round
    precision: RoundPrecision | None = None  # what training and evaluation ran in, and why

    # ------------------------------------------------------------------ derived
    @property
    def ok_devices(self) -> list[DeviceRecord]:
        """The devices whose update was used."""
        return [d for d in self.devices if d.ok]

    @property
    def failures(self) -> list[dict]:
        """Each device left out, with the reason."""
        return [{"device": d.device, "reason": d.reason} for d in self.devices if not d.ok]

    @property
    def train_loss(self) -> float:
        """The mean local training loss over the devices whose update was used, by samples (nan
        under DP, where devices report no loss)."""
        ok = [d for d in self.ok_devices if d.samples is not None and d.train_loss is not None]
        total = sum(d.samples for d in ok)
        return sum(d.train_loss * d.samples for d in ok) / total if total else math.nan

    @property
    def uplink_bytes(self) -> int:
        """Bytes the devices sent up."""
        return sum(d.uplink_bytes or 0 for d in self.devices)

    @property
    def downlink_bytes(self) -> int:
        """Bytes sent down to the devices."""
        return sum(d.downlink_bytes for d in self.devices)

    def device(self, k: int) -> DeviceRecord:
        """Device k's entry."""
        return next(d for d in self.devices if d.device == k)

    # ------------------------------------------------------------------ JSON (metrics.jsonl)
    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "round": self.round,
            "participants": self.participants,
            "train_loss": self.train_loss,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "fold_bytes": self.fold_bytes,
        }
        if self.fold_error is not None:
            out |= {"fold_error": self.fold_error, "fold_error_rel": self.fold_error_rel}
        if self.truncation is not None:
            out["truncation"] = {str(r): e for r, e in self.truncation.items()}
        out |= {
            "devices": [d.to_json() for d in self.devices],
            "failures": self.failures,
            "train": self.train,
            "eval": self.eval,
            "eval_loss": self.eval_loss,
            "wall_s": self.wall_s,
            "timing": self.timing.to_json(),
        }
        if self.system is not None:
            out["system"] = self.system.to_json()
        if self.flower is not None:
            out["flower"] = self.flower.to_json()
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        if self.precision is not None:
            out["precision"] = self.precision.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> RoundRecord:
        return cls(
            round=int(d["round"]),
            participants=list(d.get("participants", [x["device"] for x in d["devices"]])),
            devices=[DeviceRecord.from_json(x) for x in d["devices"]],
            fold_bytes=int(d.get("fold_bytes", 0)),
            fold_error=d.get("fold_error"),
            fold_error_rel=d.get("fold_error_rel"),
            truncation={int(r): float(e) for r, e in d["truncation"].items()} if d.get("truncation") else None,
            train=dict(d.get("train", {})),
            eval=dict(d.get("eval", {})),
            eval_loss=float(d.get("eval_loss", math.nan)),
            wall_s=float(d.get("wall_s", 0.0)),
            timing=Timing.from_json(d.get("timing", {})),
            system=RoundSim.from_json(d["system"]) if d.get("system") else None,
            flower=FlowerRound.from_json(d["flower"]) if d.get("flower") else None,
            privacy=PrivacySpent.from_json(d["privacy"]) if d.get("privacy") else None,
            precision=RoundPrecision.from_json(d["precision"]) if d.get("precision") else None,
        )

    def line(self, main: str) -> str:
        """The round's one line on the console, in every engine."""
        ev = " ".join(f"{k} {v:.4f}" for k, v in self.eval.items())
        tr = f"  train {main} {self.train[main]:.4f}" if main in self.train else ""
        n = len(self.failures)
        left = f"  ({n} left out)" if n else ""
        sim = f"  simulated {self.system.latency_s:.3g} s, {self.system.energy_j:.3g} J" if self.system else ""
        dp = f"  epsilon {self.privacy.epsilon:.3g} ({self.privacy.relation})" if self.privacy else ""
        loss = "n/a" if math.isnan(self.train_loss) and self.privacy else f"{self.train_loss:.4f}"
        return (
            f"round {self.round:>3}  train loss {loss}{tr}  eval {ev}  "
            f"sent {self.uplink_bytes / 1e6:.3f} MB up / {self.downlink_bytes / 1e6:.3f} MB down{sim}{dp}  "
            f"{self.wall_s:.1f}s{left}"
        )


def _never_used(records: list[RoundRecord]) -> dict[str, str]:
    """Devices asked in some round whose update was never used in any, with the last reason: a
    SuperNode that never came up, a device whose data cannot be read. The run's last line says so."""
    asked, used, why = set(), set(), {}
    for r in records:
        for d in r.devices:
            asked.add(d.device)
            if d.ok:
                used.add(d.device)
            elif d.reason:
                why[d.device] = d.reason
    return {str(k): why.get(k, "left out") for k in sorted(asked - used)}


@dataclass
class RunSystem:
    """A run on the simulated clock and meter (summary.json's `system`)."""

    simulated_time_s: float
    energy_j: float
    devices_dropped_for_limits: int
    limit_violations: int
    stopped_by: str | None = None  # the run budget that ended training early

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> RunSystem:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Summary:
    """A finished run (summary.json), written last, read by `fedlodrop report`, `compare`, the
    benchmarks and the tests, always through these fields: the final and the best round (by the
    task's main metric, its whole metric dict), the generalization gap, what travelled, who was
    left out; with a system, the simulated time and energy; with DP, the privacy spent; and the
    precision that trained and evaluated."""

    task: str
    model: str
    rounds: int
    devices: int
    aggregation: str
    variant: str
    rates: list[float]
    main_metric: str
    final: dict[str, float]
    best: dict[str, float]
    best_round: int
    final_train: dict[str, float]
    generalization_gap: dict[str, float]
    uplink_bytes_total: int
    downlink_bytes_total: int
    devices_left_out: int
    adapter_values: int
    head_values: int
    wall_s: float
    devices_never_used: dict[str, str] = field(default_factory=dict)  # device -> the last reason
    system: RunSystem | None = None
    privacy: PrivacySpent | None = None
    precision: dict | None = None  # {"train": [Precision json...], "eval": Precision json}

    @property
    def final_metric(self) -> float:
        """The main metric of the last round (nan if it was not scored)."""
        return float(self.final.get(self.main_metric, math.nan))

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("system", "privacy", "precision")}
        if self.system is not None:
            out["system"] = self.system.to_json()
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        if self.precision is not None:
            out["precision"] = self.precision
        return out

    @classmethod
    def from_json(cls, d: dict) -> Summary:
        """A summary.json, from this version or an earlier one (keys it lacks take their defaults)."""
        plain = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("system", "privacy")}
        plain.setdefault("devices_never_used", {})
        return cls(**plain, system=RunSystem.from_json(d["system"]) if d.get("system") else None,
                   privacy=PrivacySpent.from_json(d["privacy"]) if d.get("privacy") else None)


def summarize(cfg, main: str, rates: list[float], adapter_values: int, head_values: int,
              records: list[RoundRecord], stopped_by: str | None = None) -> Summary:
    """The run's `Summary` from its round records (`stopped_by`: the run budget, if one ended it)."""
    best = max(records, key=lambda r: r.eval.get(main, -math.inf))
    last = records[-1]
    system = None
    if any(r.system is not None for r in records):
        system = RunSystem(
            simulated_time_s=sum(r.system.latency_s for r in records if r.system),
            energy_j=sum(r.system.energy_j for r in records if r.system),
            devices_dropped_for_limits=sum(1 for r in records for d in r.devices if d.limit and not d.ok),
            limit_violations=sum(1 for r in records for d in r.devices if d.limit),
            stopped_by=stopped_by,
        )
    ran = [r.precision for r in records if r.precision is not None]
    precision = None
    if ran:
        precision = {"train": [p.to_json() for p in distinct(p for r in ran for p in r.train)],
                     "eval": ran[-1].eval.to_json()}
    return Summary(
        task=cfg.task, model=cfg.model, rounds=len(records), devices=cfg.federation.devices,
        aggregation=cfg.federation.aggregation, variant=cfg.dropout.variant, rates=rates, main_metric=main,
        final=last.eval, best=best.eval, best_round=best.round, final_train=last.train,
        generalization_gap={k: last.train[k] - last.eval[k] for k in last.eval if k in last.train},
        uplink_bytes_total=sum(r.uplink_bytes for r in records),
        downlink_bytes_total=sum(r.downlink_bytes for r in records),
        devices_left_out=sum(len(r.failures) for r in records), adapter_values=adapter_values,
        head_values=head_values, wall_s=round(sum(r.wall_s for r in records), 3),
        devices_never_used=_never_used(records), system=system,
        privacy=last.privacy,  # epsilon is cumulative: the last round's is the run's
        precision=precision,
    )
