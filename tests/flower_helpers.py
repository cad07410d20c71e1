"""Test helpers for the Flower engine: a Grid that runs the ClientApp in this process, and what
the end-to-end tests compare between two run folders."""

from __future__ import annotations

import copy
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SRC = Path(__file__).resolve().parents[1] / "src"  # this checkout's fedlodrop
SUPERLINK_NODE = 1  # the node id Flower's SuperLink signs its own error replies with
# Real Flower runs in the tests: every wait ends on an event (a reply, a line, an exit), never on
# the clock. A round or discovery timeout is only how long a live device may take (a ClientApp
# process that imports torch and builds the model, on a slow shared machine): far above what any
# test needs, so it never decides what happens. HANG_S only stops a test that hangs.
LIVE_DEVICE_S = 600.0
HANG_S = 1800.0
# A deployment's SuperNodes beat every HEARTBEAT_S (Flower's default is 30 s); the SuperLink calls a
# node gone after 2 x HEARTBEAT_S without one, so a killed node is noticed sooner. With 10 s a live
# node on a 2-core machine running two federations at once was once called gone (its reply came
# after the 20 s); 15 s leaves room, and the deployment tests run one federation at a time.
HEARTBEAT_S = 15


class FakeGrid(Grid):
    """A SuperLink and its SuperNodes in one process: a pushed message is handled at once by
    `fedlodrop.flower.app.client_app` with that node's Context (node_config, a persistent
    state), and its reply waits to be pulled. `offline` nodes take TRAIN messages and never answer;
    `unavailable` nodes' TRAIN messages get the SuperLink's NODE_UNAVAILABLE error (signed by node
    1, as Flower does); `hidden` nodes are not listed by get_node_ids at all; `refused` nodes' TRAIN messages
    are not taken (push returns no id for them)."""

    def __init__(self, devices: int, run_config: dict, node_ids: list[int] | None = None,
                 data: list[Path] | None = None):
        """`data`: each device's own training file, in its node config (`supernode --data`)."""
        from fedlodrop.flower.app import client_app

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, SUPERLINK_NODE, 1
        self.client_app = client_app
        self.node_ids = node_ids or [1000 + 17 * k for k in range(devices)]
        node_config = [{"partition-id": k, "num-partitions": devices} | ({"data": str(data[k])} if data else {})
                       for k in range(devices)]
        self.contexts = {
            n: Context(7, n, node_config[k], RecordDict(), dict(run_config)) for k, n in enumerate(self.node_ids)
        }
        self.offline: set[int] = set()
        self.unavailable: set[int] = set()
        self.hidden: set[int] = set()
        self.refused: set[int] = set()  # nodes whose TRAIN messages the SuperLink does not take
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}

    # the abstract parts of Grid this engine does not use
    def set_run(self, run) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return [n for n in self.node_ids if n not in self.hidden]

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node, train = msg.metadata.dst_node_id, msg.metadata.message_type == "train"
            if train and node in self.refused:
                ids.append("")
                continue
            self.pushed.append(msg)
            ids.append(mid)
            if train and node in self.offline:
                continue
            if train and node in self.unavailable:
                reply = Message(Error(5, "Node is unavailable."), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE
            else:
                try:  # a copy, as a SuperNode gets it over the wire (SecAgg+ sends one content to all)
                    reply = self.client_app(copy.deepcopy(msg), self.contexts[node])
                except Exception as err:  # noqa: BLE001 - what a SuperNode makes of a raising ClientApp
                    reply = Message(Error(2, f"<class '{type(err).__name__}'>:<'{err}'>"), reply_to=msg)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]


# ---------------------------------------------------------------------------- comparing runs

def serve(cfg, out: Path, grid: FakeGrid | None = None, **grid_kw) -> FakeGrid:
    """Our ServerApp's whole run over an in-process Grid (FakeGrid unless one is given; `data=`:
    each device's own file)."""
    from fedlodrop.flower import app as flower_app

    rc = {"config-json": cfg.model_dump_json(), "run-dir": str(out)}
    grid = grid or FakeGrid(cfg.federation.devices, rc, **grid_kw)
    flower_app.serve(grid, rc)
    return grid


def metrics(folder: Path) -> list:
    from fedlodrop.run.folder import RunFolder

    return RunFolder(Path(folder)).records()


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same model (bit for bit) and the same metrics."""
    from fedlodrop.run.folder import compare

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors", "checkpoint.json"):
        assert (Path(b) / name).is_file(), name
    _, problems = compare(a, b)
    assert not problems, problems


# ---------------------------------------------------------------------------- Flower processes


def subprocess_env(tmp: Path, pythonpath: bool = True, **extra: str) -> dict[str, str]:
    """For `python -m fedlodrop flower ...` in a test: offline, and its temporary files (the CLI's
    FLWR_HOME workspace) under `tmp`, so that every process it starts can be found afterwards by
    that path. `pythonpath`: this checkout on PYTHONPATH; without it, run the command with
    cwd=SRC (`python -m` then imports this checkout, and the CLI must pass it on to Flower)."""
    import os

    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(SRC)
    # Ray would put its session (and socket paths, limited to 107 characters) under TMPDIR
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TMPDIR=str(tmp / "tmp"), RAY_TMPDIR="/tmp", **extra)
    return env


FAULTS = Path(__file__).parent / "faults"  # test-only fault injection for real processes (faults/fault_inject.py)


def raising_env(spec: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment entries that make devices `spec` ("K" or "K@R", comma-separated) raise in every
    Flower process a test starts: the faults folder on PYTHONPATH and FEDLODROP_TEST_RAISE."""
    import os

    from fault_inject import ENV

    paths = [str(FAULTS)] + [p for p in (base or {}).get("PYTHONPATH", "").split(os.pathsep) if p]
    return {ENV: spec, "PYTHONPATH": os.pathsep.join(paths)}


def fedlodrop_cmd(*args) -> list[str]:
    import sys

    return [sys.executable, "-m", "fedlodrop", *(str(a) for a in args)]


def write_config(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def wait_for_text(path: Path, text: str, start: int = 0, proc=None, timeout: float = HANG_S) -> int:
    """Until `text` is in the file at `path` after character `start`; its position. Fails at once
    if `proc` (a Popen) has ended first; `timeout` only ends a hang."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.is_file() else ""
        if (at := content.find(text, start)) >= 0:
            return at
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{text!r} not in {path}; the process ended with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path} after {timeout:g} s (a hang)")
        time.sleep(0.1)


def assert_no_processes_left(tmp: Path, timeout: float = 120.0) -> None:
    """No process (or descendant of one) mentions `tmp` in its command line or environment
    (waits while some are still exiting; `timeout` only ends a hang)."""
    import time

    from fedlodrop.flower.launch import processes_of

    deadline = time.monotonic() + timeout
    while (left := processes_of(str(tmp))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"


# ---------------------------------------------------------------------------- a loopback deployment


@dataclass
class Federation:
    """A deployment on loopback: TLS SuperLink with SuperNode authentication, one registered
    SuperNode per device (`fedlodrop flower supernode`, HEARTBEAT_S heartbeats)."""

    root: Path
    ws: object  # launch.Workspace: spawns, logs and stops (by PID) its processes
    address: str
    ca: Path
    devices: int
    nodes: list
    data: list[Path] | None = None  # each device's own training file (supernode --data)

    def node_cmd(self, device: int) -> list[str]:
        """`fedlodrop flower supernode` for `device` with its key (and its own training file, when
        the federation has them); a dead node is noticed after 2 x HEARTBEAT_S instead of Flower's 2 x 30 s."""
        from fedlodrop.flower import launch

        data = ["--data", self.data[device]] if self.data else []
        return fedlodrop_cmd("flower", "supernode", "--superlink", self.address, "--ca", self.ca,
                             "--key", self.root / "keys" / f"device{device}_key", "--device", device,
                             "--devices", self.devices, "--port", launch.free_port(), "--heartbeat-s", HEARTBEAT_S,
                             *data)

    def run(self, cfg_file: Path, out: Path) -> list[str]:
        return fedlodrop_cmd("flower", "run", "--config", cfg_file, "--superlink", self.address,
                             "--ca", self.ca, "--out", out)


def cli_ok(*args):
    """`fedlodrop ARGS` in this process; it must succeed."""
    from typer.testing import CliRunner

    from fedlodrop.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@contextmanager
def federation(root: Path, devices: int, spare_keys: int = 0, data: list[Path] | None = None):
    """Certificates and keys made with the CLI (`spare_keys` more, never registered), the
    SuperLink, the devices' keys registered, their SuperNodes started (with `data`: each with its
    own training file). On exit every process is stopped by PID and none may be left."""
    import subprocess

    from fedlodrop.flower import launch

    ws = launch.Workspace.create(root)
    ws.env = launch.flower_env(ws.flwr_home, base=subprocess_env(root))
    try:
        cli_ok("flower", "certs", "--out", root / "certs", "--host", "127.0.0.1")
        cli_ok("flower", "keys", "--out", root / "keys", "--devices", devices + spare_keys)
        port = launch.free_port()
        link = ws.spawn("superlink", fedlodrop_cmd("flower", "superlink", "--certs", root / "certs",
                                                   "--host", "127.0.0.1", "--port", port))
        fed = Federation(root, ws, f"127.0.0.1:{port}", root / "certs" / "ca.crt", devices, [], data)
        launch.wait_http(fed.address, fed.ca, timeout=HANG_S, proc=link)
        keys = [root / "keys" / f"device{k}_key.pub" for k in range(devices)]
        reg = subprocess.run(fedlodrop_cmd("flower", "register", "--superlink", fed.address, "--ca", fed.ca, *keys),
                             env=ws.env, capture_output=True, text=True, timeout=HANG_S, check=False)
        assert reg.returncode == 0 and reg.stderr.count("registered") == devices, reg.stderr
        fed.nodes = [ws.spawn(f"node{k}", fed.node_cmd(k)) for k in range(devices)]
        yield fed
    finally:
        left = ws.stop_all()
        assert not left, f"processes left running: {left}"
        assert_no_processes_left(root)


def run_and_kill_node(cmd: list[str], env: dict, node, start: int = 0, nth: int = 1) -> tuple[int, str, str]:
    """Start `cmd` (a `fedlodrop flower run`), kill `node`'s SuperNode (its process group,
    SIGKILL, by PID) once it has received its `nth` TRAIN message after log position `start`,
    and wait for the run: (exit code, stdout, stderr). Waits end on log lines, never the clock."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        at = start
        for _ in range(nth):
            at = wait_for_text(node.log, "Receiving: train message", at, proc) + 1
        wait_for_text(node.log, "Received successfully", at, proc)
        os.killpg(node.pid, signal.SIGKILL)  # the device and its ClientApp are gone at once
        node.popen.wait(timeout=HANG_S)
        out, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err
