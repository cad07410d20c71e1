"""The Flower ServerApp and ClientApp of fedlodrop (Message API).

The app folder `fedlodrop flower` generates is one pyproject.toml naming
`fedlodrop.flower.app:server_app` and `:client_app`; the code is this installed package. The run
config carries the validated RunConfig as JSON (`config-json`) and the absolute run folder on the
ServerApp's machine (`run-dir`).

ServerApp: `engine.prepare` (server-side evaluation data and model), find which SuperNode serves
which device, then `engine.train` with the Flower round, so the run folder is `fedlodrop run`'s.

ClientApp: a device is the `partition-id` of its SuperNode. Its backbone and data shard are built
from the config and the seed exactly as the in-process engine builds them (cached per process);
its FedEx fold F, the only state a device keeps between rounds, lives in `context.state`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlodrop import __version__
from fedlodrop.config import RunConfig, validate
from fedlodrop.errors import RoundFailed, UserError
from fedlodrop.flower.records import content_task, from_records, reply_content, to_records
from fedlodrop.flower.transport import NODE, Discovery, DiscoveryError

log = logging.getLogger("flwr")  # Flower's handler: these lines reach `flwr log`

CONFIG_JSON, RUN_DIR, FORCE = "config-json", "run-dir", "force"
# prefixes of the exception text the ServerApp fails with; the CLI reads them back from
# `flwr ls` (status-details) to print one line and choose the exit code
USER_ERROR, ROUND_FAILED = "fedlodrop user error: ", "fedlodrop round failed: "
# test-only fault injection: "K" or "K@R" (device K, in round R, 1-based), comma-separated
TEST_RAISE_ENV = "FEDLODROP_FLOWER_TEST_RAISE"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class ServerAppFailed(RuntimeError):
    """What the ServerApp raises so that Flower records the run as failed, with this text."""


# ============================================================================ server

server_app = ServerApp()


class _LogFile(io.TextIOBase):
    """A file for rich's Console that hands each printed line to Flower's logger."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.info(line)
        return len(text)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp. A user error or a failed round fails the Flower run with a prefixed one-line
    text (Flower shows it as the run's status details), which the CLI turns back into exit 2 / 1."""
    try:
        serve(grid, dict(context.run_config))
    except (UserError, DiscoveryError) as err:
        log.error("%s", err)
        raise ServerAppFailed(f"{USER_ERROR}{err}") from None
    except RoundFailed as err:
        log.error("%s", err)
        raise ServerAppFailed(f"{ROUND_FAILED}{err}") from None


def serve(grid: Grid, run_config: dict) -> None:
    """Validate, prepare (before the run folder exists), find the devices' nodes, train."""
    from rich.console import Console

    from fedlodrop import engine
    from fedlodrop.flower.strategy import FedLoDropStrategy
    from fedlodrop.runs import RunFolder

    cfg = config_from_run_config(run_config)
    run_dir = Path(str(run_config.get(RUN_DIR, "")))
    if not run_dir.is_absolute():
        raise UserError(f"run-dir must be an absolute path on the ServerApp's machine, got {str(run_dir)!r}")
    force = bool(run_config.get(FORCE, False))
    folder = RunFolder(run_dir)
    folder.check_new(force)
    exp = engine.prepare(cfg)
    fl = cfg.flower
    discovery = Discovery(cfg.federation.devices)
    discovery.wait(grid, fl.discovery_timeout_s, fl.poll_interval_s)
    strategy = FedLoDropStrategy(exp, discovery, fl)
    folder.start(cfg, force=force)
    log.info("fedlodrop %s: run folder %s", __version__, run_dir)
    engine.train(
        exp,
        folder,
        engine.initial_state(exp),
        [],
        console=Console(file=_LogFile(), width=200),
        show_progress=False,
        round_fn=lambda exp_, server, round_: strategy.run_round(grid, exp_, server, round_),
    )


def config_from_run_config(run_config: dict) -> RunConfig:
    text = str(run_config.get(CONFIG_JSON, ""))
    if not text:
        raise UserError(f"the run config has no {CONFIG_JSON}: submit runs with `fedlodrop flower`")
    try:
        tree = json.loads(text)
    except ValueError as err:
        raise UserError(f"{CONFIG_JSON} is not JSON: {err}") from None
    return validate(tree)


# ============================================================================ client

client_app = ClientApp()

FOLD, FOLD_LAYOUT, FOLD_META = "fedlodrop.fold", "fedlodrop.fold.layout", "fedlodrop.fold.meta"


@dataclass
class ClientSide:
    """What a device process builds once from the config: backbone, seeded initial adapter, data."""

    cfg: RunConfig
    fm: object
    known: dict
    shards_raw: list
    tokenizer: object
    shards: dict[int, object] = field(default_factory=dict)

    def shard(self, device: int):
        """The device's tokenised training data: the in-process engine's split, its part only."""
        from fedlodrop.data import TASKS, tokenize

        if device not in self.shards:
            task = TASKS[self.cfg.task]
            self.shards[device] = tokenize(self.shards_raw[device], self.tokenizer, task, self.cfg.train.max_length)
        return self.shards[device]


_CACHE: dict[str, ClientSide] = {}  # config JSON -> its ClientSide (one per process, the latest)


def client_side(config_json: str) -> ClientSide:
    """Built once per process and config: in simulation a Ray actor serves many devices and
    rounds with it; in deployment each message starts a new process and builds it again."""
    if config_json not in _CACHE:
        _CACHE.clear()
        _CACHE[config_json] = _build(config_from_run_config({CONFIG_JSON: config_json}))
    return _CACHE[config_json]


def _build(cfg: RunConfig) -> ClientSide:
    """The same calls, in the same order, as `engine.prepare` makes for the model and the split."""
    from fedlodrop.data import TASKS, load_splits, partition
    from fedlodrop.model import build_model, init_regression_head, load_tokenizer
    from fedlodrop.rng import stream_seed

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = TASKS[cfg.task]
    train_raw, _ = load_splits(task, cfg.data, cfg.seed)
    fed = cfg.federation
    shards_raw = partition(
        train_raw, fed.devices, fed.partition, fed.dirichlet_alpha, stream_seed(cfg.seed, "partition"),
        task.is_regression,
    )
    tokenizer = load_tokenizer(cfg)
    fm = build_model(cfg, task, tokenizer, stream_seed(cfg.seed, "init"))
    if task.is_regression:
        init_regression_head(fm, float(np.mean(train_raw["label"])))
    return ClientSide(cfg, fm, fm.get_state(), shards_raw, tokenizer)


def _device(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise RuntimeError(
            "this SuperNode has no partition-id: start it with --node-config \"partition-id=K num-partitions=N\""
        ) from None


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which device this SuperNode is (the ServerApp cannot read node configs)."""
    answer = ConfigRecord({
        "partition-id": _device(context),
        "num-partitions": int(context.node_config.get("num-partitions", -1)),
        "version": __version__,
    })
    return Message(RecordDict({NODE: answer}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One device's round: `client.device_step` over this node's fold F, kept in context.state."""
    from fedlodrop.client import device_step

    device = _device(context)
    task = content_task(msg.content)
    if task.device != device:
        raise RuntimeError(f"a task for device {task.device} reached the SuperNode of device {device}")
    _test_fault(device, task.round)
    side = client_side(str(context.run_config[CONFIG_JSON]))
    fold, fold_round = load_fold(context.state)
    side.fm.set_fold(fold, fold_round)
    reply = device_step(side.fm, task, side.shard(device), side.cfg, side.known)
    save_fold(context.state, side.fm.fold, side.fm.fold_round)
    return Message(reply_content(reply, side.cfg.flower.pack_arrays), reply_to=msg)


def load_fold(state: RecordDict) -> tuple[dict[str, torch.Tensor], int]:
    """This device's fold F and the rounds it holds ({} and 0 before its first fold)."""
    if FOLD_META not in state:
        return {}, 0
    fold = from_records(state.array_records[FOLD], state.config_records[FOLD_LAYOUT])
    return fold, int(state.config_records[FOLD_META]["fold_round"])


def save_fold(state: RecordDict, fold: dict[str, torch.Tensor], fold_round: int) -> None:
    arrays, layout = to_records(fold, pack=True)
    state[FOLD] = arrays
    state[FOLD_LAYOUT] = layout
    state[FOLD_META] = ConfigRecord({"fold_round": int(fold_round)})


def _test_fault(device: int, round_: int) -> None:
    spec = os.environ.get(TEST_RAISE_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        k, _, r = item.partition("@")
        if int(k) == device and (not r or int(r) == round_ + 1):
            raise RuntimeError(f"test fault: device {device} raises in round {round_ + 1}")

