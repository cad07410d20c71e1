"""End to end on a tiny BERT and a tiny GLUE-layout folder: run folder, bytes, determinism."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlodrop.cli import app
from fedlodrop.round.client import train_local
from fedlodrop.data import make_loader
from fedlodrop.run.engine import run
from fedlodrop.run.experiment import build as prepare
from fedlodrop.lora.masks import draw_masks
from fedlodrop.lora.variants import VARIANTS

from conftest import read_metrics, read_summary, tiny_cfg


def test_run_folder_is_complete(tiny_bert, sst2_dir, tmp_path):
    summary = run(tiny_cfg(tiny_bert, sst2_dir), tmp_path / "run", show_progress=False)
    folder = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors", "base_delta.safetensors"):
        assert (folder / name).is_file(), name
    rows = read_metrics(folder)
    assert [r.round for r in rows] == [1, 2]
    for r in rows:
        assert set(r.to_json()) >= {"round", "train_loss", "train", "eval", "uplink_bytes", "downlink_bytes", "wall_s"}
        assert "accuracy" in r.eval and "accuracy" in r.train and math.isfinite(r.train_loss)
        assert r.uplink_bytes > 0 and r.wall_s > 0 and r.timing.checkpoint_s is not None
    saved = read_summary(folder)
    assert saved == summary
    assert set(json.loads((folder / "summary.json").read_text())) >= {
        "task", "rounds", "final", "best", "uplink_bytes_total", "downlink_bytes_total", "wall_s"}
    assert saved.final == rows[-1].eval
    assert saved.best["accuracy"] == max(r.eval["accuracy"] for r in rows)
    assert saved.uplink_bytes_total == sum(r.uplink_bytes for r in rows)
    adapter = load_file(str(folder / "adapter.safetensors"))
    assert any(k.endswith(".lora_A") for k in adapter) and any(k.startswith("head.") for k in adapter)


@pytest.mark.precision
def test_same_seed_same_result_and_other_seed_differs(tiny_bert, sst2_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": 0.3})
    run(cfg, tmp_path / "a", show_progress=False)
    run(cfg, tmp_path / "b", show_progress=False)
    other = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": 0.3, "seed": 4})
    run(other, tmp_path / "c", show_progress=False)
    from fedlodrop.run.folder import compare

    assert compare(tmp_path / "a", tmp_path / "b") == (0.0, [])  # model bit for bit, metrics but time
    worst, problems = compare(tmp_path / "a", tmp_path / "c")
    assert worst > 0 and any("adapter.safetensors" in p for p in problems), problems
    assert "metrics.jsonl differ beyond time" in problems


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_bytes_are_what_travels_for_each_variant(tiny_bert, sst2_dir, tmp_path, variant):
    gamma = 0.5
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": gamma, "dropout.sampler": "exact",
                                          "dropout.variant": variant, "federation.aggregation": "masked"})
    run(cfg, tmp_path / "r", show_progress=False)
    summary = read_summary(tmp_path / "r")
    q, head = summary.adapter_values, summary.head_values
    exp = prepare(cfg)
    layout = exp.fm.layout
    # exact sampler: each module keeps n - floor(gamma n) columns of A and rows of B
    kept = sum(m.r * (m.n_in - math.floor(gamma * m.n_in) + m.n_out - math.floor(gamma * m.n_out))
               for m in layout.modules)
    assert q == layout.adapter_values and kept == (1 - gamma) * q
    sub = 4 * ((1 - gamma) * q + head)  # the kept slices and the head, float32
    full = 4 * (q + head)
    up, down = {"subadapter": (sub, sub), "update": (sub, full), "reset": (full, sub)}[variant]
    for r in read_metrics(tmp_path / "r"):
        for d in r.devices:
            assert (d.uplink_bytes, d.downlink_bytes) == (up, down)  # masked: no fold travels


def test_fedex_folds_travel_down_the_next_round_in_the_comm_dtype(tiny_bert, sst2_dir, tmp_path):
    gamma = 0.3
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": gamma, "federation.comm_dtype": "float16",
                                          "federation.rounds": 3})
    run(cfg, tmp_path / "r", show_progress=False)
    summary = read_summary(tmp_path / "r")
    q, head = summary.adapter_values, summary.head_values
    rows = read_metrics(tmp_path / "r")
    ups = [d.uplink_bytes for r in rows for d in r.devices]
    assert abs(sum(ups) / len(ups) - 2 * ((1 - gamma) * q + head)) < 0.05 * 2 * q
    # update variant, fp16: the devices start from the fp16 global adapter, so the fold is
    # s (B A - B16 A16 + sum_k w_k B_k A_k - B' A'): rank (K + 3) r, factored while smaller
    k, r, n = 3, 4, 32
    fold = 4 * 2 * min(n * n, (k + 3) * r * (n + n))  # 4 modules of 32 x 32, 2 bytes a value
    for i, row in enumerate(rows):
        assert row.fold_bytes == fold
        for d in row.devices:
            assert d.uplink_bytes == 2 * (d.kept_values + head)
            assert d.downlink_bytes == 2 * (q + head) + (fold if i > 0 else 0)


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_what_each_variant_trains(tiny_bert, sst2_dir, variant):
    from fedlodrop.lora.variants import make_variant

    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": 0.5, "dropout.variant": variant})
    exp = prepare(cfg)
    layout = exp.fm.layout
    masks = draw_masks(layout, 0.5, "bernoulli", seed=0, round_=0, device=0)
    v = make_variant(variant)
    glob = exp.fm.get_state()
    for m in layout.modules:  # make B nonzero so A gets gradients too
        glob[m.key_b] = torch.randn_like(glob[m.key_b]) * 0.1
    start = {k: t.clone() for k, t in glob.items()}
    view = v.view(masks, layout)
    if view is not None:
        from fedlodrop.lora.masks import apply_masks
        start = apply_masks(glob, layout, view)
    loader = make_loader(exp.shards[0], exp.fm.tokenizer, 8, True, 0)
    trained = v.trained(masks, layout)
    result = train_local(exp.fm, start, trained, loader, cfg.train, 1.0, lambda f: 1e-2)
    m = layout.modules[0]
    drop_a, drop_b = ~masks[m.name].a_cols, ~masks[m.name].b_rows
    end_a, end_b = result.state[m.key_a], result.state[m.key_b]
    assert not torch.equal(end_a[:, ~drop_a], start[m.key_a][:, ~drop_a])  # kept slices trained
    if variant == "subadapter":  # absent: zero and untouched
        assert (end_a[:, drop_a] == 0).all() and (end_b[drop_b, :] == 0).all()
    elif variant == "update":  # present as the global model, untouched
        assert torch.equal(end_a[:, drop_a], glob[m.key_a][:, drop_a]) and (end_a[:, drop_a] != 0).any()
        assert torch.equal(end_b[drop_b, :], glob[m.key_b][drop_b, :])
    else:  # reset: zeroed, then trained like the rest
        assert (end_a[:, drop_a] != 0).any() and (end_b[drop_b, :] != 0).any()


def test_ffa_keeps_a_frozen_and_sends_no_a(tiny_bert, sst2_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"federation.aggregation": "ffa"})
    exp = prepare(cfg)
    a0 = {k: v for k, v in exp.fm.get_state().items() if k.endswith("lora_A")}
    run(cfg, tmp_path / "r", show_progress=False)
    final = load_file(str(tmp_path / "r" / "adapter.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in a0.items())
    summary = read_summary(tmp_path / "r")
    b_values = sum(m.n_out * m.r for m in exp.fm.layout.modules)
    row = read_metrics(tmp_path / "r")[0]
    assert row.devices[0].uplink_bytes == 4 * (b_values + summary.head_values)


def test_centralised_baseline_one_device(tiny_bert, sst2_dir, tmp_path):
    summary = run(tiny_cfg(tiny_bert, sst2_dir, **{"federation.devices": 1}), tmp_path / "r", show_progress=False)
    assert summary.devices == 1 and summary.rounds == 2


def test_decoder_model_runs(tiny_gpt2, sst2_dir, tmp_path):
    summary = run(tiny_cfg(tiny_gpt2, sst2_dir, **{"federation.rounds": 1}), tmp_path / "r", show_progress=False)
    assert 0.0 <= summary.final["accuracy"] <= 1.0


@pytest.mark.xdist_group("mini2-runs")
@pytest.mark.slow  # trains the 2-layer MiniLM (shared with test_learning)
def test_each_round_scores_the_global_model(mini2, polarity_dir, trained):
    """The logged eval loss is the saved global model's (not, say, the last device's adapter):
    re-scoring the run folder gives the same loss, on a model that learned something."""
    from conftest import learning_cfg

    cfg = learning_cfg(mini2, polarity_dir, **{"dropout.rate": 0.3, "dropout.variant": "update",
                                               "federation.aggregation": "fedex", "federation.rounds": 5})
    folder = trained(cfg)  # the run test_learning's update/fedex case checks learns
    last = read_metrics(folder)[-1]
    result = CliRunner().invoke(app, ["evaluate", str(folder)])
    assert result.exit_code == 0, result.output
    rescored = json.loads(result.stdout)
    assert last.eval_loss < 0.6  # it learned: a wrong model would score differently
    assert rescored["eval_loss"] == pytest.approx(last.eval_loss, abs=1e-6)
    assert rescored["eval"] == pytest.approx(last.eval)


def test_learning_rate_spans_the_federation(tiny_bert, sst2_dir, tmp_path):
    """Warm-up over the first half of the whole federation, then linear decay to 0: each device's
    first and last step of every round sit where the schedule says, not restarted each round."""
    rounds, base = 4, 1e-2
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"federation.rounds": rounds, "train.lr": base,
                                          "train.warmup_ratio": 0.5, "train.batch_size": 16})
    run(cfg, tmp_path / "r", show_progress=False)

    def lr(p):
        return base * p / 0.5 if p < 0.5 else base * (1 - p) / 0.5

    for i, row in enumerate(read_metrics(tmp_path / "r")):
        for d in row.devices:
            assert d.steps == 2  # 32 examples per device, batch 16
            first, last = d.lr
            assert first == pytest.approx(lr(i / rounds)) and last == pytest.approx(lr((i + 0.5) / rounds))
    assert [r.devices[0].lr[0] for r in read_metrics(tmp_path / "r")] == pytest.approx(
        [0.0, 0.005, 0.01, 0.005])


def test_devices_are_weighted_by_their_sample_counts(tiny_bert, tmp_path):
    """Unequal Dirichlet shards: the head moves by the samples-weighted mean of the changes."""
    from conftest import write_sst2

    from conftest import one_round

    from fedlodrop.round.server import Server

    glue = write_sst2(tmp_path / "glue", n_train=96)
    cfg = tiny_cfg(tiny_bert, glue, **{"federation.rounds": 1, "federation.partition": "dirichlet",
                                       "federation.dirichlet_alpha": 0.3})
    exp = prepare(cfg)
    seen = {}
    finish = Server.finish

    def spy(self, tasks, replies, summed=None):
        seen["replies"] = replies
        return finish(self, tasks, replies, summed)

    Server.finish = spy
    try:
        before = {k: v.clone() for k, v in exp.fm.get_state().items()}
        server, _ = one_round(exp)
    finally:
        Server.finish = finish
    sizes = [len(s) for s in exp.shards]
    assert max(sizes) - min(sizes) >= 10, sizes
    replies = sorted(seen["replies"], key=lambda r: r.device)
    assert [r.num_samples for r in replies] == sizes
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    key = exp.fm.layout.head_keys[0]
    expected = before[key] + sum(float(wk) * (r.upload[key] - before[key]) for wk, r in zip(w, replies))
    assert torch.allclose(server.state.global_state[key], expected, atol=1e-6)
    uniform = before[key] + sum((r.upload[key] - before[key]) / 3 for r in replies)
    assert not torch.allclose(server.state.global_state[key], uniform, atol=1e-6)


@pytest.mark.xdist_group("mini2-runs")
@pytest.mark.slow  # trains the 2-layer MiniLM (shared with test_learning)
def test_test_time_ensemble(mini2, polarity_dir, trained):
    """dropout.test_ensemble N: the mean of N sub-adapter models. Without dropout every member is the
    full model (same scores as N = 0); with dropout the members differ and the mean is what is scored."""
    from conftest import learning_cfg

    from fedlodrop.round.client import predict_outputs
    from conftest import load_global

    from fedlodrop.run.evaluation import evaluate
    from fedlodrop.lora.masks import apply_masks, draw_masks

    cfg = learning_cfg(mini2, polarity_dir, **{"dropout.rate": 0.3, "dropout.variant": "update",
                                               "federation.aggregation": "masked", "federation.rounds": 5})
    exp, adapter = load_global(trained(cfg))  # the run test_learning's update/masked case checks learns
    full = evaluate(exp, exp.eval_set, adapter)
    exp.rates = [0.0] * 3
    exp.cfg = exp.cfg.model_copy(update={"dropout": exp.cfg.dropout.model_copy(update={"test_ensemble": 3})})
    same = evaluate(exp, exp.eval_set, adapter)
    assert full[0]["accuracy"] > 0.7 and same[0] == full[0] and same[1] == pytest.approx(full[1], rel=1e-5)
    exp.rates = [0.5] * 3
    ensemble = evaluate(exp, exp.eval_set, adapter, round_=1)
    # by hand: three masked models, mean probabilities
    loader = make_loader(exp.eval_set, exp.fm.tokenizer, exp.cfg.train.batch_size * 2, False, 0, sort_by_length=True)
    probs = []
    for i in range(3):
        masks = draw_masks(exp.fm.layout, 0.5, "bernoulli", exp.cfg.seed, 1, i, stream="test-mask")
        exp.fm.set_view(masks)
        exp.fm.set_state(apply_masks(adapter, exp.fm.layout, masks))
        out, labels, _ = predict_outputs(exp.fm, loader, probabilities=True)
        probs.append(out)
    assert not all((p.argmax(-1) == probs[0].argmax(-1)).all() for p in probs[1:]) or not all(
        abs(p - probs[0]).max() < 1e-6 for p in probs[1:])
    mean = sum(probs) / 3
    assert ensemble[0]["accuracy"] == pytest.approx(float((mean.argmax(-1) == labels).mean()))
    nll = -np.log(mean[np.arange(len(labels)), labels.astype(int)]).mean()
    assert ensemble[1] == pytest.approx(float(nll), rel=1e-6)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "federation.devices=0"], "federation.devices"),
        (["--set", "federation.aggregation=fedavg"], "fedavg"),
        (["--set", "no_such_key=1"], "no_such_key"),
        (["--set", "task=nope"], "nope"),
        (["--set", "dropout.rate=1.2"], "1.2"),
        (["--set", "dropout.rate=[0.1,0.2]"], "2 rates"),
        (["--set", "data.glue_dir=/no/such/dir"], "/no/such/dir"),
        (["--set", "model=/no/such/model"], "/no/such/model"),
        (["--set", "model=someone/no-such-model"], "offline"),
    ],
)
def test_bad_input_one_line_exit_2_no_folder(tiny_bert, sst2_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    base = ["run", "--out", str(out), "--quiet", "--set", "task=sst2", "--set", f"model={tiny_bert}",
            "--set", "data.source=glue_dir", "--set", f"data.glue_dir={sst2_dir}"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(needle in line for line in lines) and any(line.startswith("error:") for line in lines)
    assert not any("Traceback" in line for line in lines)
    assert not out.exists()


@pytest.mark.precision
def test_device_order_does_not_change_the_round(tiny_bert, sst2_dir):
    from conftest import one_round

    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": 0.4})
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        exp = prepare(cfg)
        server, record = one_round(exp, order=order)
        results.append((server.state.global_state, record))
    (a, ra), (b, rb) = results
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [d.train_loss for d in ra.devices] == [d.train_loss for d in rb.devices]


def test_per_device_rates_set_each_devices_upload(tiny_bert, sst2_dir, tmp_path):
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"dropout.rate": [0.0, 0.5, 0.9], "dropout.sampler": "exact",
                                          "federation.rounds": 1})
    summary = run(cfg, tmp_path / "r", show_progress=False)
    q, head = summary.adapter_values, summary.head_values
    devices = read_metrics(tmp_path / "r")[0].devices
    assert [d.rate for d in devices] == [0.0, 0.5, 0.9]
    assert devices[0].uplink_bytes == 4 * (q + head)
    assert devices[1].uplink_bytes == 4 * (q // 2 + head)
    assert devices[0].uplink_bytes > devices[1].uplink_bytes > devices[2].uplink_bytes


def test_head_learning_rate_scale(tiny_bert, sst2_dir):
    """Adam's first step moves every parameter with a gradient by exactly its learning rate: the
    head by head_lr_scale x lr, the adapter by lr."""
    cfg = tiny_cfg(tiny_bert, sst2_dir, **{"train.head_lr_scale": 10.0})
    exp = prepare(cfg)
    start = exp.fm.get_state()
    for m in exp.fm.layout.modules:  # B != 0 so that A has gradients too
        start[m.key_b] = torch.randn_like(start[m.key_b]) * 0.1
    loader = make_loader(exp.shards[0], exp.fm.tokenizer, 32, True, 0)
    lr = 1e-3
    cfg_train = cfg.train.model_copy(update={"max_grad_norm": None})
    end = train_local(exp.fm, start, None, loader, cfg_train, 1 / len(loader), lambda f: lr).state
    head = torch.cat([(end[k] - start[k]).flatten() for k in exp.fm.layout.head_keys]).abs()
    lora = torch.cat([(end[m.key_b] - start[m.key_b]).flatten() for m in exp.fm.layout.modules]).abs()
    # |step| = lr |g| / (|g| + eps): lr itself wherever the gradient is not tiny
    assert head.max() == pytest.approx(10 * lr, rel=1e-3) and lora.max() == pytest.approx(lr, rel=1e-3)


def test_summary_best_is_one_rounds_whole_metrics():
    """MRPC scores f1 and accuracy: `best` is the best round by f1 (the main metric), both of its
    numbers, never a mix of maxima from different rounds."""
    from fedlodrop.run.settings import load_config
    from fedlodrop.data import TASKS
    from fedlodrop.round.records import DeviceRecord, RoundRecord, summarize

    cfg = load_config(None, ["task=mrpc", "data.glue_dir=x"])
    device = DeviceRecord(0, 0.0, 1, samples=8, train_loss=0.5, uplink_bytes=1)
    rows = [RoundRecord(i + 1, [0], [device], eval=e, train={"f1": 0.9, "accuracy": 0.9}, wall_s=1.0)
            for i, e in enumerate([{"f1": 0.80, "accuracy": 0.70}, {"f1": 0.79, "accuracy": 0.75},
                                   {"f1": 0.78, "accuracy": 0.72}])]
    summary = summarize(cfg, TASKS["mrpc"].main_metric, [0.0] * 3, 1, 1, rows)
    assert TASKS["mrpc"].main_metric == "f1"
    assert summary.best == {"f1": 0.80, "accuracy": 0.70} and summary.best_round == 1
    assert summary.final == {"f1": 0.78, "accuracy": 0.72}
