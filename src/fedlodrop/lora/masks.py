"""SPEC section 1: row/column dropout masks on LoRA and the sub-adapters they cut out.

A mask keeps columns of A (input features) and rows of B (output features), and the first r_k of
the r rank components (rows of A, columns of B) for a device of rank r_k (`lora.ranks`); dropout
never drops a rank component and nothing is rescaled. The server draws the masks, so a device
uploads only the kept slices (`pack`) and the server rebuilds full matrices (`unpack`) without any
index travelling.
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
    ranks: torch.Tensor  # bool (r,): the rank components the device holds (its first r_k)

    @property
    def a(self) -> torch.Tensor:
        """Kept values of A (r x n_in), as a bool matrix."""
        return self.ranks[:, None] & self.a_cols[None, :]

    @property
    def b(self) -> torch.Tensor:
        """Kept values of B (n_out x r), as a bool matrix."""
        return self.b_rows[:, None] & self.ranks[None, :]


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
    layout: AdapterLayout, rate: float, sampler: Sampler, seed: int, round_: int, device: int, stream: str = "mask",
    rank: int | None = None,
) -> Masks:
    """Masks of one device for one round; each module's draw has its own named stream. `rank`:
    the device's rank r_k (its first r_k components kept); None: all of them."""
    masks: Masks = {}
    for index, m in enumerate(layout.modules):
        ranks = _first(m.r, rank)
        if rate == 0.0:
            masks[m.name] = ModuleMask(torch.ones(m.n_in, dtype=torch.bool), torch.ones(m.n_out, dtype=torch.bool),
                                       ranks)
            continue
        a = draw_keep(m.n_in, rate, sampler, numpy_rng(seed, f"{stream}-A", round_, device, index))
        b = draw_keep(m.n_out, rate, sampler, numpy_rng(seed, f"{stream}-B", round_, device, index))
        masks[m.name] = ModuleMask(torch.from_numpy(a), torch.from_numpy(b), ranks)
    return masks


def rank_of(masks: Masks) -> int:
    """How many rank components a device's masks hold (the same in every module)."""
    return int(next(iter(masks.values())).ranks.sum())


def device_rank(cfg: RunConfig, device: int) -> int | None:
    """Device `device`'s LoRA rank r_k from `lora.ranks`; None: the model's rank `lora.r`."""
    ranks = cfg.lora.ranks
    if ranks is None:
        return None
    return ranks[device] if isinstance(ranks, list) else ranks


def device_masks(cfg: RunConfig, layout: AdapterLayout, rate: float, round_: int, device: int,
                 rank: int | None = None) -> Masks:
    """A device's masks for a round: the server and the device draw the same ones by name. `rank`:
    the rank it holds now (a task's, after self-pruning); None: its configured `lora.ranks`."""
    rank = device_rank(cfg, device) if rank is None else rank
    return draw_masks(layout, rate, cfg.dropout.sampler, cfg.seed, round_, device, rank=rank)


def full_masks(layout: AdapterLayout) -> Masks:
    """Masks that keep everything (no dropout, every rank component)."""
    return {m.name: _all_kept(m.n_in, m.n_out, m.r) for m in layout.modules}


def rank_masks(masks: Masks) -> Masks | None:
    """Every row and column, only the rank components of `masks`; None when those are all of them
    (a device of full rank holds the whole model)."""
    if all(bool(mask.ranks.all()) for mask in masks.values()):
        return None
    return {name: ModuleMask(torch.ones_like(mask.a_cols), torch.ones_like(mask.b_rows), mask.ranks)
            for name, mask in masks.items()}


def _first(r: int, rank: int | None) -> torch.Tensor:
    keep = torch.ones(r, dtype=torch.bool)
    if rank is not None:
        keep[rank:] = False
    return keep


def _all_kept(n_in: int, n_out: int, r: int) -> ModuleMask:
    return ModuleMask(torch.ones(n_in, dtype=torch.bool), torch.ones(n_out, dtype=torch.bool), torch.ones(r, dtype=torch.bool))


def apply_masks(state: State, layout: AdapterLayout, masks: Masks) -> State:
    """A diag(m_A) and diag(m_B) B: the sub-adapter embedded in full-size zeros."""
    out = dict(state)
    for m in layout.modules:
        mask = masks[m.name]
        out[m.key_a] = state[m.key_a] * mask.a.to(state[m.key_a].dtype)
        out[m.key_b] = state[m.key_b] * mask.b.to(state[m.key_b].dtype)
    return out


def pack(state: State, layout: AdapterLayout, masks: Masks, dtype: torch.dtype) -> State:
    """The tensors that travel: kept columns of A, kept rows of B, and the whole head."""
    packed: State = {}
    for m in layout.modules:
        mask = masks[m.name]
        packed[m.key_a] = state[m.key_a][mask.ranks][:, mask.a_cols].to(dtype).contiguous()
        packed[m.key_b] = state[m.key_b][mask.b_rows][:, mask.ranks].to(dtype).contiguous()
    for key in layout.head_keys:
        packed[key] = state[key].to(dtype).contiguous()
    return packed


def unpack(packed: State, layout: AdapterLayout, masks: Masks) -> State:
    """Full-size float32 matrices with zeros where the mask dropped."""
    state: State = {}
    for m in layout.modules:
        mask = masks[m.name]
        state[m.key_a] = place(packed[m.key_a].float(), mask.ranks, mask.a_cols, torch.zeros(m.r, m.n_in))
        state[m.key_b] = place(packed[m.key_b].float(), mask.b_rows, mask.ranks, torch.zeros(m.n_out, m.r))
    for key in layout.head_keys:
        state[key] = packed[key].float()
    return state


def place(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """`into` with its kept rows x kept columns (bool masks) set to `values`, in place."""
    into[rows.nonzero()[:, 0][:, None], cols.nonzero()[:, 0][None, :]] = values
    return into


def payload_bytes(packed: State) -> int:
    """Bytes of the tensors as they travel (their dtype, their actual kept sizes)."""
    return sum(t.numel() * t.element_size() for t in packed.values())


def kept_values(layout: AdapterLayout, masks: Masks) -> int:
    """How many of the Q adapter values a mask keeps ((1 - gamma) Q in expectation)."""
    return sum(int(masks[m.name].ranks.sum()) * (int(masks[m.name].a_cols.sum()) + int(masks[m.name].b_rows.sum()))
               for m in layout.modules)
