"""Server optimisers (FedOpt, Reddi et al. 2021): the round's aggregate taken as a pseudo-gradient.

Each round the aggregation rule proposes a new global model; its difference from the current one,
delta_t = aggregate - current, is what FedAvg applies as is. A server optimiser applies
`step(delta_t)` instead, with its own state carried from round to round:

* `none` - x += delta_t (the rule's aggregate, unchanged)
* `avgm` - FedAvgM:  v = mu v + delta_t;                                x += eta v
* `adam` - FedAdam:  m = b1 m + (1 - b1) delta_t;  v = b2 v + (1 - b2) delta_t^2;
                     x += eta sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + tau)
* `yogi` - FedYogi:  m as adam;  v = v - (1 - b2) delta_t^2 sign(v - delta_t^2);
                     x += eta m / (sqrt(v) + tau)

t counts the optimiser's steps (rounds that aggregated anything), from 1. These are Flower's
FedAvgM / FedAdam / FedYogi arithmetic (tests/test_server_optimizers.py feeds both the same arrays;
Flower bias-corrects FedAdam with its `server_round + 1`, which is our t when its rounds count from 0).

What x is depends on the rule (`Server._aggregate`): the factors A, B and the head for rules that
average factors; for `fedex`, each module's effective weight change s (B'A' - BA) + R and the head,
so the optimiser moves the model the devices' mean of models points at, and the fold carries what
the factors do not (docs/optimisers.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedlodrop.config import ServerConfig
from fedlodrop.registry import Registry

SERVER_OPTIMIZERS: Registry[ServerOptimizer] = Registry("server.optimizer")

Tensors = dict[str, torch.Tensor]


class ServerOptimizer:
    """A server optimiser: `step(delta, state)` -> the change to apply. Its state (moments, step
    count) lives in `state`, a flat dict the server checkpoints; a new optimiser registers."""

    name: ClassVar[str]
    default_lr: ClassVar[float] = 1.0  # eta when server.lr is null

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.lr = cfg.lr if cfg.lr is not None else self.default_lr

    def step(self, delta: Tensors, state: Tensors) -> Tensors:
        """The change to apply for the pseudo-gradient `delta`; updates `state` in place."""
        raise NotImplementedError

    @staticmethod
    def _slot(state: Tensors, slot: str, key: str, like: torch.Tensor) -> torch.Tensor:
        return state.get(f"{slot}/{key}", torch.zeros_like(like))

    @staticmethod
    def _count(state: Tensors) -> int:
        """Advance and return t, the step count (kept in `state` as a 0-d tensor)."""
        t = int(state.get("t", torch.zeros((), dtype=torch.int64))) + 1
        state["t"] = torch.tensor(t, dtype=torch.int64)
        return t


@SERVER_OPTIMIZERS.register
class Plain(ServerOptimizer):
    """FedAvg: the rule's aggregate as it is."""

    name = "none"

    def step(self, delta, state):
        """delta itself."""
        return delta


@SERVER_OPTIMIZERS.register
class AvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): heavy-ball momentum on the pseudo-gradient."""

    name = "avgm"

    def step(self, delta, state):
        """v = momentum v + delta; the change is lr v."""
        out = {}
        for key, d in delta.items():
            v = self.cfg.momentum * self._slot(state, "v", key, d) + d
            state[f"v/{key}"] = v
            out[key] = self.lr * v
        return out


class _Adaptive(ServerOptimizer):
    """FedAdam and FedYogi: a first moment as Adam's, a second moment each its own way."""

    default_lr = 0.05  # learns the polarity task in 5 rounds on fedex's effective weights (tests/test_learning.py)
    bias_correction: ClassVar[bool] = True

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, delta, state):
        """m and v, then lr_t m / (sqrt(v) + tau)."""
        b1, b2, tau = self.cfg.beta1, self.cfg.beta2, self.cfg.tau
        t = self._count(state)
        lr = self.lr * (1 - b2**t) ** 0.5 / (1 - b1**t) if self.bias_correction else self.lr
        out = {}
        for key, d in delta.items():
            m = b1 * self._slot(state, "m", key, d) + (1 - b1) * d
            v = self.second(self._slot(state, "v", key, d), d * d)
            state[f"m/{key}"], state[f"v/{key}"] = m, v
            out[key] = lr * m / (v.sqrt() + tau)
        return out


@SERVER_OPTIMIZERS.register
class Adam(_Adaptive):
    """FedAdam: Adam's moments on the pseudo-gradient, bias-corrected step size."""

    name = "adam"

    def second(self, v, d2):
        """v = b2 v + (1 - b2) delta^2."""
        return self.cfg.beta2 * v + (1 - self.cfg.beta2) * d2


@SERVER_OPTIMIZERS.register
class Yogi(_Adaptive):
    """FedYogi: the second moment moves additively, by at most (1 - b2) delta^2 a round."""

    name = "yogi"
    bias_correction = False

    def second(self, v, d2):
        """v = v - (1 - b2) delta^2 sign(v - delta^2)."""
        return v - (1 - self.cfg.beta2) * d2 * torch.sign(v - d2)


def make_server_optimizer(cfg: ServerConfig) -> ServerOptimizer:
    """The one place a server optimiser is chosen by name (`run.settings` checks it first)."""
    return SERVER_OPTIMIZERS.make(cfg.optimizer, cfg)
