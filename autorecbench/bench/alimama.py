"""``make bench`` (Alimama part): preparing a large generated behaviour log in bounded memory, and DIN training
speed. A benchmark, not a test.

1. Generates the four Alimama files (``synthetic_alimama``, in a process of its own) at two sizes, about
   ``--log-rows`` and half that many behaviour-log rows, with samples in the real files' proportion (26.6M
   samples per 723M behaviours) and ``--users`` scaled alike.
2. Prepares each as ``data=alimama`` does (``--preset``, default ``bars``: every user, the most memory) in its
   own process and reports behaviour-log rows/s and that process's peak resident memory. Memory grows with the
   samples kept in memory and the vocabularies, not with the log (partitions are sized by
   ``data.partition_bytes``), so the two sizes give a line, extrapolated to the full log's 723,268,134 rows
   (the issue's bound: ≤ 4 GB).
3. Trains FIXED + DIN (the Alimama settings: K = 4, 200-80, T = 50) for one epoch over ``--train-rows``
   training rows of the larger file and reports training samples/s.

    python -m autorecbench.bench.alimama [--log-rows 50000000] [--train-rows 200000] [--device auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from autorecbench.bench.ctr import MEMORY_LIMIT_BYTES, run_stages, train_epoch, training_table

FULL_LOG_ROWS = 723_268_134
FULL_SAMPLES = 26_557_961
ROWS_PER_USER = 12 * 32.5 * 1.1  # behaviour days x mean pv events per day x (1 + other btags)


def _spec(log_rows: int) -> Any:
    from autorecbench.data.synthetic_alimama import FIRST_DESIGN, AlimamaGenerator

    users = max(100, round(log_rows / ROWS_PER_USER))
    ads = max(400, users)
    sizes = {"users": users, "ads": ads, "categories": min(5000, ads // 2), "brands": min(50_000, ads),
             "campaigns": min(50_000, ads), "customers": min(30_000, ads),
             "samples": round(log_rows * FULL_SAMPLES / FULL_LOG_ROWS), "chunk_users": 4000}
    return AlimamaGenerator(**{**FIRST_DESIGN, **sizes}, seed=0)  # the first design: ROWS_PER_USER's events a day


def _raw(args: argparse.Namespace, log_rows: int) -> Path:
    return Path(args.root) / f"alimama-bench-{_spec(log_rows).key()}"


def _data_overrides(args: argparse.Namespace, raw: Path) -> list[str]:
    return ["data=alimama", f"data.path={raw}", f"data.processed_dir={Path(args.root) / 'processed'}",
            f"data.preset={args.preset}"]


def _generate(args: argparse.Namespace, log_rows: int) -> dict[str, Any]:
    from autorecbench.data.synthetic_alimama import generate_alimama

    raw = _raw(args, log_rows)
    if not (raw / "truth.json").is_file():
        generate_alimama(_spec(log_rows), raw)
    return {"stage": "generate", "raw": str(raw)}


def _prepare(args: argparse.Namespace, log_rows: int) -> dict[str, Any]:
    from autorecbench import envinfo
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig, prepare

    raw = _raw(args, log_rows)
    data_cfg = DatasetConfig.from_mapping(compose(_data_overrides(args, raw)).data)
    started = time.perf_counter()
    prepared = prepare(data_cfg, force=True)
    seconds = time.perf_counter() - started
    extra = prepared.schema.extra
    return {
        "stage": "prepare",
        "preset": args.preset,
        "log_rows": extra["behaviours_in_file"],
        "log_bytes": (raw / "behavior_log.csv").stat().st_size,
        "samples": extra["samples_in_file"],
        "rows": prepared.schema.n_rows,
        "partitions": extra["partitions"],
        "seconds": seconds,
        "log_rows_per_second": extra["behaviours_in_file"] / seconds,
        "peak_rss_bytes": envinfo.peak_rss_bytes(),
        "cache_bytes": sum(p.stat().st_size for p in prepared.directory.rglob("*") if p.is_file()),
    }


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig, prepare

    overrides = _data_overrides(args, _raw(args, args.log_rows))
    data_cfg = DatasetConfig.from_mapping(compose(overrides).data)
    return train_epoch(prepare(data_cfg), data_cfg, [*overrides, f"model={args.model}"], args.device, args.train_rows)


def extrapolate(points: list[tuple[float, float]], at: float) -> float:
    """The straight line through two (x, y) points, evaluated at ``at``."""
    (x0, y0), (x1, y1) = points
    return y1 + (y1 - y0) / (x1 - x0) * (at - x1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-rows", type=int, default=50_000_000, help="behaviour-log rows of the larger file")
    parser.add_argument("--preset", default="bars", choices=["bars", "dsin"])
    parser.add_argument("--train-rows", type=int, default=200_000)
    parser.add_argument("--model", default="din")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--root", default=None, help="folder for the generated files and caches (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per stage")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        stages = {"generate": lambda: _generate(args, args.size), "prepare": lambda: _prepare(args, args.size),
                  "train": lambda: _train(args)}
        print(json.dumps(stages[args.stage]()))
        return

    from rich.table import Table

    from autorecbench.bench.reference import hardware_line, load_average, load_references
    from autorecbench.console import out_console as console

    load_at_start = load_average()
    sizes = [args.log_rows // 2, args.log_rows]
    with tempfile.TemporaryDirectory() as tmp:
        args.root = args.root or tmp
        options = [f"--log-rows={args.log_rows}", f"--preset={args.preset}", f"--train-rows={args.train_rows}",
                   f"--model={args.model}", f"--device={args.device}", f"--root={args.root}"]
        results = []
        for size in sizes:
            results += run_stages("autorecbench.bench.alimama", ["generate", "prepare"], [*options, f"--size={size}"],
                                  f"about {size:,} behaviour-log rows", args.json)
        if not args.skip_train:
            results += run_stages("autorecbench.bench.alimama", ["train"], options, f"{args.model} on the larger file",
                                  args.json)
    if args.json:
        return
    mib = 2**20
    table = Table(title=f"Alimama preprocessing (preset {args.preset}), generated files")
    for col in ("log rows", "log MiB", "samples kept", "partitions", "seconds", "log rows/s", "vs README",
                "peak RSS MiB"):
        table.add_column(col, justify="right")
    preps = [r for r in results if r["stage"] == "prepare"]
    references = load_references()
    for size, p in zip(sizes, preps):
        # The preparation runs on the CPU whatever --device says.
        vs_readme = references.ratio(p["log_rows_per_second"], "alimama", "prepare_log_rows_per_second", "cpu",
                                     log_rows=size)
        table.add_row(f"{p['log_rows']:,}", f"{p['log_bytes'] / mib:,.0f}", f"{p['rows']:,}", str(p["partitions"]),
                      f"{p['seconds']:.1f}", f"{p['log_rows_per_second']:,.0f}", vs_readme,
                      f"{p['peak_rss_bytes'] / mib:,.0f}")
    peak = extrapolate([(p["log_rows"], p["peak_rss_bytes"]) for p in preps], FULL_LOG_ROWS)
    seconds = extrapolate([(p["log_rows"], p["seconds"]) for p in preps], FULL_LOG_ROWS)
    table.add_row(f"{FULL_LOG_ROWS:,} (extrapolated)", "", "", "", f"{seconds:,.0f}", "", "",
                  f"{peak / mib:,.0f} ({'≤' if peak <= MEMORY_LIMIT_BYTES else '>'} 4 GiB)")
    console.print(table)
    trains = [r for r in results if r["stage"] == "train"]
    if trains:
        console.print(training_table(trains[0], "alimama"))
        console.print(f"torch threads: {trains[0]['torch_threads']}")
    console.print(hardware_line(args.device, load_at_start))
    console.print(references.legend())


if __name__ == "__main__":
    main()
