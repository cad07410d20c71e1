"""Run logs users can watch while a run trains: TensorBoard event files and Weights & Biases.

Both are off by default and both only mirror `metrics.jsonl`, which stays the source of truth.
Per round: validation and train metrics, losses, bytes, round time; per device: loss and bytes.
TensorBoard files go to `<run>/tensorboard/`; W&B runs in the mode the config names (`offline`
needs no network; `wandb sync` uploads later) and is imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path

from fedlodrop.config import RunConfig
from fedlodrop.errors import UserError
from fedlodrop.round.records import RoundRecord


def progress_bar(console, enabled: bool = True):
    """The one progress bar style (rounds of a run, batches of a prediction), on `console`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The numbers of one round's record, by the names both loggers use."""
    out: dict[str, float] = {}
    for split, metrics in (("eval", record.eval), ("train", record.train)):
        for name, value in metrics.items():
            out[f"{split}/{name}"] = value
    out["loss/train"] = record.train_loss
    out["loss/eval"] = record.eval_loss
    out["bytes/uplink"] = record.uplink_bytes
    out["bytes/downlink"] = record.downlink_bytes
    out["time/round_s"] = record.wall_s
    out["devices/left_out"] = len(record.failures)
    if record.system is not None:
        out["system/latency_s"] = record.system.latency_s
        out["system/energy_j"] = record.system.energy_j
    for d in record.devices:
        if d.reported:
            if d.train_loss is not None:  # none under DP
                out[f"device/{d.device}/loss"] = d.train_loss
            out[f"device/{d.device}/uplink_bytes"] = d.uplink_bytes
        out[f"device/{d.device}/downlink_bytes"] = d.downlink_bytes
        if d.system is not None:
            out[f"device/{d.device}/latency_s"] = d.system.latency_s
            out[f"device/{d.device}/energy_j"] = d.system.energy_j
    return {k: float(v) for k, v in out.items() if v == v}  # drop NaN


class RunLogs:
    """The loggers a config asks for; `round(record)` after every round, `close()` at the end."""

    def __init__(self, cfg: RunConfig, folder: Path, resumed_rounds: int = 0):
        self.writers = []
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint
            self.writers.append(_TensorBoard(SummaryWriter(str(folder / "tensorboard"), purge_step=resumed_rounds + 1)))
        if cfg.log.wandb:
            self.writers.append(_WandB(cfg, folder))

    def round(self, record: RoundRecord) -> None:
        """Send one round's numbers to every logger."""
        scalars = round_scalars(record)
        for w in self.writers:
            w.log(scalars, record.round)

    def close(self) -> None:
        """Flush and close every logger."""
        for w in self.writers:
            w.close()


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: RunConfig, folder: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("log.wandb is on but wandb is not installed: pip install wandb") from None
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            name=folder.name,
            dir=str(folder),
            mode=cfg.log.wandb_mode,
            config=cfg.model_dump(mode="json"),
            id=_run_id(folder),
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _run_id(folder: Path) -> str:
    """One W&B run per run folder, so a resumed run continues its W&B run."""
    import hashlib

    return hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
