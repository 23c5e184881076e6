"""``autorecbench reproduce autoias-ablations``: the AutoIAS paper's ablations (Figs. 3–6) as runs of
``method=autoias``, printed as tables and written as Parquet so that the curves can be drawn.

Groups (``autoias_ablations.yaml`` holds the settings and what the paper says of each figure): KD on or off and
β ∈ {0, .25, .5, .75, 1} (Fig. 3); students N ∈ {1, 3, 5, 9, 13} (Fig. 4); generator against random search,
both with KD off and one student (Fig. 5); reward samples m ∈ {1, 2, 4, 8} (Fig. 6). A setting shared by several
groups (the defaults: β = 0.5, N = 9, m = 4) runs once. Per setting and seed the table shows the search's last
interval: the students' mean training loss (Eq. 16), the hard part (Eq. 15), the probe architectures'
validation logloss (the supernet's quality for fixed architectures), the derived a*'s validation AUC with the
supernet's weights, and the re-trained a*'s test AUC. ``--output`` (default ``results/autoias-ablations``)
receives ``curves.parquet`` (every search evaluation of every run: group, setting, seed, step and the numbers
above) and ``final.parquet`` (one row per run).

Without ``--small`` the raw files of the chosen dataset must be in place (otherwise the command stops with
where to get them); ``--small`` runs a small synthetic Criteo-format stand-in (a pipeline check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
import yaml

from autorecbench.console import out_console, setup_logging
from autorecbench.errors import UserError
from autorecbench.reproduce import runs
from autorecbench.reproduce.autoias_table1 import DATASETS

REFERENCE = Path(__file__).with_suffix(".yaml")
SMALL = ["data=synthetic-criteo", "data.generator.rows=20000", "data.generator.n_fields=8",
         "data.generator.n_informative=4", "data.generator.n_pairs=2", "data.generator.cardinality_max=30",
         "runner.epochs=1", "runner.batch_size=500", "method.budget=quick", "method.search_epochs=2"]
FINAL = ("student_loss", "student_hard_loss", "probe_valid_logloss", "derived_valid_auc")


def load_reference(path: Path = REFERENCE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def settings(groups: list[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(group, setting, overrides) of the chosen groups, in the reference's order."""
    reference = load_reference()["groups"]
    return [(g, name, tuple(overrides)) for g in groups for name, overrides in reference[g]["settings"].items()]


def run_all(chosen: list[tuple[str, str, tuple[str, ...]]], data: list[str], seeds: list[int], extra: list[str]
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every distinct setting once per seed; the curve rows and one final row per (group, setting, seed)."""
    done: dict[tuple[tuple[str, ...], int], tuple[pl.DataFrame, dict[str, float]]] = {}
    curves: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    for group, name, overrides in chosen:
        for seed in seeds:
            key = (tuple(sorted(overrides)), seed)
            if key not in done:
                folder = runs.run_once([*data, "method=autoias", *overrides, f"seed={seed}", "quiet=true", *extra],
                                  f"{group} / {name} / seed {seed}")
                search = pl.read_parquet(folder / "search.parquet")
                test = runs.run_metrics(folder, "test")
                done[key] = (search, {"test_auc": test["auc"],
                                      "search_seconds": runs.run_metrics(folder, "cost")["search_seconds"]})
            search, result = done[key]
            ids = {"group": group, "setting": name, "seed": seed}
            curves += [{**ids, **row} for row in search.select("step", *FINAL).to_dicts()]
            last = search.row(search.height - 1, named=True)
            finals.append({**ids, **{k: last[k] for k in FINAL}, **result})
    return curves, finals


def table(finals: list[dict[str, Any]], group: str) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "student loss", "hard loss", "probe valid logloss", "a* valid AUC (supernet)",
              "re-trained test AUC", "search s"]
    rows = []
    for name in dict.fromkeys(f["setting"] for f in finals if f["group"] == group):
        mine = [f for f in finals if f["group"] == group and f["setting"] == name]
        rows.append([name, *[runs.mean_std([float(f[k]) for f in mine]) for k in FINAL],
                     runs.mean_std([f["test_auc"] for f in mine]), runs.mean_std([f["search_seconds"] for f in mine], 1)])
    return header, rows


EPILOG = ("Examples:\n\n"
          "* `autorecbench reproduce autoias-ablations --small` (pipeline check on a synthetic stand-in)\n\n"
          "* `autorecbench reproduce autoias-ablations --data avazu --groups kd,students --seeds 0,1 device=cuda`")


def command(
    small: runs.Small = False,
    data: Annotated[str, typer.Option("--data", help="avazu or criteo (Criteo-8d).")] = "avazu",
    groups: Annotated[str, typer.Option("--groups", help="Comma-separated: kd, students, generator, reward_samples.")] = "kd,students,generator,reward_samples",
    seeds: runs.Seeds = "0",
    fmt: runs.Format = "table",
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for curves.parquet and final.parquet.")] = Path("results/autoias-ablations"),
    extra: runs.Extra = None,
) -> None:
    """AutoIAS paper (CIKM 2021) ablations, Figs. 3-6: KD and β, student count, generator vs random search, reward
    samples m. Prints one table per figure and writes the curves as Parquet. `--small` runs a synthetic stand-in."""
    setup_logging()
    reference = load_reference()["groups"]
    chosen_groups = [g.strip() for g in groups.split(",") if g.strip()]
    if not chosen_groups or any(g not in reference for g in chosen_groups) or data not in DATASETS:
        raise UserError(f"--groups: choose from {', '.join(reference)}; --data: {', '.join(DATASETS)}; "
                        f"got {groups!r}, {data!r}")
    runs.check_format(fmt)
    seed_list = runs.parse_seeds(seeds)
    if not small:
        runs.require_raw_data({data: DATASETS[data]}, "`autorecbench reproduce autoias-ablations --small`")
    curves, finals = run_all(settings(chosen_groups), SMALL if small else DATASETS[data], seed_list,
                             list(extra or []))
    for group in chosen_groups:
        header, rows = table(finals, group)
        title = f"AutoIAS Fig. {reference[group]['figure']} ({group})" + (" — synthetic stand-in" if small else "")
        runs.show(title, header, rows, fmt)
        out_console.print(f"paper: {reference[group]['paper']}", highlight=False, soft_wrap=True)
    output.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(curves).write_parquet(output / "curves.parquet")
    pl.DataFrame(finals).write_parquet(output / "final.parquet")
    out_console.print(f"written: {output / 'curves.parquet'}, {output / 'final.parquet'}", highlight=False)


if __name__ == "__main__":
    runs.main(command)
