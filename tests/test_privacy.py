"""Client-level differential privacy (fedlodrop.privacy, docs/privacy.md): each device's update is
clipped, the Gaussian noise lands once (on the sum under central DP, on each update under local
DP) with the scale the accountant was told, epsilon is Opacus' and is reported, and bad settings
are refused with one line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import one_round, tiny_cfg
from typer.testing import CliRunner

from fedlodrop import privacy
from fedlodrop.cli import app
from fedlodrop.experiment import build
from fedlodrop.masks import device_masks
from fedlodrop.server import participants
from fedlodrop.variants import make_variant


def _dp(**over):
    return {"privacy.dp": True, "federation.weighting": "uniform", "federation.rounds": 1,
            "federation.aggregation": "fedit"} | over


def test_clipping_bounds_the_sent_update_and_keeps_its_direction():
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(4, 6, generator=g), "head.w": torch.randn(3, generator=g)}
    end = {k: v + torch.randn(v.shape, generator=g) for k, v in start.items()}
    sent = {"a": (torch.rand(4, 6, generator=g) > 0.5).float(), "head.w": torch.ones(3)}
    upd = {k: (end[k] - start[k]) * sent[k] for k in end}
    norm = float(torch.sqrt(sum(u.pow(2).sum() for u in upd.values())))

    clipped, seen = privacy.clip(start, end, sent, clip_norm=norm / 4)
    assert seen == pytest.approx(norm)
    new = {k: (clipped[k] - start[k]) * sent[k] for k in end}
    assert float(torch.sqrt(sum(u.pow(2).sum() for u in new.values()))) == pytest.approx(norm / 4, rel=1e-5)
    for k in end:  # the same direction, a quarter of the length; values not sent are untouched
        torch.testing.assert_close(new[k], upd[k] / 4)
        assert torch.equal(clipped[k][sent[k] == 0], end[k][sent[k] == 0])
    same, _ = privacy.clip(start, end, sent, clip_norm=norm * 2)  # inside the ball: unchanged
    assert all(torch.equal(same[k], end[k]) for k in end)


def _global_after_one_round(cfg):
    exp = build(cfg)
    server, record = one_round(exp)
    return exp, server.state.global_state, record


def _coverage(cfg, exp, rule_trains_a=True):
    """Per state key: how many of round 0's devices sent each value."""
    layout, variant = exp.fm.layout, make_variant(cfg.dropout.variant)
    sent = [privacy.sent_masks(layout, variant.trained(device_masks(cfg, layout, exp.rates[k], 0, k), layout),
                               rule_trains_a) for k in participants(cfg, 0)]
    return {key: sum(s[key] for s in sent) for key in sent[0]}


@pytest.mark.parametrize("rule", ["fedit", "masked"])
def test_central_noise_joins_the_sum_once_with_std_sigma_c(tiny_bert, sst2_dir, rule):
    """One round with sigma 0 and one with sigma 2, same seed: the models differ by the noise
    alone. FedIT divides the noised sum by the devices (3), the masked rule by each value's
    count; both are N(0, (sigma C)^2) once multiplied back, and exactly 0 where nobody trained."""
    sigma, c = 2.0, 0.05
    base = _dp(**{"federation.aggregation": rule, "dropout.rate": 0.6, "privacy.clip_norm": c})
    cfg0 = tiny_cfg(tiny_bert, sst2_dir, **base, **{"privacy.noise_multiplier": 0.0})
    cfg1 = tiny_cfg(tiny_bert, sst2_dir, **base, **{"privacy.noise_multiplier": sigma})
    exp, quiet, _ = _global_after_one_round(cfg0)
    _, noisy, record = _global_after_one_round(cfg1)
    count = _coverage(cfg1, exp)
    scaled, untouched = [], 0
    for key in quiet:
        diff = noisy[key] - quiet[key]
        per = count[key] if rule == "masked" else torch.full_like(count[key], 3.0)
        scaled.append((diff * per)[count[key] > 0])
        assert torch.equal(diff[count[key] == 0], torch.zeros_like(diff[count[key] == 0]))
        untouched += int((count[key] == 0).sum())
    z = torch.cat(scaled)
    assert untouched > 0 and z.numel() > 500  # std within 10%: over 4 standard errors
    assert float(z.std()) == pytest.approx(sigma * c, rel=0.1)
    assert abs(float(z.mean())) < 0.1 * sigma * c
    assert record.privacy.noise_multiplier == sigma and record.privacy.mode == "central"


def test_local_noise_is_each_devices_own(tiny_bert, sst2_dir):
    """Local DP: each device noises its own update, so the FedIT mean carries count_v noises of
    std sigma C divided by the 3 devices at every value v."""
    sigma, c = 2.0, 0.05
    base = _dp(**{"federation.aggregation": "fedit", "dropout.rate": 0.6, "privacy.clip_norm": c,
                  "privacy.mode": "local"})
    exp, quiet, _ = _global_after_one_round(tiny_cfg(tiny_bert, sst2_dir, **base, **{"privacy.noise_multiplier": 0.0}))
    cfg = tiny_cfg(tiny_bert, sst2_dir, **base, **{"privacy.noise_multiplier": sigma})
    _, noisy, _ = _global_after_one_round(cfg)
    count = _coverage(cfg, exp)
    z = torch.cat([((noisy[k] - quiet[k]) * 3 / count[k].clamp_min(1).sqrt())[count[k] > 0] for k in quiet])
    assert float(z.std()) == pytest.approx(sigma * c, rel=0.1)


def test_prv_is_tighter_than_rdp_for_the_same_target(tiny_bert, sst2_dir):
    over = _dp(**{"privacy.target_epsilon": 3.0, "federation.rounds": 6})
    rdp, prv = (privacy.mechanism(tiny_cfg(tiny_bert, sst2_dir, **over, **{"privacy.accountant": a}))
                for a in ("rdp", "prv"))
    assert prv.noise_multiplier < rdp.noise_multiplier


def test_target_epsilon_sets_sigma_and_the_spend_is_reported_per_round(tiny_bert, sst2_dir):
    cfg = tiny_cfg(tiny_bert, sst2_dir, **_dp(**{"privacy.target_epsilon": 3.0, "federation.rounds": 6,
                                                 "federation.devices": 4, "federation.devices_per_round": 2}))
    mech = privacy.mechanism(cfg)
    assert mech.delta == 1e-5 and mech.noise_multiplier > 0
    spent = [privacy.epsilon(mech, cfg, r) for r in range(7)]
    assert spent[0] == 0 and all(a < b for a, b in zip(spent, spent[1:]))
    assert 2.9 <= spent[-1] <= 3.0  # the smallest sigma that spends at most the target
    # sampling 2 of 4 devices amplifies: the same sigma with every device every round spends more
    everyone = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"devices_per_round": None})})
    assert privacy.epsilon(mech, everyone, 6) > spent[-1] * 1.3


def test_local_epsilon_counts_the_rounds_a_device_took_part_in(tiny_bert, sst2_dir):
    """Under local DP the server sees who sent: no amplification, and a device spends only in the
    rounds it was drawn for; the run reports its worst device."""
    over = _dp(**{"privacy.mode": "local", "privacy.noise_multiplier": 1.5, "federation.rounds": 6,
                  "federation.devices": 4})
    everyone = tiny_cfg(tiny_bert, sst2_dir, **over)
    sampled = tiny_cfg(tiny_bert, sst2_dir, **over, **{"federation.devices_per_round": 2})
    busiest = max(privacy.participations(sampled, 6))
    assert busiest < 6
    mech = privacy.mechanism(sampled)
    eps = privacy.epsilon(mech, sampled, 6)
    assert eps < privacy.epsilon(mech, everyone, 6)
    assert eps == privacy.epsilon(mech, everyone, busiest)  # the same as that many rounds with everyone


@pytest.mark.parametrize(
    "args,needle",
    [
        (["privacy.clip_norm=0"], "privacy.clip_norm"),
        (["privacy.clip_norm=-1"], "privacy.clip_norm"),
        (["privacy.target_epsilon=0"], "privacy.target_epsilon"),
        (["privacy.target_epsilon=-3"], "privacy.target_epsilon"),
        ([], "exactly one of privacy.noise_multiplier and privacy.target_epsilon"),
        (["privacy.target_epsilon=3", "privacy.noise_multiplier=1"], "exactly one of"),
        (["privacy.target_epsilon=3", "federation.weighting=samples"], "federation.weighting uniform"),
        (["privacy.target_epsilon=3", "federation.aggregation=fedex"], "cannot protect federation.aggregation 'fedex'"),
    ],
)
def test_bad_privacy_settings_one_line_exit_2_nothing_written(tiny_bert, sst2_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    base = {"task": "sst2", "model": tiny_bert, "data.source": "glue_dir", "data.glue_dir": sst2_dir,
            "privacy.dp": "true", "federation.weighting": "uniform", "federation.aggregation": "fedit"}
    sets = [f"{k}={v}" for k, v in base.items()] + args
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--quiet", *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not out.exists()


def test_epsilon_of_sigma_zero_is_infinite_and_of_no_round_zero(tiny_bert, sst2_dir):
    cfg = tiny_cfg(tiny_bert, sst2_dir, **_dp(**{"privacy.noise_multiplier": 0.0}))
    mech = privacy.mechanism(cfg)
    assert privacy.epsilon(mech, cfg, 0) == 0 and math.isinf(privacy.epsilon(mech, cfg, 1))


def test_under_central_dp_the_server_clips_what_a_device_sent_unclipped(tiny_bert, sst2_dir, monkeypatch):
    """The sensitivity is the server's promise: a device that skips its own clipping (a bug or a
    cheat) still moves the sum by at most C. With sigma 0 the FedIT change is the mean of the
    clipped updates, so its norm is at most C."""
    import fedlodrop.client as client

    c = 0.01
    monkeypatch.setattr(client.privacy, "privatize_device", lambda start, end, *a, **k: end)
    cfg = tiny_cfg(tiny_bert, sst2_dir, **_dp(**{"privacy.noise_multiplier": 0.0, "privacy.clip_norm": c}))
    exp = build(cfg)
    before = {k: v.clone() for k, v in exp.fm.get_state().items()}
    server, _ = one_round(exp)
    after = server.state.global_state
    change = float(torch.sqrt(sum((after[k] - before[k]).double().pow(2).sum() for k in after)))
    assert 0.5 * c < change <= c * (1 + 1e-5)
