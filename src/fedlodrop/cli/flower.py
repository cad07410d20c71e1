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

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlodrop.cli.common import ConfigOpt, SetOpt, announce, err_console, print_summary, resume_alone, user_errors
from fedlodrop.errors import UserError
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


def _flower_errors(fn):
    """Flower itself failing (`federation.FlowerFailure`) becomes one line on stderr and exit 1
    (inside `user_errors`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from fedlodrop.flower.federation import FlowerFailure

        try:
            return fn(*args, **kwargs)
        except FlowerFailure as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _say(line: str) -> None:
    err_console.print(line, highlight=False, markup=False, soft_wrap=True)


def _show_round(record, main: str) -> None:
    err_console.print(record.line(main), highlight=False, soft_wrap=True)


def _print_outcome(result, out: Path) -> None:
    if result.summary is not None:
        print_summary(result.summary, out)
    else:
        _say(result.note)


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
    from fedlodrop.flower import federation
    from fedlodrop.flower.federation import refuse_simulation
    from fedlodrop.run.settings import load_config, with_absolute_paths

    if resume is not None:
        resume_alone(config, set_, out)
        cfg, out, done = federation.resumed(resume)
        _say(f"resuming {out} after round {done}")
    else:
        cfg = with_absolute_paths(load_config(config, set_ or []))  # Flower's processes run in other folders
        out = federation.new_run_folder(cfg, out, force)
    refuse_simulation(cfg)
    announce("fedlodrop flower simulate", cfg, out)
    result = federation.simulate(cfg, out, force=force, resume=resume is not None,
                                 on_record=None if quiet else _show_round, say=_say)
    _print_outcome(result, out)


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
    from fedlodrop.flower import federation
    from fedlodrop.run.settings import load_config

    if resume:
        resume_alone(config, set_, None)
        cfg, out, done = federation.resumed(out)
        _say(f"resuming {out} after round {done}")
    else:
        cfg = load_config(config, set_ or [])
    _need_file(ca, "--ca")
    if not resume:
        out = federation.new_run_folder(cfg, out, force)
    announce(f"fedlodrop flower run on {superlink}", cfg, out, devices_here=False)
    result = federation.deploy(cfg, out, superlink, ca, force=force, resume=resume,
                               on_record=None if quiet else _show_round, say=_say)
    _print_outcome(result, out)


def _need_file(path: Path, option: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"{option}: file not found: {path}")


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
    from fedlodrop.flower import federation

    _need_file(ca, "--ca")
    for key in public_keys:
        _need_file(key, "public key")
    for key, node in federation.register(superlink, ca, public_keys):
        err_console.print(f"registered {key} as SuperNode {node}", highlight=False)


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
