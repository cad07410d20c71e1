"""`fedlodrop flower ...`: the same runs as `fedlodrop run`, on Flower (docs/flower.md).

    simulate    Flower's simulation engine on this machine (own SuperLink, Ray), waits, cleans up
    certs       CA and SuperLink certificate for TLS
    keys        one SuperNode authentication key pair per device
    superlink   flower-superlink with TLS and SuperNode authentication
    register    register SuperNode public keys with a SuperLink
    supernode   flower-supernode for one device (its partition-id)
    run         submit a run to a SuperLink and wait for it

Registered by cli.py. Bad input prints one line and exits 2 before anything is started or
written; a failed round exits 1; every process `simulate` starts is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlodrop.cli_common import ConfigOpt, SetOpt, announce, err_console, print_summary, user_errors
from fedlodrop.errors import RoundFailed, UserError
from fedlodrop.flower.supernode import HEARTBEAT_RANGE_S

flower_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run fedlodrop on Flower: `simulate` on this machine, or deploy a SuperLink and SuperNodes "
    "(certs, keys, superlink, register, supernode, run). See docs/flower.md.",
)

ResumeOpt = Annotated[
    Optional[Path],
    typer.Option("--resume", help="continue this interrupted run folder (it must be readable here) from its "
                 "last complete round, with its own config.yaml"),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite a run folder that already holds a run")]
QuietOpt = Annotated[bool, typer.Option(help="no per-round lines")]
SuperLinkOpt = Annotated[str, typer.Option("--superlink", help="the SuperLink's address, HOST:PORT")]
CaOpt = Annotated[Path, typer.Option("--ca", help="the CA certificate (ca.crt from `fedlodrop flower certs`)")]


class _Failure(Exception):
    """Flower itself failed (not the user's input, not a round): one line, exit 1."""


def _flower_errors(fn):
    """A _Failure becomes one line on stderr and exit 1 (inside `user_errors`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _Failure as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper



# ---------------------------------------------------------------------------- runs


@flower_app.command()
@user_errors
@_flower_errors
def simulate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (default runs/<task>-...)")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    resume: ResumeOpt = None,
) -> None:
    """One run in Flower's simulation engine: a SuperLink on 127.0.0.1, one simulated SuperNode per
    device (Ray actors); the same run folder and, with the same seed, the same result as `fedlodrop run`."""
    from fedlodrop.flower import launch

    if resume is not None:
        cfg, out = _resumed(resume, config, set_, out)
    else:
        cfg = _load(config, set_ or [], absolute_paths=True)
        out = _run_folder(cfg, out, force, "flower")
    if cfg.federation.partition == "local":
        raise UserError("federation.partition local is for a deployment (fedlodrop flower run), where each "
                        "SuperNode reads its own file; a simulation splits one file: use by_column")
    fl = cfg.flower
    federation = {
        "num-supernodes": cfg.federation.devices,
        "client-resources-num-cpus": fl.client_cpus,
        "client-resources-num-gpus": fl.client_gpus,
    }
    if fl.simulation_cpus is not None:
        federation["init-args-num-cpus"] = fl.simulation_cpus
    announce("fedlodrop flower simulate", cfg, out)
    ws = launch.Workspace.create()
    try:
        with _terminate_as_interrupt():
            app = launch.write_app(ws.dir / launch.APP_NAME)
            port = launch.free_port()
            link = ws.spawn("superlink", launch.superlink_command("127.0.0.1", port, simulation=True))
            launch.wait_http(f"127.0.0.1:{port}", proc=link)
            ws.add_connection(launch.SIM_CONNECTION, f"127.0.0.1:{port}")
            run_id = ws.submit(launch.SIM_CONNECTION, app, _run_config(cfg, out, force, resume is not None),
                               federation)
            status = _wait(ws, launch.SIM_CONNECTION, run_id, cfg, out, quiet)
            log = "" if _succeeded(status) else ws.run_log(launch.SIM_CONNECTION, run_id)
    except launch.FlowerError as err:
        raise _Failure(str(err)) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: stopping the Flower processes", highlight=False)
        raise
    finally:
        left = ws.close()
        if left:
            err_console.print(f"warning: could not stop Flower processes {sorted(left)}", highlight=False)
    _finish(status, cfg, out, log)


@flower_app.command()
@user_errors
@_flower_errors
def run(
    superlink: SuperLinkOpt,
    ca: CaOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="run folder, on the SuperLink's machine (made absolute here)")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --out (a folder "
                                          "readable here too) with its own config.yaml")] = False,
) -> None:
    """Submit a run to a SuperLink (TLS, `--ca`) and wait for it; the ServerApp writes the run
    folder on the SuperLink's machine. Ctrl-C stops the run."""
    from fedlodrop.flower import launch

    if resume:
        cfg, out = _resumed(out, config, set_, None)
    else:
        cfg = _load(config, set_ or [], absolute_paths=False)
    _need_file(ca, "--ca")
    if not resume:
        out = _run_folder(cfg, out, force, "flower")
    announce(f"fedlodrop flower run on {superlink}", cfg, out, devices_here=False)
    ws = launch.Workspace.create()
    try:
        with _terminate_as_interrupt():
            app = launch.write_app(ws.dir / launch.APP_NAME)
            ws.add_connection(launch.CONNECTION, superlink, ca)
            run_id = ws.submit(launch.CONNECTION, app, _run_config(cfg, out, force, resume))
            err_console.print(f"submitted run {run_id}", highlight=False)
            try:
                status = _wait(ws, launch.CONNECTION, run_id, cfg, out, quiet)
            except KeyboardInterrupt:
                err_console.print(f"interrupted: stopping run {run_id} on the SuperLink", highlight=False)
                ws.flwr("stop", str(run_id), launch.CONNECTION, check=False, timeout=60)
                raise
            log = "" if _succeeded(status) else ws.run_log(launch.CONNECTION, run_id)
    except launch.FlowerError as err:
        raise _Failure(str(err)) from None
    finally:
        ws.close()
    _finish(status, cfg, out, log)


def _load(config: Path | None, overrides: list[str], absolute_paths: bool):
    """The validated config; with `absolute_paths`, its paths made absolute here (Flower's
    processes run in other folders)."""
    from fedlodrop.config import load_config, with_absolute_paths

    cfg = load_config(config, overrides)
    return with_absolute_paths(cfg) if absolute_paths else cfg


def _resumed(run_dir: Path, config, set_, out) -> tuple:
    """The interrupted run's own config and its absolute folder."""
    from fedlodrop.runs import RunFolder

    if config is not None or set_ or out is not None:
        raise UserError("--resume continues a run with its own config.yaml: drop --config, --set and --out")
    folder = RunFolder(Path(run_dir).expanduser().resolve())
    cfg = folder.config()
    if folder.finished:
        raise UserError(f"{folder.path} holds a finished run: nothing to resume")
    if folder.rounds_done() == 0:
        raise UserError(f"{folder.path} holds no complete round to resume from; start the run again")
    err_console.print(f"resuming {folder.path} after round {folder.rounds_done()}", highlight=False)
    return cfg, folder.path


def _run_folder(cfg, out: Path | None, force: bool, tag: str) -> Path:
    from fedlodrop.runs import RunFolder, default_run_dir

    out = (out or default_run_dir(cfg, tag)).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"run folder {out} exists and is not a folder")
    RunFolder(out).check_new(force)
    return out


def _need_file(path: Path, option: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"{option}: file not found: {path}")


def _run_config(cfg, out: Path, force: bool, resume: bool = False) -> dict:
    from fedlodrop.flower.app import CONFIG_JSON, FORCE, RESUME, RUN_DIR

    return {CONFIG_JSON: cfg.model_dump_json(), RUN_DIR: str(out), FORCE: force, RESUME: resume}


@contextlib.contextmanager
def _terminate_as_interrupt():
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


def _wait(ws, conn: str, run_id: int, cfg, out: Path, quiet: bool) -> dict:
    """Wait for the run, printing each round's line as the ServerApp appends it (when the run
    folder is on this machine)."""
    from fedlodrop.runs import RunFolder

    folder = RunFolder(out)
    shown = folder.rounds_done()  # a resumed run's earlier rounds were shown when they ran

    def tick() -> bool:
        nonlocal shown
        if quiet:
            return folder.finished
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError, UserError):
            main = folder.task().main_metric  # the ServerApp writes task.json when the run starts
            for record in folder.records()[shown:]:
                err_console.print(record.line(main), highlight=False, soft_wrap=True)
                shown += 1
        return folder.finished

    status = ws.wait_run(conn, run_id, tick=tick)
    tick()
    return status


def _succeeded(status: dict) -> bool:
    return status.get("status") == "finished:completed"


def _finish(status: dict, cfg, out: Path, log: str) -> None:
    """Print the summary of a completed run, or turn a failed one into the right error."""
    from fedlodrop.flower.app import ROUND_FAILED, USER_ERROR
    from fedlodrop.runs import RunFolder

    if _succeeded(status):
        if RunFolder(out).finished:
            print_summary(RunFolder(out).summary(), out)
        else:
            err_console.print(f"run completed; its run folder is {out} on the SuperLink's machine", highlight=False)
        return
    details = str(status.get("status-details", "")) or str(status.get("status"))
    for prefix, kind in ((USER_ERROR, UserError), (ROUND_FAILED, RoundFailed)):
        if prefix in details:
            raise kind(details.split(prefix, 1)[1].strip())
    tail = "\n".join(log.strip().splitlines()[-15:])
    if tail:
        err_console.print(tail, highlight=False, markup=False)
    raise _Failure(f"Flower run {status.get('run-id', '?')} ended {status.get('status')}: {details}")


# ---------------------------------------------------------------------------- deployment set-up


@flower_app.command()
@user_errors
def certs(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for ca.crt, ca.key, server.pem, server.key")],
    host: Annotated[
        Optional[list[str]],
        typer.Option("--host", help="an IP or DNS name SuperNodes use to reach the SuperLink (repeat it)"),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity")] = 365,
) -> None:
    """A CA and the SuperLink's TLS certificate (EC P-256); give SuperNodes ca.crt."""
    from fedlodrop.flower.launch import make_certificates

    hosts = host or ["127.0.0.1", "localhost"]
    paths = make_certificates(out, hosts, days)
    err_console.print(f"wrote {', '.join(p.name for p in paths)} to {out} for {', '.join(hosts)}", highlight=False)


@flower_app.command()
@user_errors
def keys(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for deviceK_key and deviceK_key.pub")],
    devices: Annotated[int, typer.Option("--devices", "-k", min=1, help="how many devices (key pairs)")],
) -> None:
    """One SuperNode authentication key pair per device (EC P-384, OpenSSH format)."""
    from fedlodrop.flower.launch import make_node_keys

    paths = make_node_keys(out, devices)
    err_console.print(f"wrote {len(paths) // 2} key pairs to {out}", highlight=False)


@flower_app.command()
@user_errors
def superlink(
    certs_dir: Annotated[Path, typer.Option("--certs", help="folder from `fedlodrop flower certs`")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port of the Fleet, Control and Runtime APIs")] = 9092,
    database: Annotated[
        Optional[Path], typer.Option(help="SQLite file that keeps registrations and runs across restarts")
    ] = None,
) -> None:
    """flower-superlink with TLS and SuperNode authentication (runs in the foreground; its
    ServerApps write run folders relative to this machine)."""
    from fedlodrop.flower import launch

    for name in ("ca.crt", "server.pem", "server.key"):
        _need_file(certs_dir / name, "--certs")
    _exec(launch.superlink_command(host, port, certs_dir.resolve(), database=database))


@flower_app.command()
@user_errors
@_flower_errors
def register(
    superlink: SuperLinkOpt,
    ca: CaOpt,
    public_keys: Annotated[list[Path], typer.Argument(help="deviceK_key.pub files")],
) -> None:
    """Register SuperNodes' public keys; only registered SuperNodes may connect."""
    from fedlodrop.flower import launch

    _need_file(ca, "--ca")
    for key in public_keys:
        _need_file(key, "public key")
    ws = launch.Workspace.create()
    try:
        ws.add_connection(launch.CONNECTION, superlink, ca)
        for key in public_keys:
            try:
                node = ws.flwr_json("supernode", "register", str(key.resolve()), launch.CONNECTION, timeout=120)
            except launch.FlowerError as err:
                raise _Failure(f"{key}: {err}") from None
            err_console.print(f"registered {key} as SuperNode {node.get('node-id')}", highlight=False)
    except launch.FlowerError as err:
        raise _Failure(str(err)) from None
    finally:
        ws.close()


@flower_app.command()
@user_errors
def supernode(
    superlink: SuperLinkOpt,
    ca: CaOpt,
    key: Annotated[Path, typer.Option("--key", help="this device's private key (deviceK_key)")],
    device: Annotated[int, typer.Option("--device", min=0, help="device index K (partition-id)")],
    devices: Annotated[int, typer.Option("--devices", min=1, help="federation.devices (num-partitions)")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="this SuperNode's own Runtime API port")] = 9094,
    host: Annotated[str, typer.Option(help="address of this SuperNode's Runtime API")] = "127.0.0.1",
    max_retries: Annotated[
        Optional[int], typer.Option(min=0, help="give up after this many failed connection attempts (default: never)")
    ] = None,
    heartbeat_s: Annotated[
        Optional[float],
        typer.Option(help="heartbeat interval in seconds, 10 to 1800; the SuperLink gives up on this device after "
                     "2 missed intervals (default: Flower's 30)"),
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option(help="this device's own training file (CSV, TSV, JSONL, JSON, Parquet or a save_to_disk "
                     "folder) for runs with federation.partition local; it never leaves this machine"),
    ] = None,
) -> None:
    """flower-supernode for device K (runs in the foreground). Its ClientApp builds the model from
    the run's config and trains on this device's own file (--data, federation.partition local) or
    on its shard of the run's data, so the model (and that data) must be readable here."""
    from fedlodrop.flower import launch

    _need_file(ca, "--ca")
    _need_file(key, "--key")
    if device >= devices:
        raise UserError(f"--device {device} is not below --devices {devices}")
    low, high = HEARTBEAT_RANGE_S
    if heartbeat_s is not None and not low <= heartbeat_s <= high:
        raise UserError(f"--heartbeat-s {heartbeat_s:g} is outside [{low:g}, {high:g}], what the SuperLink accepts")
    if data is not None:
        from fedlodrop.data.files import read_table

        read_table(data, "--data", "train")  # one line now for a missing or unreadable file, not at the first round
        data = data.expanduser().resolve()
    launch.check_port_free(host, port)
    _exec(launch.supernode_command(superlink, device, devices, port, ca.resolve(), key.resolve(), host, max_retries,
                                   heartbeat_s, data))


def _exec(cmd: list[str]) -> None:
    """Become the Flower process (same PID: signals and exit codes are Flower's)."""
    from fedlodrop.flower import launch

    err_console.print(" ".join(cmd), highlight=False, markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, launch.flower_env())
