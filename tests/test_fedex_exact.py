"""FedEx with dropout, on the real layers (BERT nn.Linear, GPT-2 Conv1D), on random inputs:

* exact: after a round the global effective weight is W + sum_k w_k (W_k^end - W_k^start), the
  weighted mean of what each device's training changed in the model it held;
* consistent: what a device holds at the start of the next round is the global model seen
  through its mask, W0 + M_k (.) (W - W0) (the whole global model for the `update` variant).

Effective weights are read off the layers themselves: layer(I) - bias.
"""

import pytest
import torch

from fedlodrop.run.settings import validate
from fedlodrop.data.tasks import TASKS
from fedlodrop.lora.masks import device_masks
from fedlodrop.lora.messages import DeviceReply, decode_adapter, encode_adapter
from fedlodrop.model.backbone import build_model, load_tokenizer
from fedlodrop.round.server import Server, ServerState
from fedlodrop.lora.aggregation import RULES
from fedlodrop.lora.variants import VARIANTS, make_variant


def _setup(path, variant, rate=0.3, aggregation="fedex", comm="float32", devices=3, r=4, ranks=None):
    cfg = validate({"model": path, "task": "sst2", "lora": {"r": r, "dropout": 0.0, "ranks": ranks},
                    "federation": {"aggregation": aggregation, "devices": devices, "rounds": 3, "comm_dtype": comm},
                    "dropout": {"rate": rate, "variant": variant}})
    fm = build_model(cfg, TASKS["sst2"], load_tokenizer(cfg), init_seed=0)
    known = fm.get_state()
    g = torch.Generator().manual_seed(5)
    glob = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in known.items()}  # B != 0
    server = Server(cfg, fm.layout, ServerState(0, glob), [rate] * devices, known)
    return cfg, fm, server, g


def _effective(fm) -> dict[str, torch.Tensor]:
    """Each LoRA layer's effective weight as (in x out): layer(I) - bias, in eval mode."""
    fm.net.eval()
    out = {}
    with torch.no_grad():
        for mod in fm.modules:
            layer = mod.layer
            eye = torch.eye(mod.shape.n_in)
            out[mod.shape.name] = layer(eye) - layer.get_base_layer().bias
    return out


def _device_round(cfg, fm, server, task, g):
    """Decode the task as a device does, 'train' (random change of the trained slices), reply."""
    v = make_variant(cfg.dropout.variant)
    masks = device_masks(cfg, fm.layout, task.rate, task.round, task.device)
    view, trained = v.view(masks, fm.layout), v.trained(masks, fm.layout)
    if task.fold is not None:
        fm.sync_fold(task.fold)
    fm.set_view(view)
    start = decode_adapter(task.adapter, fm.layout, view, server.known)
    fm.set_state(start)
    held = _effective(fm)
    end = {k: t.clone() for k, t in start.items()}
    for m in fm.layout.modules:  # only what it trains: its rows, columns and rank components
        end[m.key_a] += 0.1 * torch.randn(end[m.key_a].shape, generator=g) * trained[m.name].a
        end[m.key_b] += 0.1 * torch.randn(end[m.key_b].shape, generator=g) * trained[m.name].b
    for key in fm.layout.head_keys:
        end[key] = end[key] + 0.1 * torch.randn(end[key].shape, generator=g)
    fm.set_state(end)
    trained_model = _effective(fm)
    upload = encode_adapter(end, fm.layout, trained, server.rule, server.dtype)
    reply = DeviceReply(task.device, task.round, upload, 10 + 7 * task.device, 0.5, 1, 0.0)
    return masks, held, trained_model, reply


def _global(fm, server):
    fm.set_view(None)
    fm.set_state(server.state.global_state)
    return _effective(fm)


@pytest.mark.parametrize("variant", VARIANTS.names())
@pytest.mark.parametrize("model_fixture,aggregation,ranks", [
    ("tiny_bert", "fedex", None), ("tiny_gpt2", "fedex", None),
    # devices of ranks 1, 2 and 4 on one backbone: FedEx and FLoRA's stacking stay exact
    ("tiny_bert", "fedex", [1, 2, 4]), ("tiny_bert", "flora", [1, 2, 4]), ("tiny_gpt2", "flora", None),
])
def test_fedex_with_masks_is_exact_and_consistent(request, model_fixture, variant, aggregation, ranks):
    cfg, fm, server, g = _setup(request.getfixturevalue(model_fixture), variant, aggregation=aggregation, ranks=ranks)
    w0 = {m.shape.name: v for m, v in zip(fm.modules, _pristine(fm))}
    for round_ in range(3):
        before = _global(fm, server)
        tasks = server.configure(round_)
        rounds = [_device_round(cfg, fm, server, t, g) for t in tasks]
        # consistency: each device held the global model seen through its mask (a device of a lower
        # rank holds only its first r_k components: not the global model, by design)
        if round_ > 0 and ranks is None:
            for (masks, held, _, _), task in zip(rounds, tasks):
                for name, h in held.items():
                    if make_variant(variant).view(masks, fm.layout) is not None:
                        mask = (masks[name].a_cols[:, None] & masks[name].b_rows[None, :]).float()  # in x out
                        expected = w0[name] + mask * (before[name] - w0[name])
                    else:
                        expected = before[name]
                    assert torch.allclose(h, expected, atol=2e-5), (round_, task.device, name)
        result = server.finish(tasks, [r[3] for r in rounds])
        fm.sync_fold(_catch_up(result, round_))
        after = _global(fm, server)
        w = torch.tensor([r[3].num_samples for r in rounds], dtype=torch.float64)
        w = (w / w.sum()).float()
        for name in after:  # exactness
            change = sum(wk * (r[2][name] - r[1][name]) for wk, r in zip(w, rounds))
            assert torch.allclose(after[name], before[name] + change, atol=2e-5), (round_, name)


def _pristine(fm):
    """The LoRA layers' pretrained weights as (in x out), before any fold."""
    return [(m.base_weight.detach().T if not m.shape.fan_in_fan_out else m.base_weight.detach()).clone()
            for m in fm.modules]


def _catch_up(result, round_):
    from fedlodrop.lora.messages import FoldCatchUp

    return FoldCatchUp(round_, round_ + 1, [result.fold_update])


def test_a_round_that_changes_nothing_leaves_the_model_alone(tiny_bert):
    """The collapse of issue 7: dropped slices must count as unchanged, not as zeros, under every rule."""
    # reset restarts the dropped slices from zero, so its unchanged device does move them: not this property
    for aggregation in RULES.names():
        for variant in [v for v in VARIANTS.names() if v != "reset"]:
            cfg, fm, server, g = _setup(tiny_bert, variant, rate=0.5, aggregation=aggregation)
            before = _global(fm, server)
            tasks = server.configure(0)
            replies = []
            for task in tasks:
                masks = device_masks(cfg, fm.layout, task.rate, 0, task.device)
                v = make_variant(variant)
                start = decode_adapter(task.adapter, fm.layout, v.view(masks, fm.layout), server.known)
                upload = encode_adapter(start, fm.layout, v.trained(masks, fm.layout), server.rule, server.dtype)
                replies.append(DeviceReply(task.device, 0, upload, 10, 0.5, 1, 0.0))
            result = server.finish(tasks, replies)
            if result.fold_update is not None:
                fm.sync_fold(_catch_up(result, 0))
            after = _global(fm, server)
            for name in after:
                assert torch.allclose(after[name], before[name], atol=1e-5), (aggregation, variant, name)


def test_fedex_residual_rank(tiny_bert):
    """Devices that start from the whole adapter give FedEx-LoRA's (K + 1) r; masked views (2K + 2) r;
    a rank that is not cheaper than the dense matrix travels dense."""
    k, r = 2, 2
    for variant, rank, r_ in (("update", (k + 1) * r, r), ("subadapter", (2 * k + 2) * r, r), ("subadapter", None, 4)):
        cfg, fm, server, g = _setup(tiny_bert, variant, devices=k, r=r_)
        tasks = server.configure(0)
        replies = [_device_round(cfg, fm, server, t, g)[3] for t in tasks]
        result = server.finish(tasks, replies)
        shapes = {key: v.shape for key, v in result.fold_update.tensors.items()}
        m = fm.layout.modules[0]
        if rank is not None:  # 32 x 32 layers: factors of rank 6 or 12 are fewer values
            assert shapes[f"{m.name}.u"] == (m.n_out, rank) and shapes[f"{m.name}.v"] == (rank, m.n_in)
        else:  # rank 24 x 64 > 32 x 32
            assert shapes[f"{m.name}.dense"] == (m.n_out, m.n_in)
