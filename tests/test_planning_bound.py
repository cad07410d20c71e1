"""SPEC 4: the bound G = Emp + Gap, its shape, its exact minimisers and the calibration fit."""

import numpy as np
import pytest
from scipy.optimize import minimize

from fedlodrop.planning.bound import Bound, Curve, emp_feature, fit_curve, fit_empirical, sparsity_feature
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


def test_fit_recovers_known_constants_with_per_device_rates_weighted_as_the_bound():
    """The feature is sum_k w_k gamma_k/(1-gamma_k) with w_k = D_k / N (the bound's weights), not the
    plain mean: a device with 3 times the samples counts 3 times."""
    e0, c = 0.31, 0.07
    rates = [0.0, 0.2, [0.3, 0.5], 0.6]
    weights = [[1.0], [1.0], [1.0, 3.0], [1.0]]
    assert emp_feature([0.3, 0.5], [1.0, 3.0]) == pytest.approx(0.25 * 0.3 / 0.7 + 0.75 * 1.0)
    x = [emp_feature(r, w) for r, w in zip(rates, weights)]
    fe0, fc, rmse = fit_empirical(x, [e0 + c * xi for xi in x])
    assert fe0 == pytest.approx(e0, abs=1e-12) and fc == pytest.approx(c, abs=1e-12) and rmse < 1e-12


def test_fit_keeps_the_sign_the_data_gives():
    e0, c, rmse = fit_empirical([0.0, 1.0], [0.5, 0.3])  # error falls with dropout: a negative slope, said
    assert c == pytest.approx(-0.2) and e0 == pytest.approx(0.5)


def test_the_convex_curve_is_recovered_and_is_the_bound_it_maps_to():
    """fit_curve recovers e0 + c x + sqrt(a + b/(1 + kappa s)) from noiseless points, and as_bound
    gives a BoundSpec whose Emp + Gap is that curve on a system of N samples (for the planners)."""
    truth = Curve(0.12, 0.05, 0.001, 0.04, 3.0)
    rates = [0.0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8]
    x, sp = [emp_feature(g) for g in rates], [sparsity_feature(g) for g in rates]
    curve, rmse = fit_curve(x, sp, truth(np.array(x), np.array(sp)))
    assert rmse < 1e-6
    assert curve(np.array(x), np.array(sp)) == pytest.approx(truth(np.array(x), np.array(sp)), abs=1e-5)
    bound = Bound(truth.as_bound(N=360.0), np.array([0.5, 0.5]), 360.0)
    for g in rates:
        assert float(bound.value([g, g])) == pytest.approx(float(truth(emp_feature(g), sparsity_feature(g))), rel=1e-9)
