"""A run's life on Flower, as library code: `simulate` starts a SuperLink of its own and Flower's
simulation engine on this machine, `deploy` submits to a running SuperLink (TLS); both wait for the
run (showing each round as the ServerApp appends it, when the run folder is on this machine), stop
what they started, also on Ctrl-C or SIGTERM, and turn Flower's verdict into ours (`outcome`): the
run's summary, a UserError (exit 2) or RoundFailed (exit 1) carried back from the ServerApp, or
`FlowerFailure` (Flower itself failed). `fedlodrop flower simulate | run` only parse and print.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlodrop.config import RunConfig
from fedlodrop.errors import RoundFailed, UserError
from fedlodrop.flower import launch
from fedlodrop.flower.app import CONFIG_JSON, FORCE, RESUME, ROUND_FAILED, RUN_DIR, USER_ERROR
from fedlodrop.round.records import RoundRecord, Summary
from fedlodrop.run.folder import RunFolder, default_run_dir

Say = Callable[[str], None]  # where a line for the user goes
OnRecord = Callable[[RoundRecord, str], None]  # (a round's record, the task's main metric)


class FlowerFailure(Exception):
    """Flower itself failed (not the user's input, not a round): one line, exit 1."""


@dataclass
class Outcome:
    """A finished Flower run: its summary when the run folder is on this machine, else a note."""

    summary: Summary | None
    note: str | None = None


def run_config(cfg: RunConfig, out: Path, force: bool, resume: bool = False) -> dict:
    """What the ServerApp reads from Flower's run config (the keys the generated app declares)."""
    return {CONFIG_JSON: cfg.model_dump_json(), RUN_DIR: str(out), FORCE: force, RESUME: resume}


def resumed(run_dir: Path) -> tuple[RunConfig, Path, int]:
    """An interrupted run's own config, its absolute folder and the rounds it holds (or one line
    saying why it cannot be resumed)."""
    folder = RunFolder(Path(run_dir).expanduser().resolve())
    cfg = folder.config()
    if folder.finished:
        raise UserError(f"{folder.path} holds a finished run: nothing to resume")
    if folder.rounds_done() == 0:
        raise UserError(f"{folder.path} holds no complete round to resume from; start the run again")
    return cfg, folder.path, folder.rounds_done()


def new_run_folder(cfg: RunConfig, out: Path | None, force: bool) -> Path:
    """The absolute run folder a new run goes to, checked before anything starts."""
    out = (out or default_run_dir(cfg, "flower")).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"run folder {out} exists and is not a folder")
    RunFolder(out).check_new(force)
    return out


def refuse_simulation(cfg: RunConfig) -> None:
    """What a simulation cannot run, one line each (before anything starts)."""
    if cfg.federation.partition == "local":
        raise UserError("federation.partition local is for a deployment (fedlodrop flower run), where each "
                        "SuperNode reads its own file; a simulation splits one file: use by_column")


def simulate(cfg: RunConfig, out: Path, *, force: bool = False, resume: bool = False,
             on_record: OnRecord | None = None, say: Say = print) -> Outcome:
    """One run in Flower's simulation engine: a SuperLink on 127.0.0.1, one simulated SuperNode
    per device (Ray actors). Every process it starts is stopped before it returns."""
    refuse_simulation(cfg)
    fl = cfg.flower
    federation = {"num-supernodes": cfg.federation.devices, "client-resources-num-cpus": fl.client_cpus,
                  "client-resources-num-gpus": fl.client_gpus}
    if fl.simulation_cpus is not None:
        federation["init-args-num-cpus"] = fl.simulation_cpus
    ws = launch.Workspace.create()
    try:
        with terminate_as_interrupt():
            app = launch.write_app(ws.dir / launch.APP_NAME)
            port = launch.free_port()
            link = ws.spawn("superlink", launch.superlink_command("127.0.0.1", port, simulation=True))
            launch.wait_http(f"127.0.0.1:{port}", proc=link)
            ws.add_connection(launch.SIM_CONNECTION, f"127.0.0.1:{port}")
            run_id = ws.submit(launch.SIM_CONNECTION, app, run_config(cfg, out, force, resume), federation)
            status = wait(ws, launch.SIM_CONNECTION, run_id, out, on_record)
            log = "" if succeeded(status) else ws.run_log(launch.SIM_CONNECTION, run_id)
    except launch.FlowerError as err:
        raise FlowerFailure(str(err)) from None
    except KeyboardInterrupt:
        say("interrupted: stopping the Flower processes")
        raise
    finally:
        left = ws.close()
        if left:
            say(f"warning: could not stop Flower processes {sorted(left)}")
    return outcome(status, out, log, say)


def deploy(cfg: RunConfig, out: Path, superlink: str, ca: Path, *, force: bool = False, resume: bool = False,
           on_record: OnRecord | None = None, say: Say = print) -> Outcome:
    """Submit a run to the SuperLink at `superlink` (TLS with CA `ca`) and wait for it; the
    ServerApp writes the run folder at `out` on the SuperLink's machine. Ctrl-C stops the run."""
    ws = launch.Workspace.create()
    try:
        with terminate_as_interrupt():
            app = launch.write_app(ws.dir / launch.APP_NAME)
            ws.add_connection(launch.CONNECTION, superlink, ca)
            run_id = ws.submit(launch.CONNECTION, app, run_config(cfg, out, force, resume))
            say(f"submitted run {run_id}")
            try:
                status = wait(ws, launch.CONNECTION, run_id, out, on_record)
            except KeyboardInterrupt:
                say(f"interrupted: stopping run {run_id} on the SuperLink")
                ws.flwr("stop", str(run_id), launch.CONNECTION, check=False, timeout=60)
                raise
            log = "" if succeeded(status) else ws.run_log(launch.CONNECTION, run_id)
    except launch.FlowerError as err:
        raise FlowerFailure(str(err)) from None
    finally:
        ws.close()
    return outcome(status, out, log, say)


def register(superlink: str, ca: Path, public_keys: list[Path]) -> list[tuple[Path, object]]:
    """Register SuperNodes' public keys with the SuperLink at `superlink`: (key, node id) each."""
    ws = launch.Workspace.create()
    done = []
    try:
        ws.add_connection(launch.CONNECTION, superlink, ca)
        for key in public_keys:
            try:
                node = ws.flwr_json("supernode", "register", str(Path(key).resolve()), launch.CONNECTION, timeout=120)
            except launch.FlowerError as err:
                raise FlowerFailure(f"{key}: {err}") from None
            done.append((key, node.get("node-id")))
    except launch.FlowerError as err:
        raise FlowerFailure(str(err)) from None
    finally:
        ws.close()
    return done


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM behaves like Ctrl-C, so the cleanup in `finally` runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. under a test runner): leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def wait(ws: launch.Workspace, conn: str, run_id: int, out: Path, on_record: OnRecord | None = None) -> dict:
    """Wait for the run; with `on_record`, hand it each round's record as the ServerApp appends it
    (when the run folder is on this machine)."""
    folder = RunFolder(out)
    shown = folder.rounds_done()  # a resumed run's earlier rounds were shown when they ran

    def tick() -> bool:
        nonlocal shown
        if on_record is None:
            return folder.finished
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError, UserError):
            main = folder.task().main_metric  # the ServerApp writes task.json when the run starts
            for record in folder.records()[shown:]:
                on_record(record, main)
                shown += 1
        return folder.finished

    status = ws.wait_run(conn, run_id, tick=tick)
    tick()
    return status


def succeeded(status: dict) -> bool:
    """Whether Flower says the run completed."""
    return status.get("status") == "finished:completed"


def outcome(status: dict, out: Path, log: str, say: Say = print) -> Outcome:
    """A completed run's summary, or the failed run's error: the ServerApp's UserError or
    RoundFailed (carried in Flower's status details), else FlowerFailure after the log's tail."""
    if succeeded(status):
        if RunFolder(out).finished:
            return Outcome(RunFolder(out).summary())
        return Outcome(None, f"run completed; its run folder is {out} on the SuperLink's machine")
    details = str(status.get("status-details", "")) or str(status.get("status"))
    for prefix, kind in ((USER_ERROR, UserError), (ROUND_FAILED, RoundFailed)):
        if prefix in details:
            raise kind(details.split(prefix, 1)[1].strip())
    tail = "\n".join(log.strip().splitlines()[-15:])
    if tail:
        say(tail)
    raise FlowerFailure(f"Flower run {status.get('run-id', '?')} ended {status.get('status')}: {details}")
