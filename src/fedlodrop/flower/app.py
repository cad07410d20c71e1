"""The Flower ServerApp and ClientApp of fedlodrop (Message API).

The app folder `fedlodrop flower` generates is one pyproject.toml naming
`fedlodrop.flower.app:server_app` and `:client_app`; the code is this installed package. The run
config carries the validated RunConfig as JSON (`config-json`) and the absolute run folder on the
ServerApp's machine (`run-dir`).

ServerApp: `engine.run` (or `engine.resume`, with `resume` in the run config) with a factory that,
once `experiment.build` has checked everything, finds which SuperNode serves which device and
makes the `FlowerEngine`; so the run folder is `fedlodrop run`'s.

ClientApp: a device is the `partition-id` of its SuperNode. Its backbone and data shard come from
`experiment.build(cfg, eval_data=False)`, the calls the server makes, from the same seed (cached
per process); its FedEx fold F, the only state a device keeps between rounds, lives in
`context.state`.

Flower starts a new ClientApp process for every message a SuperNode takes, and three of SecAgg+'s
four stages (and every discovery query) never train: this module imports neither torch nor the
model code at import time, so those processes start in about a second instead of four.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlodrop import __version__
from fedlodrop.config import RunConfig
from fedlodrop.errors import RoundFailed, UserError
from fedlodrop.flower.transport import NODE, RUN_TASK, Discovery, DiscoveryError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("flwr")  # Flower's handler: these lines reach `flwr log`

CONFIG_JSON, RUN_DIR, FORCE, RESUME = "config-json", "run-dir", "force", "resume"
# prefixes of the exception text the ServerApp fails with; the CLI reads them back from
# `flwr ls` (status-details) to print one line and choose the exit code
USER_ERROR, ROUND_FAILED = "fedlodrop user error: ", "fedlodrop round failed: "

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
    """Validate and build (before the run folder is written), find the devices' nodes, train; or
    resume the run folder's interrupted run."""
    from rich.console import Console

    from fedlodrop.flower.strategy import FedLoDropStrategy, FlowerEngine
    from fedlodrop.run import engine

    cfg = config_from_run_config(run_config)
    run_dir = Path(str(run_config.get(RUN_DIR, "")))
    if not run_dir.is_absolute():
        raise UserError(f"run-dir must be an absolute path on the ServerApp's machine, got {str(run_dir)!r}")
    fl = cfg.flower

    def make_engine(exp) -> FlowerEngine:
        discovery = Discovery(exp.cfg.federation.devices)
        discovery.wait(grid, fl.discovery_timeout_s, fl.poll_interval_s)
        log.info("fedlodrop %s: run folder %s", __version__, run_dir)
        return FlowerEngine(FedLoDropStrategy(exp, discovery, fl), grid)

    console = Console(file=_LogFile(), width=200)
    if run_config.get(RESUME, False):
        engine.resume(run_dir, make_engine, console=console, show_progress=False)
    else:
        engine.run(cfg, run_dir, make_engine, console=console, show_progress=False,
                   force=bool(run_config.get(FORCE, False)))


def config_from_run_config(run_config: dict) -> RunConfig:
    """The run's config, from the JSON `fedlodrop flower` put in Flower's run config, validated."""
    from fedlodrop.run.settings import validate  # torch (the registries' modules): only a training stage pays

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
SECAGG_CONFIGS = "secaggplus_configs"  # Flower's record of a SecAgg+ stage


_CACHE: dict[tuple, object] = {}  # (config, task, device, file) -> its device-side Experiment (the latest)
DATA = "data"  # the node config key of a device's own training file (fedlodrop flower supernode --data)


def client_side(config_json: str, task_json: str | None = None, device: int | None = None,
                data: str | None = None):
    """Built once per process and config: in simulation a Ray actor serves many devices and
    rounds with it; in deployment each message starts a new process and builds it again. With
    `federation.partition: local` the device reads its own file `data`, in the classes of the
    run's task the server sent (`task_json`)."""
    from fedlodrop.data.tasks import task_from_json
    from fedlodrop.run.experiment import build

    key = (config_json, task_json, device, data)
    if key not in _CACHE:
        _CACHE.clear()
        cfg = config_from_run_config({CONFIG_JSON: config_json})
        if cfg.federation.partition == "local":
            if not data:
                raise RuntimeError("federation.partition local: this SuperNode has no data of its own (start it with "
                                   "fedlodrop flower supernode --data FILE)")
            if not task_json:
                raise RuntimeError("federation.partition local: the message carries no task from the server")
            _CACHE[key] = build(cfg, eval_data=False, task=task_from_json(json.loads(task_json)),
                                device_file=(device, Path(data)))
        else:
            _CACHE[key] = build(cfg, eval_data=False)
    return _CACHE[key]


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
    """One device's round: `client.device_step` over this node's fold F, kept in context.state.
    Under secure aggregation every TRAIN message is a SecAgg+ stage: Flower's `secaggplus_mod`
    answers the protocol's stages and calls `_secure_train` in the stage that collects updates."""
    if SECAGG_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, _secure_train)
    from fedlodrop.flower.wire import reply_content

    side, task, reply = _device_round(msg, context)
    return Message(reply_content(reply, side.cfg.flower.pack_arrays), reply_to=msg)


def _secure_train(msg: Message, context: Context) -> Message:
    """The device's round with its update as a vector for the secure sum; its scalars travel in
    the clear."""
    from fedlodrop.flower.secure import fitres_reply
    from fedlodrop.round.client import secure_step

    side, task, (reply, vector) = _device_round(msg, context, secure_step)
    _, scalars = reply.to_flat()
    return fitres_reply(vector, scalars, msg)


def _device_round(msg: Message, context: Context, step=None):
    """`step` (client.device_step or secure_step) on this node's device, its fold kept in context."""
    from fedlodrop.flower.wire import content_task
    from fedlodrop.round.client import device_step

    step = step or device_step
    device = _device(context)
    task = content_task(msg.content)
    if task.device != device:
        raise RuntimeError(f"a task for device {task.device} reached the SuperNode of device {device}")
    task_json = str(msg.content.config_records[RUN_TASK]["json"]) if RUN_TASK in msg.content.config_records else None
    data = context.node_config.get(DATA)
    side = client_side(str(context.run_config[CONFIG_JSON]), task_json, device, str(data) if data else None)
    fold, fold_round = load_fold(context.state)
    side.fm.set_fold(fold, fold_round)
    out = step(side.fm, task, side.shards[device], side.cfg, side.known)
    save_fold(context.state, side.fm.fold, side.fm.fold_round)
    return side, task, out


def load_fold(state: RecordDict) -> tuple[dict[str, torch.Tensor], int]:
    """This device's fold F and the rounds it holds ({} and 0 before its first fold)."""
    if FOLD_META not in state:
        return {}, 0
    from fedlodrop.flower.wire import from_records

    fold = from_records(state.array_records[FOLD], state.config_records[FOLD_LAYOUT])
    return fold, int(state.config_records[FOLD_META]["fold_round"])


def save_fold(state: RecordDict, fold: dict[str, torch.Tensor], fold_round: int) -> None:
    """Keep this device's fold F (and the rounds it holds) in the SuperNode's context state, so the next
    round's catch-up applies to it."""
    from fedlodrop.flower.wire import to_records

    arrays, layout = to_records(fold, pack=True)
    state[FOLD] = arrays
    state[FOLD_LAYOUT] = layout
    state[FOLD_META] = ConfigRecord({"fold_round": int(fold_round)})
