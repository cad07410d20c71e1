"""SPEC 3: the system file, payload sizes from model configs, and the latency/energy formulas."""

import json
import math

import numpy as np
import pytest
import yaml

from fedlodrop.errors import UserError
from fedlodrop.planning import round_costs
from fedlodrop.planning.arch import resolve_arch
from fedlodrop.planning.feasibility import allocate, min_bandwidth, min_latency_limit
from fedlodrop.planning.scenarios import random_system
from fedlodrop.planning.spec import dump_system, load_system, system_from_dict
from fedlodrop.planning.system import system_model


def small_tree(**round_kw):
    return {
        "devices": [
            {"samples": 500, "distance_m": 100.0, "energy_budget_j": 5.0},
            {"samples": 800, "channel_gain": 1e-12, "energy_budget_j": 3.0, "p_max_w": 0.1, "f_max_hz": 1.5e9},
        ],
        "round": {"latency_s": 10.0, **round_kw},
    }


def test_payload_sizes_from_the_builtin_table():
    # SPEC's numbers: RoBERTa-large, r = 4 on query/value: Q = 393,216; head about 1.05 M
    arch = resolve_arch("roberta-large")
    assert arch.adapter_values(4, ["query", "value"]) == 393_216
    assert arch.head_values(2) == 1024 * 1024 + 1024 + 1024 * 2 + 2
    assert resolve_arch("MiniLM-L6").adapter_values(4, ["query", "value"]) == 6 * 2 * 4 * (384 + 384)
    assert resolve_arch("bert-base").head_values(3) == 768 * 3 + 3
    assert resolve_arch("llama-7b").adapter_values(8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * (4096 + 4096)


def test_payload_from_a_local_config_json(tmp_path):
    cfg = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
           "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tree = small_tree()
    tree["payload"] = {"model": str(tmp_path), "rank": 2, "target_modules": ["query", "value"], "num_labels": 2}
    m = system_model(system_from_dict(tree))
    assert m.Q == 2 * 2 * 2 * (64 + 64) and m.head == 64 * 2 + 2


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"round": {"latency_s": -1}}, "round.latency_s"),
        ({"round": {"latency_s": 5, "gamma_max": 1.0}}, "round.gamma_max"),
        ({"cell": {"bandwith_hz": 1e6}}, "cell.bandwith_hz"),
        ({"payload": {"model": "gpt-17"}}, "gpt-17"),
        ({"payload": {"model": "roberta-base", "target_modules": ["q_proj"]}}, "q_proj"),
        ({"bound": {"delta": 2}}, "bound.delta"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(patch, needle):
    tree = small_tree()
    for key, val in patch.items():
        tree[key] = {**tree.get(key, {}), **val}
    with pytest.raises(UserError) as err:
        system_from_dict(tree, "s.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_needs_a_channel_and_a_budget():
    tree = small_tree()
    del tree["devices"][0]["distance_m"]
    with pytest.raises(UserError, match="devices.0"):
        system_from_dict(tree)
    tree = small_tree()
    del tree["devices"][1]["energy_budget_j"]
    with pytest.raises(UserError, match="devices.1.energy_budget_j"):
        system_from_dict(tree)


def test_yaml_round_trip_and_missing_file(tmp_path):
    spec = random_system(4, seed=5)
    path = tmp_path / "s.yaml"
    path.write_text(dump_system(spec))
    again = load_system(path)
    assert again == spec
    assert np.array_equal(system_model(again).h, system_model(spec).h)  # fading reproducible from cell.seed
    with pytest.raises(UserError, match="cannot read"):
        load_system(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("devices: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_system(tmp_path / "bad.yaml")


def _plan_tree():
    from fedlodrop.planning import optimize

    return json.loads(optimize(random_system(2, seed=1), "fixed").to_json())


@pytest.mark.parametrize(
    "write, needles",
    [
        (None, ["cannot read", "plan.json"]),
        (lambda p: p.write_text("{not json"), ["plan.json", "not valid JSON"]),
        (lambda p: p.write_text("[1, 2]"), ["plan.json"]),
        (lambda p: p.write_text(json.dumps({**_plan_tree(), "method": 3})), ["plan.json", "method"]),
        (lambda p: p.write_text(json.dumps(_edit(_plan_tree(), "devices", 1, "gamma", 1.5))),
         ["plan.json", "devices.1.gamma"]),
        (lambda p: p.write_text(json.dumps(_edit(_plan_tree(), "system", "round", "latency_s", -1))),
         ["plan.json", "system.round.latency_s"]),
    ],
)
def test_bad_plan_file_is_one_line_user_error_naming_file_and_key(tmp_path, write, needles):
    from fedlodrop.planning import load_plan

    path = tmp_path / "plan.json"
    if write:
        write(path)
    with pytest.raises(UserError) as err:
        load_plan(path)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_plan_file_round_trip(tmp_path):
    from fedlodrop.planning import load_plan

    tree = _plan_tree()
    (tmp_path / "plan.json").write_text(json.dumps(tree))
    plan = load_plan(tmp_path / "plan.json")
    assert json.loads(plan.to_json()) == tree


def _edit(tree, *keys_and_value):
    *keys, last, value = keys_and_value
    node = tree
    for key in keys:
        node = node[key]
    node[last] = value
    return tree


def test_channel_gain_is_path_loss_times_seeded_fading():
    tree = small_tree()
    tree["cell"] = {"seed": 3}
    m = system_model(system_from_dict(tree))
    fade = max(np.random.default_rng(3).exponential(1.0, size=2)[0], 0.1)
    pl_db = 128.1 + 37.6 * math.log10(0.1)
    assert m.h[0] == pytest.approx(10 ** (-pl_db / 10) * fade, rel=1e-12)
    assert m.h[1] == 1e-12  # given directly
    assert m.N0 == pytest.approx(10 ** (-17.4) * 1e-3, rel=1e-12)


def test_latency_and_energy_follow_spec_formulas():
    m = system_model(system_from_dict(small_tree()))
    g, B, p, f = 0.3, 1e6, 0.15, 1.2e9
    lat, en = m.latency_energy(np.array([g, g]), np.array([B, B]), np.array([p, p]), np.array([f, f]))
    for k in range(2):
        bits = (1 - g) * m.Q * m.bits + m.head * m.bits
        rate = B * math.log2(1 + p * m.h[k] / (m.N0 * B))
        cycles = m.tau * m.D[k] * (m.c0 + (1 - g) * m.c1)
        assert lat[k] == pytest.approx(cycles / f + bits / rate, rel=1e-12)
        assert en[k] == pytest.approx(m.kappa * cycles * f**2 + p * bits / rate, rel=1e-12)


def test_cycles_come_from_flops_per_sample():
    m = system_model(system_from_dict(small_tree(tokens_per_sample=50, flops_per_cycle=1000)))
    assert m.c0 == pytest.approx(6 * (355.4e6 * 50 + m.head) / 1000)
    assert m.c1 == pytest.approx(6 * 393_216 * 50 / 1000)


def test_downlink_time_counts_when_modelled():
    tree = small_tree()
    tree["cell"] = {"downlink_bandwidth_hz": 20e6, "server_power_w": 5.0}
    m = system_model(system_from_dict(tree))
    snr = 5.0 * m.h / (m.N0 * 20e6)
    rate = 20e6 / 2 * np.log2(1 + snr)
    assert np.allclose(m.downlink_time(0.5, np.arange(2)), m.downlink_bits(0.5, np.arange(2)) / rate)


def test_random_system_is_reproducible_feasible_and_binding():
    a, b = random_system(10, seed=7), random_system(10, seed=7)
    assert a == b and a != random_system(10, seed=8)
    m = system_model(a)
    assert m.N == 6000  # exactly the samples asked for (largest remainder), not 5999 or 6001
    assert [int(m.N) for m in map(system_model, (random_system(7, seed=s, samples_total=300) for s in range(20)))] == [300] * 20
    g_max = np.full(m.K, m.gamma_max)
    assert min_bandwidth(m, np.arange(m.K), g_max).sum() <= m.B_tot  # feasible at the easiest corner
    # T_max sits strictly between the tightest feasible limit and the one where gamma = 0 fits,
    # so the weakest devices are held back by latency or energy
    assert min_latency_limit(m, m.gamma_max) < m.T < min_latency_limit(m, 0.0)
    # communication is a significant share of the round for a typical device
    beta = min_bandwidth(m, np.arange(m.K), g_max)
    alloc = allocate(m, np.arange(m.K), g_max, beta * m.B_tot / beta.sum())
    assert np.median(alloc.t_upload / m.T) > 0.2


def test_round_costs_price_the_measured_bits():
    spec = system_from_dict(small_tree())
    m = system_model(spec)
    devices = [{"gamma": 0.2, "bandwidth_hz": 2e6, "power_w": 0.1, "frequency_hz": 1e9}] * 2
    bits = [3e6, 5e6]
    costs = round_costs(spec, devices, bits)
    for k, (lat, en) in enumerate(costs):
        rate = 2e6 * math.log2(1 + 0.1 * m.h[k] / (m.N0 * 2e6))
        cycles = m.tau * m.D[k] * (m.c0 + 0.8 * m.c1)
        assert lat == pytest.approx(cycles / 1e9 + bits[k] / rate, rel=1e-12)
        assert en == pytest.approx(m.kappa * cycles * 1e18 + 0.1 * bits[k] / rate, rel=1e-12)
    # the plan's system as a plain dict works as well
    assert round_costs(yaml.safe_load(dump_system(spec)), devices, bits) == costs
    with pytest.raises(ValueError):
        round_costs(spec, devices[:1], bits)
