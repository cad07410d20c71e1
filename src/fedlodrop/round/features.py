"""The one place a config's round features become plug-ins (`round.plugin.RoundPlugin`): both the
server and every device compose them here, so a feature is switched on in one line."""

from __future__ import annotations

from fedlodrop.config import RunConfig
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.round.privacy import DifferentialPrivacy


def features(cfg: RunConfig) -> list[RoundPlugin]:
    """The plug-ins `cfg` asks for, in the order their hooks run. The simulated clock and meter
    joins them on the server's side (`run.experiment`): it needs the run's system."""
    return [p for p in (DifferentialPrivacy.from_config(cfg),) if p is not None]
