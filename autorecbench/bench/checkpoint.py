"""``make bench`` (checkpoints): what writing checkpoints costs. A benchmark, not a test.

For FIXED and ESAPN on a synthetic stream whose tables span ml-20m-sized id spaces (as ``bench.streaming``), and
for FIXED + DeepFM offline on a synthetic Criteo-format file, each configuration in its own process: the run
without checkpoints, then the same run writing a checkpoint every ``--every`` batches / steps through the real
run-folder machinery (``execute.FolderControl``: atomic state file, appended predictions, fsync). Printed: seconds
of both, checkpoints written, seconds and MiB per checkpoint, the measured overhead, and the overhead of the
default policy (``runner.checkpoint_seconds=300``, and never sooner than 20 x the last checkpoint's cost), which
for a run longer than five minutes is cost / max(300 s, 20 x cost) <= 5%.

    python -m autorecbench.bench.checkpoint [--rows 300000] [--ctr-rows 200000] [--every 100] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autorecbench.bench.streaming import ML20M_ITEMS, ML20M_USERS

DEFAULT_SECONDS = 300.0
COST_FACTOR = 20.0


class _Counting:
    """A run folder's ``FolderControl`` that also counts what it wrote."""

    def __init__(self, folder: Path, cfg: Any) -> None:
        from autorecbench.execute import FolderControl
        from autorecbench.results.run_folder import RunFolder

        started = time.perf_counter()
        self.inner = FolderControl(RunFolder(folder, "bench"), {}, cfg, None, lambda: time.perf_counter() - started)
        self.resume = None
        self.seconds = 0.0
        self.count = 0
        self.bytes = 0

    def tick(self, count: int, epoch_end: bool = False) -> bool:
        return self.inner.tick(count, epoch_end)

    def save(self, state: dict[str, Any], position: dict[str, Any], append: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        self.inner.save(state, position, append)
        self.seconds += time.perf_counter() - started
        self.count += 1
        self.bytes = int(self.inner.info["checkpoint"]["bytes"])


def _streaming(args: argparse.Namespace, root: Path) -> tuple[float, _Counting | None]:
    from autorecbench.config import compose, resolve_device
    from autorecbench.data.cache import DatasetConfig, prepare
    from autorecbench.data.schema import FieldSpec, TaskSpec
    from autorecbench.data.stream import load_stream
    from autorecbench.execute import seed_everything
    from autorecbench.methods.base import MethodContext, method_class
    from autorecbench.runners.streaming import StreamingConfig, StreamingRunner

    cfg = compose(["data=synthetic", f"method={args.method}", f"paths.root={root}",
                   f"data.generator.n_interactions={args.rows}", f"data.generator.n_users={ML20M_USERS}",
                   f"data.generator.n_items={ML20M_ITEMS}"])
    device = resolve_device(args.device)
    task = TaskSpec.from_name("binary")
    prepared = prepare(DatasetConfig.from_mapping(cfg.data))
    schema = dataclasses.replace(prepared.schema, fields=[FieldSpec("user", ML20M_USERS), FieldSpec("item", ML20M_ITEMS)])
    prepared = dataclasses.replace(prepared, schema=schema)
    seed_everything(0, deterministic=False)
    stream = load_stream(prepared, task, device)
    method = method_class(args.method)(MethodContext(schema, task, cfg.method, cfg.model, device, 0))
    runner_cfg = StreamingConfig(checkpoint_every=args.every if args.checkpoints else None, checkpoint_seconds=None)
    control = _Counting(root / "runs", runner_cfg) if args.checkpoints else None
    result = StreamingRunner(runner_cfg).run(method, stream, control)
    return result.stream_seconds, control


def _offline(args: argparse.Namespace, root: Path) -> tuple[float, _Counting | None]:
    from autorecbench.config import compose, resolve_device, runner_config
    from autorecbench.data.cache import DatasetConfig, prepare
    from autorecbench.data.schema import TaskSpec
    from autorecbench.execute import seed_everything
    from autorecbench.methods.base import MethodContext, method_class
    from autorecbench.runners.offline import OfflineProtocol

    cfg = compose(["data=synthetic-criteo", "model=deepfm", f"paths.root={root}", f"data.generator.rows={args.ctr_rows}",
                   "runner.epochs=1", f"runner.checkpoint_every={args.every if args.checkpoints else 'null'}",
                   "runner.checkpoint_seconds=null"])
    device = resolve_device(args.device)
    task = TaskSpec.from_name("binary")
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    prepared = prepare(data_cfg)
    seed_everything(0, deterministic=False)
    protocol = OfflineProtocol(runner_config(cfg))
    data = protocol.load(prepared, task, device, data_cfg)
    method = method_class("fixed", "offline")(MethodContext(prepared.schema, task, cfg.method, cfg.model, device, 0))
    control = _Counting(root / "runs", protocol.cfg) if args.checkpoints else None
    started = time.perf_counter()
    protocol.run(method, data, control)
    return time.perf_counter() - started, control


def _one(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    seconds, control = _offline(args, root) if args.method == "deepfm" else _streaming(args, root)
    from autorecbench.config import resolve_device

    out = {"method": args.method, "checkpoints": args.checkpoints, "seconds": seconds,
           "device": str(resolve_device(args.device))}
    if control is not None:
        out.update(count=control.count, checkpoint_seconds=control.seconds, checkpoint_bytes=control.bytes)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="stream rows (FIXED, ESAPN)")
    parser.add_argument("--ctr-rows", type=int, default=200_000, help="Criteo-format rows (DeepFM, one epoch)")
    parser.add_argument("--every", type=int, default=100, help="a checkpoint every N batches / steps")
    parser.add_argument("--methods", default="fixed,esapn,deepfm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--root", default=None, help="folder for the synthetic data (default: a temporary one)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args)))
        return

    from rich.table import Table

    from autorecbench.bench.reference import hardware_line, load_average, load_references
    from autorecbench.console import out_console as console

    load_at_start = load_average()
    references = load_references()
    table = Table(title=f"Checkpoint cost: a checkpoint every {args.every} batches / steps, against none")
    for column in ("method", "run s (none)", "run s (with)", "checkpoints", "s each", "vs README", "MiB each",
                   "measured overhead", "default policy overhead"):
        table.add_column(column, justify="left" if column == "method" else "right")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        for method in args.methods.split(","):
            results = []
            for checkpoints in (False, True):
                console.print(f"[dim]running {method} {'with' if checkpoints else 'without'} checkpoints …[/]")
                cmd = [sys.executable, "-m", "autorecbench.bench.checkpoint", "--one", f"--method={method}",
                       f"--rows={args.rows}", f"--ctr-rows={args.ctr_rows}", f"--every={args.every}",
                       f"--device={args.device}", f"--root={root}", *(["--checkpoints"] if checkpoints else [])]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    console.print(f"[red]{method} failed:[/]\n{done.stderr[-2000:]}")
                    break
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if len(results) < 2:
                continue
            plain, with_ = results
            each = with_["checkpoint_seconds"] / max(with_["count"], 1)
            measured = (with_["seconds"] - plain["seconds"]) / plain["seconds"]
            default = each / max(DEFAULT_SECONDS, COST_FACTOR * each)
            table.add_row(method, f"{plain['seconds']:.1f}", f"{with_['seconds']:.1f}", str(with_["count"]),
                          f"{each:.3f}",
                          references.ratio(each if with_["count"] else None, "checkpoint", "seconds_per_checkpoint",
                                           with_["device"], method=method),
                          f"{with_['checkpoint_bytes'] / 2**20:,.1f}", f"{measured:+.1%}",
                          f"{default:.2%}")
    console.print(table)
    console.print(f"default policy: a checkpoint every {DEFAULT_SECONDS:.0f} s, never sooner than {COST_FACTOR:.0f}x "
                  "the last one's cost; its overhead is cost / max(300 s, 20 x cost) for runs longer than that")
    console.print("vs README: seconds per checkpoint / the README's (above 1: slower)")
    console.print(hardware_line(args.device, load_at_start))
    console.print(references.legend())


if __name__ == "__main__":
    main()
