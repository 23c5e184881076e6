"""``autorecbench reproduce ameir``: the AMEIR paper's Tables 1, 3, 4 and 5, our runs beside the published numbers.

- Table 1 (Alimama, AUC and QPS): DNN, Wide&Deep, DeepFM, DIN, DIEN (``method=fixed``; the suite's backbones on
  behaviour histories), AMEIR-A/B/C (``method=ameir method.variant=…``). DSIN: not implemented (its sessions need
  the behaviours' timestamps, which the cache does not store).
- Table 3 (Criteo, Avazu, AUC and logloss): DNN, Wide&Deep, DeepFM, IPNN, AutoFIS (on DeepFM), AMEIR-I/B/C and a
  capacity-matched FIXED (DeepFM with the embedding size whose parameter count is closest to AMEIR-C's of the same
  seed). xDeepFM, FiBiNet, AutoCross, AutoCTR: not implemented.
- Table 4 (Alimama, NAS algorithms on one space): Random (``--random`` uniformly random architectures of the joint
  space trained standalone, ``method.architecture=…``; each seed's row is their best by validation AUC, as a
  random search would pick), One-shot random search (``method.search=joint``: one one-shot model over the joint
  space, uniform children, no progressive steps) and AMEIR (AMEIR-C, shared with Table 1); the search cost is our
  search seconds. RL, EA, ENAS, DARTS, SNAS: not implemented.
- Table 5 (Criteo, Avazu): where p^b goes (``method.interaction_mode``) with the manual MLP (AMEIR-B's
  structure), and MLP+SE with the searched MLP (AMEIR-C).
Every run uses the paper's batch size (``runner.batch_size=1024``). Each cell is our mean ± std over the seeds
beside the paper's value. Without ``--small`` the raw files must be in place (Alimama's four files, Criteo's
``train.txt``, Avazu's ``train``), otherwise the command stops before any run and says where to get them.
``--small`` runs the grid on small synthetic Alimama-, Criteo- and Avazu-format files with a reduced AMEIR budget:
a check of the pipeline, not a reproduction. A run that diverges (``RunDiverged``) does not stop the grid: its
cell shows the other seeds, the runs that diverged are listed under the tables and the command exits 1.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from autorecbench.console import out_console, setup_logging
from autorecbench.data.schema import Schema
from autorecbench.data.synthetic_alimama import FIRST_DESIGN_OVERRIDES
from autorecbench.errors import RunDiverged, UserError
from autorecbench.reproduce.autoias_table1 import matched_embedding_dim
from autorecbench.reproduce.runs import (
    Extra,
    Format,
    Seeds,
    Small,
    check_format,
    finish,
    main,
    markdown,
    mean_std,
    parse_seeds,
    require_raw_data,
    run_metrics,
    run_once,
    show,
)

log = logging.getLogger(__name__)
REFERENCE = Path(__file__).with_suffix(".yaml")
NOT_IMPLEMENTED = "not implemented"
BATCH = ["runner.batch_size=1024"]
DATASETS: dict[str, list[str]] = {"alimama": ["data=alimama"], "criteo": ["data=criteo"], "avazu": ["data=avazu"]}
_SMALL_CTR = ["data.generator.rows=10000", "data.generator.n_fields=8", "data.generator.n_informative=4",
              "data.generator.n_pairs=2", "data.generator.cardinality_max=30"]
# --small: every fit early-stops (patience 2) within 20 epochs — with the former 2-epoch cap (7 batches of 1024 per
# epoch) no model learnt (DNN on the Criteo stand-in: test AUC 0.634 after 2 epochs, 0.850 when it stops itself);
# the Alimama stand-in has 40,000 samples at a 20% click rate (the validation's): at 10,000 samples and 5% clicks
# (~60 test clicks) DNN's AUC stayed 0.559 whatever the epochs, at 40,000 and 20% it reaches 0.625
SMALL: dict[str, list[str]] = {
    "alimama": ["data=synthetic-alimama", *FIRST_DESIGN_OVERRIDES, "data.generator.users=600",
                "data.generator.ads=200", "data.generator.samples=40000", "data.generator.base_ctr=0.2",
                "data.generator.interest_strength=0",
                "data.generator.order_strength=1.5", "data.generator.order_pair_rate=0.3", "data.max_seq_len=10"],
    "criteo": ["data=synthetic-criteo", *_SMALL_CTR],
    "avazu": ["data=synthetic-avazu", *_SMALL_CTR],
}
SMALL_RUN = ["runner.epochs=20"]
SMALL_AMEIR = ["method.budget=quick", "method.children=10", "method.top=2", "method.keep=5", "method.finetune_steps=5"]
AMEIR = ["method=ameir"]
MATCHED, RANDOM = "matched", "random"
# table -> (datasets, columns, rows: label -> overrides | None (not implemented) | MATCHED | RANDOM)
TABLES: dict[str, tuple[list[str], list[str], dict[str, Any]]] = {
    "table1": (["alimama"], ["auc", "qps"], {
        "DNN": ["method=fixed", "model=dnn"], "Wide&Deep": ["method=fixed", "model=wide_deep"],
        "DeepFM": ["method=fixed", "model=deepfm"], "DIN": ["method=fixed", "model=din"],
        "DIEN": ["method=fixed", "model=dien"],
        "DSIN": None, "AMEIR-A": [*AMEIR, "method.variant=A"], "AMEIR-B": [*AMEIR, "method.variant=B"],
        "AMEIR-C": [*AMEIR, "method.variant=C"]}),
    "table3": (["criteo", "avazu"], ["auc", "logloss"], {
        "DNN": ["method=fixed", "model=dnn"], "Wide&Deep": ["method=fixed", "model=wide_deep"],
        "DeepFM": ["method=fixed", "model=deepfm"], "IPNN": ["method=fixed", "model=ipnn"], "xDeepFM": None,
        "FiBiNet": None, "AutoCross": None, "AutoFIS": ["method=autofis", "model=deepfm"], "AutoCTR": None,
        "AMEIR-I": [*AMEIR, "method.variant=I"], "AMEIR-B": [*AMEIR, "method.variant=B"],
        "AMEIR-C": [*AMEIR, "method.variant=C"], "FIXED (capacity-matched)": MATCHED}),
    "table4": (["alimama"], ["auc", "search_seconds"], {
        "Random": RANDOM, "RL": None, "EA": None, "ENAS": None, "DARTS": None, "SNAS": None,
        "One-shot random search": [*AMEIR, "method.variant=C", "method.search=joint"],
        "AMEIR": [*AMEIR, "method.variant=C"]}),
    "table5": (["criteo", "avazu"], ["auc", "logloss"], {
        "None / manual": [*AMEIR, "method.variant=B", "method.interaction_mode=none"],
        "MLP / manual": [*AMEIR, "method.variant=B", "method.interaction_mode=mlp"],
        "FM / manual": [*AMEIR, "method.variant=B", "method.interaction_mode=fm"],
        "MLP+FM / manual": [*AMEIR, "method.variant=B", "method.interaction_mode=mlp+fm"],
        "MLP+SE / manual": [*AMEIR, "method.variant=B"], "MLP+SE / searched": [*AMEIR, "method.variant=C"]}),
}


@dataclass
class Cell:
    """One (table, row, dataset): each metric over seeds, and notes (e.g. the matched embedding size)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    detail: list[str] = field(default_factory=list)

    def add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value)


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


class Grid:
    """Runs each distinct configuration once (a row shared by two tables, e.g. AMEIR-C, runs once per seed)."""

    def __init__(self, small: bool, extra: list[str], random_count: int, scratch: Path) -> None:
        self.small, self.extra, self.random_count, self.scratch = small, extra, random_count, scratch
        self.folders: dict[tuple[str, ...], Path | None] = {}
        self.diverged: list[str] = []

    def data(self, dataset: str) -> list[str]:
        return SMALL[dataset] + SMALL_RUN if self.small else DATASETS[dataset]

    def run(self, dataset: str, overrides: list[str], seed: int, label: str) -> Path | None:
        """The run's folder; None when it diverged (kept in ``diverged``: the grid goes on, the cell shows the
        other seeds, the command exits 1 at the end)."""
        ameir = SMALL_AMEIR if self.small and overrides[0] == "method=ameir" else []
        key = (dataset, *overrides, str(seed))
        if key not in self.folders:
            args = [*self.data(dataset), *BATCH, *overrides, *ameir, f"seed={seed}", "quiet=true", *self.extra]
            name = f"{dataset} / {label} / seed {seed}"
            try:
                self.folders[key] = run_once(args, name)
            except RunDiverged as exc:
                log.warning("%s: %s", name, exc)
                self.diverged.append(f"{name}: {exc}")
                self.folders[key] = None
        return self.folders[key]

    def metrics(self, folder: Path | None) -> dict[str, float]:
        if folder is None:  # diverged: no value for any column
            return dict.fromkeys(("auc", "logloss", "qps", "search_seconds", "parameters", "valid_auc"), math.nan)
        test, cost = run_metrics(folder, "test"), run_metrics(folder, "cost")
        return {"auc": test["auc"], "logloss": test["logloss"], "qps": cost.get("inference_qps", float("nan")),
                "search_seconds": cost.get("search_seconds", float("nan")), "parameters": cost["parameters"],
                "valid_auc": run_metrics(folder, "valid")["auc"]}

    def matched(self, dataset: str, seed: int, cell: Cell) -> dict[str, float]:
        ameir = self.run(dataset, [*AMEIR, "method.variant=C"], seed, "AMEIR-C")
        if ameir is None:  # nothing to match
            return self.metrics(None)
        cache = Path(json.loads((ameir / "run.json").read_text())["data"]["cache_dir"])
        dim = matched_embedding_dim(Schema.load(cache / "schema.json").fields,
                                    run_metrics(ameir, "cost")["parameters"])
        cell.detail.append(str(dim))
        return self.metrics(self.run(dataset, ["method=fixed", "model=deepfm", f"method.embedding_dim={dim}"], seed,
                                     "FIXED (capacity-matched)"))

    def random(self, dataset: str, seed: int, cell: Cell) -> dict[str, float]:
        """The best (validation AUC) of ``random_count`` random architectures trained standalone; the search
        cost is their summed training time."""
        from autorecbench.config import compose
        from autorecbench.data.cache import DatasetConfig, prepare
        from autorecbench.data.schema import TaskSpec
        from autorecbench.methods.ameir import AMEIR as AMEIRMethod
        from autorecbench.methods.base import MethodContext

        import torch

        cfg = compose([*self.data(dataset), *BATCH, *AMEIR, f"seed={seed}", *self.extra])
        prepared = prepare(DatasetConfig.from_mapping(cfg.data))
        method = AMEIRMethod(MethodContext(prepared.schema, TaskSpec.from_name("binary"), cfg.method, cfg.model,
                                           torch.device("cpu"), seed))
        generator = torch.Generator().manual_seed(20_000 + seed)
        runs = []
        for i in range(self.random_count):
            path = self.scratch / f"random-{dataset}-{seed}-{i}.json"
            path.write_text(json.dumps(method.random_architecture(generator)))
            runs.append(self.metrics(self.run(dataset, [*AMEIR, f"method.architecture={path}"], seed, f"Random {i}")))
        best = max(runs, key=lambda m: -math.inf if math.isnan(m["valid_auc"]) else m["valid_auc"])
        cell.detail.append(f"best of {self.random_count}")
        cost = sum(run_metrics(f, "cost")["train_seconds"] for k, f in self.folders.items()
                   if f is not None and k[0] == dataset and k[-1] == str(seed)
                   and any(str(o).startswith("method.architecture=") for o in k))
        return {**best, "search_seconds": cost}


def run_tables(tables: list[str], seeds: list[int], datasets: list[str], grid: Grid) -> dict[tuple[str, str, str], Cell]:
    cells: dict[tuple[str, str, str], Cell] = {}
    for table in tables:
        _, _, rows = TABLES[table]
        for dataset in [d for d in TABLES[table][0] if d in datasets]:
            for seed in seeds:
                for label, overrides in rows.items():
                    if overrides is None:
                        continue
                    cell = cells.setdefault((table, label, dataset), Cell())
                    if overrides == MATCHED:
                        cell.add(grid.matched(dataset, seed, cell))
                    elif overrides == RANDOM:
                        cell.add(grid.random(dataset, seed, cell))
                    else:
                        cell.add(grid.metrics(grid.run(dataset, overrides, seed, label)))
    return cells


def _paper(value: Any, std: Any = None) -> str:
    """A published metric (4 decimals, ± its std where given)."""
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std else "")


def table_rows(table: str, cells: dict[tuple[str, str, str], Cell], reference: dict[str, Any],
               small: bool) -> tuple[list[str], list[list[str]]]:
    datasets, columns, rows = TABLES[table]
    paper = reference[table]
    header = ["model", "source"] + [f"{d} {COLUMN_NAMES[c]}" for d in datasets for c in columns]
    out = []
    for label in list(dict.fromkeys([*paper, *rows])):
        ref = paper.get(label)
        if ref is not None:
            if isinstance(ref, dict):
                out.append([label, "paper", *[_paper(v) for d in datasets for v in ref[d]]])
            else:  # [value, std, extra]
                out.append([label, "paper", _paper(ref[0], ref[1]), str(ref[2])])  # QPS / GPU-days as printed
        if rows.get(label) is None:
            out.append([label, "ours", *[NOT_IMPLEMENTED] * (len(datasets) * len(columns))])
            continue
        row = [label, "ours" + (" (synthetic)" if small else "")]
        for dataset in datasets:
            cell = cells.get((table, label, dataset), Cell())
            for column in columns:
                values = cell.values.get(column, [])
                if column == "qps":
                    text = mean_std([v / 1000 for v in values], 0) + "K" if values and values[0] == values[0] else "–"
                else:
                    text = mean_std(values, 1 if column == "search_seconds" else 4)
                row.append(text)
        if cell.detail and rows[label] in (MATCHED, RANDOM):
            row[1] += f" ({'embedding ' if rows[label] == MATCHED else ''}{'/'.join(dict.fromkeys(cell.detail))})"
        out.append(row)
    return header, out


COLUMN_NAMES = {"auc": "AUC", "logloss": "logloss", "qps": "QPS", "search_seconds": "search cost"}
TITLES = {"table1": "Table 1: Alimama, test AUC and inference QPS (paper QPS: V100; ours: this machine)",
          "table3": "Table 3: Criteo and Avazu, test AUC and logloss",
          "table4": "Table 4: NAS algorithms on one search space, Alimama (paper: GPU-days; ours: search seconds)",
          "table5": "Table 5: where the interactions go, Criteo and Avazu (AUC, logloss)"}
EPILOG = ("Examples:\n\n"
          "* `autorecbench reproduce ameir --small` (pipeline check on synthetic stand-ins)\n\n"
          "* `autorecbench reproduce ameir --small --data alimama,criteo` (Avazu's columns left empty)\n\n"
          "* `autorecbench reproduce ameir --tables table1,table4 --seeds 0,1,2,3 device=cuda`")


def command(
    small: Small = False,
    tables: Annotated[str, typer.Option("--tables", help="Comma-separated: table1, table3, table4, table5.")] =
    "table1,table3,table4,table5",
    seeds: Seeds = "0",
    data: Annotated[str, typer.Option("--data", help="Comma-separated datasets to run: alimama, criteo, avazu.")] =
    "alimama,criteo,avazu",
    random: Annotated[int, typer.Option("--random", help="Table 4: random architectures per seed.")] = 3,
    fmt: Format = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the markdown tables here.")] = None,
    extra: Extra = None,
) -> None:
    """AMEIR paper (IJCAI 2021) Tables 1, 3, 4, 5 beside the paper's numbers (methods the suite lacks: "not
    implemented"). Stops with download instructions if a raw file is missing; `--small` runs synthetic stand-ins."""
    setup_logging()
    chosen = [t.strip() for t in tables.split(",") if t.strip()]
    if not chosen or any(t not in TABLES for t in chosen):
        raise UserError(f"--tables: choose from {', '.join(TABLES)}, got {tables!r}")
    datasets = [d.strip() for d in data.split(",") if d.strip()]
    if not datasets or any(d not in DATASETS for d in datasets):
        raise UserError(f"--data: choose from {', '.join(DATASETS)}, got {data!r}")
    if random < 1:
        raise UserError(f"--random must be >= 1, got {random}")
    check_format(fmt)
    seed_list = parse_seeds(seeds)
    needed = [d for d in dict.fromkeys(d for t in chosen for d in TABLES[t][0]) if d in datasets]
    if not small:
        require_raw_data({d: DATASETS[d] for d in needed}, "`autorecbench reproduce ameir --small`")
    with tempfile.TemporaryDirectory(prefix="autorecbench-ameir-") as scratch:
        grid = Grid(small, list(extra or []), random, Path(scratch))
        cells = run_tables(chosen, seed_list, needed, grid)
    reference = load_reference()
    texts = []
    for table in [t for t in chosen if set(TABLES[t][0]) & set(needed)]:
        header, rows = table_rows(table, cells, reference, small)
        title = TITLES[table] + (" — synthetic stand-ins" if small else "")
        show(title, header, rows, fmt)
        texts.append(f"**{title}**\n\n" + markdown(header, rows))
    if grid.diverged:
        texts.append("Diverged (left out of their cells): " + "; ".join(grid.diverged))
        out_console.print(texts[-1], highlight=False)
    finish(output, "\n\n".join(texts) + "\n", small)
    if grid.diverged:  # the tables show the other seeds; the exit code says a run is missing
        raise SystemExit(1)


if __name__ == "__main__":
    main(command)
