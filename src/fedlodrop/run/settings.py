"""The one validator of a run's configuration, and how every entry point gets one.

`fedlodrop.config` is the schema (types, bounds, keys that must agree with each other). What else a
config must satisfy needs the layers above it, so it is checked here, once, for every entry point
(`fedlodrop run`, sweeps, comparisons, Flower's ServerApp and ClientApp, a run folder read back):

* the task: a built-in one, or your own data under another name; its label kind fits the
  partition;
* the names of registered extension points (aggregation rules, factor rules, dropout variants,
  metrics);
* each feature's refusals, written once in its own module: `round.privacy.check`,
  `round.secagg.check`.

Every problem is one UserError line, `invalid config: ...`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fedlodrop.config import RunConfig, from_tree, parse_override, read_config_tree, set_key
from fedlodrop.data.tasks import METRICS, TASKS
from fedlodrop.errors import UserError
from fedlodrop.lora.aggregation import FACTOR_RULES, RULES
from fedlodrop.lora.variants import VARIANTS
from fedlodrop.round import privacy, secagg
from fedlodrop.round.optimizers import SERVER_OPTIMIZERS

REGISTRIES = {r.key: r for r in (RULES, FACTOR_RULES, VARIANTS, SERVER_OPTIMIZERS)}  # config key -> the names it accepts


def check(cfg: RunConfig) -> None:
    """Everything the schema alone cannot know; ValueError with the one line to show."""
    for key, registry in REGISTRIES.items():
        section, name = key.split(".")
        problem = registry.unknown(getattr(getattr(cfg, section), name))
        if problem:
            raise ValueError(problem)
    rule = RULES[cfg.federation.aggregation]
    if cfg.server.optimizer != "none" and not rule.takes_server_optimizer:
        raise ValueError(f"server.optimizer {cfg.server.optimizer} cannot follow federation.aggregation "
                         f"{cfg.federation.aggregation}: its factors are a new SVD basis every round; choose one of "
                         f"{', '.join(RULES.where(lambda cls: cls.takes_server_optimizer))}")
    if cfg.lora.self_prune is not None and cfg.federation.aggregation == "flora":
        raise ValueError("lora.self_prune cannot follow federation.aggregation flora: its adapter restarts at B = 0 "
                         "every round, so no tail ever shrinks over a local phase")
    if cfg.lora.self_prune is not None and (cfg.privacy.dp or cfg.privacy.secure_aggregation):
        raise ValueError("lora.self_prune: a device's rank decision travels in the clear, which privacy.dp and "
                         "privacy.secure_aggregation do not allow; turn one of them off")
    if cfg.server.optimizer == "none" and cfg.server.lr is not None:
        raise ValueError(f"server.lr {cfg.server.lr:g} has no effect: server.optimizer is none (choose one of "
                         f"{', '.join(n for n in SERVER_OPTIMIZERS if n != 'none')})")
    own = cfg.data.own
    if own and cfg.task in TASKS:
        key = "train" if cfg.data.train else "hub_path" if cfg.data.hub_path else "eval"
        raise ValueError(f"task {cfg.task!r} is a built-in task, and data.{key} brings your own data: name your "
                         "task something else (task: my_reviews)")
    if not own and cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {', '.join(sorted(TASKS))}; or train on your own data "
                         "with data.train (files) or data.hub_path (docs/data.md)")
    for name in cfg.data.metrics or []:
        if name not in METRICS:
            raise ValueError(f"data.metrics: unknown metric {name!r}; known: {', '.join(METRICS)}")
    if cfg.federation.partition == "continuous" and (
            cfg.data.regression is False if own else not TASKS[cfg.task].is_regression):
        raise ValueError("federation.partition continuous is for a real-valued label (stsb, or your own data with "
                         "data.regression)")
    privacy.check(cfg)
    secagg.check(cfg)


def validate(tree: dict) -> RunConfig:
    """A config tree, read by the schema and checked here: a RunConfig or one UserError line."""
    cfg = from_tree(tree)
    try:
        check(cfg)
    except ValueError as err:
        raise UserError(f"invalid config: {err}") from None
    return cfg


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                tree: dict | None = None, system: Path | None = None) -> RunConfig:
    """Defaults <- YAML file (or its already read `tree`) <- `--set` overrides <- what the run's system
    (`system`, system.file or the plan's) says of the run where the tree says nothing, validated once."""
    tree = copy.deepcopy(tree) if tree is not None else read_config_tree(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        set_key(tree, ".".join(key), value)
    if system is not None:
        set_key(tree, "system.file", str(system))
    _fill_from_system(tree)
    return validate(tree)


def _given(tree: dict, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if part == "file" and isinstance(node, (str, Path)):
            return True  # `system: FILE`
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None or key == "lora.ranks"  # null ranks is a choice (every device lora.r)


def _fill_from_system(tree: dict) -> None:
    """The devices, local epochs and training samples of the system the tree names (system.file, or
    its plan's), set where the tree leaves them to the defaults: a system describes one run, and
    `fedlodrop compare system.yaml` needs no `--set federation.devices=...` to say it again. Values
    the tree gives win; the run then refuses a system that disagrees (fedlodrop.run.systems)."""
    system = tree.get("system")
    file = system if isinstance(system, (str, Path)) else system.get("file") if isinstance(system, dict) else None
    if file is None and not tree.get("plan"):
        return
    from fedlodrop.run.systems import IMPLIED

    missing = [key for key in IMPLIED if not _given(tree, key)]
    if not missing:  # a whole config (a run folder's): the system file is not even read
        return
    from fedlodrop.planning import load_plan, load_system  # the planner: only a run with a system needs it
    from fedlodrop.run.systems import implied_keys

    spec = load_system(file) if file is not None else load_plan(tree["plan"]).system
    keys = implied_keys(spec)
    for key in missing:
        set_key(tree, key, keys[key])


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with dotted keys replaced, validated again (sweeps, comparisons)."""
    tree = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        set_key(tree, key, value)
    return validate(tree)


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy whose paths (data.glue_dir, data.train, data.eval, a local data.hub_path, plan, the
    system file, a local model folder) are absolute from the current folder: for processes that
    run elsewhere (Flower's)."""
    tree = cfg.model_dump(mode="json")
    for key in ("glue_dir", "train", "eval"):
        if tree["data"][key]:
            tree["data"][key] = str(Path(tree["data"][key]).expanduser().resolve())
    if tree["data"]["hub_path"] and Path(tree["data"]["hub_path"]).expanduser().is_dir():
        tree["data"]["hub_path"] = str(Path(tree["data"]["hub_path"]).expanduser().resolve())
    if tree["plan"]:
        tree["plan"] = str(Path(tree["plan"]).expanduser().resolve())
    if tree["system"]["file"]:
        tree["system"]["file"] = str(Path(tree["system"]["file"]).expanduser().resolve())
    if Path(tree["model"]).expanduser().is_dir():
        tree["model"] = str(Path(tree["model"]).expanduser().resolve())
    return validate(tree)


def registry_names(key: str) -> list[str]:
    """The names a registry-backed config key accepts, in registration order."""
    return REGISTRIES[key].names()
