import torch

from fedlodrop.aggregation import DeviceUpdate, aggregate, device_weights
from fedlodrop.masks import apply_masks, draw_masks, full_masks

from test_masks import LAYOUT, random_state


def updates_with_masks(rate=0.5, k=3):
    out = []
    for d in range(k):
        masks = draw_masks(LAYOUT, rate, "bernoulli", seed=3, round_=0, device=d)
        out.append(DeviceUpdate(apply_masks(random_state(10 + d), LAYOUT, masks), masks, 10 * (d + 1)))
    return out


def test_weights_by_samples_and_uniform():
    ups = updates_with_masks()
    assert torch.allclose(device_weights(ups, "samples"), torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert torch.allclose(device_weights(ups, "uniform"), torch.full((3,), 1 / 3))


def test_fedit_is_weighted_mean_counting_zeros():
    ups = updates_with_masks()
    w = device_weights(ups, "samples")
    new, residuals = aggregate("fedit", LAYOUT, random_state(0), ups, w)
    m = LAYOUT.modules[0]
    expected = sum(wk * u.state[m.key_b] for wk, u in zip(w, ups))
    assert torch.allclose(new[m.key_b], expected) and residuals == {}


def test_masked_mean_over_keepers_and_previous_when_nobody_kept():
    prev = random_state(0)
    ups = updates_with_masks(rate=0.6)
    w = device_weights(ups, "samples")
    new, _ = aggregate("masked", LAYOUT, prev, ups, w)
    m = LAYOUT.modules[0]
    for j in range(m.n_in):
        keepers = [(wk, u) for wk, u in zip(w, ups) if u.masks[m.name].a_cols[j]]
        if not keepers:
            assert torch.equal(new[m.key_a][:, j], prev[m.key_a][:, j])
        else:
            total = sum(wk for wk, _ in keepers)
            expected = sum(wk * u.state[m.key_a][:, j] for wk, u in keepers) / total
            assert torch.allclose(new[m.key_a][:, j], expected, atol=1e-6)
    # at rate 0.6 with 3 devices some column is dropped by all (prob ~0.2 each of 32): check it happened
    kept_any = torch.stack([u.masks[m.name].a_cols for u in ups]).any(0)
    assert not kept_any.all()


def test_masked_equals_fedit_without_dropout():
    ups = [DeviceUpdate(random_state(d), full_masks(LAYOUT), 5 + d) for d in range(3)]
    w = device_weights(ups, "samples")
    a, _ = aggregate("masked", LAYOUT, random_state(0), ups, w)
    b, _ = aggregate("fedit", LAYOUT, random_state(0), ups, w)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)


def test_fedex_residual_makes_product_exact():
    ups = updates_with_masks(rate=0.3)
    w = device_weights(ups, "samples")
    for factor_rule in ("masked", "fedit"):
        new, residuals = aggregate("fedex", LAYOUT, random_state(0), ups, w, factor_rule)
        for m in LAYOUT.modules:
            target = sum(wk * m.scaling * u.state[m.key_b] @ u.state[m.key_a] for wk, u in zip(w, ups))
            got = m.scaling * new[m.key_b] @ new[m.key_a] + residuals[m.name].dense()
            assert torch.allclose(got, target, atol=1e-5)
            # factored downlink is cheaper than the dense residual for these shapes
            assert residuals[m.name].downlink_values() == (3 + 1) * m.r * (m.n_in + m.n_out)


def test_ffa_keeps_a_and_averages_b():
    prev = random_state(0)
    ups = updates_with_masks(rate=0.0)
    w = device_weights(ups, "uniform")
    new, residuals = aggregate("ffa", LAYOUT, prev, ups, w)
    m = LAYOUT.modules[1]
    assert torch.equal(new[m.key_a], prev[m.key_a])
    assert torch.allclose(new[m.key_b], sum(u.state[m.key_b] for u in ups) / 3, atol=1e-6)
    assert residuals == {}


def test_head_is_weighted_mean_for_every_rule():
    ups = updates_with_masks()
    w = device_weights(ups, "samples")
    for rule in ("fedit", "masked", "fedex", "ffa"):
        new, _ = aggregate(rule, LAYOUT, random_state(0), ups, w)
        for key in LAYOUT.head_keys:
            assert torch.allclose(new[key], sum(wk * u.state[key] for wk, u in zip(w, ups)), atol=1e-6)
