"""A prepared dataset as train / validation / test tensors for the offline protocol.

Each split is one ``[rows, fields]`` int32 tensor of field codes (the schema's field order) and a label
tensor (float32 0/1 for binary, int64 class for multiclass). They live on the run's device when they fit
(``data_on_device: auto`` puts them on a GPU when they take at most half of its free memory); otherwise they
stay in pinned CPU memory and each batch is gathered on the CPU and copied over asynchronously. Mini-batches
are slices of a seeded permutation: no DataLoader, no Python objects per row.

CTR caches carry their split (``split`` column, fixed when preparing since the vocabularies are fitted on
the training rows). MovieLens caches (fields ``user``, ``item``) are split here, by ``data.split``:
``random`` (exact ``split_ratio``, seeded by ``data.split_seed``) or ``time`` (the cache is in timestamp
order: the first 80% train, the next 10% validation, the last 10% test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from autorecbench.data.cache import DatasetConfig, PreparedData
from autorecbench.data.ctr import block_paths
from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.data.splits import SPLITS, ordered_split, random_split, split_counts
from autorecbench.errors import UserError

PLACEMENTS = ("auto", "device", "pinned")


@dataclass
class OfflineBatch:
    """Rows of one split: ``x`` [rows, fields] int32 codes and ``label`` [rows], both on the run's device."""

    x: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class SplitData:
    """One split's rows, resident on the device or pinned on the CPU; batches come out on the device."""

    def __init__(self, name: str, x: torch.Tensor, label: torch.Tensor, device: torch.device) -> None:
        self.name = name
        self.x = x
        self.label = label
        self.device = device

    @property
    def resident(self) -> bool:
        return self.x.device == self.device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, index: torch.Tensor | slice) -> OfflineBatch:
        if self.resident:
            return OfflineBatch(self.x[index], self.label[index])
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        x, label = self.x[index], self.label[index]
        if x.device.type == "cpu" and self.device.type == "cuda":
            x, label = x.pin_memory(), label.pin_memory()
        return OfflineBatch(x.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True))

    def bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """Consecutive [start, end) ranges; a last batch of one row joins the one before (batch-norm needs 2)."""
        n = len(self)
        out = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        if len(out) > 1 and out[-1][1] - out[-1][0] < 2:
            last = out.pop()
            out[-1] = (out[-1][0], last[1])
        return out

    def batches(self, batch_size: int, generator: torch.Generator | None = None, skip: int = 0) -> Iterator[OfflineBatch]:
        """All rows once, in order or (``generator``) in a fresh seeded random order, ``batch_size`` at a time;
        ``skip``: leave out the first batches (a resumed epoch: the order is drawn all the same)."""
        if generator is None:
            for start, end in self.bounds(batch_size)[skip:]:
                yield self.rows(slice(start, end))
            return
        order = torch.randperm(len(self), generator=generator)
        if self.resident:
            order = order.to(self.device)
        for start, end in self.bounds(batch_size)[skip:]:
            yield self.rows(order[start:end])


@dataclass
class OfflineData:
    train: SplitData
    valid: SplitData
    test: SplitData
    fields: list[FieldSpec]
    task: TaskSpec
    user_index: int | None  # column of the user field in ``x`` (gAUC), if any
    split_info: dict[str, Any]

    def __len__(self) -> int:
        """The run's rows (under torchrun: all processes' training shards, not this process's)."""
        return sum(self.split_info["rows"].values())

    def split(self, name: str) -> SplitData:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def _caps(sizes: dict[str, int], max_rows: int | None) -> dict[str, int]:
    """Rows kept per split: all, or ``max_rows`` in total shared in proportion to the split sizes."""
    if max_rows is None:
        return dict(sizes)
    total = sum(sizes.values())
    return {k: min(v, math.ceil(max_rows * v / total)) for k, v in sizes.items()}


def _place(x: np.ndarray, label: np.ndarray, task: TaskSpec, device: torch.device, resident: bool, name: str
           ) -> SplitData:
    tx = torch.from_numpy(x)
    tl = torch.from_numpy(label).to(torch.float32 if task.is_binary else torch.int64)
    if resident:
        tx, tl = tx.to(device), tl.to(device)
    elif device.type == "cuda":
        tx, tl = tx.pin_memory(), tl.pin_memory()
    return SplitData(name, tx, tl, device)


def _resident(placement: str, device: torch.device, n_bytes: int) -> bool:
    if placement not in PLACEMENTS:
        raise UserError(f"runner.data_on_device must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "auto" or device.type != "cuda":
        return placement != "pinned" or device.type != "cuda"
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes <= free // 2


def _load_ctr(prepared: PreparedData, task: TaskSpec, max_rows: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    schema = prepared.schema
    if not task.is_binary:
        raise UserError(f"dataset {schema.dataset!r} has 0/1 click labels: use task=binary")
    names = schema.field_names
    caps = _caps(schema.splits or {}, max_rows)
    xs = {s: np.empty((caps[s], len(names)), dtype=np.int32) for s in SPLITS}
    labels = {s: np.empty(caps[s], dtype=np.int8) for s in SPLITS}
    filled = dict.fromkeys(SPLITS, 0)
    for block in block_paths(prepared.directory):
        if all(filled[s] == caps[s] for s in SPLITS):
            break
        frame = pl.read_parquet(block, columns=[*names, "label", "split"])
        for code, s in enumerate(SPLITS):
            room = caps[s] - filled[s]
            if room == 0:
                continue
            part = frame.filter(pl.col("split") == code).head(room)
            n = part.height
            xs[s][filled[s]:filled[s] + n] = part.select(names).to_numpy()
            labels[s][filled[s]:filled[s] + n] = part["label"].to_numpy()
            filled[s] += n
    return xs, labels


def _load_ratings(prepared: PreparedData, task: TaskSpec, data_cfg: DatasetConfig, max_rows: int | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    frame = pl.read_parquet(prepared.interactions_path, columns=["user", "item", "rating"])
    n = frame.height
    if data_cfg.split == "last_day":
        raise UserError("data.split=last_day needs day files (Criteo 1TB); use random or time for ratings")
    if data_cfg.split == "random":
        split = random_split(n, data_cfg.split_ratio, data_cfg.split_seed)
        rule = {"rule": "random", "seed": data_cfg.split_seed, "ratio": list(data_cfg.split_ratio)}
    else:
        split = ordered_split(n, data_cfg.split_ratio)
        rule = {"rule": "time", "by": "timestamp order", "ratio": list(data_cfg.split_ratio)}
    x = frame.select("user", "item").to_numpy().astype(np.int32)
    labels = task.labels(torch.from_numpy(frame["rating"].to_numpy(writable=True))).numpy()
    sizes = dict(zip(SPLITS, split_counts(n, data_cfg.split_ratio)))
    caps = _caps(sizes, max_rows)
    xs, ys = {}, {}
    for code, s in enumerate(SPLITS):
        rows = np.flatnonzero(split == code)[: caps[s]]
        xs[s], ys[s] = x[rows], labels[rows]
    return xs, ys, rule


def _shard(xs: dict[str, np.ndarray], labels: dict[str, np.ndarray], rank: int, world: int) -> dict[str, int]:
    """Keep process ``rank``'s share of ``world``: training rows rank, rank + world, ... (the same count on
    every process; the last ``n % world`` rows are left out) and the test split on rank 0 only (it alone tests)."""
    n = len(xs["train"])
    per_process = n // world
    rows = slice(rank, rank + per_process * world, world)
    xs["train"], labels["train"] = xs["train"][rows], labels["train"][rows]
    if rank:
        xs["test"], labels["test"] = xs["test"][:0], labels["test"][:0]
    return {"processes": world, "train_rows_per_process": per_process, "train_rows_left_out": n - per_process * world}


def load_offline(prepared: PreparedData, task: TaskSpec, device: torch.device, data_cfg: DatasetConfig, *,
                 max_rows: int | None = None, placement: str = "auto", process: tuple[int, int] = (0, 1)
                 ) -> OfflineData:
    """The prepared dataset's three splits as tensors (see the module docstring). ``process``: (rank, world
    size) of a data-parallel run, which holds only its shard of the training rows (:func:`_shard`)."""
    schema = prepared.schema
    if schema.label == "click":
        xs, labels = _load_ctr(prepared, task, max_rows)
        rule = dict(schema.extra.get("split", {}))
    else:
        xs, labels, rule = _load_ratings(prepared, task, data_cfg, max_rows)
    for s in ("train", "valid"):
        if len(xs[s]) < 2:
            raise UserError(f"dataset {schema.dataset!r}: the {s} split has {len(xs[s])} rows; the offline "
                            "protocol needs at least 2 (check data.split / runner.max_rows)")
    if len(xs["test"]) == 0:
        raise UserError(f"dataset {schema.dataset!r}: the test split is empty (check data.split / runner.max_rows)")
    rank, world = process
    sharding = _shard(xs, labels, rank, world) if world > 1 else None
    n_bytes = sum(x.nbytes + labels[s].nbytes * (4 if task.is_binary else 8) for s, x in xs.items())
    resident = _resident(placement, device, n_bytes)
    splits = {s: _place(xs[s], labels[s], task, device, resident, s) for s in SPLITS}
    names = schema.field_names
    user_index = names.index(schema.user_field) if schema.user_field in names else None
    rows = {s: len(splits[s]) for s in SPLITS}
    if sharding:  # the training rows of the run, not of this process (rank 0, which writes, holds the test rows)
        rows["train"] = sharding["train_rows_per_process"] * world
    info = {**rule, "rows": rows, "max_rows": max_rows, "on_device": resident, "fields": len(names),
            **({"data_parallel": sharding} if sharding else {})}
    return OfflineData(splits["train"], splits["valid"], splits["test"], list(schema.fields), task, user_index, info)
