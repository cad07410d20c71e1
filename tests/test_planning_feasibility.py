"""Per-device feasibility: the minimal bandwidth beta_k(gamma), the allocation, infeasibility reasons."""

import math

import numpy as np
import pytest

from fedlodrop.planning.feasibility import (
    InfeasibleError,
    allocate,
    bandwidth_for_rate,
    check_feasible,
    gamma_lower,
    min_bandwidth,
    min_bandwidth_bisect,
    smallest_common_gamma,
)
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.spec import system_from_dict
from fedlodrop.planning.system import system_model


def feasible_by_scan(m, k, gamma, B, n=20001):
    """Written apart from the library: scan the compute/upload split of T_max, take the least
    power that sends the bits in the upload time and the frequency that ends compute in time."""
    bits = (1 - gamma) * m.Q * m.bits + m.head * m.bits
    cycles = m.tau * m.D[k] * (m.c0 + (1 - gamma) * m.c1)
    tc = np.linspace(cycles / m.fmax[k], m.T, n)[:-1]
    tu = m.T - tc
    with np.errstate(over="ignore"):
        p = (m.N0 * B / m.h[k]) * (2.0 ** (bits / (B * tu)) - 1.0)
    energy = m.kappa * cycles**3 / tc**2 + p * tu
    return bool(np.any((p <= m.P[k]) & (energy <= m.E[k])))


@pytest.fixture(scope="module")
def m():
    return system_model(random_system(6, seed=11))


def test_bandwidth_for_rate_inverts_shannon():
    a = np.array([1e6, 5e7, 3e9, 1e7])
    R = np.array([1e5, 2e7, 1e6, 1e7 / math.log(2) * 0.999])
    B = bandwidth_for_rate(a, R)
    assert np.allclose(B * np.log2(1 + a / B), R, rtol=1e-10)
    assert np.isinf(bandwidth_for_rate(1e6, 1e6 / math.log(2) * 1.001))  # above the infinite-band limit


def test_beta_matches_bisection_and_an_independent_scan(m):
    ks = np.repeat(np.arange(m.K), 4)
    gs = np.tile([0.0, 0.3, 0.6, 0.9], m.K)
    beta = min_bandwidth(m, ks, gs)
    ref = min_bandwidth_bisect(m, ks, gs)
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(beta), finite)
    assert np.allclose(beta[finite], ref[finite], rtol=1e-9)
    for k, g, b in zip(ks[finite], gs[finite], beta[finite]):
        assert feasible_by_scan(m, k, g, b * (1 + 1e-3))
        assert not feasible_by_scan(m, k, g, b * (1 - 1e-3))


def test_beta_decreases_with_the_rate(m):
    g = np.linspace(0, m.gamma_max, 60)
    for k in range(m.K):
        b = min_bandwidth(m, k, g)
        b = b[np.isfinite(b)]
        assert np.all(np.diff(b) <= 1e-12 * b[:-1])


def test_allocation_at_beta_meets_both_limits(m):
    ks, g = np.arange(m.K), np.full(m.K, 0.5)
    beta = min_bandwidth(m, ks, g)
    alloc = allocate(m, ks, g, beta)
    assert alloc.feasible.all()
    lat, en = m.latency_energy(g, beta, alloc.power, alloc.frequency)
    assert np.all(lat <= m.T) and np.all(en <= m.E)
    assert np.all(alloc.power <= m.P) and np.all(alloc.frequency <= m.fmax)
    # with less band than beta the device fails
    assert not allocate(m, ks, g, beta * (1 - 1e-6)).feasible.any()


def test_gamma_lower_and_smallest_common(m):
    budget = np.full(m.K, m.B_tot / m.K)
    lo = gamma_lower(m, budget)
    ks = np.arange(m.K)
    ok = ~np.isnan(lo)
    assert np.all(min_bandwidth(m, ks[ok], lo[ok]) <= budget[ok])
    below = np.maximum(lo[ok] - 1e-6, 0)
    assert np.all((min_bandwidth(m, ks[ok], below) > budget[ok]) | (lo[ok] == 0))
    g = smallest_common_gamma(m)
    assert min_bandwidth(m, ks, np.full(m.K, g)).sum() <= m.B_tot
    if g > 0:
        assert min_bandwidth(m, ks, np.full(m.K, g - 1e-6)).sum() > m.B_tot


def one_device(**dev):
    base = {"samples": 500, "distance_m": 200.0, "fading": 1.0, "energy_budget_j": 5.0}
    return system_model(system_from_dict({"devices": [{**base, **dev}, base], "round": {"latency_s": 6.0}}))


def test_infeasible_by_latency_names_the_device():
    m = one_device(samples=50_000)  # far too much compute for T_max even at f_max
    with pytest.raises(InfeasibleError) as err:
        check_feasible(m)
    assert err.value.device == 0 and err.value.constraint == "latency"
    assert "device 0" in str(err.value) and "binding constraint: latency" in str(err.value)


def test_infeasible_by_energy_names_the_device():
    m = one_device(energy_budget_j=1e-4)
    with pytest.raises(InfeasibleError) as err:
        check_feasible(m)
    assert err.value.device == 0 and err.value.constraint == "energy"
    assert "energy_budget_j" in str(err.value)


def test_infeasible_band_is_the_bandwidth_constraint():
    tree = {"devices": [{"samples": 500, "distance_m": 480.0, "fading": 0.2, "energy_budget_j": 50.0}] * 4,
            "cell": {"bandwidth_hz": 1.5e6}, "round": {"latency_s": 6.0}}
    m = system_model(system_from_dict(tree))
    beta = min_bandwidth(m, np.arange(4), np.full(4, m.gamma_max))
    assert np.all(beta <= m.B_tot) and beta.sum() > m.B_tot  # each alone fits, together they do not
    with pytest.raises(InfeasibleError) as err:
        check_feasible(m)
    assert err.value.constraint == "bandwidth" and "binding constraint: bandwidth" in str(err.value)


def test_nearly_infeasible_system_still_fits_at_its_edge():
    m = system_model(random_system(4, seed=3))
    from fedlodrop.planning.feasibility import min_latency_limit

    t_min = min_latency_limit(m, m.gamma_max, rel_tol=1e-9)
    edge = m.with_limits(latency_s=t_min * (1 + 1e-6))
    check_feasible(edge)  # no error
    with pytest.raises(InfeasibleError):
        check_feasible(m.with_limits(latency_s=t_min * (1 - 1e-4)))


@pytest.mark.parametrize("limit", ["latency", "energy"])
def test_smallest_limit_is_the_edge_of_feasibility(limit):
    from fedlodrop.planning.feasibility import min_energy_scale, min_latency_limit, system_feasible

    m = system_model(random_system(4, seed=3))
    search, at = {"latency": (min_latency_limit, lambda x: m.with_limits(latency_s=x)),
                  "energy": (min_energy_scale, lambda x: m.with_limits(energy_scale=x))}[limit]
    loose = at(1e3 * (m.T if limit == "latency" else 1.0))  # the swept limit all but lifted
    for gamma in (m.gamma_max, smallest_common_gamma(loose) + 0.01):
        edge = search(m, gamma, rel_tol=1e-7)
        assert 0 < edge < math.inf
        assert system_feasible(at(edge), gamma) and not system_feasible(at(edge * (1 - 1e-5)), gamma)
    # energy: a scale past which nothing changes; latency: the energy at gamma = 0 never allows it
    stuck = m.with_limits(energy_scale=1e-6) if limit == "latency" else m.with_limits(latency_s=1e-3)
    assert search(stuck, 0.0) == math.inf


def test_the_feasibility_test_answers_as_the_whole_search():
    """`system_feasible` ends its search once the betas found so far fit the band; at the edge of
    feasibility and away from it, it must answer as the sum of the whole search's betas does."""
    from fedlodrop.planning.feasibility import min_latency_limit, system_feasible

    answers = set()
    for K, seed in ((3, 0), (8, 1)):
        m = system_model(random_system(K, seed=seed))
        rng = np.random.default_rng(seed)
        for _ in range(5):
            g = rng.uniform(0.0, m.gamma_max, size=K)
            edge = min_latency_limit(m, g, rel_tol=1e-9)
            for T in (edge * (1 - 1e-8), edge, edge * (1 + 1e-8), edge * rng.uniform(0.7, 1.5)):
                at = m.with_limits(latency_s=T)
                whole = bool(min_bandwidth(at, np.arange(K), g).sum() <= at.B_tot)
                assert system_feasible(at, g) == whole, (K, seed, T / edge)
                answers.add(whole)
    assert answers == {True, False}


# ------------------------------------------------------------------------------------------
# the downlink: its time is taken from T_max, before computing and uploading
# ------------------------------------------------------------------------------------------

N0_DL = 10 ** ((-174.0 - 30) / 10)  # W/Hz


def downlink_tree(latency_s=1.0, downlink=True):
    """Two devices with every SPEC 3 quantity given, so a test can recompute latencies by hand."""
    cell = {"bandwidth_hz": 10e6, "fading": "none"}
    if downlink:
        cell.update(downlink_bandwidth_hz=2e6, server_power_w=10.0)
    return {
        "devices": [
            {"samples": 1000, "channel_gain": 1e-10, "p_max_w": 0.2, "f_max_hz": 2e9, "energy_budget_j": 2.0},
            {"samples": 1500, "channel_gain": 3e-11, "p_max_w": 0.2, "f_max_hz": 3e9, "energy_budget_j": 2.0},
        ],
        "cell": cell,
        "round": {"latency_s": latency_s, "cycles_per_sample": 1e6, "adapter_cycles_per_sample": 1e5},
        "payload": {"model": None, "adapter_values": 400_000, "head_values": 100_000, "bits_per_value": 16,
                    "downlink_extra_values": 20_000},
    }


def hand_latencies(tree, plan):
    """T_dn + T_cmp + T_up of each device from SPEC 3's formulas and the plan's gamma, B, p, f."""
    out = []
    cell, rnd, pay = tree["cell"], tree["round"], tree["payload"]
    K = len(tree["devices"])
    for dev, d in zip(tree["devices"], plan.devices):
        h, b = dev["channel_gain"], pay["bits_per_value"]
        up_bits = ((1 - d.gamma) * pay["adapter_values"] + pay["head_values"]) * b
        t_dn = 0.0
        if "downlink_bandwidth_hz" in cell:
            bdn, ps = cell["downlink_bandwidth_hz"], cell["server_power_w"]
            dl_rate = bdn / K * math.log2(1 + ps * h / (N0_DL * bdn))
            t_dn = (up_bits + pay["downlink_extra_values"] * b) / dl_rate
        c = rnd["cycles_per_sample"] + (1 - d.gamma) * rnd["adapter_cycles_per_sample"]
        cycles = dev["samples"] * c
        t_up = up_bits / (d.bandwidth_hz * math.log2(1 + d.power_w * h / (N0_DL * d.bandwidth_hz)))
        out.append((t_dn, cycles / d.frequency_hz, t_up))
    return out


@pytest.mark.parametrize("method", ["bnb", "psca", "fixed", "equal-bandwidth"])
def test_plans_leave_room_for_the_downlink(method):
    from fedlodrop.planning import optimize

    tree = downlink_tree()
    plan = optimize(system_from_dict(tree), method)
    T = tree["round"]["latency_s"]
    for d, (t_dn, t_cmp, t_up) in zip(plan.devices, hand_latencies(tree, plan)):
        assert t_dn > 0.1 * T  # a downlink that matters
        assert d.downlink_s == pytest.approx(t_dn, rel=1e-9)
        assert t_dn + t_cmp + t_up <= T * (1 + 1e-12)
        assert d.latency_s == pytest.approx(t_dn + t_cmp + t_up, rel=1e-9)
    # the rates are forced up by the latency limit: some device uses the whole round
    assert max(sum(parts) for parts in hand_latencies(tree, plan)) == pytest.approx(T, rel=1e-6)


def test_a_system_that_fits_only_without_the_downlink_is_infeasible():
    from fedlodrop.planning.feasibility import min_latency_limit

    without = system_model(system_from_dict(downlink_tree(downlink=False)))
    t_dn = system_model(system_from_dict(downlink_tree())).downlink_time(without.gamma_max, np.arange(2))
    # by hand: the shortest downlink is that of (1 - gamma_max) Q + head + extra values at the
    # better channel's rate; T_max lies between the tightest limit without it and that plus it
    by_hand = (0.1 * 400_000 + 100_000 + 20_000) * 16 / (1e6 * math.log2(1 + 10.0 * 1e-10 / (N0_DL * 2e6)))
    assert t_dn.min() == pytest.approx(by_hand, rel=1e-12)
    T = min_latency_limit(without, without.gamma_max) + 0.5 * by_hand
    check_feasible(system_model(system_from_dict(downlink_tree(T, downlink=False))))
    with pytest.raises(InfeasibleError) as err:
        check_feasible(system_model(system_from_dict(downlink_tree(T))))
    assert err.value.constraint == "latency" and "downlink" in str(err.value)
