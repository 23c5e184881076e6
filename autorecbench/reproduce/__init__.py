"""Paper reproductions: one module per published table (its grid, its printout, its ``command``), the paper's
numbers in a YAML of the same name beside it, and the registry below that `autorecbench reproduce NAME` and
`make reproduce-NAME` read. Adding a reproduction: one module, one YAML, one ``Reproduction`` line here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Reproduction:
    """A registered reproduction (see :meth:`load` for what its module defines)."""

    name: str  # `autorecbench reproduce NAME`, `make reproduce-NAME`
    module: str
    summary: str

    def load(self) -> ModuleType:
        """The module: ``command`` (a Typer command function; its docstring is the help), optional ``EPILOG``
        (examples) and ``CONTEXT_SETTINGS`` (e.g. extra Hydra overrides as arguments)."""
        return importlib.import_module(self.module)


REPRODUCTIONS: tuple[Reproduction, ...] = (
    Reproduction(
        "table1", "autorecbench.reproduce.esapn_table1",
        "ESAPN paper (SIGIR 2020) Table 1 (+ Table 2, memory): FIXED, DARTS, AutoEmb, ESAPN × ml-20m, ml-latest × "
        "binary, multiclass, beside the paper's numbers."),
    Reproduction(
        "autoloss-table2", "autorecbench.reproduce.autoloss_table2",
        "AutoLoss paper (KDD 2021) Table 2 (+ Table 3's AL-1, AL-2): Criteo, ML-20m × DeepFM, IPNN × the losses, "
        "beside the paper's numbers. Stops with download instructions if a raw file is missing; `--small` runs "
        "synthetic stand-ins in seconds."),
    Reproduction(
        "autoias", "autorecbench.reproduce.autoias_table1",
        "AutoIAS paper (CIKM 2021) Table 1: FM, DeepFM, AutoFIS, AutoIAS, capacity-matched FIXED on Avazu and "
        "Criteo-8d (AutoFIS/PIN protocol) beside the paper's rows; `--small` runs synthetic stand-ins."),
    Reproduction(
        "autoias-ablations", "autorecbench.reproduce.autoias_ablations",
        "AutoIAS paper Figs. 3-6: KD and β, students, generator vs random search, reward samples m; tables and "
        "Parquet curves; `--small` runs a synthetic stand-in."),
    Reproduction(
        "ameir", "autorecbench.reproduce.ameir",
        "AMEIR paper (IJCAI 2021) Tables 1, 3, 4, 5: the suite's baselines, AMEIR-A/B/C/I, random architectures "
        "and the interaction ablation on Alimama, Criteo and Avazu beside the paper's numbers; `--small` runs "
        "synthetic stand-ins."),
)


def reproduction(name: str) -> Reproduction:
    from autorecbench.errors import UserError

    for item in REPRODUCTIONS:
        if item.name == name:
            return item
    raise UserError(f"unknown reproduction {name!r}; known: {', '.join(r.name for r in REPRODUCTIONS)}")
