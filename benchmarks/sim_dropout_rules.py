"""Weight-space simulation of FedLoDrop's rules on one LoRA module (seconds, no model, no data).

Each of K devices fits W = W0 + F + s B A to a shared low-rank target T on its own inputs X_k
(loss |(W - T) X_k|^2) with a few SGD steps per round, through its dropout masks; the server then
aggregates. Printed: the global model's relative error |W - W0 - T| / |T| after rounds 1, 5, 10,
20 and 30 at gamma 0.3 (and the last one at gamma 0, where every rule is FedAvg / FedEx-LoRA).

Rules (docs/dropout.md):
* `spec fedex`: SPEC sections 1-2 as first built: devices start from the masked adapter over an
  unmasked fold, fedex makes the product exact over the devices' masked *models*; the fold
  collects -(2 gamma - gamma^2) s B A and the devices' starts invert (the collapse of issue 7).
* fedlodrop's variants `update`, `subadapter`, `reset` with `fedex` and `masked`, through the
  package's own aggregation rules (`fedlodrop.lora.aggregation`) and views (`fedlodrop.lora.variants`).
* `inverted`: the sub-adapter with kept slices scaled by 1 / (1 - gamma) in the forward pass
  (the authors' earlier Federated Dropout convention), aggregated as the `update` variant.

    python benchmarks/sim_dropout_rules.py [--rounds 30] [--out docs/benchmarks/dropout-rules-sim.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedlodrop.lora.adapter import AdapterLayout, ModuleShape
from fedlodrop.lora.aggregation import DeviceUpdate, device_weights, make_rule
from fedlodrop.lora.masks import apply_masks, draw_masks, full_masks
from fedlodrop.lora.variants import make_variant

N, R, K, STEPS, LR = 48, 4, 3, 30, 0.05
LAYOUT = AdapterLayout(modules=(ModuleShape("m", N, N, R, 1.0),), head=())
M = LAYOUT.modules[0]


def run(rule: str, variant: str, gamma: float, rounds: int, seed: int = 0, factor_rule: str = "masked") -> list[float]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(N, 3, generator=g) @ torch.randn(3, N, generator=g) / 3
    xs = [torch.randn(N, 64, generator=g) for _ in range(K)]
    glob = {M.key_a: torch.randn(R, N, generator=g) / N**0.5, M.key_b: torch.zeros(N, R)}
    fold = torch.zeros(N, N)
    errors = []
    for t in range(rounds):
        updates = []
        for k in range(K):
            masks = draw_masks(LAYOUT, gamma, "bernoulli", seed, t, k)
            mk = masks[M.name].b_rows.float()[:, None] * masks[M.name].a_cols.float()[None, :]
            if variant == "inverted":  # scaled sub-adapter forward, trains kept slices, full view
                view, trained, scale, fold_view = full_masks(LAYOUT), masks, 1 / (1 - gamma) ** 2, fold
            elif variant == "spec":  # masked adapter over the unmasked fold (SPEC 1-2 as built)
                view, trained, scale, fold_view = masks, masks, 1.0, fold
            else:
                v = make_variant(variant)
                view, trained, scale = v.view(masks, LAYOUT), v.trained(masks, LAYOUT), 1.0
                fold_view = fold if view is None else fold * mk
                view = full_masks(LAYOUT) if view is None else view
            start = apply_masks(glob, LAYOUT, view)
            b = start[M.key_b].clone().requires_grad_(True)
            a = start[M.key_a].clone().requires_grad_(True)
            mb, ma = trained[M.name].b_rows.float()[:, None], trained[M.name].a_cols.float()[None, :]
            for _ in range(STEPS):
                if variant == "inverted":
                    delta = scale * (b * masks[M.name].b_rows.float()[:, None]) @ (a * masks[M.name].a_cols.float()[None, :])
                else:
                    delta = b @ a
                loss = ((fold_view + M.scaling * delta - target) @ xs[k]).pow(2).mean()
                gb, ga = torch.autograd.grad(loss, (b, a))
                with torch.no_grad():
                    b -= LR * gb * mb
                    a -= LR * ga * ma
            end = {M.key_b: b.detach(), M.key_a: a.detach()}
            updates.append(DeviceUpdate(start, end, trained, 1))
        w = device_weights(updates, "uniform")
        if variant == "spec":
            new, _ = make_rule("masked").aggregate(LAYOUT, glob, updates, w)  # SPEC's masked mean
            if rule == "fedex":  # exact over the devices' masked models, the fold unmasked
                mean = sum(wk * u.end[M.key_b] @ u.end[M.key_a] for wk, u in zip(w, updates))
                fold = fold + M.scaling * (mean - new[M.key_b] @ new[M.key_a])
        else:
            name = "masked" if rule == "masked" else "fedex"
            new, residuals = make_rule(name, factor_rule).aggregate(LAYOUT, glob, updates, w)
            if residuals:
                fold = fold + residuals[M.name].dense()
        glob = new
        learned = fold + M.scaling * glob[M.key_b] @ glob[M.key_a]
        errors.append(float((learned - target).norm() / target.norm()))
    return errors


CASES = [  # (variant, rule, fedex's factor_rule)
    ("spec", "fedex", "masked"),
    ("update", "fedex", "masked"), ("subadapter", "fedex", "masked"), ("reset", "fedex", "masked"),
    ("inverted", "fedex", "masked"),
    ("update", "fedex", "fedit"), ("subadapter", "fedex", "fedit"), ("reset", "fedex", "fedit"),
    ("update", "masked", "-"), ("subadapter", "masked", "-"), ("reset", "masked", "-"), ("inverted", "masked", "-"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    shown = [r for r in (1, 5, 10, 20, 30) if r <= args.rounds]
    lines = [
        f"Relative error |learned - T| / |T| of the global model, one {N} x {N} module, r {R}, {K} devices,"
        f" {STEPS} SGD steps a round (torch threads: 1).",
        "",
        "| variant | rule | factor rule | " + " | ".join(f"round {r}" for r in shown) + " | gamma 0, last round |",
        "|---|---|---|" + "---|" * (len(shown) + 1),
    ]
    for variant, rule, factor in CASES:
        fr = "masked" if factor == "-" else factor
        e = run(rule, variant, 0.3, args.rounds, factor_rule=fr)
        e0 = run(rule, variant, 0.0, args.rounds, factor_rule=fr)
        cells = " | ".join("diverged" if not e[r - 1] < 1e6 else f"{e[r - 1]:.3f}" for r in shown)
        lines.append(f"| {variant} | {rule} | {factor} | {cells} | {e0[-1]:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text("# `python benchmarks/sim_dropout_rules.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
