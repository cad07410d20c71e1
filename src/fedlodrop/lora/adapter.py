"""What a device is: its adapter state, a flat dict of tensors with fixed keys.

For every LoRA module `m` the state holds `m.lora_A` (r x n_in) and `m.lora_B` (n_out x r), in
PEFT's orientation; the trainable classifier head is held under `head.<param name>`. Masks,
aggregation, checkpoints and the Flower transport all work on this one structure, so none of them
needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class ModuleShape:
    """One LoRA module: B (n_out x r) @ A (r x n_in), scaled by `scaling`."""

    name: str
    n_out: int
    n_in: int
    r: int
    scaling: float
    fan_in_fan_out: bool = False  # GPT-2 Conv1D stores the base weight as (in, out)

    @property
    def key_a(self) -> str:
        """The state key of this module's A."""
        return f"{self.name}.lora_A"

    @property
    def key_b(self) -> str:
        """The state key of this module's B."""
        return f"{self.name}.lora_B"

    @property
    def values(self) -> int:
        """r (n_out + n_in): the values of its A and B together."""
        return self.r * (self.n_out + self.n_in)


@dataclass(frozen=True)
class AdapterLayout:
    """The shapes of every LoRA module and of the head: what masks, aggregation, messages and byte counts need
    to know of a model."""
    modules: tuple[ModuleShape, ...]
    head: tuple[tuple[str, tuple[int, ...]], ...]  # (state key, shape)

    @property
    def adapter_values(self) -> int:
        """Q of SPEC section 3: values in all A and B matrices."""
        return sum(m.values for m in self.modules)

    @property
    def head_values(self) -> int:
        """Values of the classifier head (trained in full, never dropped, always sent)."""
        n = 0
        for _, shape in self.head:
            size = 1
            for d in shape:
                size *= d
            n += size
        return n

    @property
    def head_keys(self) -> list[str]:
        """The head's state keys, in order."""
        return [k for k, _ in self.head]

    def module(self, name: str) -> ModuleShape:
        """The module named `name` (KeyError if there is none)."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


def to_base_orientation(shape: ModuleShape, delta: torch.Tensor) -> torch.Tensor:
    """An (out x in) update in the layout of the base layer's `weight`: nn.Linear keeps it,
    GPT-2's Conv1D stores (in x out). The released FedEx code transposed for nn.Linear too."""
    return delta.T if shape.fan_in_fan_out else delta


def delta_weight(shape: ModuleShape, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """s * B @ A in the orientation of the base layer's `weight`."""
    return to_base_orientation(shape, shape.scaling * (b @ a))


def clone_state(state: State) -> State:
    """A deep copy of a state, detached from any graph."""
    return {k: v.detach().clone() for k, v in state.items()}
