"""The one builder: everything a run is made of, from its config, in one order on every side.

    build(cfg)                                   the server of the in-process engine and of Flower:
                                                 backbone, every device's shard, validation data, rates
    build(cfg, eval_data=False)                  a device process (Flower's ClientApp): backbone and
                                                 the shards, each tokenised when first asked for
    build(cfg, train_data=False)                 re-scoring a saved run: backbone and validation data
    load_run(run_dir)                            a finished run's global model (export, predict, evaluate)

Every side builds the backbone and the partition with the same calls from the same seed, so a
device process and the server hold the same initial adapter and the same split without anything
travelling. Everything that can fail on the user's input (config, data, model, plan) fails here,
before a run folder is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedlodrop.config import RunConfig
from fedlodrop.data import Task, load_task, partition, tokenize
from fedlodrop.data.files import load_device_file
from fedlodrop.data.tasks import task_from_config
from fedlodrop.errors import UserError
from fedlodrop.lora.adapter import State
from fedlodrop.model.backbone import FedModel, build_model, init_regression_head, load_tokenizer
from fedlodrop.rng import stream_seed
from fedlodrop.round.features import features
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.run.folder import RunFolder
from fedlodrop.run.meter import Meter, meter_for
from fedlodrop.run.systems import COMM_BITS, check_payload, check_sizes, planned_sizes, uplink_bits

PRECISIONS = ("fp32", "bf16", "auto")

class Shards(Sequence):
    """Each device's training data, tokenised when first asked for (a device process tokenises
    only its own). An entry is None where this process does not hold that device's data (a
    deployment's server, or another device, with `federation.partition: local`)."""

    def __init__(self, raw: list, tokenizer, task: Task, max_length: int):
        self.raw, self.tokenizer, self.task, self.max_length = raw, tokenizer, task, max_length
        self._done: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, device: int):

        if self.raw[device] is None:
            raise RuntimeError(f"device {device}'s data is not in this process")
        if device not in self._done:
            self._done[device] = tokenize(self.raw[device], self.tokenizer, self.task, self.max_length)
        return self._done[device]

    def samples(self, device: int) -> int | None:
        """How many examples device `device` trains on, or None where this process cannot know."""
        return None if not self.raw or self.raw[device] is None else len(self.raw[device])


@dataclass
class Experiment:
    """A run ready to start: the shared backbone, the devices' data, the server's data and rates."""

    cfg: RunConfig
    task: Task
    fm: FedModel
    shards: Shards  # training data per device (empty without train_data)
    eval_set: object | None  # tokenised validation split (None without eval_data)
    train_eval_set: object | None  # training examples scored each round for the gap
    rates: list[float]  # per-device dropout rates (from dropout.rate, or the plan)
    known: State  # the seeded initial adapter every device builds
    plan: object | None = None
    meter: Meter | None = None  # the simulated clock and meter, with a system

    @property
    def plugins(self) -> list[RoundPlugin]:
        """The server's round features: those the config asks for, and the meter with a system."""
        return features(self.cfg) + ([self.meter] if self.meter is not None else [])


def build(cfg: RunConfig, *, train_data: bool = True, eval_data: bool = True, task: Task | None = None,
          device_file: tuple[int, Path] | None = None) -> Experiment:
    """Data, backbone and rates of `cfg`. `train_data`: the partition into device shards;
    `eval_data`: the validation split, the train-eval sample and the plan (the server's side).
    `task`: the run's task as its folder keeps it (a finished run's, whose classes its data once
    decided, or the one the server sends a device); by default the config's, or what the data says.
    `device_file`: (device, file) of a deployment's device that brings its own data
    (`federation.partition: local`); with it, `task` is the server's and nothing else is read."""

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    plan, rates = _rates(cfg) if train_data or eval_data else (None, cfg.device_rates())
    spec = _system(cfg, plan) if train_data or eval_data else None
    meter = meter_for(cfg, plan, spec) if spec is not None else None
    train_raw = eval_raw = None
    if device_file is not None:

        if task is None:
            raise RuntimeError("a device with its own data needs the run's task from the server")
        train_data, eval_data = False, False
    if train_data or eval_data:
        found, train_raw, eval_raw = load_task(cfg)
        if task is not None and task != found:
            raise UserError(f"the data no longer gives the run's task: {_task_change(task, found)}")
        task = found
    elif task is None:
        task = task_from_config(cfg)
        if task is None:
            raise UserError("the run's classes come from its data: load it from its run folder (task.json)")
    fed = cfg.federation
    shards_raw: list = []
    if device_file is not None:
        shards_raw = [None] * fed.devices
        shards_raw[device_file[0]] = load_device_file(cfg, task, device_file[1])
    elif fed.partition == "local":
        shards_raw = [None] * fed.devices  # each device holds its own; this process none of them
    elif train_data:
        # with a system, an IID split gives each device the system's D_k samples; any split must end
        # with the sample counts the system planned, or the clock would price other work than trains
        where = cfg.system.file or cfg.plan
        sizes = planned_sizes(cfg, spec, len(train_raw), where) if spec is not None else None
        shards_raw = partition(train_raw, fed.devices, fed.partition, fed.dirichlet_alpha,
                               stream_seed(cfg.seed, "partition"), task.is_regression, sizes)
        if spec is not None:
            check_sizes(spec, [len(s) for s in shards_raw], fed.partition, where)
    tokenizer = load_tokenizer(cfg)
    fm = build_model(cfg, task, tokenizer, stream_seed(cfg.seed, "init"))
    if spec is not None:
        check_payload(cfg, spec, fm.layout, cfg.system.file or cfg.plan)
    if task.is_regression:
        # the label mean, from the devices' pooled labels in simulation; under DP from the server's own
        # validation labels, so that no statistic of private labels is in the model (devices take the
        # head from the server every round, so theirs need not match)
        labels = eval_raw if cfg.privacy.dp or train_raw is None else train_raw
        if labels is not None and len(labels):
            init_regression_head(fm, float(np.mean(labels["label"])))
    shards = Shards(shards_raw, tokenizer, task, cfg.train.max_length)
    eval_set = train_eval_set = None
    if eval_data:
        eval_set = tokenize(eval_raw, tokenizer, task, cfg.train.max_length)
        train_eval_set = _train_eval_sample(cfg, shards, eval_set)
    return Experiment(cfg, task, fm, shards, eval_set, train_eval_set, rates, fm.get_state(), plan, meter)


def _task_change(was: Task, now: Task) -> str:
    for name in ("label_names", "is_regression", "metrics", "text_a", "text_b"):
        if getattr(was, name) != getattr(now, name):
            return f"{name} was {getattr(was, name)!r}, the data now gives {getattr(now, name)!r}"
    return "it changed"


@dataclass
class RunShape:
    """What a system file must know of a run to price it: each device's training samples (the
    run's own partition), and what one device sends (adapter values Q, head values, bits)."""

    samples: list[int]
    adapter_values: int
    head_values: int
    backbone_params: int
    bits_per_value: int
    uplink_bits_per_value: float
    uplink_extra_bits: float
    rank: int
    num_labels: int
    local_epochs: float


def run_shape(cfg: RunConfig) -> RunShape:
    """The partition and the model of `cfg`, measured without training: what `fedlodrop system
    random --config` writes into a system file, so plans are made for the samples and bytes the
    run really has."""
    if cfg.system.file is not None or cfg.plan is not None:
        raise UserError("system random --config describes a run without a system: drop system.file and plan")
    exp = build(cfg, eval_data=False)
    layout, fm = exp.fm.layout, exp.fm
    trainable = {id(p) for p in fm.trainable()}
    backbone = sum(p.numel() for p in fm.net.parameters() if id(p) not in trainable)
    bits = COMM_BITS[cfg.federation.comm_dtype]
    if cfg.federation.partition == "local":
        raise UserError("system random --config: with federation.partition local the devices' samples are on the "
                        "devices; give --devices and --samples")
    return RunShape([len(exp.shards.raw[k]) for k in range(len(exp.shards))], layout.adapter_values,
                    layout.head_values, int(backbone), bits, *uplink_bits(cfg, layout), cfg.lora.r, exp.task.num_labels,
                    cfg.federation.local_epochs)


def describe_run(cfg: RunConfig, seed: int = 0, bandwidth_hz: float = 10e6, latency_s: float | None = None):
    """A random cell around the run of `cfg` (what `fedlodrop system random` writes): its devices,
    local epochs and upload (Q, head, federation.comm_dtype's bits), and its training samples: under an
    IID split the run's training set spread over the devices in Dirichlet(4) shares (the run's shards
    then follow the system's D_k), under any other split the split's own sizes. Positions, fading,
    budgets and the latency limit are `planning.random_system`'s."""
    from fedlodrop.planning import random_system  # the planner: only `system random` needs it here
    from fedlodrop.planning.spec import PayloadSpec

    shape = run_shape(cfg)
    iid = cfg.federation.partition == "iid"
    payload = PayloadSpec(model=None, rank=shape.rank, num_labels=shape.num_labels,
                          adapter_values=shape.adapter_values, head_values=shape.head_values,
                          backbone_params=float(shape.backbone_params), bits_per_value=float(shape.bits_per_value),
                          uplink_bits_per_value=(shape.uplink_bits_per_value
                                                 if shape.uplink_bits_per_value != shape.bits_per_value else None),
                          uplink_extra_bits=shape.uplink_extra_bits)
    spec = random_system(len(shape.samples), seed, samples_total=sum(shape.samples),
                         samples=None if iid else shape.samples, bandwidth_hz=bandwidth_hz,
                         latency_s=latency_s, local_epochs=shape.local_epochs, payload=payload)
    if cfg.lora.ranks is not None:  # device classes: each device's rank, priced as r_k / r of the adapter
        for k, dev in enumerate(spec.devices):
            dev.rank = cfg.lora.ranks[k] if isinstance(cfg.lora.ranks, list) else cfg.lora.ranks
    return spec


def _train_eval_sample(cfg: RunConfig, shards: Shards, eval_set):
    """`data.train_eval_samples` training examples, drawn from all devices' shards by the seed;
    none under DP (a score on the devices' data is a release the accountant does not count)."""
    from datasets import concatenate_datasets

    if not len(shards) or not cfg.data.train_eval_samples or cfg.privacy.dp or any(r is None for r in shards.raw):
        return eval_set.select([])
    pool = concatenate_datasets([shards[k] for k in range(len(shards))])
    n = min(cfg.data.train_eval_samples, len(pool))
    return pool.shuffle(seed=stream_seed(cfg.seed, "train-eval") % 2**32).select(range(n))


def _system(cfg: RunConfig, plan):
    """The system that prices this run (system.file, or the plan's), checked against the plan;
    None without one. Device processes read it too: their shards follow its sample counts."""
    if cfg.system.file is None:  # before importing the planner: a run without a system needs none of it
        return plan.system if plan is not None else None
    from fedlodrop.planning import load_system

    spec = load_system(cfg.system.file)
    if plan is not None and plan.system.model_dump(mode="json") != spec.model_dump(mode="json"):
        raise UserError(f"plan {cfg.plan} was made for another system than {cfg.system.file}")
    return spec


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


# ---------------------------------------------------------------------------- a finished run


@dataclass
class LoadedRun:
    """A finished run's global model, ready for inference: backbone with the fold F, the global
    adapter and head set, eval mode."""

    exp: Experiment
    adapter: State  # the global adapter and head
    fold: dict[str, torch.Tensor] = field(default_factory=dict)  # FedEx: F of each module, (out x in)
    rounds_done: int = 0

    @property
    def cfg(self) -> RunConfig:
        """The run's config."""
        return self.exp.cfg

    @property
    def task(self) -> Task:
        """The run's task (from its task.json)."""
        return self.exp.task

    @property
    def fm(self) -> FedModel:
        """The backbone holding the global model."""
        return self.exp.fm


def check_finished(run_dir: Path) -> RunFolder:
    """The run folder at `run_dir`, or one line saying it holds no finished run."""
    folder = RunFolder(Path(run_dir))
    if not folder.finished:
        raise UserError(f"{run_dir} is not a finished run folder (no config.yaml and summary.json)")
    return folder


def load_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), device: str | None = None,
             eval_data: bool = False, precision: str | None = None) -> LoadedRun:
    """Backbone of the run's config + its folded FedEx deltas + the global adapter and head.

    Needs no training data (exporting or predicting must not); `eval_data` also loads the
    validation split (re-scoring). `device` overrides `train.device`: a run trained on a GPU can
    be exported on a laptop; `precision` overrides `train.eval_precision` (fp32 unless the run
    asked otherwise: what the exported model computes)."""
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    folder = check_finished(run_dir)
    extra = ([f"train.device={device}"] if device else []) + ([f"train.eval_precision={precision}"] if precision else [])
    cfg = folder.config(list(overrides) + extra)
    exp = build(cfg, train_data=False, eval_data=eval_data, task=folder.task())
    adapter, fold = folder.load_final(exp.fm.layout)
    rounds = folder.rounds_done()
    exp.fm.set_fold(fold, rounds)
    exp.fm.set_view(None)
    exp.fm.set_state(adapter)
    exp.fm.net.eval()
    return LoadedRun(exp, adapter, fold, rounds)
