"""``make bench`` (CTR part): preparing a large Criteo-format file, and DeepFM training speed. A benchmark, not a test.

1. Writes a synthetic Criteo Kaggle-format ``train.txt`` of ``--rows`` rows (default 5,000,000; all 39
   fields, up to ``--cardinality`` values per categorical field with Zipf frequencies, 2% empty values), once
   per size, under ``--root``, in a process of its own.
2. Prepares it as ``data=criteo`` does (BARS Criteo_x4_001 options: min count 10, log-square integers,
   random 8:1:1 split) in its own process, and reports rows/s and that process's peak resident memory
   (the chunked reader keeps it bounded: the issue asks for < 4 GB at 5M rows).
3. Trains FIXED + DeepFM (AutoLoss §3.3 settings, batch 2000) for one epoch over ``--train-rows`` training
   rows in its own process and reports training samples/s (optimisation steps only) on ``--device``; with
   DeepFM, its FLOPs per sample (``flops.py``), the FLOP/s achieved and their share of the rate of one matrix
   product of the MLP's first layer and of a large square one, both measured in that process right after.
4. ``--fuxictr``: trains FuxiCTR's DeepFM on the same rows and settings in its own process
   (``fuxictr_deepfm.py``) and prints both samples/s and their ratio; ``--repeat N`` alternates N rounds of
   ours and FuxiCTR's and prints each round's ratio and their median.

Every figure is printed with its ratio to README "Speed" (``reference.yaml``) and a hardware line.

    python -m autorecbench.bench.ctr [--rows 5000000] [--train-rows 500000] [--device auto] [--fuxictr]
                                     [--repeat 1] [--fuxictr-workers 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MEMORY_LIMIT_BYTES = 4 * 2**30
SQUARE = 2048  # the large square matrix product of the FLOP-rate line


def _dataset(args: argparse.Namespace) -> tuple[Path, Path]:
    """The raw folder holding ``train.txt`` (generated if absent) and the processed folder."""
    from autorecbench.data.synthetic_ctr import CTRGenerator, generate_ctr

    spec = CTRGenerator(seed=0, rows=args.rows, cardinality_min=4, cardinality_max=args.cardinality,
                        max_int_cardinality=400, n_informative=12, n_pairs=8)
    raw = Path(args.root) / f"criteo-bench-{spec.key()}"
    if not (raw / "truth.json").is_file():
        generate_ctr("criteo", spec, raw)
    return raw, Path(args.root) / "processed"


def _data_config(raw: Path, processed: Path) -> Any:
    from autorecbench.config import compose
    from autorecbench.data.cache import DatasetConfig

    cfg = compose(["data=criteo", f"data.path={raw}", f"data.processed_dir={processed}"])
    return cfg, DatasetConfig.from_mapping(cfg.data)


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    from autorecbench import envinfo
    from autorecbench.data.cache import prepare

    raw, processed = _dataset(args)
    _, data_cfg = _data_config(raw, processed)
    started = time.perf_counter()
    prepared = prepare(data_cfg, force=True)
    seconds = time.perf_counter() - started
    schema = prepared.schema
    return {
        "stage": "prepare",
        "rows": schema.n_rows,
        "raw_bytes": (raw / "train.txt").stat().st_size,
        "seconds": seconds,
        "rows_per_second": schema.n_rows / seconds,
        "peak_rss_bytes": envinfo.peak_rss_bytes(),
        "cache_bytes": sum(p.stat().st_size for p in prepared.directory.rglob("*") if p.is_file()),
        "feature_values": sum(f.cardinality for f in schema.fields),
    }


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from autorecbench.data.cache import prepare

    raw, processed = _dataset(args)
    _, data_cfg = _data_config(raw, processed)
    prepared = prepare(data_cfg)
    overrides = ["data=criteo", f"model={args.model}", f"method.embedding_optimizer={args.optimizer}"]
    result = train_epoch(prepared, data_cfg, overrides, args.device, args.train_rows)
    if args.model == "deepfm":
        result.update(flop_rates(result, len(prepared.schema.fields), overrides, args.device))
    return result


def _fuxictr(args: argparse.Namespace) -> dict[str, Any]:
    """FuxiCTR's DeepFM on the rows and settings ``_train`` uses (``fuxictr_deepfm.py``)."""
    from autorecbench.bench.fuxictr_deepfm import train_fuxictr
    from autorecbench.data.cache import prepare

    raw, processed = _dataset(args)
    _, data_cfg = _data_config(raw, processed)
    overrides = ["data=criteo", "model=deepfm", "method.embedding_optimizer=dense"]
    setup = epoch_setup(prepare(data_cfg), data_cfg, overrides, args.device, args.train_rows)
    with tempfile.TemporaryDirectory(dir=args.root) as folder:
        return train_fuxictr(setup.data, setup.cfg.model, setup.batch_size, float(setup.cfg.method.lr),
                             setup.device, Path(folder), args.fuxictr_workers)


def flop_rates(train: dict[str, Any], n_fields: int, overrides: list[str], device_name: str) -> dict[str, Any]:
    """DeepFM's FLOPs per training sample (``flops.py``), the FLOP/s the training achieved, and the rate of one
    matrix product of the MLP's first layer (batch x F d @ F d x hidden) and of a large square one
    (``SQUARE``^3), measured in this process with the training's threads, right after it."""
    from autorecbench.bench.flops import deepfm_flops, layer_widths, matmul_rate
    from autorecbench.config import compose, resolve_device

    model = compose(overrides).model
    dim, hidden = int(model.embedding_dim), [int(h) for h in model.hidden]
    per_sample = deepfm_flops(n_fields, dim, hidden)
    device = resolve_device(device_name)
    first_in, first_out = layer_widths(n_fields, dim, hidden)[0]
    mlp_rate = matmul_rate(train["batch_size"], first_in, first_out, device)
    square_rate = matmul_rate(SQUARE, SQUARE, SQUARE, device)
    return {"flops_per_sample": per_sample.total,
            "mlp_flops_per_sample": per_sample.mlp_forward + per_sample.mlp_backward,
            "achieved_flops_per_second": per_sample.total * train["samples_per_second"],
            "matmul_mlp_shape": [mlp_rate.m, mlp_rate.k, mlp_rate.n],
            "matmul_mlp_flops_per_second": mlp_rate.flops_per_second,
            "matmul_square_flops_per_second": square_rate.flops_per_second}


@dataclass
class EpochSetup:
    """The composed config, device, one-epoch offline protocol and loaded splits a training bench runs on."""

    cfg: Any
    device: Any
    task: Any
    protocol: Any
    data: Any
    batch_size: int


def epoch_setup(prepared: Any, data_cfg: Any, overrides: list[str], device_name: str, train_rows: int) -> EpochSetup:
    """The offline protocol of the composed ``overrides`` for one epoch, its splits cut to ``train_rows`` training
    rows (every split in proportion), loaded on ``device_name``; seeds set."""
    from omegaconf import OmegaConf

    from autorecbench.config import compose, resolve_device
    from autorecbench.data.schema import TaskSpec
    from autorecbench.execute import seed_everything
    from autorecbench.runners.offline import OfflineConfig, OfflineProtocol

    cfg = compose(overrides)
    device = resolve_device(device_name)
    task = TaskSpec.from_name("binary")
    options = OmegaConf.to_container(cfg.runner, resolve=True)
    assert isinstance(options, dict)
    options.pop("name")
    total = sum((prepared.schema.splits or {}).values())
    options.update(epochs=1, max_rows=int(train_rows * total / max(prepared.schema.splits["train"], 1)))
    seed_everything(0, deterministic=False)
    protocol = OfflineProtocol(OfflineConfig(**options))
    data = protocol.load(prepared, task, device, data_cfg)
    return EpochSetup(cfg, device, task, protocol, data, int(options["batch_size"]))


def train_epoch(prepared: Any, data_cfg: Any, overrides: list[str], device_name: str, train_rows: int) -> dict[str, Any]:
    """FIXED on the composed ``overrides`` for one epoch over ``train_rows`` training rows of ``prepared``: its
    training samples/s (optimisation steps only) and memory."""
    import torch

    from autorecbench import envinfo
    from autorecbench.methods.base import MethodContext, method_class

    setup = epoch_setup(prepared, data_cfg, overrides, device_name, train_rows)
    cfg, device, task, protocol, data = setup.cfg, setup.device, setup.task, setup.protocol, setup.data
    method = method_class("fixed", "offline")(MethodContext(prepared.schema, task, cfg.method, cfg.model, device, 0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = protocol.run(method, data)
    memory = method.memory()
    return {
        "stage": "train",
        "model": str(cfg.model.name),
        "optimizer": str(cfg.method.embedding_optimizer),
        "batch_size": setup.batch_size,
        "device": str(device),
        "gpu": envinfo.hardware(device).get("gpu"),
        "train_rows": len(data.train),
        "samples_per_second": out.cost["train_samples_per_second"],
        "train_seconds": out.cost["train_step_seconds"],
        "test_auc": out.headline.get("auc"),
        "parameters": memory.parameters,
        "embedding_bytes": memory.embedding_bytes,
        "peak_rss_bytes": envinfo.peak_rss_bytes(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
    }


def run_stages(module: str, stages: list[str], options: list[str], describe: str, as_json: bool) -> list[dict[str, Any]]:
    """Run ``python -m module --stage=S options...`` for each stage in a process of its own (so each peak memory is
    its own) and return their JSON results, ``generate`` stages left out; exits on a failed stage."""
    from autorecbench.console import out_console as console

    results = []
    for stage in stages:
        if not as_json:
            console.print(f"[dim]{stage} ({describe}) …[/]")
        done = subprocess.run([sys.executable, "-m", module, f"--stage={stage}", *options], capture_output=True, text=True)
        if done.returncode != 0:
            console.print(f"[red]{stage} failed:[/]\n{done.stderr[-2000:]}")
            sys.exit(1)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if stage.startswith("generate"):
            continue
        results.append(result)
        if as_json:
            print(json.dumps(result))
    return results


def training_table(train: dict[str, Any], bench: str) -> Any:
    """The rich table of a :func:`train_epoch` result, with the ratio to the README's figure of ``bench``."""
    from rich.table import Table

    from autorecbench.bench.reference import load_references

    mib = 2**20
    table = Table(title=f"Training one epoch, FIXED + {train['model']} (batch {train['batch_size']}, "
                        f"{train['optimizer']} Adam)")
    for col in ("device", "train rows", "samples/s", "vs README", "parameters", "embedding MiB", "peak RSS MiB",
                "CUDA peak MiB", "test AUC"):
        table.add_column(col, justify="right" if col != "device" else "left")
    vs_readme = load_references().ratio(train["samples_per_second"], bench, "train_samples_per_second",
                                        train["device"], model=train["model"])
    table.add_row(train["gpu"] or train["device"], f"{train['train_rows']:,}", f"{train['samples_per_second']:,.0f}",
                  vs_readme, f"{train['parameters']:,}", f"{train['embedding_bytes'] / mib:,.1f}",
                  f"{train['peak_rss_bytes'] / mib:,.0f}",
                  "–" if train["cuda_peak_bytes"] is None else f"{train['cuda_peak_bytes'] / mib:,.0f}",
                  f"{train['test_auc']:.4f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--cardinality", type=int, default=100_000, help="most values of a categorical field")
    parser.add_argument("--train-rows", type=int, default=500_000)
    parser.add_argument("--model", default="deepfm")
    parser.add_argument("--optimizer", default="dense", help="embedding optimiser: dense (the papers') or lazy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--root", default=None, help="folder for the generated file and cache (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per stage")
    parser.add_argument("--fuxictr", action="store_true",
                        help="also train FuxiCTR's DeepFM on the same rows and settings (the [bench] extra)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="training rounds (ours, then FuxiCTR's with --fuxictr, in turn); tables show medians")
    parser.add_argument("--fuxictr-workers", type=int, default=1,
                        help="worker processes of FuxiCTR's loader (default 1, its own default)")
    parser.add_argument("--stage", choices=["generate", "prepare", "train", "fuxictr"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage == "generate":
        print(json.dumps({"stage": "generate", "raw": str(_dataset(args)[0])}))
        return
    if args.stage:
        stages = {"prepare": _prepare, "train": _train, "fuxictr": _fuxictr}
        print(json.dumps(stages[args.stage](args)))
        return
    if args.fuxictr:
        import importlib.util

        problem = None
        if args.skip_train or args.model != "deepfm" or args.optimizer != "dense":
            problem = "--fuxictr compares DeepFM with dense Adam: drop --skip-train, --model and --optimizer"
        elif importlib.util.find_spec("fuxictr") is None:
            problem = '--fuxictr needs FuxiCTR: pip install -e ".[bench]" (make setup installs it)'
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)

    from rich.table import Table

    from autorecbench.bench.reference import hardware_line, load_average, load_references
    from autorecbench.console import out_console as console

    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        args.root = args.root or tmp
        # The file is written in a process of its own, so the preparation's peak memory is preparation only.
        # Training rounds alternate ours and FuxiCTR's (--repeat): on a machine whose speed drifts, the two of a
        # round are measured under the same load.
        rounds = [] if args.skip_train else (["train", "fuxictr"] if args.fuxictr else ["train"]) * args.repeat
        stages = ["generate", "prepare", *rounds]
        options = [f"--rows={args.rows}", f"--cardinality={args.cardinality}", f"--train-rows={args.train_rows}",
                   f"--model={args.model}", f"--optimizer={args.optimizer}", f"--device={args.device}",
                   f"--root={args.root}", f"--fuxictr-workers={args.fuxictr_workers}"]
        results = run_stages("autorecbench.bench.ctr", stages, options, f"{args.rows:,}-row Criteo-format file",
                             args.json)
    if args.json:
        return
    mib = 2**20
    prep = results[0]
    table = Table(title=f"CTR preprocessing, synthetic Criteo Kaggle format ({prep['raw_bytes'] / mib:,.0f} MiB)")
    for col in ("rows", "seconds", "rows/s", "vs README", "peak RSS MiB", "< 4 GiB", "feature values", "cache MiB"):
        table.add_column(col, justify="right")
    from autorecbench.config import resolve_device

    references = load_references()
    # Preparation runs on the CPU, but the README's figure for a GPU machine was measured on that machine's CPUs.
    vs_readme = references.ratio(prep["rows_per_second"], "ctr", "prepare_rows_per_second",
                                 str(resolve_device(args.device)))
    table.add_row(f"{prep['rows']:,}", f"{prep['seconds']:.1f}", f"{prep['rows_per_second']:,.0f}", vs_readme,
                  f"{prep['peak_rss_bytes'] / mib:,.0f}", "yes" if prep["peak_rss_bytes"] < MEMORY_LIMIT_BYTES else "NO",
                  f"{prep['feature_values']:,}", f"{prep['cache_bytes'] / mib:,.0f}")
    console.print(table)
    trains = [r for r in results if r["stage"] == "train"]
    if trains:
        train = sorted(trains, key=lambda r: r["samples_per_second"])[len(trains) // 2]  # the median round's
        console.print(training_table(train, "ctr"))
        if "flops_per_sample" in train:
            console.print(flop_line(train))
        console.print(f"torch threads: {train['torch_threads']}" + (f"; the median of {len(trains)} rounds" if
                                                                     len(trains) > 1 else ""))
    theirs = [r for r in results if r["stage"] == "fuxictr"]
    if theirs:
        console.print(fuxictr_table(trains, theirs))
    console.print(hardware_line(args.device, load_at_start))
    console.print(references.legend())


def fuxictr_table(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> Any:
    """Our DeepFM's training samples/s beside FuxiCTR's on the same rows (``fuxictr_deepfm.py``), per round
    (measured one after the other) and the median over rounds of each round's ratio."""
    from rich.table import Table

    table = Table(title=f"DeepFM, one epoch over the same {ours[0]['train_rows']:,} rows: ours against FuxiCTR "
                        f"2.3.10 ({theirs[0]['loader_workers']} loader worker(s))")
    for col in ("round", "ours samples/s", "FuxiCTR samples/s (its loop)", "ours / FuxiCTR",
                "FuxiCTR samples/s (steps alone)", "ours / FuxiCTR steps", "test AUC ours / FuxiCTR"):
        table.add_column(col, justify="right")
    loop_ratios, step_ratios = [], []
    for round_, (mine, fuxi) in enumerate(zip(ours, theirs), 1):
        loop_ratios.append(mine["samples_per_second"] / fuxi["samples_per_second"])
        step_ratios.append(mine["samples_per_second"] / fuxi["steps_samples_per_second"])
        table.add_row(str(round_), f"{mine['samples_per_second']:,.0f}", f"{fuxi['samples_per_second']:,.0f}",
                      f"{loop_ratios[-1]:.2f}×", f"{fuxi['steps_samples_per_second']:,.0f}",
                      f"{step_ratios[-1]:.2f}×",
                      f"{mine['test_auc']:.4f} / {fuxi['test_auc']:.4f}")
    if len(loop_ratios) > 1:
        table.add_row("median", "", "", f"{statistics.median(loop_ratios):.2f}×", "",
                      f"{statistics.median(step_ratios):.2f}×", "")
    return table


def flop_line(train: dict[str, Any]) -> str:
    """Achieved FLOP/s of the training against the machine's matrix-product rates (:func:`flop_rates`)."""
    giga = 1e9
    achieved = train["achieved_flops_per_second"]
    m, k, n = train["matmul_mlp_shape"]
    return (f"FLOPs: {train['flops_per_sample']:,} per training sample (DeepFM's MLP and FM, forward + backward; "
            f"{train['mlp_flops_per_sample']:,} in matrix products) x {train['samples_per_second']:,.0f} samples/s "
            f"= {achieved / giga:,.1f} GFLOP/s achieved; one matrix product {m} x {k} @ {k} x {n}: "
            f"{train['matmul_mlp_flops_per_second'] / giga:,.1f} GFLOP/s (achieved "
            f"{achieved / train['matmul_mlp_flops_per_second']:.1%} of it), {SQUARE} x {SQUARE} @ {SQUARE} x "
            f"{SQUARE}: {train['matmul_square_flops_per_second'] / giga:,.1f} GFLOP/s "
            f"({achieved / train['matmul_square_flops_per_second']:.1%})")


if __name__ == "__main__":
    main()
