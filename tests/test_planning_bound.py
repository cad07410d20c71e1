"""SPEC 4: the bound G = Emp + Gap, its shape, its exact minimisers and the calibration fit."""

import numpy as np
import pytest
from scipy.optimize import minimize

from fedlodrop.planning.bound import Bound, fit_empirical
from fedlodrop.planning.spec import BoundSpec


def bound(K=3, N=6000.0, **kw):
    return Bound(BoundSpec(**kw), np.full(K, 1.0 / K), N)


def test_spec_reference_values():
    # SPEC 4: with N = 6000 the defaults give G(0) ~ 0.63, G(0.3) ~ 0.24, G(0.5) ~ 0.26
    b = bound()
    assert b.value(np.zeros(3)) == pytest.approx(0.634, abs=1e-3)
    assert b.value(np.full(3, 0.3)) == pytest.approx(0.236, abs=1e-3)
    assert b.value(np.full(3, 0.5)) == pytest.approx(0.263, abs=1e-3)
    assert 0.25 < b.best_common(0.0, 0.9) < 0.35


def test_emp_rises_gap_falls_and_G_is_convex():
    b = bound(K=4, N=1234.0, c_emp=0.3, e0=0.05)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = rng.uniform(0, 0.95, 4), rng.uniform(0, 0.95, 4)
        hi = np.maximum(x, y)
        assert b.emp(hi) >= b.emp(x) - 1e-15 and b.gap(hi) <= b.gap(x) + 1e-15
        t = rng.uniform()
        assert b.value(t * x + (1 - t) * y) <= t * b.value(x) + (1 - t) * b.value(y) + 1e-12


def test_sparsity_weights_by_samples():
    b = Bound(BoundSpec(), np.array([0.25, 0.75]), 100.0)
    g = np.array([0.2, 0.6])
    assert b.sparsity(g) == pytest.approx(0.25 * (0.4 - 0.04) + 0.75 * (1.2 - 0.36))


def test_s_minimiser_solves_the_stationarity_condition():
    b = bound()
    for lam in (0.05, 0.2, 1.0):
        s = b.s_minimiser(lam, 0.0, 1.0)
        if 0 < s < 1:
            assert b.dgap_ds(s) == pytest.approx(-lam, rel=1e-9)
    assert b.s_minimiser(0.0, 0.1, 0.7) == 0.7  # Gap decreasing: no price on s -> largest s


def test_minimise_box_matches_a_generic_solver():
    b = Bound(BoundSpec(c_emp=0.2), np.array([0.1, 0.3, 0.6]), 3000.0)
    lo, hi = np.array([0.0, 0.5, 0.1]), np.array([0.9, 0.9, 0.2])
    x = b.minimise_box(lo, hi)
    ref = minimize(lambda g: b.value(g), x0=(lo + hi) / 2, bounds=list(zip(lo, hi)), method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12})
    assert b.value(x) <= ref.fun + 1e-10
    assert np.all(x >= lo) and np.all(x <= hi)


@pytest.mark.parametrize("c_emp", [0.0, 0.1])
def test_box_lower_bound_is_below_every_point(c_emp):
    b = bound(c_emp=c_emp)
    rng = np.random.default_rng(1)
    a, c = np.array([0.1, 0.2, 0.0]), np.array([0.5, 0.3, 0.8])
    low = b.box_lower(a, c)
    for _ in range(100):
        assert b.value(rng.uniform(a, c)) >= low - 1e-15


def test_fit_recovers_known_constants_with_per_device_rates():
    e0, c = 0.31, 0.07
    rates = [0.0, 0.2, [0.3, 0.5], 0.6]
    x = [np.mean(np.atleast_1d(r) / (1 - np.atleast_1d(r))) for r in rates]
    losses = [e0 + c * xi for xi in x]
    fe0, fc, rmse = fit_empirical(rates, losses)
    assert fe0 == pytest.approx(e0, abs=1e-12) and fc == pytest.approx(c, abs=1e-12) and rmse < 1e-12


def test_fit_keeps_constants_non_negative_and_needs_two_rates():
    e0, c, rmse = fit_empirical([0.0, 0.5], [0.5, 0.3])  # loss falls with dropout: c_emp clipped at 0
    assert c == 0.0 and e0 == pytest.approx(0.4)
    with pytest.raises(ValueError, match="two or more"):
        fit_empirical([0.3, 0.3], [0.1, 0.2])
