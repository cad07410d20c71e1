"""SPEC section 1: row/column dropout masks on LoRA and the sub-adapters they cut out.

A mask keeps columns of A (input features) and rows of B (output features); the rank is never
dropped and nothing is rescaled. The server draws the masks, so a device uploads only the kept
slices (`pack`) and the server rebuilds full matrices (`unpack`) without any index travelling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from fedlodrop.lora.adapter import AdapterLayout, State
from fedlodrop.rng import numpy_rng

if TYPE_CHECKING:
    from fedlodrop.config import RunConfig

Sampler = Literal["bernoulli", "exact", "budget"]


@dataclass(frozen=True)
class ModuleMask:
    """Which columns of A and rows of B one device keeps in one module."""
    a_cols: torch.Tensor  # bool (n_in,): kept columns of A
    b_rows: torch.Tensor  # bool (n_out,): kept rows of B


Masks = dict[str, ModuleMask]  # keyed by module name


def draw_keep(n: int, rate: float, sampler: Sampler, rng: np.random.Generator) -> np.ndarray:
    """Keep-vector of length n: i.i.d. Bernoulli(1 - rate), or exactly floor(rate n) drops
    (`exact`), or exactly ceil(rate n) drops (`budget`: never more kept than (1 - rate) n).

    At least one index is always kept, so no module loses its whole update.
    """
    if sampler == "bernoulli":
        keep = rng.random(n) >= rate
        if not keep.any():
            keep[rng.integers(n)] = True
        return keep
    if sampler == "budget":
        drops = min(math.ceil(rate * n - 1e-9), n - 1)
    else:
        drops = min(math.floor(rate * n + 1e-9), n - 1)  # 0.29 * 100 is 28.999999999999996
    keep = np.ones(n, dtype=bool)
    keep[rng.choice(n, size=drops, replace=False)] = False
    return keep


def draw_masks(
    layout: AdapterLayout, rate: float, sampler: Sampler, seed: int, round_: int, device: int, stream: str = "mask"
) -> Masks:
    """Masks of one device for one round; each module's draw has its own named stream."""
    masks: Masks = {}
    for index, m in enumerate(layout.modules):
        if rate == 0.0:
            masks[m.name] = _all_kept(m.n_in, m.n_out)
            continue
        a = draw_keep(m.n_in, rate, sampler, numpy_rng(seed, f"{stream}-A", round_, device, index))
        b = draw_keep(m.n_out, rate, sampler, numpy_rng(seed, f"{stream}-B", round_, device, index))
        masks[m.name] = ModuleMask(torch.from_numpy(a), torch.from_numpy(b))
    return masks


def device_masks(cfg: RunConfig, layout: AdapterLayout, rate: float, round_: int, device: int) -> Masks:
    """A device's masks for a round: the server and the device draw the same ones by name."""
    return draw_masks(layout, rate, cfg.dropout.sampler, cfg.seed, round_, device)


def full_masks(layout: AdapterLayout) -> Masks:
    """Masks that keep everything (no dropout)."""
    return {m.name: _all_kept(m.n_in, m.n_out) for m in layout.modules}


def _all_kept(n_in: int, n_out: int) -> ModuleMask:
    return ModuleMask(torch.ones(n_in, dtype=torch.bool), torch.ones(n_out, dtype=torch.bool))


def apply_masks(state: State, layout: AdapterLayout, masks: Masks) -> State:
    """A diag(m_A) and diag(m_B) B: the sub-adapter embedded in full-size zeros."""
    out = dict(state)
    for m in layout.modules:
        mask = masks[m.name]
        out[m.key_a] = state[m.key_a] * mask.a_cols.to(state[m.key_a].dtype)[None, :]
        out[m.key_b] = state[m.key_b] * mask.b_rows.to(state[m.key_b].dtype)[:, None]
    return out


def pack(state: State, layout: AdapterLayout, masks: Masks, dtype: torch.dtype) -> State:
    """The tensors that travel: kept columns of A, kept rows of B, and the whole head."""
    packed: State = {}
    for m in layout.modules:
        mask = masks[m.name]
        packed[m.key_a] = state[m.key_a][:, mask.a_cols].to(dtype).contiguous()
        packed[m.key_b] = state[m.key_b][mask.b_rows, :].to(dtype).contiguous()
    for key in layout.head_keys:
        packed[key] = state[key].to(dtype).contiguous()
    return packed


def unpack(packed: State, layout: AdapterLayout, masks: Masks) -> State:
    """Full-size float32 matrices with zeros where the mask dropped."""
    state: State = {}
    for m in layout.modules:
        mask = masks[m.name]
        a = torch.zeros(m.r, m.n_in)
        a[:, mask.a_cols] = packed[m.key_a].float()
        b = torch.zeros(m.n_out, m.r)
        b[mask.b_rows, :] = packed[m.key_b].float()
        state[m.key_a], state[m.key_b] = a, b
    for key in layout.head_keys:
        state[key] = packed[key].float()
    return state


def payload_bytes(packed: State) -> int:
    """Bytes of the tensors as they travel (their dtype, their actual kept sizes)."""
    return sum(t.numel() * t.element_size() for t in packed.values())


def kept_values(layout: AdapterLayout, masks: Masks) -> int:
    """How many of the Q adapter values a mask keeps ((1 - gamma) Q in expectation)."""
    return sum(m.r * (int(masks[m.name].a_cols.sum()) + int(masks[m.name].b_rows.sum())) for m in layout.modules)
