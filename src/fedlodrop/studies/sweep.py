"""Sweeps: a grid of run configurations, one ordinary run folder per grid point and seed.

    fedlodrop sweep --config FILE --rates 0,0.3,0.5 --seeds 3 --out DIR
    fedlodrop sweep --config FILE --vary lora.r=4,16,64 --vary federation.aggregation=fedit,fedex

`--vary KEY=V1,V2,...` takes any config key (values parsed as YAML, like `--set`); repeated, the
grid is the product of the axes. `--rates` is shorthand for `--vary dropout.rate=...`.
`--arm NAME={key: value, ...}` (repeated) is one axis, `arm`, whose values set several keys at
once: settings compared as wholes, e.g. at equal uplink bytes a dropout rate, a smaller rank or a
compressed uplink.
`--seeds N` repeats every grid point with seeds base..base+N-1 (base: the config's `seed`).

Every grid point is validated before anything is written. Each run goes to
`DIR/<key>=<value>__...__seed=<s>` (readable, filesystem-safe). A folder holding `summary.json`
is a finished run and is reused (after checking that its config is the one this sweep asks for),
so an interrupted sweep continues where it stopped; an interrupted run continues from its last
checkpointed round (`engine.resume`), and one killed before its first round is run again.
`DIR/sweep.json` records the grid, so `fedlodrop report DIR` knows which key is the x axis.

`--jobs N` runs N points at once, each in its own (spawned) process with `train.threads` fixed
(`--threads T`; default: the config's, else the CPUs shared out, at least 1 each), one line as a
run starts and one as it ends. Each run's result depends only on its config, never on N.
Folders are read only through `RunFolder`; the training engine is called only by `_run_one`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fedlodrop.config import RunConfig, parse_override
from fedlodrop.errors import UserError
from fedlodrop.round.records import Summary
from fedlodrop.run import engine
from fedlodrop.run.folder import RunFolder
from fedlodrop.run.settings import with_overrides

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
    sets: dict[str, dict[str, Any]] | None = None  # --arm: each value's name -> the keys it sets

    def label(self, value: Any) -> str:
        """A value as it reads in a run folder's name and a table."""
        shown = show_value(value)
        if self.sets is not None:
            return f"--arm {value}"
        return f"--rates {shown}" if self.option == "--rates" else f"--vary {self.key}={shown}"

    def overrides(self, value: Any) -> dict[str, Any]:
        """The config keys this axis sets at `value`."""
        return dict(self.sets[value]) if self.sets is not None else {self.key: value}


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its folder name, the values it sets, its seed and validated config."""

    name: str
    values: dict[str, Any]  # key -> validated value, in axis order
    seed: int
    cfg: RunConfig


@dataclass
class Outcome:
    """A grid point's run: its folder, its summary, whether it was reused, and how long it took."""
    point: Point
    path: Path
    summary: Summary
    reused: bool
    seconds: float | None = None  # how long the run took here (None: reused)


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


ARM_KEY = "arm"


def parse_arms(items: list[str] | tuple[str, ...]) -> Axis | None:
    """`NAME={key: value, ...}` options -> the `arm` axis (None without any)."""
    sets: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, raw = item.partition("=")
        name = name.strip()
        try:
            mapping = parse_override(f"x={raw}")[1] if raw.strip() else None
        except UserError:
            mapping = None
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not isinstance(mapping, dict) or not mapping:
            raise UserError(f"--arm {item!r}: expected NAME={{key: value, ...}} (a name, then the keys it sets)")
        if name in sets:
            raise UserError(f"--arm {name}: the name is given twice")
        if "seed" in mapping:
            raise UserError(f"--arm {item!r}: use --seeds N to repeat runs over seeds")
        sets[name] = {str(k): v for k, v in mapping.items()}
    return Axis(ARM_KEY, tuple(sets), "--arm", sets) if sets else None


def make_axes(rates: str | None, vary: list[str] | tuple[str, ...] = (),
              arms: list[str] | tuple[str, ...] = ()) -> list[Axis]:
    """The sweep's axes from `--rates`, `--arm` and `--vary` options, in that order."""
    axes = []
    if rates is not None:
        axes.append(parse_vary(f"{RATE_KEY}={rates}", option="--rates"))
    arm = parse_arms(arms)
    if arm is not None:  # the arms are the x axis of the table and plot
        axes.append(arm)
    axes.extend(parse_vary(v) for v in vary)
    if arm is not None:
        varied = {a.key for a in axes} & {k for keys in arm.sets.values() for k in keys}
        if varied:
            raise UserError(f"--arm sets {sorted(varied)[0]}, which --vary or --rates varies too")
    seen: set[str] = set()
    for axis in axes:
        if axis.key in seen:
            hint = " (--rates is --vary dropout.rate)" if axis.key == RATE_KEY and rates is not None else ""
            raise UserError(f"--vary {axis.key}: the key is varied twice{hint}")
        seen.add(axis.key)
    return axes


# ---------------------------------------------------------------------------- naming


def get_key(tree: dict, key: str) -> Any:
    """The value at dotted `key` of a config tree (KeyError if a part is missing)."""
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
            cfg = _validate(base, axis.overrides(value), axis.label(value))
            tree = cfg.model_dump(mode="json")
            valid = [get_key(tree, k) for k in axis.sets[value]] if axis.sets is not None else get_key(tree, axis.key)
            if valid in seen:
                raise UserError(f"{axis.label(value)}: the value {show_value(valid)} is given twice")
            seen.append(valid)
    seed_values = [base.seed + i for i in range(seeds)]
    points: list[Point] = []
    names: dict[str, str] = {}
    for seed in seed_values:
        for combo in itertools.product(*(axis.values for axis in axes)):
            chosen = {axis.key: v for axis, v in zip(axes, combo)}
            overrides = {k: v for axis, v in zip(axes, combo) for k, v in axis.overrides(v).items()}
            label = "grid point " + ", ".join(f"{k}={show_value(v)}" for k, v in chosen.items())
            cfg = _validate(base, {**overrides, "seed": seed}, label)
            tree = cfg.model_dump(mode="json")
            values = {key: v if key == ARM_KEY else get_key(tree, key) for key, v in chosen.items()}
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


def _saved_config(folder: RunFolder, what: str) -> dict:
    """A reused or resumed run's config, as RunFolder reads it (validated; folders from before
    `pooling` read as `pooling: cls`), as a tree to compare with the sweep's."""
    if not folder.started:
        raise UserError(f"{what} {folder.path} has no readable config.yaml; remove it to re-run")
    try:
        return folder.config().model_dump(mode="json")
    except (OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{what} {folder.path} has no readable config.yaml; remove it to re-run") from None
    except UserError as err:
        raise UserError(f"{what} {folder.path} has a config.yaml this version does not accept ({err}); "
                        "remove it to re-run") from None


def check_folders(out: Path, points: list[Point]) -> None:
    """Before any run: finished folders must hold this sweep's config; others must be run folders."""
    for p in points:
        folder = RunFolder(out / p.name)
        path = folder.path
        if not path.exists():
            continue
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a folder; remove it or choose another --out")
        if folder.finished or folder.rounds_done() > 0:
            what = "finished run" if folder.finished else "interrupted run"
            diff = config_differences(_saved_config(folder, what), p.cfg)
            if diff:
                shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
                raise UserError(
                    f"{what} {path} was made with another configuration (differs in {shown}); "
                    "remove it or choose another --out"
                )
        elif any(path.iterdir()) and not folder.started:
            raise UserError(f"{path} exists but is not a run folder; remove it or choose another --out")


def write_manifest(out: Path, axes: list[Axis], points: list[Point], seeds: list[int]) -> None:
    """Record the sweep's grid (sweep.json), so `report` can rebuild its tables."""
    values: dict[str, list] = {axis.key: [] for axis in axes}
    for p in points:
        for k, v in p.values.items():
            if v not in values[k]:
                values[k].append(v)
    arms = next((a.sets for a in axes if a.sets is not None), None)
    manifest = {
        "vary": [{"key": k, "values": vs} | ({"sets": arms} if k == ARM_KEY else {}) for k, vs in values.items()],
        "seeds": seeds,
        "runs": [p.name for p in points],
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST)


def read_manifest(out: Path) -> dict | None:
    """The grid a sweep folder recorded, or None for a plain folder of runs."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------- running


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int, threads: int | None) -> None:
    """One line for a bad --jobs or --threads."""
    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"--threads must be at least 1, got {threads}")


def run_threads(cfg: RunConfig, jobs: int, threads: int | None) -> RunConfig:
    """`cfg` with the torch thread count its run uses: `threads` when given; else the config's own
    `train.threads` when set; else, with several jobs, the CPUs shared out (at least 1 each);
    else (one job) torch's default, `train.threads` left unset."""
    if threads is None:
        if cfg.train.threads is not None or jobs == 1:
            return cfg
        threads = max(1, cpu_count() // jobs)
    return cfg if cfg.train.threads == threads else with_overrides(cfg, {"train.threads": threads})


def run_sweep(
    base: RunConfig,
    axes: list[Axis],
    seeds: int,
    out: Path,
    console=None,
    show_progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
) -> list[Outcome]:
    """Validate the whole grid, then run (or reuse) every point in `out`, `jobs` at a time."""
    check_jobs(jobs, threads)
    points = expand_grid(base, axes, seeds)
    return run_points(points, out, jobs, threads, console, show_progress, axes=axes)


def run_points(
    points: list[Point],
    out: Path,
    jobs: int = 1,
    threads: int | None = None,
    console=None,
    show_progress: bool = True,
    axes: list[Axis] | None = None,
) -> list[Outcome]:
    """Run (or reuse, or resume) each point in `out / point.name`, in point order with one job,
    else in `jobs` processes; returns one Outcome per point, in point order.

    The runner of `fedlodrop sweep` and of the benchmarks. Every check is made before anything is
    written: `jobs`/`threads`, `out`, and the folders already there (a finished or interrupted run
    must hold the point's config, `train.threads` aside; anything else must be a run folder).
    With `axes`, `out/sweep.json` records the grid for `fedlodrop report`. With `jobs` > 1 the
    workers are spawned, so a script that calls this must guard its entry point
    (`if __name__ == "__main__":`): each worker imports the script's module again.
    """
    from rich.console import Console

    check_jobs(jobs, threads)
    console = console or Console(stderr=True)
    out = Path(out)
    points = [replace(p, cfg=run_threads(p.cfg, jobs, threads)) for p in points]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    check_folders(out, points)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if axes is not None:
        write_manifest(out, axes, points, sorted({p.seed for p in points}))
    try:
        if jobs == 1:
            return _run_in_process(points, out, console, show_progress)
        return _run_in_processes(points, out, console, jobs)
    except UserError:
        # e.g. the data or the model is missing: found by the first run's preparation, before it
        # wrote anything. Leave no empty sweep folder behind.
        if created and not any(p.is_dir() for p in out.iterdir()):
            shutil.rmtree(out)
        raise


def _run_one(point: Point, path: Path, resume: bool, console=None, show_progress: bool = True) -> Summary:
    """The one place that calls the training engine: run `point` into the empty (or absent) folder
    `path`, or continue the interrupted run there from its last complete round. Returns its summary."""

    if resume:
        return engine.resume(path, console=console, show_progress=show_progress)
    return engine.run(point.cfg, path, console=console, show_progress=show_progress)


def _start(point: Point, path: Path, tag: str, console) -> bool | None:
    """What to do with a point's folder, said in one line: None: reuse it (finished); True: resume
    it; False: run it (an interrupted run with no complete round is removed first)."""
    folder = RunFolder(path)
    if folder.finished:
        console.print(f"{tag}: finished earlier, reused", highlight=False)
        return None
    done = folder.rounds_done()
    if done > 0:
        console.print(f"{tag}: interrupted after round {done}, resuming", highlight=False)
        return True
    if path.exists():
        console.print(f"{tag}: interrupted before its first round, running again", highlight=False)
        shutil.rmtree(path)
    else:
        console.print(f"{tag}: running", highlight=False)
    return False


def _finished(tag: str, summary: Summary, console, seconds: float | None = None) -> None:
    main, final = summary.main_metric, summary.final_metric
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    console.print(f"{tag}: final {main} {final:.4f}{took}", highlight=False)


def _tags(points: list[Point]) -> list[str]:
    width = len(str(len(points)))
    return [f"[{i:>{width}}/{len(points)}] {p.name}" for i, p in enumerate(points, 1)]


def _run_in_process(points: list[Point], out: Path, console, show_progress: bool) -> list[Outcome]:
    """One run after the other in this process, each printing its rounds."""
    outcomes: list[Outcome] = []
    for p, tag in zip(points, _tags(points)):
        path = out / p.name
        resume = _start(p, path, tag, console)
        if resume is None:
            outcomes.append(Outcome(p, path, RunFolder(path).summary(), reused=True))
            continue
        t0 = time.perf_counter()
        summary = _run_one(p, path, resume, console=console, show_progress=show_progress)
        seconds = time.perf_counter() - t0
        _finished(tag, summary, console)
        outcomes.append(Outcome(p, path, summary, reused=False, seconds=seconds))
    return outcomes


def _worker_init(filters: list) -> None:
    """A spawned worker takes the parent's warning filters (the CLI hides other packages' notices)."""
    warnings.filters[:] = filters


def _worker(point: Point, path: Path, resume: bool) -> tuple[Summary, float]:
    """One run in a worker process: its rounds are not printed (parallel runs would interleave)."""
    from rich.console import Console

    t0 = time.perf_counter()
    summary = _run_one(point, path, resume, console=Console(stderr=True, quiet=True), show_progress=False)
    return summary, time.perf_counter() - t0


def _run_in_processes(points: list[Point], out: Path, console, jobs: int) -> list[Outcome]:
    """Up to `jobs` runs at once, each in its own spawned process, started in point order; one line
    when a run starts and one when it ends. After a failure no new run starts; the running ones
    finish, then the first failure is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    outcomes: dict[int, Outcome] = {}
    running: dict = {}  # future -> (index, tag)
    failure: BaseException | None = None
    pool = None

    def collect() -> None:
        """Wait for one run or more to end; record each outcome, or the first failure."""
        nonlocal failure
        done, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in done:
            i, tag = running.pop(fut)
            p = points[i]
            try:
                summary, seconds = fut.result()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others end
                console.print(f"{tag}: failed", highlight=False)
                failure = failure or err
                continue
            _finished(tag, summary, console, seconds)
            outcomes[i] = Outcome(p, out / p.name, summary, reused=False, seconds=seconds)

    try:
        for i, (p, tag) in enumerate(zip(points, _tags(points))):
            path = out / p.name
            if RunFolder(path).finished:
                _start(p, path, tag, console)
                outcomes[i] = Outcome(p, path, RunFolder(path).summary(), reused=True)
                continue
            while len(running) >= jobs:
                collect()
            if failure is not None:
                break
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_worker_init, initargs=(list(warnings.filters),))
            resume = _start(p, path, tag, console)
            running[pool.submit(_worker, p, path, resume)] = (i, tag)
        while running:
            collect()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure
    return [outcomes[i] for i in range(len(points))]
