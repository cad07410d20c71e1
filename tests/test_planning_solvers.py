"""SPEC 5: B&B against brute force, P-SCA against B&B, every plan re-checked by hand, trends."""

import math

import numpy as np
import pytest

from fedlodrop.planning import InfeasibleError, make_plan, optimize
from fedlodrop.planning.bnb import solve_bnb
from fedlodrop.planning.bound import Bound
from fedlodrop.planning.feasibility import min_bandwidth_bisect, min_latency_limit, smallest_common_gamma
from fedlodrop.planning.psca import solve_psca
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.spec import system_from_dict
from fedlodrop.planning.system import system_model


def recheck(plan, m):
    """SPEC 3's limits recomputed from the plan's numbers alone, not from any solver quantity."""
    assert sum(d.bandwidth_hz for d in plan.devices) <= m.B_tot * (1 + 1e-12)
    for k, d in enumerate(plan.devices):
        g, B, p, f = d.gamma, d.bandwidth_hz, d.power_w, d.frequency_hz
        assert 0 <= g <= m.gamma_max and 0 < p <= m.P[k] and 0 < f <= m.fmax[k] and B > 0
        bits = (1 - g) * m.Q * m.bits + m.head * m.bits
        rate = B * math.log2(1 + p * m.h[k] / (m.N0 * B))
        cycles = m.tau * m.D[k] * (m.c0 + (1 - g) * m.c1)
        latency = cycles / f + bits / rate
        energy = m.kappa * cycles * f**2 + p * bits / rate
        assert latency <= m.T, (k, latency, m.T)
        assert energy <= m.E[k], (k, energy, m.E[k])
        assert d.latency_s == pytest.approx(latency, rel=1e-9) and d.energy_j == pytest.approx(energy, rel=1e-9)
    G = Bound.of(m).value(np.array([d.gamma for d in plan.devices]))
    assert plan.objective == pytest.approx(G, rel=1e-12)


def grid_search(m, grids):
    """min G over the rate vectors of a product grid whose minimal bands (found by plain
    bisection on B, not the solvers' golden-section search) fit in B_tot."""
    betas = [min_bandwidth_bisect(m, k, g, iterations=60) for k, g in enumerate(grids)]
    best, arg = math.inf, None
    bound = Bound.of(m)
    mesh = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1).reshape(-1, m.K)
    band = sum(np.meshgrid(*betas, indexing="ij")).reshape(-1)
    ok = band <= m.B_tot
    if ok.any():
        vals = bound.value(mesh[ok])
        i = int(np.argmin(vals))
        best, arg = float(vals[i]), mesh[ok][i]
    return best, arg


@pytest.mark.parametrize("K, seed", [(2, 1), (2, 4), (3, 0), (3, 2)])
def test_bnb_is_the_global_optimum_of_a_brute_force_grid(K, seed):
    m = system_model(random_system(K, seed=seed))
    res = solve_bnb(m)
    assert res.stats.status == "optimal" and res.stats.gap <= 1e-4 * res.objective
    # 1. a coarse exhaustive grid over the whole box: no feasible grid point beats B&B
    coarse = [np.linspace(0, m.gamma_max, 61)] * K
    coarse_best, _ = grid_search(m, coarse)
    assert res.objective <= coarse_best + 1e-4 * coarse_best
    assert res.stats.lower_bound <= coarse_best
    # 2. a fine grid around B&B's point: within its resolution, and never better beyond tolerance
    step = 2.5e-4
    fine = [np.clip(g + step * np.arange(-16, 17), 0, m.gamma_max) for g in res.gamma]
    fine_best, _ = grid_search(m, fine)
    assert res.objective <= fine_best + 1e-4 * fine_best
    assert fine_best <= res.objective + 2 * step  # |dG/dgamma| summed over devices is below 2 here
    recheck(make_plan(random_system(K, seed=seed), res.gamma, "bnb", res.stats), m)


@pytest.mark.parametrize("K, seed", [(4, 1), (6, 2), (8, 3)])
def test_psca_lands_within_two_percent_of_bnb(K, seed):
    spec = random_system(K, seed=seed)
    m = system_model(spec)
    bnb = solve_bnb(m, eps_rel=1e-3)
    psca = solve_psca(m)
    assert psca.stats.status == "converged"
    assert psca.objective <= bnb.objective * 1.02
    assert psca.objective >= bnb.stats.lower_bound * (1 - 1e-9)  # B&B's certificate holds
    recheck(make_plan(spec, psca.gamma, "psca", psca.stats), m)


def test_psca_prices_the_uplink_and_cycles_as_the_system_does_on_an_int8_uplink_with_device_ranks():
    """P-SCA's convex surrogate writes a device's uplink Mbit and Gcycles as S0 - S1 gamma and
    W0 - W1 gamma. On an int8 uplink (8 bits a value up, 16 down, a scale a tensor) with devices of
    different ranks, both must be the system model's own S_k(gamma) and cycles at every rate: a
    slope priced at the downlink's bits would make dropout look four times cheaper to send. The
    plan it finds must still land within 2 % of B&B's global optimum on the same system."""
    from dataclasses import replace

    from fedlodrop.planning.psca import _Surrogate
    from fedlodrop.planning.spec import PayloadSpec

    spec = random_system(4, seed=1, payload=PayloadSpec(rank=8, bits_per_value=16, uplink_bits_per_value=8,
                                                        uplink_extra_bits=32 * 48))
    m = replace(system_model(spec), share=np.array([0.25, 0.5, 1.0, 1.0]))
    assert m.ub == 8 and m.bits == 16 and m.up_extra_bits > 0
    sur = _Surrogate(m)
    for g in np.random.default_rng(0).uniform(0, m.gamma_max, (5, m.K)):
        np.testing.assert_allclose((sur.S0 - sur.S1 * g) * 1e6, m.uplink_bits(g), rtol=1e-12)
        np.testing.assert_allclose((sur.W0 - sur.W1 * g) * 1e9, m.cycles(g), rtol=1e-12)
    bnb, psca = solve_bnb(m, eps_rel=1e-3), solve_psca(m)
    assert psca.stats.status == "converged"
    assert bnb.stats.lower_bound * (1 - 1e-9) <= psca.objective <= bnb.objective * 1.02


@pytest.mark.parametrize("start", ["feasible", "equal", (1.0, 1e-3)])
def test_psca_converges_from_feasible_and_infeasible_starts(start):
    m = system_model(random_system(5, seed=4))
    ref = solve_psca(m)
    res = solve_psca(m, start=start)
    assert res.stats.status == "converged" and res.stats.max_slack <= 1e-6
    assert res.objective == pytest.approx(ref.objective, rel=1e-3)


def test_every_method_returns_a_plan_that_meets_every_limit():
    spec = random_system(5, seed=6, latency_s=None)
    m = system_model(spec)
    best = optimize(spec, "bnb", tol=1e-3)
    recheck(best, m)
    for method in ("psca", "fixed", "equal-bandwidth"):
        try:
            plan = optimize(spec, method)
        except InfeasibleError as err:  # a baseline may not fit at all; then it must say why
            assert err.constraint in ("latency", "energy", "bandwidth")
            continue
        recheck(plan, m)
        assert plan.objective >= best.solver.lower_bound * (1 - 1e-9)


def test_baselines_do_what_they_say():
    spec = random_system(4, seed=2, latency_s=None)
    spec.round.latency_s *= 1.3  # loose enough for all baselines
    m = system_model(spec)
    fixed = optimize(spec, "fixed")
    gam = {d.gamma for d in fixed.devices}
    assert len(gam) == 1 and gam.pop() == pytest.approx(smallest_common_gamma(m), abs=1e-9)
    best = optimize(spec, "fixed", gamma="best")
    assert len({d.gamma for d in best.devices}) == 1 and best.objective <= fixed.objective + 1e-12
    eq = optimize(spec, "equal-bandwidth")
    assert all(d.bandwidth_hz == pytest.approx(m.B_tot / m.K) for d in eq.devices)
    recheck(eq, m)
    none = optimize(spec, "none")
    assert all(d.gamma == 0 for d in none.devices)
    recheck(none, m)
    with pytest.raises(InfeasibleError):
        optimize(spec, "fixed", gamma=0.95)  # above gamma_max


def test_weak_device_gets_the_higher_rate():
    dev = {"samples": 800, "energy_budget_j": 20.0}
    tree = {"devices": [{**dev, "channel_gain": 1e-10}, {**dev, "channel_gain": 2e-13}],
            "cell": {"bandwidth_hz": 2e6}, "round": {"latency_s": 6.0}}
    spec = system_from_dict(tree)
    plan = optimize(spec, "bnb")
    recheck(plan, system_model(spec))
    assert plan.devices[1].gamma > plan.devices[0].gamma
    assert plan.totals["bandwidth_binding"]


def test_rates_rise_as_latency_or_energy_tighten():
    m = system_model(random_system(4, seed=5))
    w = m.w
    t_lo = min_latency_limit(m, m.gamma_max)
    prev = None
    for t in (1.3 * m.T, 1.1 * m.T, m.T, 0.5 * (m.T + t_lo), 1.001 * t_lo):  # loose to tight
        mt = m.with_limits(latency_s=t)
        exact, local = solve_bnb(mt, eps_rel=1e-3), solve_psca(mt)
        if prev is not None:
            assert exact.objective >= prev[0].stats.lower_bound  # a tighter limit never helps
            assert float(w @ local.gamma) >= float(w @ prev[1].gamma) - 1e-4
        prev = (exact, local)
    assert float(w @ prev[1].gamma) > float(w @ solve_psca(m.with_limits(latency_s=1.3 * m.T)).gamma) + 0.05
    loose, tight = (solve_psca(m.with_limits(energy_scale=s)) for s in (2.0, 1.0))
    assert float(w @ tight.gamma) > float(w @ loose.gamma)
    assert tight.objective > loose.objective


def test_bnb_reports_an_honest_gap_when_stopped_early():
    """Stopped by its node budget, which stops it at the same point on any machine (a 1 ms time
    limit stopped it before the first box, or later on a faster one): the gap runs from the
    incumbent down to a lower bound that counts the open boxes. A time limit already passed
    stops it before the first box."""
    m = system_model(random_system(6, seed=1))
    res = solve_bnb(m, max_nodes=1)
    assert res.stats.status == "limit" and res.stats.nodes == 1 and res.stats.open_boxes > 0
    assert res.stats.lower_bound <= res.objective and res.stats.gap == pytest.approx(
        res.objective - res.stats.lower_bound)
    assert 0 < res.stats.gap < math.inf  # open boxes below the incumbent: not optimal, not unbounded
    timed = solve_bnb(m, time_limit=0.0)
    assert timed.stats.status == "limit" and timed.stats.nodes == 0
    assert timed.stats.lower_bound <= timed.objective
