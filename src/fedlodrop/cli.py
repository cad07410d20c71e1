"""The `fedlodrop` command: a typer app whose commands call the library and print with rich."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from fedlodrop.cli_common import err_console, user_errors
from fedlodrop.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated LoRA fine-tuning with row/column dropout (FedLoDrop) and edge resource planning.",
)
out_console = Console()

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run configuration")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a config key: --set train.lr=1e-3")
]


def _offline_env() -> None:
    """Never hang on a hub request when the user set offline mode; keep transformers quiet."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@app.command()
@user_errors
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="run folder (default runs/<task>-<time>)")] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="continue this run folder from its last complete round")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite a run folder that already holds a run")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Fine-tune across simulated devices; with no arguments, the offline default (MiniLM, Rotten Tomatoes)."""
    from fedlodrop.config import load_config
    from fedlodrop.engine import resume as resume_engine
    from fedlodrop.engine import run as run_engine

    _offline_env()
    if resume is not None:
        if config is not None or set_ or out is not None:
            raise UserError("--resume continues a run with its own config.yaml: drop --config, --set and --out")
        out = resume
        err_console.print(f"fedlodrop run: resuming {out}", highlight=False)
        summary = resume_engine(out, console=err_console, show_progress=not quiet)
    else:
        cfg = load_config(config, set_ or [])
        if out is None:
            out = Path("runs") / f"{cfg.task}-{cfg.federation.aggregation}-{time.strftime('%Y%m%d-%H%M%S')}"
        err_console.print(
            f"fedlodrop run: task {cfg.task}, model {cfg.model}, {cfg.federation.devices} devices, "
            f"{cfg.federation.rounds} rounds, {cfg.federation.aggregation}, dropout {cfg.dropout.rate} "
            f"({cfg.dropout.variant}) -> {out}",
            highlight=False,
        )
        summary = run_engine(cfg, out, console=err_console, show_progress=not quiet, force=force)
    main = summary["main_metric"]
    out_console.print(
        f"final {main} {summary['final'][main]:.4f}, best {summary['best'][main]:.4f} "
        f"(round {summary['best_round']}); sent {summary['uplink_bytes_total'] / 1e6:.2f} MB up, "
        f"{summary['downlink_bytes_total'] / 1e6:.2f} MB down; {summary['wall_s']:.0f} s; run folder {out}",
        highlight=False,
    )


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    set_: SetOpt = None,
) -> None:
    """Re-score a saved run's global model on the validation split."""
    from fedlodrop.engine import rescore

    _offline_env()
    result = rescore(run_dir, set_ or [])
    out_console.print_json(json.dumps(result))


@app.command()
@user_errors
def sweep(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    rates: Annotated[
        Optional[str],
        typer.Option("--rates", help="dropout rates 0,0.1,0.3: shorthand for --vary dropout.rate=0,0.1,0.3"),
    ] = None,
    vary: Annotated[
        Optional[list[str]],
        typer.Option("--vary", help="KEY=V1,V2,... for any config key; repeat it for a grid (the product)"),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option("--seeds", min=1, help="runs per grid point: seeds base..base+N-1 (base: config seed)"),
    ] = 1,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="sweep folder; the same one again continues it (default runs/...)"),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """One run per grid point and seed (finished ones reused), then a table, CSV and plot against the rate."""
    from fedlodrop.config import load_config
    from fedlodrop.report import build_report
    from fedlodrop.sweep import expand_grid, make_axes, run_sweep

    _offline_env()
    cfg = load_config(config, set_ or [])
    axes = make_axes(rates, vary or [])
    if not axes and seeds == 1:
        raise UserError("nothing to sweep: give --rates, --vary KEY=V1,V2,... or --seeds N")
    if out is None:
        out = Path("runs") / f"sweep-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = len(expand_grid(cfg, axes, seeds))
    grid = " x ".join(f"{a.key} ({len(a.values)})" for a in axes) or "no varied key"
    err_console.print(
        f"fedlodrop sweep: task {cfg.task}, model {cfg.model}, {grid}, {seeds} seed(s): {n} runs -> {out}",
        highlight=False,
    )
    run_sweep(cfg, axes, seeds, out, console=err_console, show_progress=not quiet)
    build_report(out, console=out_console)


@app.command()
@user_errors
def report(
    folder: Annotated[Path, typer.Argument(help="a sweep folder (or any folder of run folders)")],
    out_prefix: Annotated[
        Optional[Path],
        typer.Option(
            "--out-prefix", help="write PREFIX.csv, PREFIX_runs.csv, PREFIX.png (default: FOLDER/sweep)"
        ),
    ] = None,
) -> None:
    """Rebuild a sweep's table, CSV files and plot from its run folders, without running anything."""
    from fedlodrop.report import build_report

    build_report(folder, out_prefix, console=out_console)


from fedlodrop.cli_planning import calibrate, optimize, plot_tradeoff, system_app  # noqa: E402

app.add_typer(system_app, name="system")
app.command("optimize")(optimize)
app.command("calibrate")(calibrate)
app.command("plot-tradeoff")(plot_tradeoff)


def _hide_third_party_deprecations() -> None:
    """Other packages' deprecation notices (PEFT reading `is_gradient_checkpointing`, which
    transformers deprecated, prints a FutureWarning on every run) tell a user nothing they can act
    on. Hide them for the command only; fedlodrop's own warnings, and any -W or PYTHONWARNINGS the
    user gave, still apply."""
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"fedlodrop(\.|$)")  # checked first


def main() -> None:
    _hide_third_party_deprecations()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
