"""What every command shares: the consoles, the config options, UserError -> one line, exit code 2,
and the lines that open and close a run on any engine."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from fedlodrop.errors import RoundFailed, UserError

if TYPE_CHECKING:
    from fedlodrop.round.records import Summary

err_console = Console(stderr=True)
out_console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run configuration")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a config key: --set train.lr=1e-3")
]


def fail(message: str) -> None:
    """Print `error: <message>` on stderr and exit with code 2 (the user's input was wrong)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def resume_alone(config, set_, out) -> None:
    """--resume continues a run with its own config.yaml: any other run option is a mistake."""
    if config is not None or set_ or out is not None:
        raise UserError("--resume continues a run with its own config.yaml: drop --config, --set and --out")


def user_errors(fn):
    """A UserError (the planner's InfeasibleError too) becomes one line on stderr and exit 2; a
    failed round one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            fail(str(err))
        except RoundFailed as err:  # not the user's input: exit 1, the last checkpoint is intact
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def announce(command: str, cfg, out, devices_here: bool = True) -> None:
    """The first line of a run, on either engine: what trains, on what, in which precision and
    why, and where it is written. `devices_here`: the devices train on this machine (in process, or
    simulated); in a deployment each device resolves `train.precision auto` on its own hardware."""
    from fedlodrop.model.backbone import model_pooling, run_precisions

    head = model_pooling(cfg).why
    train, evaluation = run_precisions(cfg)
    if not devices_here and cfg.train.precision == "auto":
        train = "each device's own choice (train.precision auto: bf16 on bf16 hardware)"
    data = cfg.data
    source = (f" (data.train {data.train})" if data.train is not None else
              f" (data.hub_path {data.hub_path})" if data.hub_path is not None else "")
    err_console.print(
        f"{command}: task {cfg.task}{source}, model {cfg.model} (classifier on {head}), {cfg.federation.devices} "
        f"devices, {cfg.federation.rounds} rounds, {cfg.federation.aggregation}, dropout {cfg.dropout.rate} "
        f"({cfg.dropout.variant}); training {train}, evaluation {evaluation} -> {out}",
        highlight=False,
        soft_wrap=True,
    )


def print_summary(summary: Summary, out) -> None:
    """The last line of a run (in-process or on Flower): final and best metric, bytes, time; and a
    warning for every device whose update no round could use."""
    main = summary.main_metric
    spent = f"; {summary.privacy}" if summary.privacy is not None else ""
    precision = ""
    if summary.precision:
        train = "/".join(p["dtype"] for p in summary.precision["train"]) or "-"
        precision = f" (trained {train}, evaluated {summary.precision['eval']['dtype']})"
    out_console.print(
        f"final {main} {summary.final[main]:.4f}, best {summary.best[main]:.4f} "
        f"(round {summary.best_round}){precision}; sent {summary.uplink_bytes_total / 1e6:.2f} MB up, "
        f"{summary.downlink_bytes_total / 1e6:.2f} MB down{spent}; {summary.wall_s:.0f} s; run folder {out}",
        highlight=False,
    )
    for device, reason in summary.devices_never_used.items():
        err_console.print(f"warning: device {device} took part in no round of {summary.rounds} ({reason})",
                          highlight=False, soft_wrap=True)
