"""The `fedlodrop` command: a typer app whose commands call the library and print with rich."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedlodrop.cli.common import (
    ConfigOpt,
    SetOpt,
    announce,
    err_console,
    out_console,
    print_summary,
    resume_alone,
    user_errors,
)
from fedlodrop.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated LoRA fine-tuning with row/column dropout (FedLoDrop) and edge resource planning.",
)


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
    from fedlodrop.run.engine import resume as resume_engine
    from fedlodrop.run.engine import run as run_engine
    from fedlodrop.run.folder import default_run_dir
    from fedlodrop.run.inprocess import refuse
    from fedlodrop.run.settings import load_config

    _offline_env()
    if resume is not None:
        resume_alone(config, set_, out)
        out = resume
        err_console.print(f"fedlodrop run: resuming {out}", highlight=False, soft_wrap=True)
        summary = resume_engine(out, console=err_console, show_progress=not quiet)
    else:
        cfg = load_config(config, set_ or [])
        out = out or default_run_dir(cfg)
        refuse(cfg)  # before the model loads: what one process cannot run
        announce("fedlodrop run", cfg, out)
        summary = run_engine(cfg, out, console=err_console, show_progress=not quiet, force=force)
    print_summary(summary, out)


PrecisionOpt = Annotated[
    Optional[str],
    typer.Option(
        "--precision",
        help="fp32, bf16 or auto (bf16 on bf16 hardware); default: the run's train.eval_precision, fp32 unless "
        "set: the exported model's outputs on any machine",
    ),
]


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    set_: SetOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Re-score a saved run's global model on the validation split."""
    from fedlodrop.run.evaluation import rescore

    _offline_env()
    result = rescore(run_dir, set_ or [], precision)
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
    arm: Annotated[
        Optional[list[str]],
        typer.Option("--arm", help="NAME={key: value, ...}: settings compared as wholes, one axis 'arm' (repeat "
                     "it, one per arm), e.g. --arm 'rank={lora.ranks: [2,4,8]}'"),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option("--seeds", min=1, help="runs per grid point: seeds base..base+N-1 (base: config seed)"),
    ] = 1,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="sweep folder; the same one again continues it (default runs/...)"),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option("--jobs", "-j", help="runs at once, each in its own process; a line per start and end"),
    ] = 1,
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            help="torch threads per run (sets train.threads); default: the config's train.threads, else "
            "CPUs / jobs (at least 1) with --jobs > 1, torch's own choice with one job",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
) -> None:
    """One run per grid point and seed (finished ones reused), then a table, CSV and plot against the rate."""
    from fedlodrop.run.folder import default_run_dir
    from fedlodrop.run.settings import load_config
    from fedlodrop.studies.report import build_report
    from fedlodrop.studies.sweep import check_jobs, expand_grid, make_axes, run_sweep

    _offline_env()
    check_jobs(jobs, threads)
    cfg = load_config(config, set_ or [])
    axes = make_axes(rates, vary or [], arm or [])
    if not axes and seeds == 1:
        raise UserError("nothing to sweep: give --rates, --vary KEY=V1,V2,..., --arm NAME={...} or --seeds N")
    if out is None:
        out = default_run_dir(cfg, kind="sweep")
    n = len(expand_grid(cfg, axes, seeds))
    grid = " x ".join(f"{a.key} ({len(a.values)})" for a in axes) or "no varied key"
    err_console.print(
        f"fedlodrop sweep: task {cfg.task}, model {cfg.model}, {grid}, {seeds} seed(s): {n} runs"
        + (f", {jobs} at a time" if jobs > 1 else "") + f" -> {out}",
        highlight=False,
    )
    run_sweep(cfg, axes, seeds, out, console=err_console, show_progress=not quiet, jobs=jobs, threads=threads)
    build_report(out, console=out_console)


@app.command()
@user_errors
def compare(
    system: Annotated[Path, typer.Argument(help="system YAML (devices, cell, latency limit, energy budgets)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="training seeds per method (base: config seed)")] = 3,
    methods: Annotated[
        str, typer.Option(help="comma-separated: bnb, psca, fixed, equal-bandwidth, none, fit-only, longer-rounds, "
                          "bf16, int8, bnb-int8, unplanned")
    ] = "bnb,psca,fixed,equal-bandwidth,none,fit-only,longer-rounds,bf16,int8,bnb-int8,unplanned",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder (default runs/compare-...)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs in parallel processes")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="torch threads per run (default: CPUs / jobs)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    target: Annotated[Optional[float], typer.Option(help="the metric that time and energy to target are measured "
                                                    "at (default: 0.95 x the best method's mean final metric)")] = None,
) -> None:
    """Plan the system with every method, train each plan over seeds on the simulated clock, and
    tabulate the metric (final, at equal time, at equal energy), time and energy to a target, gap,
    rounds, simulated time and energy, bytes and dropped devices. With federation.time_budget_s or
    energy_budget_j each method trains the rounds its plan fits in the budget."""
    from fedlodrop.run.folder import default_run_dir
    from fedlodrop.run.settings import load_config
    from fedlodrop.studies.comparison import compare as run_compare
    from fedlodrop.studies.comparison import write_table

    _offline_env()
    cfg = load_config(config, set_ or [], system=system)  # the system's devices, epochs and samples unless given
    out = out or default_run_dir(cfg, kind="compare")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    err_console.print(f"fedlodrop compare: task {cfg.task}, system {system}, methods {', '.join(chosen)}, "
                      f"{seeds} seed(s) -> {out}", highlight=False)
    results = run_compare(cfg, system, out, chosen, seeds, jobs, threads, console=err_console,
                          show_progress=not quiet, target=target)
    out_console.print(write_table(results, out / "compare.md", out / "compare.csv", cfg, system, target),
                      highlight=False)
    err_console.print(f"wrote {out / 'compare.md'}, compare.csv and compare.png", highlight=False)


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
    from fedlodrop.studies.report import build_report

    build_report(folder, out_prefix, console=out_console)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to create (must not exist, or be empty)")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="merged: a transformers model folder, everything folded in (always exact); "
            "peft: adapter_config.json + adapter_model.safetensors for the original backbone "
            "(FedEx runs: an exact LoRA of higher rank)",
        ),
    ] = "merged",
    device: Annotated[str, typer.Option(help="where to rebuild and merge the model: cpu, cuda, auto")] = "cpu",
) -> None:
    """Export a run's global model for use without fedlodrop (AutoModelForSequenceClassification or PEFT)."""
    from fedlodrop.artifacts.export import export as export_run

    _offline_env()
    result = export_run(run_dir, out, format_, device)
    ranks = ""
    if result.ranks:
        values = sorted(result.ranks.values())
        ranks = f"; FedEx deltas as LoRA of rank {values[0]}..{values[-1]} per module"
    out_console.print(
        f"exported {result.format} to {result.folder} ({result.bytes / 1e6:.2f} MB){ranks}", highlight=False
    )
    if result.how_to_load:
        out_console.print(result.how_to_load, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    input_: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help="a .csv, .tsv or .jsonl file with the task's text columns (sst2: sentence; mrpc, rte: "
            "sentence1, sentence2; qnli: question, sentence; rotten_tomatoes: text)",
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="CSV file to write (default: CSV on stdout): the input's columns, prediction "
            "(label index, or the score for regression) and prob_<label> per label",
        ),
    ] = None,
    device: Annotated[
        Optional[str], typer.Option(help="cpu, cuda, auto (default: the run's train.device)")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="default: 2 x the run's batch size")] = None,
    precision: PrecisionOpt = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Predict labels (or scores) for new text with a run's global model; progress on stderr."""
    from fedlodrop.artifacts.predict import predict_file

    _offline_env()
    n = predict_file(run_dir, input_, out, device, batch_size, console=err_console, show_progress=not quiet,
                     precision=precision)
    if out is not None:
        err_console.print(f"{n} predictions -> {out}", highlight=False)


from fedlodrop.cli.flower import flower_app  # noqa: E402
from fedlodrop.cli.planning import calibrate, optimize, plot_tradeoff, system_app  # noqa: E402

app.add_typer(system_app, name="system")
app.add_typer(flower_app, name="flower")
app.command("optimize")(optimize)
app.command("calibrate")(calibrate)
app.command("plot-tradeoff")(plot_tradeoff)


def hide_third_party_deprecations() -> None:
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
    """The `fedlodrop` console script: the typer app, without third-party deprecation notices; Ctrl-C exits
    130."""
    hide_third_party_deprecations()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
