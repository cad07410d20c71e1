"""SPEC 3's system description file: the pydantic schema a user edits as YAML, its one-line
validation errors, loading and saving, and the payload sizes it resolves to.

`fedlodrop.planning.system.system_model` turns a `SystemSpec` into the arrays the solvers use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlodrop.config import read_yaml
from fedlodrop.errors import UserError
from fedlodrop.planning.arch import resolve_arch

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSpec(_Section):
    """One device of a system: its samples, where it is (or its channel gain), its power and frequency limits
    and its energy budget."""
    name: str | None = None
    samples: int = Field(gt=0, description="D_k, local training samples")
    distance_m: float | None = Field(None, gt=0, description="distance to the base station")
    channel_gain: float | None = Field(None, gt=0, description="linear power gain h_k (overrides distance)")
    fading: float | None = Field(None, gt=0, description="linear small-scale power gain; None: drawn from cell.seed")
    p_max_w: float = Field(0.2, gt=0)
    f_max_hz: float = Field(2e9, gt=0)
    energy_budget_j: float = Field(gt=0, description="E_k^max per round")
    rank: int | None = Field(None, ge=1, description="this device class's LoRA rank r_k (at most payload.rank): it "
                             "sends and computes r_k / payload.rank of the adapter; null: payload.rank")

    @model_validator(mode="after")
    def _has_channel(self) -> DeviceSpec:
        if self.distance_m is None and self.channel_gain is None:
            raise ValueError("give distance_m or channel_gain")
        return self


class PathLossSpec(_Section):
    """PL(d) = intercept_db + slope_db * log10(d / 1 km)."""

    intercept_db: float = 128.1
    slope_db: float = Field(37.6, gt=0)
    min_distance_m: float = Field(10.0, gt=0, description="distances below are clipped")


class CellSpec(_Section):
    """The cell: the shared band, noise, path loss and fading, and the downlink when it is modelled."""
    bandwidth_hz: float = Field(10e6, gt=0, description="B_tot, the uplink band shared by FDMA")
    noise_dbm_per_hz: float = -174.0
    path_loss: PathLossSpec = PathLossSpec()
    fading: Literal["rayleigh", "none"] = "rayleigh"
    fading_floor: float = Field(0.1, ge=0, description="deeper Rayleigh draws are clipped to this")
    seed: int = Field(0, description="seed of the fading draws of devices without `fading`")
    radius_m: float = Field(500.0, gt=0, description="used by `system random`")
    downlink_bandwidth_hz: float | None = Field(None, gt=0, description="None: downlink time ignored")
    server_power_w: float = Field(10.0, gt=0, description="P_s, server transmit power (downlink)")


class RoundSpec(_Section):
    """A round: its latency limit, local epochs, and the compute model (cycles per sample)."""
    latency_s: float = Field(gt=0, description="T_max, the latency limit of a round")
    local_epochs: float = Field(1.0, gt=0, description="tau")
    cycles_per_sample: float | None = Field(None, gt=0, description="c0; None: from the model's FLOPs")
    adapter_cycles_per_sample: float | None = Field(None, ge=0, description="c1; None: from the model")
    tokens_per_sample: float = Field(64.0, gt=0)
    flops_per_param_token: float = Field(6.0, gt=0)
    flops_per_cycle: float = Field(32768.0, gt=0, description="device FLOPs per clock cycle")
    kappa: float = Field(1e-28, gt=0, description="effective switched capacitance")
    gamma_max: float = Field(0.9, ge=0, lt=1)


class PayloadSpec(_Section):
    """What a device sends: the model (or Q and head sizes given directly), rank, targets, labels and bits per
    value."""
    model: str | None = Field("roberta-large", description="built-in name or local config.json path")
    rank: int = Field(4, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    num_labels: int = Field(2, ge=1)
    adapter_values: int | None = Field(None, ge=0, description="Q; overrides the model")
    head_values: int | None = Field(None, ge=0, description="head size; overrides the model")
    backbone_params: float | None = Field(None, gt=0, description="overrides the model (FLOPs)")
    bits_per_value: float = Field(16.0, gt=0)
    uplink_bits_per_value: float | None = Field(
        None, gt=0, description="bits a value on the uplink when it differs from bits_per_value (federation.uplink "
        "int8: 8); null: bits_per_value")
    uplink_extra_bits: float = Field(0.0, ge=0, description="bits a device sends every round besides the values "
                                     "(federation.uplink int8: a float32 scale per tensor)")
    downlink_extra_values: int = Field(0, ge=0, description="e.g. the fedex residual, per device")

    @model_validator(mode="after")
    def _sizes_known(self) -> PayloadSpec:
        if self.model is None and (self.adapter_values is None or self.head_values is None):
            raise ValueError("without a model give adapter_values and head_values")
        return self


class BoundSpec(_Section):
    """Constants of SPEC 4 (names as there; `lambda` is spelled `lam`)."""

    M: float = Field(1.0, gt=0)
    rho: float = Field(1.0, gt=0)
    lambda_min: float = Field(0.1, gt=0)
    lam: float = Field(1.0, ge=0)
    delta: float = Field(0.05, gt=0, lt=1)
    e0: float = Field(0.0, ge=0)
    c_emp: float = Field(0.1, ge=0)
    objective: Literal["bound", "measured"] = Field(
        "bound", description="bound: SPEC 4's constants (the default ones, or fitted by `fedlodrop calibrate`); "
        "measured: a surrogate of the validation error against the rates, in the bound's shape, fitted by "
        "`fedlodrop calibrate --surrogate` (B&B and P-SCA minimise either the same way)")


class SystemSpec(_Section):
    """A whole system file (`fedlodrop system random`, or your own): devices, cell, round, payload and the
    bound's constants."""
    devices: list[DeviceSpec] = Field(min_length=1)
    cell: CellSpec = CellSpec()
    round: RoundSpec
    payload: PayloadSpec = PayloadSpec()
    bound: BoundSpec = BoundSpec()

    @model_validator(mode="after")
    def _ranks_fit(self) -> SystemSpec:
        for k, d in enumerate(self.devices):
            if d.rank is not None and d.rank > self.payload.rank:
                raise ValueError(f"devices.{k}.rank {d.rank} exceeds payload.rank {self.payload.rank}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The system as the YAML file keeps it (unset keys left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def _format_error(err: ValidationError, source: str) -> str:
    """One line: where, what, and the value that was given."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    tail = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{tail}{more}"


def validate(model: type[_M], tree: Any, source: str, expected: str) -> _M:
    """`model` from a parsed file; anything else than a valid mapping is a one-line UserError."""
    if not isinstance(tree, dict):
        raise UserError(f"{source}: expected {expected}")
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err, source)) from None


def load_file(
    path: str | Path, what: str, fmt: Literal["YAML", "JSON"], make: Callable[[Any, str], _T]
) -> _T:
    """Read a YAML or JSON file and build it with `make(tree, source)`; a missing file or bad
    syntax is a one-line UserError naming the file (and `make` reports bad content likewise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        tree = read_yaml(text) if fmt == "YAML" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid {fmt}: {str(err).splitlines()[0]}") from None
    return make(tree, str(path))


def system_from_dict(tree: Any, source: str = "system") -> SystemSpec:
    """A system from a parsed YAML or JSON tree, checked (unknown models and modules fail here, at load time)."""
    spec = validate(SystemSpec, tree, source, "a mapping with devices, cell, round, payload, bound")
    resolve_payload(spec)  # unknown models and modules fail here, at load time
    return spec


def load_system(path: str | Path) -> SystemSpec:
    """A system file (YAML), checked; one line naming the file for anything wrong."""
    return load_file(path, "system file", "YAML", system_from_dict)


def dump_system(spec: SystemSpec) -> str:
    """The system as YAML text."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def save_system(spec: SystemSpec, path: str | Path) -> None:
    """Write the system as a YAML file."""
    Path(path).write_text(dump_system(spec))


# --------------------------------------------------------------------------------------------
# Payload sizes of a system file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A system's payload resolved to numbers: Q, the head's values, the backbone's parameters and bits per
    value."""
    adapter_values: int  # Q
    head_values: int
    backbone_params: float
    bits_per_value: float
    uplink_bits_per_value: float
    uplink_extra_bits: float = 0.0


def resolve_payload(spec: SystemSpec) -> Payload:
    """The numbers of a system's payload: from the model's architecture, or those given directly."""
    pl = spec.payload
    arch = resolve_arch(pl.model) if pl.model else None
    q = pl.adapter_values if pl.adapter_values is not None else arch.adapter_values(pl.rank, pl.target_modules)
    head = pl.head_values if pl.head_values is not None else arch.head_values(pl.num_labels)
    params = pl.backbone_params or (arch.params if arch else 0.0)
    up = pl.uplink_bits_per_value or pl.bits_per_value
    return Payload(int(q), int(head), float(params), pl.bits_per_value, up, pl.uplink_extra_bits)
