"""Server optimisers: Flower's FedAvgM / FedAdam / FedYogi arithmetic on identical arrays, the step
a round really applies (to the factors, or to FedEx's effective weight through the fold), and the
refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import one_round, tiny_cfg
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.config import ServerConfig
from fedlodrop.round.optimizers import SERVER_OPTIMIZERS, make_server_optimizer
from fedlodrop.run.experiment import build

SHAPES = {"a": (4, 6), "b": (6, 4), "head": (2,)}


def _flower(name: str, cfg: ServerConfig):
    from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

    if name == "avgm":
        return FedAvgM(server_learning_rate=cfg.lr, server_momentum=cfg.momentum)
    kind = {"adam": FedAdam, "yogi": FedYogi}[name]
    return kind(eta=cfg.lr, beta_1=cfg.beta1, beta_2=cfg.beta2, tau=cfg.tau)


def _replies(states: list[dict[str, np.ndarray]], samples: list[int]):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    return [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                                "metrics": MetricRecord({"num-examples": n})}), dst_node_id=0, message_type="train")
            for s, n in zip(states, samples)]


@pytest.mark.parametrize("name", ["avgm", "adam", "yogi"])
def test_each_server_optimiser_is_flowers_arithmetic(name, monkeypatch):
    """Five rounds of three devices' weighted replies: Flower's strategy aggregates and steps; ours
    steps on the same FedAvg aggregate's pseudo-gradient. The models agree to float32 rounding."""
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    for slot in ("_run_id", "_node_id", "_task_id"):  # a Message needs the identity of a running app
        monkeypatch.setattr(TaskIdentity, slot, 1)
    cfg = ServerConfig(optimizer=name, lr={"avgm": 0.7, "adam": 0.05, "yogi": 0.03}[name], momentum=0.8,
                       beta1=0.85, beta2=0.95, tau=1e-3)
    ours, state = make_server_optimizer(cfg), {}
    flower = _flower(name, cfg)
    rng = np.random.default_rng(0)
    x = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    for t in range(5):
        samples = [int(n) for n in rng.integers(5, 50, size=3)]
        # devices move the model by different amounts each round: the moments must matter
        states = [{k: v + rng.normal(scale=10.0 ** -(t % 3), size=v.shape).astype(np.float32) for k, v in x.items()}
                  for _ in samples]
        if name == "avgm":
            flower.current_arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
        else:
            flower.current_arrays = {k: v.copy() for k, v in x.items()}
        # Flower bias-corrects FedAdam with `server_round + 1`: its round t is our step t + 1
        theirs, _ = flower.aggregate_train(t, _replies(states, samples))
        w = np.array(samples, dtype=np.float64) / sum(samples)
        mean = {k: sum(wk * s[k] for wk, s in zip(w, states)) for k in x}
        delta = {k: torch.from_numpy((mean[k] - x[k]).astype(np.float32)) for k in x}
        step = ours.step(delta, state)
        x = {k: (torch.from_numpy(v) + step[k]).numpy() for k, v in x.items()}
        for k in x:
            np.testing.assert_allclose(x[k], theirs[k].numpy(), rtol=2e-5, atol=2e-6)


def test_none_is_the_aggregate_and_every_optimiser_keeps_state_per_key():
    delta = {"a": torch.ones(2, 2), "b": -torch.ones(3)}
    assert make_server_optimizer(ServerConfig()).step(delta, {}) is delta
    state: dict = {}
    make_server_optimizer(ServerConfig(optimizer="adam")).step(delta, state)
    assert set(state) == {"t", "m/a", "v/a", "m/b", "v/b"} and int(state["t"]) == 1
    assert SERVER_OPTIMIZERS.names() == ["none", "avgm", "adam", "yogi"]


def _effective(exp, state, fold):
    """Each module's effective weight change over W0 (F + s B A) and the head."""
    out = {m.name: fold.get(m.name, 0.0) + m.scaling * state[m.key_b] @ state[m.key_a] for m in exp.fm.layout.modules}
    return out | {k: state[k] for k in exp.fm.layout.head_keys}


@pytest.mark.parametrize("aggregation,ranks", [("fedex", None), ("masked", None), ("hetlora-sw", [1, 2, 4]),
                                               ("flora", [1, 2, 4])])
def test_a_round_moves_the_model_by_the_optimisers_step(tiny_bert, sst2_dir, aggregation, ranks):
    """FedAvgM with no momentum and lr 0.5 moves the model half as far as the rule alone does: the
    factors and head (masked, hetlora-sw), or for the folding rules (fedex; flora, whose factors
    restart) the effective weight W0 + F + s B A, which only holds if the fold carries the step's part
    the factors do not. The mixed-rank rules run with devices of ranks 1, 2 and 4."""
    base = {"federation.aggregation": aggregation, "dropout.rate": 0.3, "federation.rounds": 1, "lora.ranks": ranks}
    runs = {}
    for name, server in (("none", {}), ("half", {"server.optimizer": "avgm", "server.momentum": 0.0,
                                                  "server.lr": 0.5})):
        exp = build(tiny_cfg(tiny_bert, sst2_dir, **base, **server))
        first = exp.fm.get_state()
        srv, _ = one_round(exp)
        runs[name] = (first, _effective(exp, first, {}), _effective(exp, srv.state.global_state, srv.state.fold),
                      srv.state.global_state)
    (first, start, plain, none_state), (_, _, half, half_state) = runs["none"], runs["half"]
    if aggregation in ("fedex", "flora"):  # the effective weight moves half as far (the factors do not)
        for key in plain:
            moved = plain[key] - start[key]
            assert float(moved.abs().max()) > 0
            torch.testing.assert_close(half[key] - start[key], 0.5 * moved, rtol=1e-4, atol=1e-6)
    else:  # the factors and head themselves move half as far (their product, being bilinear, does not)
        for kind in ("lora_B", "classifier"):  # (A cannot move in a one-step round: B starts at zero)
            assert any(float((none_state[k] - first[k]).abs().max()) > 0 for k in first if kind in k), kind
        for key, value in half_state.items():
            torch.testing.assert_close(value - first[key], 0.5 * (none_state[key] - first[key]), rtol=1e-4, atol=1e-6)


def test_fedprox_holds_each_device_near_what_it_was_sent(tiny_bert, sst2_dir):
    """The same round with mu 0 and a large mu: the proximal pull shortens every device's update
    (a sign error would push the devices away and lengthen it)."""
    lengths = []
    for mu in (0.0, 20.0):
        exp = build(tiny_cfg(tiny_bert, sst2_dir, **{"train.prox_mu": mu, "federation.rounds": 1, "federation.local_epochs": 4,
                                                     "train.lr": 5e-2, "train.max_grad_norm": None}))
        first = exp.fm.get_state()
        srv, _ = one_round(exp)
        lengths.append(float(torch.sqrt(sum((srv.state.global_state[k] - first[k]).pow(2).sum() for k in first))))
    assert 0 < lengths[1] < 0.5 * lengths[0], lengths


@pytest.mark.parametrize("override,words", [
    ("server.optimizer=sgd", ["server.optimizer", "'sgd'", "avgm"]),
    ("server.lr=0.1", ["server.lr 0.1", "server.optimizer is none"]),
    ("server.beta2=1.5", ["server.beta2"]),
    ("train.prox_mu=-1", ["train.prox_mu"]),
])
def test_bad_server_and_prox_settings_are_one_line(tmp_path, override, words):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["run", "--quiet", "--out", str(out), "--set", override])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert not out.exists()
