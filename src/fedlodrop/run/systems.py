"""A system file that describes the run it prices, and the checks that keep the two together.

A plan is only as good as its system's picture of the run: the devices, the local epochs, each
device's training samples D_k and what a device sends (Q adapter values, the head, bits a value).
`describe_run` writes that picture from a run's own configuration (what `fedlodrop system random`
writes by default); `implied_keys` is what a system says of the run that a config left unsaid
(`fedlodrop compare system.yaml` needs no `--set federation.devices=...`); the checks refuse, in
one line, a system whose picture differs from what would train, so that the plan, the simulated
clock and the trained run speak of the same samples and bytes.
"""

from __future__ import annotations

from fedlodrop.config import RunConfig
from fedlodrop.errors import UserError

COMM_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}  # bits a value of federation.comm_dtype


def uplink_bits(cfg: RunConfig, layout) -> tuple[float, float]:
    """What a device of `cfg` sends up besides Q and the head's sizes: bits a value (federation.uplink's,
    else federation.comm_dtype's) and bits besides the values every round (int8's scale per tensor)."""
    from fedlodrop.lora.aggregation import make_rule
    from fedlodrop.lora.messages import make_uplink, upload_keys

    uplink = make_uplink(cfg.federation.uplink)
    tensors = len(upload_keys(layout, make_rule(cfg.federation.aggregation, cfg.federation.factor_rule)))
    return float(uplink.value_bits(COMM_BITS[cfg.federation.comm_dtype])), float(uplink.scale_bits * tensors)


def check_system(cfg: RunConfig, spec, where) -> None:
    """Refuse a system (`where` it came from) that describes another federation than `cfg`:
    another number of devices or of local epochs a round."""
    if len(spec.devices) != cfg.federation.devices:
        raise UserError(f"system {where} describes {len(spec.devices)} devices but federation.devices is "
                        f"{cfg.federation.devices}")
    if spec.round.local_epochs != cfg.federation.local_epochs:
        raise UserError(f"system {where} prices {spec.round.local_epochs:g} local epochs a round but "
                        f"federation.local_epochs is {cfg.federation.local_epochs:g}")


def _remake(where) -> str:
    return f"make the system from this run: fedlodrop system random --config YOUR.yaml (not {where})"


def planned_sizes(cfg: RunConfig, spec, n: int, where) -> list[int] | None:
    """The shard sizes an IID split takes from the system (its D_k), or None for other splits;
    refused when the run trains on another number of samples than the system plans."""
    planned = [int(d.samples) for d in spec.devices]
    if cfg.federation.partition != "iid":
        return None
    if n != sum(planned):
        raise UserError(f"system {where} plans {sum(planned)} training samples ({min(planned)}-{max(planned)} a "
                        f"device) but the run trains on {n} (data.max_train_samples, or the data's size): "
                        f"{_remake(where)}")
    return planned


def check_sizes(spec, sizes: list[int], partition: str, where) -> None:
    """Refuse a split whose devices hold other sample counts than the system's D_k: the clock would
    price samples that do not train (or train samples it never priced)."""
    planned = [int(d.samples) for d in spec.devices]
    if list(sizes) != planned:
        diff = next(k for k, (a, b) in enumerate(zip(sizes, planned)) if a != b)
        raise UserError(f"system {where} plans {planned[diff]} samples on device {diff} but the {partition} split "
                        f"gives it {sizes[diff]}: {_remake(where)}")


def check_payload(cfg: RunConfig, spec, layout, where) -> None:
    """Refuse a system that prices another upload than the run sends (`layout`: its adapter): another Q,
    head or bits a value, up or down."""
    from fedlodrop.planning.spec import resolve_payload  # the planner: only a run with a system needs it

    if cfg.lora.self_prune is not None:
        raise UserError(f"system {where} prices each device at a fixed rank; lora.self_prune changes ranks as the "
                        "run goes: drop one of them")
    run_ranks = [cfg.lora.ranks[k] if isinstance(cfg.lora.ranks, list) else cfg.lora.ranks or cfg.lora.r
                 for k in range(cfg.federation.devices)]
    planned = [d.rank or spec.payload.rank for d in spec.devices]
    mixed = cfg.lora.ranks is not None or any(d.rank is not None for d in spec.devices)
    if mixed and (spec.payload.rank != cfg.lora.r or planned != run_ranks):
        raise UserError(f"system {where} prices ranks {planned} of a rank-{spec.payload.rank} adapter but the run "
                        f"trains ranks {run_ranks} of lora.r {cfg.lora.r} (lora.ranks): {_remake(where)}")
    pay = resolve_payload(spec)
    bits = COMM_BITS[cfg.federation.comm_dtype]
    up, extra = uplink_bits(cfg, layout)
    for name, planned, sent, why in (("adapter values Q", pay.adapter_values, layout.adapter_values, "lora, the model"),
                                     ("head values", pay.head_values, layout.head_values, "the model, the labels"),
                                     ("bits a value", pay.bits_per_value, bits, "federation.comm_dtype"),
                                     ("uplink bits a value", pay.uplink_bits_per_value, up, "federation.uplink"),
                                     ("uplink bits besides the values", pay.uplink_extra_bits, extra,
                                      "federation.uplink's scales")):
        if float(planned) != float(sent):
            raise UserError(f"system {where} prices {name} {planned:g} but the run sends {sent:g} ({why}): "
                            f"{_remake(where)}")


IMPLIED = ("federation.devices", "federation.local_epochs", "data.max_train_samples", "lora.ranks")  # what a system says of a run


def implied_keys(spec) -> dict:
    """What a system says of the run it describes (the keys of IMPLIED): devices, local epochs and
    training samples. A config's own values win; the checks then refuse a mismatch."""
    return {
        "federation.devices": len(spec.devices),
        "federation.local_epochs": float(spec.round.local_epochs),
        "data.max_train_samples": int(sum(d.samples for d in spec.devices)),
        "lora.ranks": [d.rank or spec.payload.rank for d in spec.devices] if any(d.rank for d in spec.devices) else None,
    }
