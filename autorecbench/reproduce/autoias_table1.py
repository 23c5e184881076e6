"""``autorecbench reproduce autoias``: the AutoIAS paper's Table 1, our runs printed beside the published numbers.

Grid: Avazu (``data=avazu-autofis``) and Criteo-8d (``data=criteo-1tb-autofis``), the AutoFIS/PIN protocol the
paper's rows use, × the rows the suite implements: FM and DeepFM (``method=fixed``), AutoFIS(2nd)
(``method=autofis model=deepfm``), AutoIAS (``method=autoias``), and a capacity-matched FIXED — DeepFM with
the one embedding size whose parameter count (counted on the ``meta`` device from the real module) comes
closest to the re-trained AutoIAS network's of the same seed. PIN, AutoInt+, AutoCTR and AutoFeature(2) are
other papers' methods the suite does not have: their rows show the paper's numbers only ("paper only"). Every
paper row carries its protocol: AutoInt+ and AutoCTR report Kaggle Criteo (logloss ≈ 0.44), the others the
down-sampled Criteo-8d (≈ 0.54), so the Criteo column mixes two datasets, as the paper's table does.

The published numbers come from ``autoias_table1.yaml`` (with its source). Without ``--small`` the raw files
must be in place (Avazu ``train``; Criteo 1TB ``day_0`` … ``day_7``), otherwise the command stops before any run
and says where to get them. ``--small`` runs the same grid on small synthetic Criteo- and Avazu-format files
(AutoIAS with ``method.budget=quick``): a check of the whole pipeline, not a reproduction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from autorecbench.console import out_console, setup_logging
from autorecbench.data.schema import FieldSpec, Schema, TaskSpec
from autorecbench.errors import UserError
from autorecbench.reproduce.runs import (
    Extra,
    Format,
    Seeds,
    Small,
    check_format,
    mean_std,
    parse_seeds,
    require_raw_data,
    run_metrics,
    main,
    run_once,
    show,
)

REFERENCE = Path(__file__).with_suffix(".yaml")
DATASETS: dict[str, list[str]] = {"avazu": ["data=avazu-autofis"], "criteo": ["data=criteo-1tb-autofis"]}
_SMALL_DATA = ["data.generator.rows=20000", "data.generator.n_fields=8", "data.generator.n_informative=4",
               "data.generator.n_pairs=2", "data.generator.cardinality_max=30"]
SMALL: dict[str, list[str]] = {
    "avazu": ["data=synthetic-avazu", *_SMALL_DATA],
    "criteo": ["data=synthetic-criteo", *_SMALL_DATA],
}
SMALL_RUN = ["runner.epochs=2", "runner.batch_size=500", "method.budget=quick", "method.search_epochs=1"]
# Our rows: label -> overrides (None: capacity-matched FIXED, sized after AutoIAS' run of the same seed).
ROWS: dict[str, list[str] | None] = {
    "FM": ["method=fixed", "model=fm"],
    "DeepFM": ["method=fixed", "model=deepfm"],
    "AutoFIS(2nd)": ["method=autofis", "model=deepfm"],
    "AutoIAS": ["method=autoias"],
    "FIXED (capacity-matched)": None,
}
PAPER_ONLY = "paper only"


@dataclass
class Cell:
    """One (row, dataset): the runs' test AUC, logloss and parameter counts over seeds."""

    auc: list[float] = field(default_factory=list)
    logloss: list[float] = field(default_factory=list)
    parameters: list[float] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def matched_embedding_dim(fields: Sequence[FieldSpec], target_parameters: float, model: str = "deepfm") -> int:
    """The embedding size whose FIXED backbone's parameter count is closest to ``target_parameters``. The counts
    are read from the module built for the dataset's ``fields`` at sizes 1 and 2; a backbone's count is linear
    in the embedding size (tables and the first layer's inputs grow with it, nothing else does; tested)."""
    from autorecbench.config import compose
    from autorecbench.models.backbones import build_backbone

    model_cfg = compose([f"model={model}"]).model

    def count(dim: int) -> int:
        model_cfg.embedding_dim = dim
        return sum(p.numel() for p in build_backbone(model, fields, TaskSpec.from_name("binary"), model_cfg).parameters())

    one, two = count(1), count(2)
    return max(1, round((target_parameters - one) / (two - one)) + 1)


def run_grid(datasets: list[str], seeds: list[int], small: bool, extra: list[str]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for dataset in datasets:
        data = SMALL[dataset] + SMALL_RUN if small else DATASETS[dataset]
        for seed in seeds:
            autoias: Path | None = None
            for label, overrides in ROWS.items():
                if overrides is None:
                    assert autoias is not None
                    target = run_metrics(autoias, "cost")["parameters"]
                    cache = Path(json.loads((autoias / "run.json").read_text())["data"]["cache_dir"])
                    dim = matched_embedding_dim(Schema.load(cache / "schema.json").fields, target)
                    overrides = ["method=fixed", "model=deepfm", f"method.embedding_dim={dim}"]
                run = [*data, *overrides, f"seed={seed}", "quiet=true", *extra]
                if small and overrides[0] != "method=autoias":
                    run = [o for o in run if not o.startswith("method.budget") and not o.startswith("method.search_epochs")]
                folder = run_once(run, f"{dataset} / {label} / seed {seed}")
                if label == "AutoIAS":
                    autoias = folder
                test, cost = run_metrics(folder, "test"), run_metrics(folder, "cost")
                cell = cells.setdefault((label, dataset), Cell())
                cell.auc.append(test["auc"])
                cell.logloss.append(test["logloss"])
                cell.parameters.append(cost["parameters"])
                if label.startswith("FIXED"):
                    cell.detail.append(overrides[-1].split("=")[1])
    return cells


def table_rows(cells: dict[tuple[str, str], Cell], reference: dict[str, Any], datasets: list[str],
               small: bool) -> tuple[list[str], list[list[str]]]:
    header = ["model", "source", "protocol (Criteo column)"]
    for dataset in datasets:
        name = "Avazu" if dataset == "avazu" else "Criteo"
        header += [f"{name} AUC", f"{name} logloss", f"{name} params"]
    protocols = reference["protocols"]
    rows = []
    paper = {r["model"]: r for r in reference["rows"]}
    for model in list(dict.fromkeys([*paper, *ROWS])):
        ref = paper.get(model)
        if ref is not None:
            row = [model, "paper", protocols[ref["criteo_protocol"]]]
            for dataset in datasets:
                auc, logloss, rank = ref[dataset]
                row += [f"{auc:.4f} (rank {rank})", f"{logloss:.4f}", "–"]
            rows.append(row)
        if model not in ROWS:
            rows.append([model, "ours", "–", *[PAPER_ONLY, "–", "–"] * len(datasets)])
            continue
        where = "synthetic stand-in" if small else protocols["criteo-8d"]
        row = [model, "ours", where]
        for dataset in datasets:
            cell = cells.get((model, dataset), Cell())
            params = mean_std(cell.parameters, 0)
            if cell.detail:
                params += f" (embedding {'/'.join(dict.fromkeys(cell.detail))})"
            row += [mean_std(cell.auc), mean_std(cell.logloss), params]
        rows.append(row)
    return header, rows


EPILOG = ("Examples:\n\n"
          "* `autorecbench reproduce autoias --small` (pipeline check on synthetic stand-ins, minutes on a CPU)\n\n"
          "* `autorecbench reproduce autoias --seeds 0,1,2 device=cuda`")


def command(
    small: Small = False,
    data: Annotated[str, typer.Option("--data", help="Comma-separated datasets: avazu, criteo.")] = "avazu,criteo",
    seeds: Seeds = "0",
    fmt: Format = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the markdown table here.")] = None,
    extra: Extra = None,
) -> None:
    """AutoIAS paper (CIKM 2021) Table 1: FM, DeepFM, AutoFIS, AutoIAS and a capacity-matched FIXED on Avazu and
    Criteo-8d (AutoFIS/PIN protocol), beside the paper's rows (PIN, AutoInt+, AutoCTR, AutoFeature: paper only).
    Stops with download instructions if a raw file is missing; `--small` runs synthetic stand-ins."""
    setup_logging()
    datasets = [d.strip() for d in data.split(",") if d.strip()]
    if not datasets or any(d not in DATASETS for d in datasets):
        raise UserError(f"--data: choose from {', '.join(DATASETS)}, got {data!r}")
    check_format(fmt)
    seed_list = parse_seeds(seeds)
    if not small:
        require_raw_data({d: DATASETS[d] for d in datasets}, "`autorecbench reproduce autoias --small`")
    cells = run_grid(datasets, seed_list, small, list(extra or []))
    header, rows = table_rows(cells, load_reference(), datasets, small)
    title = "AutoIAS (CIKM 2021) Table 1: test AUC and logloss" + (" — synthetic stand-ins" if small else "")
    show(title, header, rows, fmt, output)
    if small:
        out_console.print("synthetic stand-ins: the paper's rows show the layout, they are not comparable",
                          highlight=False)


if __name__ == "__main__":
    main(command)
