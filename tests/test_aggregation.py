"""The aggregation rules on random states: each factor moves by the devices' changes, dropped or
untrained slices count as unchanged, and fedex's residual makes the product exact."""

import pytest
import torch

from fedlodrop.lora.aggregation import DeviceUpdate, device_weights, make_rule
from fedlodrop.lora.masks import apply_masks, draw_masks, full_masks

from test_masks import LAYOUT, random_state


def sub_adapter_updates(glob, rate=0.5, k=3, seed=3):
    """Devices that held `glob` through their masks and changed their kept slices at random."""
    out = []
    for d in range(k):
        masks = draw_masks(LAYOUT, rate, "bernoulli", seed=seed, round_=0, device=d)
        start = apply_masks(glob, LAYOUT, masks)
        noise = apply_masks(random_state(10 + d), LAYOUT, masks)
        end = {key: start[key] + 0.1 * noise[key] for key in start}
        out.append(DeviceUpdate(start, end, masks, 10 * (d + 1)))
    return out


def test_weights_by_samples_and_uniform():
    ups = sub_adapter_updates(random_state(0))
    assert torch.allclose(device_weights(ups, "samples"), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert torch.allclose(device_weights(ups, "uniform"), torch.full((3,), 1 / 3))


def test_fedit_moves_by_the_weighted_mean_change_and_is_fedavg_without_dropout():
    glob = random_state(0)
    ups = sub_adapter_updates(glob)
    w = device_weights(ups, "samples")
    new, residuals = make_rule("fedit").aggregate(LAYOUT, glob, ups, w)
    m = LAYOUT.modules[0]
    expected = glob[m.key_b] + sum(wk * (u.end[m.key_b] - u.start[m.key_b]) for wk, u in zip(w, ups))
    assert torch.allclose(new[m.key_b], expected, atol=1e-6) and residuals == {}
    # a row every device dropped is the previous row, not zero
    dropped_by_all = ~torch.stack([u.trained[m.name].b_rows for u in ups]).any(0)
    assert dropped_by_all.any() and torch.equal(new[m.key_b][dropped_by_all], glob[m.key_b][dropped_by_all])
    # without dropout: FedIT's weighted mean of the devices' factors
    full = [DeviceUpdate(glob, random_state(20 + d), full_masks(LAYOUT), 5 + d) for d in range(3)]
    w = device_weights(full, "samples")
    new, _ = make_rule("fedit").aggregate(LAYOUT, glob, full, w)
    assert torch.allclose(new[m.key_a], sum(wk * u.end[m.key_a] for wk, u in zip(w, full)), atol=1e-5)


def test_masked_mean_over_the_devices_that_trained_each_slice():
    glob = random_state(0)
    ups = sub_adapter_updates(glob, rate=0.6)
    w = device_weights(ups, "samples")
    new, _ = make_rule("masked").aggregate(LAYOUT, glob, ups, w)
    m = LAYOUT.modules[0]
    seen_untrained = False
    for j in range(m.n_in):
        keepers = [(wk, u) for wk, u in zip(w, ups) if u.trained[m.name].a_cols[j]]
        if not keepers:
            seen_untrained = True
            assert torch.equal(new[m.key_a][:, j], glob[m.key_a][:, j])
        else:
            total = sum(wk for wk, _ in keepers)
            change = sum(wk * (u.end[m.key_a][:, j] - u.start[m.key_a][:, j]) for wk, u in keepers) / total
            assert torch.allclose(new[m.key_a][:, j], glob[m.key_a][:, j] + change, atol=1e-6)
    assert seen_untrained  # rate 0.6, 3 devices: some column is dropped by all of them


def test_masked_equals_fedit_without_dropout():
    glob = random_state(0)
    ups = [DeviceUpdate(glob, random_state(d), full_masks(LAYOUT), 5 + d) for d in range(3)]
    w = device_weights(ups, "samples")
    a, _ = make_rule("masked").aggregate(LAYOUT, glob, ups, w)
    b, _ = make_rule("fedit").aggregate(LAYOUT, glob, ups, w)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5)


def test_fedex_residual_makes_the_product_exact():
    glob = random_state(0)
    ups = sub_adapter_updates(glob, rate=0.3)
    w = device_weights(ups, "samples")
    for factor_rule in ("masked", "fedit"):
        new, residuals = make_rule("fedex", factor_rule).aggregate(LAYOUT, glob, ups, w)
        for m in LAYOUT.modules:
            s = m.scaling
            target = s * glob[m.key_b] @ glob[m.key_a] + sum(
                wk * s * (u.end[m.key_b] @ u.end[m.key_a] - u.start[m.key_b] @ u.start[m.key_a])
                for wk, u in zip(w, ups)
            )
            got = s * new[m.key_b] @ new[m.key_a] + residuals[m.name].dense()
            assert torch.allclose(got, target, atol=1e-4)
            assert residuals[m.name].u.shape[1] == (2 * 3 + 2) * m.r  # masked starts: (2K + 2) r


def test_ffa_keeps_a_and_moves_b():
    glob = random_state(0)
    ups = [DeviceUpdate(glob, {**random_state(d), **{m.key_a: glob[m.key_a] for m in LAYOUT.modules}},
                        full_masks(LAYOUT), 4) for d in range(3)]
    w = device_weights(ups, "uniform")
    rule = make_rule("ffa")
    new, residuals = rule.aggregate(LAYOUT, glob, ups, w)
    m = LAYOUT.modules[1]
    assert torch.equal(new[m.key_a], glob[m.key_a])
    assert torch.allclose(new[m.key_b], sum(u.end[m.key_b] for u in ups) / 3, atol=1e-5)
    assert residuals == {} and not rule.sends(m.key_a) and rule.sends(m.key_b)


def test_head_moves_by_the_weighted_mean_change_for_every_rule():
    glob = random_state(0)
    ups = sub_adapter_updates(glob)
    w = device_weights(ups, "samples")
    for name in ("fedit", "masked", "fedex", "ffa"):
        new, _ = make_rule(name).aggregate(LAYOUT, glob, ups, w)
        for key in LAYOUT.head_keys:
            expected = glob[key] + sum(wk * (u.end[key] - u.start[key]) for wk, u in zip(w, ups))
            assert torch.allclose(new[key], expected, atol=1e-6)


def test_truncated_fold_is_the_best_rank_k_approximation():
    from fedlodrop.lora.aggregation import Residual

    g = torch.Generator().manual_seed(0)
    res = Residual(torch.randn(40, 12, generator=g), torch.randn(12, 30, generator=g))
    dense = res.dense().double()
    u, s, vh = torch.linalg.svd(dense)
    for k in (1, 3, 11):
        t, err, norm = res.truncated(k)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert t.u.shape == (40, k) and t.v.shape == (k, 30)
        assert torch.allclose(t.dense().double(), best, atol=1e-4)
        assert err == pytest.approx(float(torch.linalg.matrix_norm(dense - best)), rel=1e-6)
        assert norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-6)
    same, err, _ = res.truncated(12)
    assert same is res and err == 0.0
