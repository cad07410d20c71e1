"""Devices of different ranks on one backbone (`lora.ranks`): what each holds, trains and sends,
the mixed-rank rules' arithmetic (HetLoRA's zero-padding, FlexLoRA's SVD; FLoRA's exactness is in
test_fedex_exact.py), and the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import one_round, tiny_cfg
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.lora.adapter import AdapterLayout, ModuleShape
from fedlodrop.lora.aggregation import DeviceUpdate, make_rule
from fedlodrop.lora.masks import draw_masks
from fedlodrop.run.experiment import build

M = ModuleShape("m", n_out=6, n_in=5, r=3, scaling=2.0)
LAYOUT = AdapterLayout(modules=(M,), head=())


def _updates(ranks, seed=0, weights=None):
    """Devices of `ranks` that each started from the global factors seen through their rank and
    changed every value they hold."""
    g = torch.Generator().manual_seed(seed)
    prev = {M.key_a: torch.randn(M.r, M.n_in, generator=g), M.key_b: torch.randn(M.n_out, M.r, generator=g)}
    updates = []
    for k, rank in enumerate(ranks):
        trained = draw_masks(LAYOUT, 0.0, "bernoulli", 0, 0, k, rank=rank)
        mask = trained[M.name]
        start = {M.key_a: prev[M.key_a] * mask.a, M.key_b: prev[M.key_b] * mask.b}
        end = {key: v + torch.randn(v.shape, generator=g) * (mask.a if key == M.key_a else mask.b)
               for key, v in start.items()}
        updates.append(DeviceUpdate(start, end, trained, num_samples=10 * (k + 1)))
    w = torch.tensor(weights or [u.num_samples for u in updates], dtype=torch.float32)
    return prev, updates, w / w.sum()


def test_hetlora_zero_pads_what_a_device_lacks():
    prev, updates, w = _updates([1, 3, 2])
    new, _ = make_rule("hetlora").aggregate(LAYOUT, prev, updates, w)
    for j in range(M.r):  # component j: the weighted mean over all devices, zero from those without it
        held = [k for k, u in enumerate(updates) if bool(u.trained[M.name].ranks[j])]
        expected_b = sum(w[k] * updates[k].end[M.key_b][:, j] for k in held)
        expected_a = sum(w[k] * updates[k].end[M.key_a][j] for k in held)
        torch.testing.assert_close(new[M.key_b][:, j], expected_b)
        torch.testing.assert_close(new[M.key_a][j], expected_a)
    assert len([k for k, u in enumerate(updates) if bool(u.trained[M.name].ranks[2])]) == 1  # diluted by the others


def test_hetlora_sparsity_weights_each_module_by_the_norm_of_a_devices_product():
    """hetlora-sw: HetLoRA's zero-padding, but in each module device k weighs w_k ||s B_k A_k||_F
    (renormalised); computed here from the devices' factors by hand."""
    prev, updates, w = _updates([1, 3, 2], seed=3)
    updates[1].end[M.key_b] *= 0.1  # a device with a small product: it counts for little
    new, _ = make_rule("hetlora-sw").aggregate(LAYOUT, prev, updates, w)
    norms = torch.tensor([float((M.scaling * (u.end[M.key_b] * u.trained[M.name].ranks) @ u.end[M.key_a]).norm())
                          for u in updates])
    p = w * norms / (w * norms).sum()
    assert p[1] < 0.5 * w[1]
    for j in range(M.r):
        held = [k for k, u in enumerate(updates) if bool(u.trained[M.name].ranks[j])]
        torch.testing.assert_close(new[M.key_b][:, j], sum(p[k] * updates[k].end[M.key_b][:, j] for k in held))
        torch.testing.assert_close(new[M.key_a][j], sum(p[k] * updates[k].end[M.key_a][j] for k in held))


def test_hetlora_at_equal_ranks_is_fedavg_of_the_factors():
    prev, updates, w = _updates([None, None])
    het, _ = make_rule("hetlora").aggregate(LAYOUT, prev, updates, w)
    avg, _ = make_rule("fedit").aggregate(LAYOUT, prev, updates, w)
    for key in het:
        torch.testing.assert_close(het[key], avg[key])


def _best(dense: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense.double())
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


def test_flexlora_holds_the_best_approximation_of_the_mean_product_at_every_rank():
    prev, updates, w = _updates([1, 2, 3, 3], seed=1)
    rule = make_rule("flexlora")
    new, residuals = rule.aggregate(LAYOUT, prev, updates, w)
    assert residuals == {}
    mean = sum(wk * M.scaling * (u.end[M.key_b] * u.trained[M.name].ranks) @ u.end[M.key_a] for wk, u in zip(w, updates))
    assert torch.linalg.matrix_rank(mean) > M.r  # the mean of products has more rank than the model: truncation bites
    for rank in (1, 2, 3):  # a device of rank r_k holds the first r_k components: the best rank-r_k approximation
        held = M.scaling * new[M.key_b][:, :rank] @ new[M.key_a][:rank]
        torch.testing.assert_close(held, _best(mean, rank), rtol=1e-4, atol=1e-5)
        error = float((mean - _best(mean, rank)).norm() / mean.norm())
        assert rule.stats["truncation"][rank] == pytest.approx(error, rel=1e-4)
    assert 0 < rule.stats["truncation"][3] < rule.stats["truncation"][1]


def test_flexlora_restarts_components_the_mean_leaves_empty():
    """A round of one rank-1 device: the mean product has rank 1; the other components restart at
    the initial A with B = 0, so a later device of rank 3 can train them (both zero would never move)."""
    prev, updates, w = _updates([1], seed=2)
    initial = {M.key_a: torch.full((M.r, M.n_in), 0.5), M.key_b: torch.zeros(M.n_out, M.r)}
    new, _ = make_rule("flexlora", initial=initial).aggregate(LAYOUT, prev, updates, w)
    torch.testing.assert_close(new[M.key_a][1:], initial[M.key_a][1:])
    assert not new[M.key_b][:, 1:].any() and new[M.key_b][:, 0].abs().sum() > 0


@pytest.mark.parametrize("aggregation", ["masked", "hetlora", "flora", "flexlora"])
def test_a_device_sends_its_rank_and_the_meter_sees_it(tiny_bert, sst2_dir, aggregation):
    """Ranks 1, 2 and 4 of a rank-4 model: each device's upload is its r_k components of every
    module (and the head); FLoRA sends only the head down (devices rebuild the restarted adapter)."""
    exp = build(tiny_cfg(tiny_bert, sst2_dir, **{"federation.aggregation": aggregation, "lora.ranks": [1, 2, 4]}))
    _, record = one_round(exp)
    layout = exp.fm.layout
    head = 4 * layout.head_values
    for d, rank in zip(record.devices, (1, 2, 4)):
        assert d.uplink_bytes == 4 * sum(rank * (m.n_in + m.n_out) for m in layout.modules) + head
        assert d.kept_values == sum(rank * (m.n_in + m.n_out) for m in layout.modules)
        down = head if aggregation == "flora" else d.uplink_bytes
        assert d.downlink_bytes == down


@pytest.mark.parametrize("override,words", [
    (["lora.ranks=[2,4]"], ["lora.ranks lists 2 ranks for 3 devices"]),
    (["lora.ranks=[2,4,16]"], ["rank 16", "lora.r (8)"]),
    (["lora.ranks=[2,4,8]", "federation.aggregation=flexlora", "server.optimizer=adam"],
     ["server.optimizer adam", "flexlora"]),
])
def test_bad_ranks_are_one_line(tmp_path, override, words):
    out = tmp_path / "r"
    args = ["run", "--quiet", "--out", str(out)]
    for item in override:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


def test_a_rank_above_a_layers_width_is_one_line(tiny_bert, sst2_dir, tmp_path):
    out = tmp_path / "r"  # the tiny BERT's layers are 32 x 32
    result = CliRunner().invoke(app, ["run", "--quiet", "--out", str(out), "--set", "task=sst2",
                                      "--set", f"model={tiny_bert}", "--set", "data.source=glue_dir",
                                      "--set", f"data.glue_dir={sst2_dir}", "--set", "lora.r=40"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]  # after the run's own header line
    assert line.startswith("error:") and "lora.r 40 exceeds the width 32" in line, line
    assert not out.exists()


@pytest.mark.slow  # a 4-round run
def test_self_pruning_shrinks_a_devices_rank_and_what_it_sends(tiny_bert, sst2_dir, tmp_path):
    """HetLoRA's self-pruning with a strong tail regulariser: devices halve their rank once their
    tail shrank, never grow it again, and from then on send and train only what they hold."""
    from fedlodrop.run.engine import run
    from fedlodrop.run.folder import RunFolder

    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"federation.aggregation": "hetlora", "lora.self_prune": 0.5,
                                           "lora.prune_lambda": 10.0, "federation.rounds": 4,
                                           "federation.local_epochs": 3})
    run(cfg, tmp_path / "r", show_progress=False)
    rows = RunFolder(tmp_path / "r").records()
    layout = build(cfg).fm.layout
    per_device = list(zip(*[[d.rank for d in r.devices] for r in rows]))
    assert all(ranks[0] == 4 for ranks in per_device)
    assert all(a >= b for ranks in per_device for a, b in zip(ranks, ranks[1:]))  # never grows back
    assert any(ranks[-1] < 4 for ranks in per_device), per_device
    for r in rows:
        for d in r.devices:
            assert d.uplink_bytes == 4 * (sum(d.rank * (m.n_in + m.n_out) for m in layout.modules) + layout.head_values)


def test_self_pruning_refuses_privacy(tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["run", "--quiet", "--out", str(out), "--set", "lora.self_prune=0.5",
                                      "--set", "privacy.dp=true", "--set", "privacy.noise_multiplier=1.0",
                                      "--set", "federation.weighting=uniform"])
    assert result.exit_code == 2 and "lora.self_prune" in result.stderr, result.output
    assert "\n" not in result.stderr.strip() and not out.exists()


@pytest.mark.slow  # a run and a refusal through the CLI
def test_device_classes_come_from_the_system_file_and_the_clock_prices_them(tiny_bert, polarity_dir, tmp_path):
    """`fedlodrop system random --config` of a run with ranks 1/2/4 writes each device's class; a run
    given only that system trains those ranks, each priced for what it sends and computes; a run
    that says other ranks is refused in one line."""
    from fedlodrop.planning import load_system, system_model
    from fedlodrop.run.folder import RunFolder

    sets = [x for s in ("task=sst2", f"model={tiny_bert}", "data.source=glue_dir", f"data.glue_dir={polarity_dir}",
                        "train.max_length=32", "train.threads=1", "lora.r=4", "federation.rounds=1")
            for x in ("--set", s)]
    system = tmp_path / "sys.yaml"
    r = CliRunner().invoke(app, ["system", "random", "--devices", "3", "--out", str(system), *sets,
                                 "--set", "lora.ranks=[1,2,4]"])
    assert r.exit_code == 0, r.output
    spec = load_system(system)
    assert [d.rank for d in spec.devices] == [1, 2, 4] and spec.payload.rank == 4
    r = CliRunner().invoke(app, ["run", "--quiet", "--out", str(tmp_path / "r"), *sets, "--set", f"system={system}",
                                 "--set", "system.enforce=report"])  # priced, not dropped: the drawn limit is tight
    assert r.exit_code == 0, r.output
    run = RunFolder(tmp_path / "r")
    assert run.config().lora.ranks == [1, 2, 4]
    m = system_model(spec)
    for k, d in enumerate(run.records()[0].devices):
        assert d.rank == [1, 2, 4][k]
        # no plan: every device at its f_max; its cycles count only its rank's share of the adapter's
        assert d.samples == m.D[k] and d.system.compute_s == pytest.approx(float(m.cycles(0.0, k)) / m.fmax[k], rel=1e-9)
    ups = [d.uplink_bytes for d in run.records()[0].devices]
    assert ups[0] < ups[1] < ups[2]
    out = tmp_path / "other"
    r = CliRunner().invoke(app, ["run", "--quiet", "--out", str(out), *sets, "--set", f"system={system}",
                                 "--set", "lora.ranks=[4,4,4]"])
    assert r.exit_code == 2 and "prices ranks [1, 2, 4]" in r.stderr.strip().splitlines()[-1], r.output
    assert not out.exists()
