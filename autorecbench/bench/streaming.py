"""``make bench``: streaming throughput and memory of methods on a synthetic stream. A benchmark, not a test.

Each configuration runs in its own process (so peak memory is its own) on a synthetic MovieLens-format
stream of ``--rows`` interactions whose embedding tables span ml-20m-sized id spaces (138,494 users and
131,263 item ids, as the official ESAPN code indexes raw ids). It prints interactions/s over the whole
test-then-train loop, peak resident memory, CUDA peak memory, and the bytes the embedding tables and
their optimiser state really allocate.

    python -m autorecbench.bench.streaming [--rows 1000000] [--device auto] [--methods fixed] [--optimizers lazy,dense]
                                           [--repeat 3]

With ``--repeat N`` every configuration runs N times, in rounds (each round runs them all in turn); the table
shows the median and range of interactions/s and, per method, the median over rounds of FIXED's throughput
divided by the method's (both measured in the same round).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ML20M_USERS = 138_494
ML20M_ITEMS = 131_263


def _one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from autorecbench import envinfo
    from autorecbench.config import compose, resolve_device
    from autorecbench.data.cache import DatasetConfig, prepare
    from autorecbench.data.schema import FieldSpec, TaskSpec
    from autorecbench.data.stream import load_stream
    from autorecbench.execute import seed_everything
    from autorecbench.methods.base import MethodContext, method_class
    from autorecbench.runners.streaming import StreamingConfig, StreamingRunner

    overrides = [
        "data=synthetic", f"method={args.method}", f"paths.root={args.root}",
        f"data.generator.n_interactions={args.rows}",
        f"data.generator.n_users={args.users}", f"data.generator.n_items={args.items}",
        f"method.embedding_optimizer={args.optimizer}", f"task={args.task}",
        *([f"method.static_shapes={args.static_shapes}"] if args.static_shapes else []),
    ]
    cfg = compose(overrides)
    device = resolve_device(args.device)
    task = TaskSpec.from_name(args.task)
    prepared = prepare(DatasetConfig.from_mapping(cfg.data))
    # Tables span the whole id space, not only the ids this stream happens to draw.
    schema = dataclasses.replace(prepared.schema, fields=[FieldSpec("user", args.users), FieldSpec("item", args.items)])
    prepared = dataclasses.replace(prepared, schema=schema)
    seed_everything(0, deterministic=False)
    stream = load_stream(prepared, task, device)
    method = method_class(args.method)(MethodContext(schema, task, cfg.method, cfg.model, device, 0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runner = StreamingRunner(StreamingConfig(batch_size=args.batch_size, eval_last=5_000_000))
    started, cpu_started = time.perf_counter(), time.process_time()
    result = runner.run(method, stream)
    total = time.perf_counter() - started
    # CPU-seconds of every thread of this process: on a shared machine a steadier measure than wall time.
    cpu_seconds = time.process_time() - cpu_started
    memory = method.memory()
    return {
        "method": args.method,
        "optimizer": args.optimizer,
        "task": args.task,
        "device": str(device),
        "rows": len(stream),
        "interactions_per_second": result.interactions_per_second,
        "stream_seconds": result.stream_seconds,
        "with_metrics_seconds": total,
        "cpu_seconds": cpu_seconds,
        "peak_rss_bytes": envinfo.peak_rss_bytes(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "embedding_bytes": memory.embedding_bytes,
        "embedding_optimizer_bytes": memory.embedding_optimizer_bytes,
        "parameters": memory.parameters,
        "torch_threads": torch.get_num_threads(),
        "static_shapes": bool(getattr(method, "static", False)),
        "gpu": envinfo.hardware(device).get("gpu"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=ML20M_USERS)
    parser.add_argument("--items", type=int, default=ML20M_ITEMS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="fixed,esapn,darts,autoemb")
    parser.add_argument("--optimizers", default="lazy,dense")
    parser.add_argument("--dense-rows", type=int, default=200_000,
                        help="rows for dense-Adam configurations, which touch every table row at every step")
    parser.add_argument("--task", default="binary")
    parser.add_argument("--static-shapes", choices=("auto", "true", "false"), default=None,
                        help="method.static_shapes for every method (default: each method's own, auto)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--root", default=None, help="folder for the synthetic data (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all configurations (interleaved); the table shows medians and ranges")
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(_one(args)))
        return

    from rich.table import Table

    from autorecbench.bench.reference import hardware_line, load_average, load_references
    from autorecbench.console import out_console as console

    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        # Rounds run every configuration once, in turn: on a machine whose speed drifts, configurations
        # measured in the same round are comparable, and medians over rounds are robust.
        for round_ in range(args.repeat):
            for method in args.methods.split(","):
                for optimizer in args.optimizers.split(","):
                    rows = args.rows if optimizer == "lazy" else min(args.rows, args.dense_rows)
                    cmd = [sys.executable, "-m", "autorecbench.bench.streaming", "--one", f"--method={method}",
                           f"--optimizer={optimizer}", f"--rows={rows}", f"--users={args.users}",
                           f"--items={args.items}", f"--device={args.device}", f"--task={args.task}",
                           f"--batch-size={args.batch_size}", f"--root={root}",
                           *([f"--static-shapes={args.static_shapes}"] if args.static_shapes else [])]
                    label = f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else ""
                    console.print(f"[dim]running {method} ({optimizer} Adam) on {rows:,} rows{label} …[/]")
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        console.print(f"[red]{method}/{optimizer} failed:[/]\n{done.stderr[-2000:]}")
                        continue
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["round"] = round_
                    runs.setdefault((method, optimizer), []).append(result)
                    if args.json:
                        print(json.dumps(result))
    if args.json:
        return
    mib = 2**20
    table = Table(title=f"Streaming throughput, synthetic stream, id spaces {args.users:,} users x {args.items:,} items")
    references = load_references()
    columns = ["method", "Adam", "device", "rows", "interactions/s", "vs README", "FIXED / method", "stream s",
               "CPU s", "peak RSS MiB", "CUDA peak MiB", "embedding MiB", "optimizer state MiB"]
    for col in columns:
        table.add_column(col, justify="right" if col not in ("method", "Adam", "device") else "left")
    for (method, optimizer), results in runs.items():
        r = results[-1]
        speeds = [x["interactions_per_second"] for x in results]
        speed = f"{statistics.median(speeds):,.0f}"
        if len(speeds) > 1:
            speed += f" ({min(speeds):,.0f}–{max(speeds):,.0f})"
        # FIXED's throughput over this method's, per round (same round: same machine state), median.
        fixed = {x["round"]: x["interactions_per_second"] for x in runs.get(("fixed", optimizer), [])}
        ratios = [fixed[x["round"]] / x["interactions_per_second"] for x in results if x["round"] in fixed]
        ratio = f"{statistics.median(ratios):.2f}×" if ratios and method != "fixed" else "–"
        table.add_row(
            method + (" (static)" if r.get("static_shapes") else ""), optimizer, r["gpu"] or r["device"],
            f"{r['rows']:,}", speed,
            "–" if r.get("static_shapes") else references.ratio(
                statistics.median(speeds), "streaming", "interactions_per_second", r["device"], method=method,
                optimizer=optimizer, task=r["task"]),
            ratio,
            f"{r['stream_seconds']:.1f}", f"{statistics.median(x['cpu_seconds'] for x in results):.1f}",
            f"{r['peak_rss_bytes'] / mib:,.0f}",
            "–" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / mib:,.0f}",
            f"{r['embedding_bytes'] / mib:,.1f}", f"{r['embedding_optimizer_bytes'] / mib:,.1f}",
        )
    console.print(table)
    first = next(iter(runs.values()), [{}])[0]
    rounds = f"; median (min–max) of {args.repeat} rounds" if args.repeat > 1 else ""
    console.print(f"torch threads: {first.get('torch_threads', '?')}; batch size {args.batch_size}{rounds}; "
                  "CPU s: CPU-seconds of the run's process, all threads (busy-waiting threads count)")
    console.print(hardware_line(args.device, load_at_start))
    console.print(references.legend())


if __name__ == "__main__":
    main()
