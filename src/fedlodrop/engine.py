"""The in-process federation: a thin loop over server, client and aggregation.

    for each round:
        tasks = server.configure(round)              # masks, sub-adapters to send
        for each device:                             # one shared backbone, state swapped in
            result = train_local(start state, masks)
            update = server.receive(task, server.upload(task, result.state))
        outcome = server.aggregate(updates)          # + FedEx residual folded into the backbone
        evaluate, log a line to metrics.jsonl

Everything that can fail on the user's input (config, data, model, plan) is done by `prepare`
before the run folder is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlodrop.client import local_steps, predict, train_local
from fedlodrop.config import RunConfig, dump_config
from fedlodrop.data import Task, TASKS, load_splits, make_loader, partition, tokenize
from fedlodrop.errors import UserError
from fedlodrop.masks import kept_values
from fedlodrop.metrics import compute_metrics
from fedlodrop.model import FedModel, build_model, init_regression_head, load_tokenizer
from fedlodrop.rng import seed_torch, stream_seed
from fedlodrop.server import Server, ServerState


@dataclass
class Experiment:
    """A run ready to start: data tokenised and split, backbone loaded, rates fixed."""

    cfg: RunConfig
    task: Task
    fm: FedModel
    shards: list  # tokenised training data per device
    eval_set: object
    train_eval_set: object
    rates: list[float]
    plan: object | None = None


def prepare(cfg: RunConfig, with_training: bool = True) -> Experiment:
    """Load and tokenise data, load the backbone; `with_training=False` skips the training
    shards (re-scoring a saved run needs only the validation set)."""
    from datasets import concatenate_datasets

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = TASKS[cfg.task]
    plan, rates = _rates(cfg)
    train_raw, eval_raw = load_splits(task, cfg.data, cfg.seed)
    shards_raw = partition(
        train_raw,
        cfg.federation.devices,
        cfg.federation.partition,
        cfg.federation.dirichlet_alpha,
        stream_seed(cfg.seed, "partition"),
        task.is_regression,
    ) if with_training else []
    tokenizer = load_tokenizer(cfg)
    fm = build_model(cfg, task, tokenizer, stream_seed(cfg.seed, "init"))
    if task.is_regression:
        init_regression_head(fm, float(np.mean(train_raw["label"])))
    max_len = cfg.train.max_length
    shards = [tokenize(s, tokenizer, task, max_len) for s in shards_raw]
    eval_set = tokenize(eval_raw, tokenizer, task, max_len)
    train_eval_set = eval_set.select([])
    if shards and cfg.data.train_eval_samples:
        pool = concatenate_datasets(shards)
        n = min(cfg.data.train_eval_samples, len(pool))
        train_eval_set = pool.shuffle(seed=stream_seed(cfg.seed, "train-eval") % 2**32).select(range(n))
    return Experiment(cfg, task, fm, shards, eval_set, train_eval_set, rates, plan)


def _rates(cfg: RunConfig) -> tuple[object | None, list[float]]:
    if cfg.plan is None:
        return None, cfg.device_rates()
    from fedlodrop.planning.plan import load_plan

    plan = load_plan(cfg.plan)
    if len(plan.devices) != cfg.federation.devices:
        raise UserError(
            f"plan {cfg.plan} is for {len(plan.devices)} devices but federation.devices is "
            f"{cfg.federation.devices}"
        )
    return plan, [float(d.gamma) for d in plan.devices]


def lr_schedule(cfg: RunConfig):
    """lr as a function of federation progress p in [0, 1]: warm-up, then linear decay or flat."""
    base, warm, kind = cfg.train.lr, cfg.train.warmup_ratio, cfg.train.schedule

    def lr(p: float) -> float:
        if warm > 0 and p < warm:
            return base * p / warm
        if kind == "constant":
            return base
        return base * max(0.0, 1.0 - p) / (1.0 - warm)

    return lr


def evaluate(exp: Experiment, data) -> tuple[dict[str, float], float]:
    if len(data) == 0:
        return {}, float("nan")
    loader = make_loader(data, exp.fm.tokenizer, exp.cfg.train.batch_size * 2, False, 0, sort_by_length=True)
    preds, labels, loss = predict(exp.fm, loader, exp.task.is_regression)
    return compute_metrics(exp.task, preds, labels), loss


def run_round(exp: Experiment, server: Server, round_: int, order: list[int] | None = None) -> dict:
    """One federated round; returns its metrics record.

    `order` is the order devices train in (as results may arrive over a network); updates are
    aggregated in device order, so the result does not depend on it.
    """
    cfg, fm = exp.cfg, exp.fm
    t_round = time.perf_counter()
    lr = lr_schedule(cfg)
    rounds = cfg.federation.rounds
    t0 = time.perf_counter()
    tasks = server.configure(round_)
    masks_s = time.perf_counter() - t0
    updates, devices, train_s = [], [], 0.0
    if order is not None:
        tasks = [tasks[k] for k in order]
    for task in tasks:
        shard = exp.shards[task.device]
        seed_torch(cfg.seed, "local-train", round_, task.device)
        loader = make_loader(
            shard,
            fm.tokenizer,
            cfg.train.batch_size,
            True,
            stream_seed(cfg.seed, "data", round_, task.device),
            group_by_length=cfg.train.group_by_length,
        )
        result = train_local(
            fm,
            server.start_state(task),
            task.masks,
            cfg.dropout.mask_mode,
            loader,
            cfg.train,
            cfg.federation.local_epochs,
            lambda f, r=round_: lr((r + f) / rounds),
            train_a=server.train_a,
        )
        train_s += result.seconds
        t0 = time.perf_counter()
        sent = server.upload(task, result.state)
        updates.append(server.receive(task, sent, len(shard)))
        masks_s += time.perf_counter() - t0
        up = sum(t.numel() * t.element_size() for t in sent.values())
        devices.append(
            {
                "device": task.device,
                "rate": task.rate,
                "kept_values": kept_values(server.layout, task.masks),
                "samples": len(shard),
                "steps": result.steps,
                "train_loss": result.loss,
                "uplink_bytes": up,
                "downlink_bytes": task.downlink_bytes,
                "train_s": round(result.seconds, 3),
            }
        )
    by_device = sorted(range(len(tasks)), key=lambda i: tasks[i].device)
    updates = [updates[i] for i in by_device]
    devices = [devices[i] for i in by_device]
    t0 = time.perf_counter()
    outcome = server.aggregate(updates)
    fm.add_to_base(outcome.base_deltas)
    fm.set_state(server.state.global_state)
    aggregate_s = time.perf_counter() - t0
    for d in devices:
        d["downlink_bytes"] += outcome.residual_downlink_bytes
    t0 = time.perf_counter()
    eval_metrics, eval_loss = evaluate(exp, exp.eval_set)
    train_metrics, train_eval_loss = evaluate(exp, exp.train_eval_set)
    eval_s = time.perf_counter() - t0
    total = sum(d["samples"] for d in devices)
    record = {
        "round": round_ + 1,
        "train_loss": sum(d["train_loss"] * d["samples"] for d in devices) / total,
        "train": train_metrics,
        "eval": eval_metrics,
        "eval_loss": eval_loss,
        "uplink_bytes": sum(d["uplink_bytes"] for d in devices),
        "downlink_bytes": sum(d["downlink_bytes"] for d in devices),
        "wall_s": round(time.perf_counter() - t_round, 3),
        "timing": {
            "train_s": round(train_s, 4),
            "masks_s": round(masks_s, 4),
            "aggregate_s": round(aggregate_s, 4),
            "eval_s": round(eval_s, 4),
        },
        "devices": devices,
    }
    if exp.plan is not None:
        record["model"] = _model_costs(exp.plan, devices)
    return record


def _model_costs(plan, devices: list[dict]) -> dict:
    """The system model's latency and energy for the bytes this round really sent."""
    from fedlodrop.planning.plan import round_costs

    costs = round_costs(
        plan.system,
        plan.devices,
        [8.0 * d["uplink_bytes"] for d in devices],
        [8.0 * d["downlink_bytes"] for d in devices],
    )
    return {
        "latency_s": max(c[0] for c in costs),
        "energy_j": sum(c[1] for c in costs),
        "device_latency_s": [c[0] for c in costs],
        "device_energy_j": [c[1] for c in costs],
    }


def initial_state(exp: Experiment) -> ServerState:
    return ServerState(rounds_done=0, global_state=exp.fm.get_state())


def run(cfg: RunConfig, out: Path, console=None, show_progress: bool = True) -> dict:
    """Prepare (may raise UserError, leaving nothing), then train all rounds into `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"run folder {out} already exists and is not empty; choose another --out")
    exp = prepare(cfg)
    return train(exp, out, console, show_progress)


def train(exp: Experiment, out: Path, console=None, show_progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = exp.cfg
    console = console or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    server = Server(cfg, exp.fm.layout, initial_state(exp), exp.rates)
    t_start = time.perf_counter()
    records: list[dict] = []
    main = exp.task.main_metric
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=True,
    )
    with progress, open(out / "metrics.jsonl", "w") as log:
        bar = progress.add_task("rounds", total=cfg.federation.rounds)
        for round_ in range(cfg.federation.rounds):
            record = run_round(exp, server, round_)
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.advance(bar)
            console.print(_round_line(record, main))
    server.state.save(out)
    summary = _summary(exp, records, time.perf_counter() - t_start)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    return summary


def _round_line(r: dict, main: str) -> str:
    ev = " ".join(f"{k} {v:.4f}" for k, v in r["eval"].items())
    tr = f"  train {main} {r['train'][main]:.4f}" if main in r["train"] else ""
    mb = (r["uplink_bytes"] + r["downlink_bytes"]) / 1e6
    return (
        f"round {r['round']:>3}  train loss {r['train_loss']:.4f}{tr}  "
        f"eval {ev}  sent {r['uplink_bytes'] / 1e6:.3f} MB up / {r['downlink_bytes'] / 1e6:.3f} MB down "
        f"({mb:.3f} MB)  {r['wall_s']:.1f}s"
    )


def _summary(exp: Experiment, records: list[dict], wall_s: float) -> dict:
    main = exp.task.main_metric
    best_round = max(records, key=lambda r: r["eval"].get(main, -math.inf))
    keys = records[-1]["eval"].keys()
    return {
        "task": exp.cfg.task,
        "model": exp.cfg.model,
        "rounds": len(records),
        "devices": exp.cfg.federation.devices,
        "aggregation": exp.cfg.federation.aggregation,
        "rates": exp.rates,
        "main_metric": main,
        "final": records[-1]["eval"],
        "best": {k: max(r["eval"][k] for r in records) for k in keys},
        "best_round": best_round["round"],
        "final_train": records[-1]["train"],
        "generalization_gap": {
            k: records[-1]["train"][k] - records[-1]["eval"][k]
            for k in keys
            if k in records[-1]["train"]
        },
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in records),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in records),
        "adapter_values": exp.fm.layout.adapter_values,
        "head_values": exp.fm.layout.head_values,
        "wall_s": round(wall_s, 3),
    }


def rescore(run_dir: Path, overrides: list[str] = ()) -> dict:
    """Rebuild a saved run's global model (backbone + folded deltas + adapter) and score it."""
    from fedlodrop.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter.safetensors").is_file():
        raise UserError(f"{run_dir} is not a finished run folder (config.yaml, adapter.safetensors)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    exp = prepare(cfg, with_training=False)
    state = ServerState.load(run_dir)
    exp.fm.add_to_base(state.base_delta)
    exp.fm.set_state(state.global_state)
    metrics, loss = evaluate(exp, exp.eval_set)
    return {"eval": metrics, "eval_loss": loss, "rounds_done": state.rounds_done}

