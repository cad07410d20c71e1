"""Who takes part in a round when no plug-in decides: every device, or `devices_per_round` drawn
from the seed (a fixed-size draw, the same on every engine, machine and after a resume). Central
differential privacy replaces it with Poisson draws from the OS's entropy
(`round.privacy.DifferentialPrivacy.participants`)."""

from __future__ import annotations

from fedlodrop.config import RunConfig
from fedlodrop.rng import numpy_rng


def seeded_participants(cfg: RunConfig, round_: int) -> list[int]:
    """The devices that train in `round_`: all, or `devices_per_round` drawn from the seed."""
    fed = cfg.federation
    if fed.devices_per_round is None or fed.devices_per_round >= fed.devices:
        return list(range(fed.devices))
    rng = numpy_rng(cfg.seed, "participants", round_)
    return sorted(int(k) for k in rng.choice(fed.devices, size=fed.devices_per_round, replace=False))


def seeded_participations(cfg: RunConfig, rounds: int) -> list[int]:
    """How many of the first `rounds` rounds each device is drawn for by `seeded_participants`."""
    counts = [0] * cfg.federation.devices
    for r in range(rounds):
        for k in seeded_participants(cfg, r):
            counts[k] += 1
    return counts
