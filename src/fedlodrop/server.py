"""The server side of a round: configure devices, receive packed updates, aggregate.

`ServerState` is everything the server knows between rounds; with the run's seed it determines
every later mask, so saving it saves the RNG streams too. `Server` owns no model: the engine (or
the Flower strategy) moves tensors between it and the devices, and folds FedEx residuals into the
backbone that the devices share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlodrop.adapter import AdapterLayout, State, clone_state, to_base_orientation
from fedlodrop.aggregation import DeviceUpdate, Residual, aggregate, device_weights
from fedlodrop.config import RunConfig
from fedlodrop.masks import Masks, apply_masks, draw_masks, full_masks, pack, payload_bytes, unpack

COMM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ServerState:
    rounds_done: int
    global_state: State
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # folded FedEx residuals

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.global_state.items()}, str(folder / "adapter.safetensors"))
        if self.base_delta:
            save_file({k: v.contiguous() for k, v in self.base_delta.items()}, str(folder / "base_delta.safetensors"))
        (folder / "server_state.json").write_text(json.dumps({"rounds_done": self.rounds_done}))

    @classmethod
    def load(cls, folder: Path) -> ServerState:
        meta = json.loads((folder / "server_state.json").read_text())
        delta_file = folder / "base_delta.safetensors"
        return cls(
            rounds_done=meta["rounds_done"],
            global_state=load_file(str(folder / "adapter.safetensors")),
            base_delta=load_file(str(delta_file)) if delta_file.exists() else {},
        )


@dataclass
class DeviceTask:
    """What the server sends one device for one round."""

    device: int
    round: int
    rate: float
    masks: Masks  # drawn by the server; a remote device can redraw them from (seed, round, device)
    download: State  # the packed tensors that travel down

    @property
    def downlink_bytes(self) -> int:
        return payload_bytes(self.download)


@dataclass
class RoundOutcome:
    residuals: dict[str, Residual]  # fedex only: to fold into every device's base weights
    base_deltas: dict[str, torch.Tensor]  # the same, dense, in each base weight's orientation
    residual_downlink_bytes: int  # per device


class Server:
    def __init__(self, cfg: RunConfig, layout: AdapterLayout, state: ServerState, rates: list[float]):
        self.cfg = cfg
        self.layout = layout
        self.state = state
        self.rates = rates
        self.dtype = COMM_DTYPES[cfg.federation.comm_dtype]
        self.train_a = cfg.federation.aggregation != "ffa"

    # ------------------------------------------------------------------ configure
    def device_masks(self, device: int, round_: int) -> Masks:
        d = self.cfg.dropout
        return draw_masks(self.layout, self.rates[device], d.sampler, self.cfg.seed, round_, device)

    def transport_masks(self, masks: Masks) -> Masks:
        """What travels: the sub-adapter in persistent mode, full matrices in reset mode."""
        return masks if self.cfg.dropout.mask_mode == "persistent" else full_masks(self.layout)

    def configure(self, round_: int) -> list[DeviceTask]:
        tasks = []
        for k in range(self.cfg.federation.devices):
            masks = self.device_masks(k, round_)
            sent = pack(self.state.global_state, self.layout, self.transport_masks(masks), self.dtype)
            if not self.train_a:  # FFA: A is the shared seeded initialisation, never sent
                sent = {key: v for key, v in sent.items() if not key.endswith(".lora_A")}
            tasks.append(DeviceTask(k, round_, self.rates[k], masks, sent))
        return tasks

    def start_state(self, task: DeviceTask) -> State:
        """The state a device trains from: what it received, as full matrices."""
        return apply_masks(self.state.global_state, self.layout, task.masks)

    # ------------------------------------------------------------------ receive and aggregate
    def upload(self, task: DeviceTask, trained: State) -> State:
        """Device side: pack the trained state for the uplink (kept slices, head, comm dtype)."""
        sent = pack(trained, self.layout, self.transport_masks(task.masks), self.dtype)
        if not self.train_a:
            sent = {key: v for key, v in sent.items() if not key.endswith(".lora_A")}
        return sent

    def receive(self, task: DeviceTask, packed: State, num_samples: int) -> DeviceUpdate:
        masks = self.transport_masks(task.masks)
        if not self.train_a:  # A never travelled: the server knows it
            packed = dict(packed)
            for m in self.layout.modules:
                packed[m.key_a] = self.state.global_state[m.key_a][:, masks[m.name].a_cols]
        return DeviceUpdate(unpack(packed, self.layout, masks), masks, num_samples)

    def aggregate(self, updates: list[DeviceUpdate]) -> RoundOutcome:
        fed = self.cfg.federation
        weights = device_weights(updates, fed.weighting)
        new_state, residuals = aggregate(
            fed.aggregation, self.layout, self.state.global_state, updates, weights, fed.factor_rule
        )
        deltas = {}
        residual_values = 0
        for name, res in residuals.items():
            shape = self.layout.module(name)
            deltas[name] = to_base_orientation(shape, res.dense())
            residual_values += res.downlink_values()
            prev = self.state.base_delta.get(name)
            self.state.base_delta[name] = deltas[name] if prev is None else prev + deltas[name]
        self.state.global_state = clone_state(new_state)
        self.state.rounds_done += 1
        elt = torch.empty((), dtype=self.dtype).element_size()
        return RoundOutcome(residuals, deltas, residual_values * elt)
