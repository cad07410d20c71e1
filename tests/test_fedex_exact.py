"""SPEC 2 exactness: after fedex the global layer equals x (W0 + s sum_k w_k B_k A_k)^T + bias."""

import pytest
import torch

from fedlodrop.adapter import to_base_orientation
from fedlodrop.aggregation import DeviceUpdate
from fedlodrop.config import validate
from fedlodrop.data.tasks import TASKS
from fedlodrop.masks import apply_masks, draw_masks
from fedlodrop.model import build_model, load_tokenizer
from fedlodrop.server import Server, ServerState


def _model(path, aggregation="fedex", r=4):
    cfg = validate({"model": path, "task": "sst2", "lora": {"r": r, "dropout": 0.0},
                    "federation": {"aggregation": aggregation, "devices": 3}, "dropout": {"rate": 0.3}})
    fm = build_model(cfg, TASKS["sst2"], load_tokenizer(cfg), init_seed=0)
    return cfg, fm


def _aggregate_random(cfg, fm):
    """Aggregate three random masked device states; returns what the checks need."""
    server = Server(cfg, fm.layout, ServerState(0, fm.get_state()), [0.3] * 3)
    ups = _random_updates(fm, 0.3)
    w = torch.tensor([u.num_samples for u in ups], dtype=torch.float32)
    return server, ups, w / w.sum(), server.aggregate(ups)


def _random_updates(fm, rate, k=3):
    g = torch.Generator().manual_seed(1)
    ups = []
    for d in range(k):
        state = {key: torch.randn(v.shape, generator=g) * 0.1 for key, v in fm.get_state().items()}
        masks = draw_masks(fm.layout, rate, "bernoulli", seed=0, round_=0, device=d)
        ups.append(DeviceUpdate(apply_masks(state, fm.layout, masks), masks, 7 + 5 * d))
    return ups


@pytest.mark.parametrize("model_fixture,kind", [("tiny_bert", "Linear"), ("tiny_gpt2", "Conv1D")])
def test_fedex_global_layer_is_weighted_mean_of_device_layers(request, model_fixture, kind):
    cfg, fm = _model(request.getfixturevalue(model_fixture))
    assert all(m.fan_in_fan_out == (kind == "Conv1D") for m in fm.layout.modules)
    base_before = fm.base_weights()
    server, ups, w, outcome = _aggregate_random(cfg, fm)
    fm.add_to_base(outcome.base_deltas)
    fm.set_state(server.state.global_state)
    fm.net.eval()
    x = torch.randn(5, fm.layout.modules[0].n_in)
    for mod in fm.modules:
        shape = mod.shape
        layer = mod.layer
        mean_delta = sum(wk * shape.scaling * u.state[shape.key_b] @ u.state[shape.key_a] for wk, u in zip(w, ups))
        w_eff = base_before[shape.name] + to_base_orientation(shape, mean_delta)
        bias = layer.get_base_layer().bias
        expected = (x @ w_eff.T if kind == "Linear" else x @ w_eff) + bias
        with torch.no_grad():
            got = layer(x)
        assert torch.allclose(got, expected, atol=1e-5), shape.name
    # the residual's downlink is counted, and in the factored (cheaper) form
    assert outcome.residual_downlink_bytes > 0


def test_fedex_would_fail_without_the_residual(tiny_bert):
    """Guard against a test that cannot fail: FedIT on the same updates is not exact."""
    cfg, fm = _model(tiny_bert, aggregation="fedit")
    base_before = fm.base_weights()
    server, ups, w, outcome = _aggregate_random(cfg, fm)
    assert outcome.base_deltas == {} and outcome.residual_downlink_bytes == 0
    shape = fm.layout.modules[0]
    target = sum(wk * shape.scaling * u.state[shape.key_b] @ u.state[shape.key_a] for wk, u in zip(w, ups))
    g = server.state.global_state
    assert not torch.allclose(shape.scaling * g[shape.key_b] @ g[shape.key_a], target, atol=1e-4)
    assert torch.equal(fm.base_weights()[shape.name], base_before[shape.name])
