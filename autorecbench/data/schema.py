"""Plain records describing a prepared dataset and a prediction task."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from autorecbench.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """What is predicted from a rating.

    ``binary``: rating >= 4 is positive (with half stars, rating > 3.5), as in the ESAPN paper §3.4.
    ``multiclass``: five classes, class = ceil(rating) - 1, so 0.5/1 -> 0, 1.5/2 -> 1, ..., 4.5/5 -> 4.
    """

    name: str
    n_classes: int

    @staticmethod
    def from_name(name: str) -> TaskSpec:
        if name == "binary":
            return TaskSpec("binary", 2)
        if name == "multiclass":
            return TaskSpec("multiclass", 5)
        raise UserError(f"unknown task {name!r}: choose task=binary or task=multiclass")

    @property
    def is_binary(self) -> bool:
        return self.name == "binary"

    @property
    def n_outputs(self) -> int:
        """Width of the model's last layer: one logit for binary, one per class otherwise."""
        return 1 if self.is_binary else self.n_classes

    def labels(self, rating: torch.Tensor) -> torch.Tensor:
        if self.is_binary:
            return (rating > 3.5).to(torch.float32)
        return (torch.ceil(rating) - 1).clamp(0, self.n_classes - 1).to(torch.int64)


@dataclass
class FieldSpec:
    """One input field.

    ``kind="categorical"``: one code per row, a column of ``OfflineBatch.x``. ``kind="sequence"``: a user's
    behaviour history, ``length`` codes per row (``OfflineBatch.seq[name]``, ``[B, T]`` int32, post-padded with
    0, the valid prefix given by ``OfflineBatch.seq_len``); its codes index the embedding table of the
    categorical field ``shares_table_with`` (``hist_cate`` reads ``cate_id``'s rows), so ``cardinality`` is that
    field's. The sequence fields of one dataset are aligned: position t of each is the same behaviour.
    """

    name: str
    cardinality: int
    kind: str = "categorical"
    shares_table_with: str | None = None
    length: int | None = None


@dataclass
class Schema:
    """A prepared dataset: its fields, size, provenance and the cache fingerprint."""

    dataset: str
    family: str
    fingerprint: str
    fields: list[FieldSpec]
    n_rows: int
    time_min: int
    time_max: int
    rating_values: list[float]
    source: dict[str, Any]
    options: dict[str, Any]
    rows_in_file: int
    created_at: str
    cache_version: int
    expected: dict[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What the label column holds: "rating" (MovieLens; the task derives binary or 5-class labels from it) or
    # "click" (CTR data: 0/1). CTR caches also hold a fixed train/valid/test split (rows per split here).
    label: str = "rating"
    splits: dict[str, int] | None = None
    # The field identifying a user (gAUC groups by it); None when the data has none.
    user_field: str | None = None
    # Behaviour sequences (``FieldSpec.kind == "sequence"``), beside the categorical ``fields``; stored in the
    # cache as ``<name>_0 .. <name>_{T-1}`` int32 columns plus one ``hist_len`` column shared by all of them.
    sequence_fields: list[FieldSpec] = field(default_factory=list)

    def cardinality(self, name: str) -> int:
        for f in self.fields:
            if f.name == name:
                return f.cardinality
        raise KeyError(name)

    @property
    def n_users(self) -> int:
        return self.cardinality("user")

    @property
    def n_items(self) -> int:
        return self.cardinality("item")

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def counts(self) -> dict[str, int]:
        """The counts a dataset's ``expected`` block is checked against."""
        if self.label == "rating":
            return {"rows": self.n_rows, "users": self.n_users, "items": self.n_items}
        return {"rows": self.n_rows, "fields": len(self.fields), **(self.splits or {})}

    def run_info(self) -> dict[str, Any]:
        """The dataset's provenance and size as recorded in a run's ``run.json``."""
        info: dict[str, Any] = {"fingerprint": self.fingerprint, "source": self.source, "n_rows": self.n_rows}
        if self.label == "rating":
            info.update(n_users=self.n_users, n_items=self.n_items, time_min=self.time_min, time_max=self.time_max)
        else:
            info.update(
                label=self.label,
                n_fields=len(self.fields),
                cardinalities={f.name: f.cardinality for f in self.fields},
                splits=self.splits,
                **{k: self.extra[k] for k in ("split", "positives", "skipped_rows", "negatives_dropped", "preset") if k in self.extra},
            )
            if self.sequence_fields:
                info["sequences"] = {f.name: {"length": f.length, "shares_table_with": f.shares_table_with}
                                     for f in self.sequence_fields}
        return info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def load(path: Path) -> Schema:
        raw = json.loads(path.read_text())
        raw["fields"] = [FieldSpec(**f) for f in raw["fields"]]
        raw["sequence_fields"] = [FieldSpec(**f) for f in raw.get("sequence_fields", [])]
        return Schema(**raw)
