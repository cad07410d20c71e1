"""Sweeps: a grid of run configurations, one ordinary run folder per grid point and seed.

    fedlodrop sweep --config FILE --rates 0,0.3,0.5 --seeds 3 --out DIR
    fedlodrop sweep --config FILE --vary lora.r=4,16,64 --vary federation.aggregation=fedit,fedex

`--vary KEY=V1,V2,...` takes any config key (values parsed as YAML, like `--set`); repeated, the
grid is the product of the axes. `--rates` is shorthand for `--vary dropout.rate=...`.
`--seeds N` repeats every grid point with seeds base..base+N-1 (base: the config's `seed`).

Every grid point is validated before anything is written. Each run goes to
`DIR/<key>=<value>__...__seed=<s>` (readable, filesystem-safe). A folder holding `summary.json`
is a finished run and is reused (after checking that its config is the one this sweep asks for),
so an interrupted sweep continues where it stopped; an interrupted run continues from its last
checkpointed round (`engine.resume`), and one killed before its first round is run again. `DIR/sweep.json` records the grid, so `fedlodrop report DIR` knows which
key is the x axis.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlodrop.config import RunConfig, parse_override, with_overrides
from fedlodrop.errors import UserError
from fedlodrop.runs import RunFolder

MANIFEST = "sweep.json"
RATE_KEY = "dropout.rate"
# Keys that may differ between a finished run and the sweep that reuses it (they do not change results):
# torch's thread count, and the Flower engine's section (sweeps run in-process; runs saved before the
# section existed lack it).
REUSE_IGNORED = frozenset({"train.threads"})
REUSE_IGNORED_PREFIXES = ("flower.",)

_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_MAX_VALUE_CHARS = 40


@dataclass(frozen=True)
class Axis:
    """One varied config key and its values (as the user wrote them, parsed as YAML)."""

    key: str
    values: tuple[Any, ...]
    option: str = "--vary"  # how the user gave it, for messages

    def label(self, value: Any) -> str:
        shown = show_value(value)
        return f"--rates {shown}" if self.option == "--rates" else f"--vary {self.key}={shown}"


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its folder name, the values it sets, its seed and validated config."""

    name: str
    values: dict[str, Any]  # key -> validated value, in axis order
    seed: int
    cfg: RunConfig


@dataclass
class Outcome:
    point: Point
    path: Path
    summary: dict
    reused: bool


# ---------------------------------------------------------------------------- parsing


def split_values(raw: str) -> list[str]:
    """Split `0.1,[0.1,0.2],x` at top-level commas (brackets and quotes keep their commas)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_vary(item: str, option: str = "--vary") -> Axis:
    """`key=v1,v2,...` -> Axis(key, parsed values)."""
    if "=" not in item:
        raise UserError(f"{option} {item!r}: expected KEY=V1,V2,...")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"{option} {item!r}: empty key")
    if key == "seed":
        raise UserError(f"{option} {item!r}: use --seeds N to repeat runs over seeds")
    texts = split_values(raw)
    if any(not t for t in texts):
        raise UserError(f"{option} {item!r}: empty value in the list")
    values = tuple(parse_override(f"{key}={t}")[1] for t in texts)
    return Axis(key, values, option)


def make_axes(rates: str | None, vary: list[str] | tuple[str, ...] = ()) -> list[Axis]:
    """The sweep's axes from `--rates` and `--vary` options, in the order given (rates first)."""
    axes = []
    if rates is not None:
        axes.append(parse_vary(f"{RATE_KEY}={rates}", option="--rates"))
    axes.extend(parse_vary(v) for v in vary)
    seen: set[str] = set()
    for axis in axes:
        if axis.key in seen:
            hint = " (--rates is --vary dropout.rate)" if axis.key == RATE_KEY and rates is not None else ""
            raise UserError(f"--vary {axis.key}: the key is varied twice{hint}")
        seen.add(axis.key)
    return axes


# ---------------------------------------------------------------------------- naming


def get_key(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def format_value(value: Any) -> str:
    """A value as it reads in a folder name: 0.3, 1e-05, true, fedex, 0.1-0.2-0.3."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value) or "empty"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def show_value(value: Any) -> str:
    """A value as messages show it: lists in brackets."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return format_value(value)


def safe_value(value: Any) -> str:
    """Filesystem-safe form of a value; a short hash keeps altered or long values distinct."""
    text = format_value(value)
    safe = _SAFE.sub("_", text)
    if safe != text or len(safe) > _MAX_VALUE_CHARS:
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        safe = f"{safe[: _MAX_VALUE_CHARS - 7]}~{digest}"
    return safe


def point_name(values: dict[str, Any], seed: int) -> str:
    """`dropout.rate=0.3__lora.r=8__seed=1`."""
    parts = [f"{key}={safe_value(v)}" for key, v in values.items()]
    parts.append(f"seed={seed}")
    return "__".join(parts)


# ---------------------------------------------------------------------------- grid


def _validate(cfg: RunConfig, overrides: dict[str, Any], label: str) -> RunConfig:
    try:
        return with_overrides(cfg, overrides)
    except UserError as err:
        raise UserError(f"{label}: {err}") from None


def expand_grid(base: RunConfig, axes: list[Axis], seeds: int = 1) -> list[Point]:
    """Every (grid point, seed), validated; seeds outermost, so a partial sweep has whole curves.

    Raises UserError naming the first bad key or value; writes nothing.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    for axis in axes:  # each value on its own first, so the message names exactly the culprit
        seen: list = []
        for value in axis.values:
            cfg = _validate(base, {axis.key: value}, axis.label(value))
            valid = get_key(cfg.model_dump(mode="json"), axis.key)
            if valid in seen:
                raise UserError(f"{axis.label(value)}: the value {show_value(valid)} is given twice")
            seen.append(valid)
    seed_values = [base.seed + i for i in range(seeds)]
    points: list[Point] = []
    names: dict[str, str] = {}
    for seed in seed_values:
        for combo in itertools.product(*(axis.values for axis in axes)):
            overrides = {axis.key: v for axis, v in zip(axes, combo)}
            label = "grid point " + ", ".join(f"{k}={show_value(v)}" for k, v in overrides.items())
            cfg = _validate(base, {**overrides, "seed": seed}, label)
            tree = cfg.model_dump(mode="json")
            values = {key: get_key(tree, key) for key in overrides}
            name = point_name(values, seed)
            if name in names:
                raise UserError(f"{label}: same run folder {name} as {names[name]}; drop the duplicate")
            names[name] = label
            points.append(Point(name, values, seed, cfg))
    return points


# ---------------------------------------------------------------------------- folders


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted key: leaf value} (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


def config_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """Dotted keys whose value differs between a saved config.yaml and `cfg`."""
    want = flatten(cfg.model_dump(mode="json"))
    have = flatten(saved if isinstance(saved, dict) else {})
    keys = sorted(set(want) | set(have))
    return [
        k for k in keys
        if k not in REUSE_IGNORED and not k.startswith(REUSE_IGNORED_PREFIXES)
        and want.get(k, "<absent>") != have.get(k, "<absent>")
    ]


def is_finished(path: Path) -> bool:
    return (path / "summary.json").is_file()


def is_resumable(path: Path) -> bool:
    """An interrupted run with at least one complete round checkpointed."""
    return not is_finished(path) and RunFolder(path).rounds_done() > 0


def check_folders(out: Path, points: list[Point]) -> None:
    """Before any run: finished folders must hold this sweep's config; others must be run folders."""
    for p in points:
        path = out / p.name
        if not path.exists():
            continue
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a folder; remove it or choose another --out")
        if is_finished(path) or is_resumable(path):
            what = "finished run" if is_finished(path) else "interrupted run"
            try:
                saved = yaml.safe_load((path / "config.yaml").read_text())
            except (OSError, yaml.YAMLError):
                msg = f"{what} {path} has no readable config.yaml; remove it to re-run"
                raise UserError(msg) from None
            diff = config_differences(saved, p.cfg)
            if diff:
                shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
                raise UserError(
                    f"{what} {path} was made with another configuration (differs in {shown}); "
                    "remove it or choose another --out"
                )
        elif any(path.iterdir()) and not (path / "config.yaml").is_file():
            raise UserError(f"{path} exists but is not a run folder; remove it or choose another --out")


def write_manifest(out: Path, axes: list[Axis], points: list[Point], seeds: list[int]) -> None:
    values: dict[str, list] = {axis.key: [] for axis in axes}
    for p in points:
        for k, v in p.values.items():
            if v not in values[k]:
                values[k].append(v)
    manifest = {
        "vary": [{"key": k, "values": vs} for k, vs in values.items()],
        "seeds": seeds,
        "runs": [p.name for p in points],
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)


def read_manifest(out: Path) -> dict | None:
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- running


def run_sweep(
    base: RunConfig,
    axes: list[Axis],
    seeds: int,
    out: Path,
    console=None,
    show_progress: bool = True,
) -> list[Outcome]:
    """Validate the whole grid, then run (or reuse) every point in `out`."""
    from rich.console import Console

    from fedlodrop import engine

    console = console or Console(stderr=True)
    out = Path(out)
    points = expand_grid(base, axes, seeds)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    check_folders(out, points)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, axes, points, sorted({p.seed for p in points}))
    try:
        return _run_points(points, out, console, show_progress, engine.run, engine.resume)
    except UserError:
        # e.g. the data or the model is missing: found by the first run's preparation, before it
        # wrote anything. Leave no empty sweep folder behind.
        if created and not any(p.is_dir() for p in out.iterdir()):
            shutil.rmtree(out)
        raise


def _run_points(points: list[Point], out: Path, console, show_progress: bool, run, resume) -> list[Outcome]:
    outcomes: list[Outcome] = []
    width = len(str(len(points)))
    for i, p in enumerate(points, 1):
        path = out / p.name
        tag = f"[{i:>{width}}/{len(points)}] {p.name}"
        if is_finished(path):
            summary = json.loads((path / "summary.json").read_text())
            console.print(f"{tag}: finished earlier, reused", highlight=False)
            outcomes.append(Outcome(p, path, summary, reused=True))
            continue
        if is_resumable(path):
            done = RunFolder(path).rounds_done()
            console.print(f"{tag}: interrupted after round {done}, resuming", highlight=False)
            summary = resume(path, console=console, show_progress=show_progress)
        else:
            if path.exists():
                console.print(f"{tag}: interrupted before its first round, running again", highlight=False)
                shutil.rmtree(path)
            else:
                console.print(f"{tag}: running", highlight=False)
            summary = run(p.cfg, path, console=console, show_progress=show_progress)
        main = summary.get("main_metric")
        final = summary.get("final", {}).get(main, math.nan)
        console.print(f"{tag}: final {main} {final:.4f}", highlight=False)
        outcomes.append(Outcome(p, path, summary, reused=False))
    return outcomes
