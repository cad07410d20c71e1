"""The in-process federation: a short loop over the server's and the devices' halves of a round.

    for each round:
        tasks   = server.configure(round)                    # who trains, what each is sent
        replies = [device_step(backbone, task, its data)]    # one shared backbone, state swapped in
        result  = server.finish(tasks, replies)              # leave out failures, aggregate, fold
        evaluate the global model, append to metrics.jsonl, checkpoint (atomically)

Everything that can fail on the user's input (config, data, model, plan) is done by `prepare`
before the run folder is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlodrop.adapter import State
from fedlodrop.client import device_step, predict, predict_outputs
from fedlodrop.config import RunConfig
from fedlodrop.data import TASKS, Task, load_splits, make_loader, partition, tokenize
from fedlodrop.errors import UserError
from fedlodrop.masks import apply_masks, draw_masks
from fedlodrop.messages import FoldCatchUp
from fedlodrop.metrics import compute_metrics
from fedlodrop.model import FedModel, build_model, init_regression_head, load_tokenizer
from fedlodrop.rng import stream_seed
from fedlodrop.runs import RunFolder
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
    known: State  # the seeded initial adapter every device builds
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
    return Experiment(cfg, task, fm, shards, eval_set, train_eval_set, rates, fm.get_state(), plan)


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


# ---------------------------------------------------------------------------- evaluation


def evaluate(exp: Experiment, data, global_state: State, round_: int = 0) -> tuple[dict[str, float], float]:
    """Score the global model (backbone + fold + adapter); with `dropout.test_ensemble` N > 0, the
    mean of N sub-adapter models at the devices' mean rate (masks from their own stream)."""
    if len(data) == 0:
        return {}, float("nan")
    fm, cfg = exp.fm, exp.cfg
    loader = make_loader(data, fm.tokenizer, cfg.train.batch_size * 2, False, 0, sort_by_length=True)
    n = cfg.dropout.test_ensemble
    if n == 0:
        fm.set_view(None)
        fm.set_state(global_state)
        preds, labels, loss = predict(fm, loader, exp.task.is_regression)
        return compute_metrics(exp.task, preds, labels), loss
    rate = float(np.mean(exp.rates))
    total = None
    for i in range(n):
        masks = draw_masks(fm.layout, rate, cfg.dropout.sampler, cfg.seed, round_, i, stream="test-mask")
        fm.set_view(masks)
        fm.set_state(apply_masks(global_state, fm.layout, masks))
        out, labels, _ = predict_outputs(fm, loader, probabilities=not exp.task.is_regression)
        total = out if total is None else total + out
    fm.set_view(None)
    mean = total / n
    if exp.task.is_regression:
        preds = mean.squeeze(-1)
        loss = float(np.mean((preds - labels) ** 2))
    else:
        preds = mean.argmax(-1)
        loss = float(-np.mean(np.log(np.clip(mean[np.arange(len(labels)), labels.astype(int)], 1e-12, None))))
    return compute_metrics(exp.task, preds, labels), loss


# ---------------------------------------------------------------------------- one round


def run_round(exp: Experiment, server: Server, round_: int, order: list[int] | None = None) -> dict:
    """One in-process round; returns its metrics record. `order` is the order devices train in (as
    replies may arrive over a network); the server aggregates in device order, so it cannot matter."""
    t_round = time.perf_counter()
    tasks = server.configure(round_)
    run_order = tasks if order is None else [t for k in order for t in tasks if t.device == k]
    replies = [device_step(exp.fm, task, exp.shards[task.device], exp.cfg, exp.known) for task in run_order]
    return finish_round(exp, server, tasks, replies, t_round)


def finish_round(exp: Experiment, server: Server, tasks: list, replies: list, t_round: float) -> dict:
    """The server's half after the replies, in every engine: aggregate and fold (`server.finish`),
    bring the evaluating backbone's fold up to date, score the global model, build the record."""
    round_ = server.state.rounds_done
    t0 = time.perf_counter()
    result = server.finish(tasks, replies)
    if result.fold_update is not None:  # the server's own copy of the backbone evaluates
        exp.fm.sync_fold(FoldCatchUp(round_, round_ + 1, [result.fold_update]))
    aggregate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_metrics, eval_loss = evaluate(exp, exp.eval_set, server.state.global_state, round_)
    train_metrics, _ = evaluate(exp, exp.train_eval_set, server.state.global_state, round_)
    eval_s = time.perf_counter() - t0
    record = result.record
    train_s = sum(r.train_s for r in replies)
    wall_s = time.perf_counter() - t_round
    record |= {
        "train": train_metrics,
        "eval": eval_metrics,
        "eval_loss": eval_loss,
        "wall_s": round(wall_s, 3),
        "timing": {
            "train_s": round(train_s, 4),
            "other_device_s": round(wall_s - train_s - aggregate_s - eval_s, 4),
            "aggregate_s": round(aggregate_s, 4),
            "eval_s": round(eval_s, 4),
        },
    }
    if exp.plan is not None:
        record["model"] = _model_costs(exp.plan, record["devices"], exp.cfg.federation.devices)
    return record


def _model_costs(plan, devices: list[dict], n: int) -> dict:
    """The system model's latency and energy for the bytes this round really sent."""
    from fedlodrop.planning.plan import round_costs

    up, down = [0.0] * n, [0.0] * n
    for d in devices:
        up[d["device"]], down[d["device"]] = 8.0 * d.get("uplink_bytes", 0), 8.0 * d["downlink_bytes"]
    costs = round_costs(plan.system, plan.devices, up, down)
    active = [c for k, c in enumerate(costs) if any(d["device"] == k for d in devices)]
    return {
        "latency_s": max(c[0] for c in active),
        "energy_j": sum(c[1] for c in active),
        "device_latency_s": [c[0] for c in costs],
        "device_energy_j": [c[1] for c in costs],
    }


# ---------------------------------------------------------------------------- whole runs


def initial_state(exp: Experiment) -> ServerState:
    return ServerState(rounds_done=0, global_state=exp.fm.get_state())


def make_server(exp: Experiment, state: ServerState) -> Server:
    return Server(exp.cfg, exp.fm.layout, state, exp.rates, exp.known)


def run(cfg: RunConfig, out: Path, console=None, show_progress: bool = True, force: bool = False) -> dict:
    """Prepare (may raise UserError, leaving nothing), then train all rounds into `out`."""
    folder = RunFolder(out)
    folder.check_new(force)
    exp = prepare(cfg)
    folder.start(cfg, force=force)
    return train(exp, folder, initial_state(exp), [], console, show_progress)


def resume(run_dir: Path, console=None, show_progress: bool = True) -> dict:
    """Continue an interrupted run from its last complete round; it ends as an uninterrupted one."""
    folder = RunFolder(run_dir)
    cfg = folder.config()
    if folder.finished:
        return folder.summary()
    state = folder.load_checkpoint()
    exp = prepare(cfg)
    exp.fm.set_fold(state.fold, state.rounds_done)
    records = folder.truncate_metrics(state.rounds_done)
    return train(exp, folder, state, records, console, show_progress)


def train(exp: Experiment, folder: RunFolder, state: ServerState, records: list[dict], console=None,
          show_progress: bool = True, round_fn=run_round) -> dict:
    """The loop over rounds every engine shares: `round_fn(exp, server, round)` runs one round
    (in-process devices here, Flower messages in `fedlodrop.flower`) and returns its record;
    each record is logged and checkpointed before the next round starts."""
    from rich.console import Console

    from fedlodrop.logs import RunLogs, progress_bar

    cfg = exp.cfg
    console = console or Console(stderr=True)
    server = make_server(exp, state)
    logs = RunLogs(cfg, folder.path, state.rounds_done)
    main = exp.task.main_metric
    progress = progress_bar(console, show_progress)
    try:
        with progress:
            bar = progress.add_task("rounds", total=cfg.federation.rounds, completed=state.rounds_done)
            for round_ in range(state.rounds_done, cfg.federation.rounds):
                record = round_fn(exp, server, round_)
                t0 = time.perf_counter()
                written = folder.write_state(server.state)
                record["timing"]["checkpoint_s"] = round(time.perf_counter() - t0, 4)
                folder.append_metrics(record)
                folder.commit(written, server.state.rounds_done)
                records.append(record)
                logs.round(record)
                progress.advance(bar)
                console.print(_round_line(record, main), highlight=False)
    finally:
        logs.close()
    summary = _summary(exp, records)
    folder.save_final(server.state, exp.fm.layout, summary)
    return summary


def _round_line(r: dict, main: str) -> str:
    ev = " ".join(f"{k} {v:.4f}" for k, v in r["eval"].items())
    tr = f"  train {main} {r['train'][main]:.4f}" if main in r["train"] else ""
    left = f"  ({len(r['failures'])} left out)" if r["failures"] else ""
    return (
        f"round {r['round']:>3}  train loss {r['train_loss']:.4f}{tr}  eval {ev}  "
        f"sent {r['uplink_bytes'] / 1e6:.3f} MB up / {r['downlink_bytes'] / 1e6:.3f} MB down  "
        f"{r['wall_s']:.1f}s{left}"
    )


def _summary(exp: Experiment, records: list[dict]) -> dict:
    """The final round and the best round (by the task's main metric, its whole metric dict)."""
    main = exp.task.main_metric
    best = max(records, key=lambda r: r["eval"].get(main, -math.inf))
    last = records[-1]
    return {
        "task": exp.cfg.task,
        "model": exp.cfg.model,
        "rounds": len(records),
        "devices": exp.cfg.federation.devices,
        "aggregation": exp.cfg.federation.aggregation,
        "variant": exp.cfg.dropout.variant,
        "rates": exp.rates,
        "main_metric": main,
        "final": last["eval"],
        "best": best["eval"],
        "best_round": best["round"],
        "final_train": last["train"],
        "generalization_gap": {k: last["train"][k] - last["eval"][k] for k in last["eval"] if k in last["train"]},
        "uplink_bytes_total": sum(r["uplink_bytes"] for r in records),
        "downlink_bytes_total": sum(r["downlink_bytes"] for r in records),
        "devices_left_out": sum(len(r["failures"]) for r in records),
        "adapter_values": exp.fm.layout.adapter_values,
        "head_values": exp.fm.layout.head_values,
        "wall_s": round(sum(r["wall_s"] for r in records), 3),
    }


def load_global(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Experiment, State]:
    """A finished run's global model loaded into a fresh backbone (fold set, adapter returned)."""
    folder = RunFolder(run_dir)
    cfg = folder.config(overrides)
    exp = prepare(cfg, with_training=False)
    adapter, fold = folder.load_final(exp.fm.layout)
    exp.fm.set_fold(fold, folder.rounds_done())
    return exp, adapter


def rescore(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Rebuild a saved run's global model (backbone + folded deltas + adapter) and score it."""
    exp, adapter = load_global(run_dir, overrides)
    metrics, loss = evaluate(exp, exp.eval_set, adapter, RunFolder(run_dir).rounds_done() - 1)
    return {"eval": metrics, "eval_loss": loss, "rounds_done": RunFolder(run_dir).rounds_done()}
