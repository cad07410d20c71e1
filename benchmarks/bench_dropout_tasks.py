"""Issue 7's task study: the default variant at rates 0 / 0.1 / 0.3 / 0.5, 3 seeds, on one task.

* `--task rte` / `--task mrpc`: real GLUE data in the overfitting regime of
  bench_dropout_variants.py (600 training examples over 3 devices, 3 local epochs x 4 rounds,
  MiniLM r 4 on query/value, batch 16, BERT's [CLS] head); about 40 min (RTE) / 30 min (MRPC)
  with 2 x 1 threads. `--set pooling=mean` measures the same with the default mean-pooled head.
* `--task rotten_tomatoes`: the offline default exactly as `fedlodrop run` has it (no other key
  changed) plus the rate; about 40 min with 2 x 1 threads.
Writes docs/benchmarks/dropout-<task>.{md,csv,png}; run folders in bench_out/.

    python benchmarks/bench_dropout_tasks.py --task rte [--jobs 2] [--threads 1] [--set key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _tables import Point, grid_args, header, markdown, plot, point, run, table, write_csv
from bench_dropout_variants import REGIME

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.0, 0.1, 0.3, 0.5)


def points(task: str, seeds: int, glue: Path, extra: list[str]) -> list[Point]:
    if task == "rotten_tomatoes":
        base = []  # the no-argument run
    else:
        base = [o for o in REGIME if not o.startswith("task=")] + [f"task={task}", f"data.glue_dir={glue}"]
    base = base + extra
    return [point(f"{task}-rate{rate}-seed{seed}", {"rate": rate}, base + [f"seed={seed}", f"dropout.rate={rate}"])
            for seed in range(seeds) for rate in RATES]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid_args(p)
    p.add_argument("--task", choices=["rte", "mrpc", "sst2", "rotten_tomatoes"], required=True)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="another override (e.g. pooling=mean); the outputs get its name as a suffix")
    args = p.parse_args()
    pts = points(args.task, args.seeds, args.glue.resolve(), args.extra)
    name = f"dropout-{args.task}" + "".join(f"-{e.replace('=', '-').replace('.', '_')}" for e in args.extra)
    results = run(pts, ROOT / "bench_out" / name, args.jobs, args.threads)
    rows = table(pts, results, ["rate"])
    metric = next(iter(results.values())).summary.main_metric
    setting = ("the offline default (no-argument `fedlodrop run`) with dropout.rate set" if args.task == "rotten_tomatoes"
               else f"{args.task.upper()}, 600 examples over 3 devices, 3 local epochs x 4 rounds, MiniLM r 4")
    if args.extra:
        setting += ", " + ", ".join(args.extra)
    title = f"{setting}; default variant; mean ± sd over {args.seeds} seeds"
    command = " ".join([f"--task {args.task}", *(f"--set {e}" for e in args.extra)])
    md = (f"# `python benchmarks/bench_dropout_tasks.py {command}`\n\n{title}. "
          f"{header(args.threads, args.jobs)}.\n\n{markdown(rows, ['rate'], metric)}\n")
    r0 = rows[0]
    for r in rows[1:]:
        md += (f"\nrate {r['rate']}: final {metric} {r['final_mean'] - r0['final_mean']:+.4f} against rate 0, "
               f"uplink {r['uplink_B_per_round_mean'] / r0['uplink_B_per_round_mean']:.3f} of rate 0's.")
    md += "\n"
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / f"{name}.md").write_text(md)
    write_csv(rows, args.docs / f"{name}.csv")
    plot(rows, "rate", [], ["final", "gap", "uplink_B_per_round"], args.docs / f"{name}.png", title)
    print(md)


if __name__ == "__main__":
    main()
