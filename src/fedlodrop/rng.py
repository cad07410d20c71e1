"""One seed, many named streams.

Every random draw in a run (initialisation, masks, data order, PEFT's input dropout) comes from a
stream named by what it is for and the indices it belongs to, e.g. ("masks", round, device,
module). A device's randomness therefore does not depend on which devices ran before it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def stream_seed(seed: int, name: str, *ids: int) -> int:
    """A 63-bit seed for the stream `name` at `ids`, independent across names and indices."""
    entropy = [seed, zlib.crc32(name.encode()), *(int(i) for i in ids)]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def numpy_rng(seed: int, name: str, *ids: int) -> np.random.Generator:
    """A numpy Generator on the stream `name` at `ids` of `seed`."""
    return np.random.default_rng(stream_seed(seed, name, *ids))


def torch_generator(seed: int, name: str, *ids: int) -> torch.Generator:
    """A torch Generator on the stream `name` at `ids` of `seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *ids))


def seed_torch(seed: int, name: str, *ids: int) -> None:
    """Seed torch's global RNG (used by nn.Dropout inside PEFT) for one named phase."""
    torch.manual_seed(stream_seed(seed, name, *ids))
