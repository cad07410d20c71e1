import numpy as np
import pytest
import torch

from fedlodrop.lora.adapter import AdapterLayout, ModuleShape
from fedlodrop.lora.masks import apply_masks, draw_keep, draw_masks, pack, payload_bytes, unpack

LAYOUT = AdapterLayout(
    modules=(ModuleShape("l0.q", 48, 32, 4, 2.0), ModuleShape("l0.v", 48, 32, 4, 2.0),
             ModuleShape("l1.q", 64, 48, 4, 2.0)),
    head=(("head.classifier.weight", (2, 48)), ("head.classifier.bias", (2,))),
)


def random_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in LAYOUT.modules:
        state[m.key_a] = torch.randn(m.r, m.n_in, generator=g)
        state[m.key_b] = torch.randn(m.n_out, m.r, generator=g)
    for k, shape in LAYOUT.head:
        state[k] = torch.randn(*shape, generator=g)
    return state


@pytest.mark.parametrize("sampler", ["bernoulli", "exact"])
def test_keep_rate_matches_gamma(sampler):
    rng = np.random.default_rng(0)
    keeps = np.stack([draw_keep(1000, 0.3, sampler, rng) for _ in range(50)])
    assert abs(keeps.mean() - 0.7) < 0.01
    if sampler == "exact":
        assert (keeps.sum(1) == 1000 - 300).all()


@pytest.mark.parametrize("n, rate, drops",
                         [(10, 0.25, 2), (7, 0.5, 3), (5, 0.9, 4), (12, 0.7, 8), (3, 0.99, 2)])
def test_exact_sampler_drops_floor_of_rate_times_n(n, rate, drops):
    # rate * n has a fraction here: floor, not ceil or round (the last case: at least one kept)
    rng = np.random.default_rng(2)
    for _ in range(20):
        keep = draw_keep(n, rate, "exact", rng)
        assert keep.dtype == bool and keep.shape == (n,)
        assert int((~keep).sum()) == drops


@pytest.mark.parametrize("sampler", ["bernoulli", "exact"])
def test_at_least_one_kept_at_extreme_rate(sampler):
    rng = np.random.default_rng(1)
    for _ in range(200):
        assert draw_keep(3, 0.99, sampler, rng).sum() >= 1


def test_masks_reproducible_and_order_independent():
    a = draw_masks(LAYOUT, 0.4, "bernoulli", seed=7, round_=3, device=2)
    # draw other devices first: device 2's masks must not change
    for d in range(5):
        draw_masks(LAYOUT, 0.4, "bernoulli", seed=7, round_=3, device=d)
    b = draw_masks(LAYOUT, 0.4, "bernoulli", seed=7, round_=3, device=2)
    for name in a:
        assert torch.equal(a[name].a_cols, b[name].a_cols) and torch.equal(a[name].b_rows, b[name].b_rows)


def test_masks_differ_across_rounds_devices_modules_and_factors():
    m = draw_masks(LAYOUT, 0.5, "bernoulli", seed=7, round_=0, device=0)
    other_round = draw_masks(LAYOUT, 0.5, "bernoulli", seed=7, round_=1, device=0)
    other_device = draw_masks(LAYOUT, 0.5, "bernoulli", seed=7, round_=0, device=1)
    other_seed = draw_masks(LAYOUT, 0.5, "bernoulli", seed=8, round_=0, device=0)
    for other in (other_round, other_device, other_seed):
        assert not torch.equal(m["l0.q"].a_cols, other["l0.q"].a_cols)
    assert not torch.equal(m["l0.q"].a_cols, m["l0.v"].a_cols)  # independent per module (same n_in)
    assert not torch.equal(m["l0.q"].b_rows[:32], m["l0.q"].a_cols)  # A and B drawn apart


def test_zero_rate_keeps_everything():
    m = draw_masks(LAYOUT, 0.0, "bernoulli", seed=0, round_=0, device=0)
    assert all(mm.a_cols.all() and mm.b_rows.all() for mm in m.values())


def test_pack_unpack_roundtrip_and_bytes():
    state = random_state()
    masks = draw_masks(LAYOUT, 0.3, "bernoulli", seed=1, round_=0, device=0)
    packed = pack(state, LAYOUT, masks, torch.float32)
    kept_values = sum(m.r * (int(masks[m.name].a_cols.sum()) + int(masks[m.name].b_rows.sum()))
                      for m in LAYOUT.modules)
    assert payload_bytes(packed) == 4 * (kept_values + LAYOUT.head_values)
    restored = unpack(packed, LAYOUT, masks)
    expected = apply_masks(state, LAYOUT, masks)
    for k in state:
        assert torch.equal(restored[k], expected[k])
    half = pack(state, LAYOUT, masks, torch.float16)
    assert payload_bytes(half) == payload_bytes(packed) // 2


def test_apply_masks_zeroes_columns_of_a_and_rows_of_b():
    state = random_state()
    masks = draw_masks(LAYOUT, 0.5, "exact", seed=1, round_=0, device=0)
    out = apply_masks(state, LAYOUT, masks)
    m = LAYOUT.modules[0]
    drop_a, drop_b = ~masks[m.name].a_cols, ~masks[m.name].b_rows
    assert (out[m.key_a][:, drop_a] == 0).all() and (out[m.key_a][:, ~drop_a] != 0).all()
    assert (out[m.key_b][drop_b, :] == 0).all() and (out[m.key_b][~drop_b, :] != 0).all()


@pytest.mark.parametrize("n,rate,kept", [(100, 0.29, 71), (32, 0.8, 6), (384, 0.3, 268), (10, 0.0, 10), (4, 0.99, 1)])
def test_budget_sampler_never_keeps_more_than_one_minus_rate(n, rate, kept):
    for seed in range(3):
        keep = draw_keep(n, rate, "budget", np.random.default_rng(seed))
        assert keep.sum() == kept and (kept <= (1 - rate) * n + 1e-9 or kept == 1)
