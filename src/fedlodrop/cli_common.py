"""What every command shares: the stderr console and UserError -> one line, exit code 2."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from fedlodrop.errors import RoundFailed, UserError

err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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


def announce(command: str, cfg, out) -> None:
    """The first line of a run, on either engine: what trains, on what, and where it is written."""
    from fedlodrop.model import model_pooling

    head = model_pooling(cfg).why
    err_console.print(
        f"{command}: task {cfg.task}, model {cfg.model} (classifier on {head}), {cfg.federation.devices} "
        f"devices, {cfg.federation.rounds} rounds, {cfg.federation.aggregation}, dropout {cfg.dropout.rate} "
        f"({cfg.dropout.variant}) -> {out}",
        highlight=False,
        soft_wrap=True,
    )
