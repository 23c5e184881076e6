"""A prepared dataset as train / validation / test tensors for the offline protocol.

Each split is one ``[rows, fields]`` int32 tensor of field codes (the schema's field order) and a label
tensor (float32 0/1 for binary, int64 class for multiclass). They live on the run's device when they fit
(``data_on_device: auto`` puts them on a GPU when they take at most half of its free memory); otherwise they
stay in pinned CPU memory and each batch is gathered on the CPU and copied over asynchronously. Mini-batches
are slices of a seeded permutation: no DataLoader, no Python objects per row.

Behaviour sequences (``schema.sequence_fields``, Alimama) come along as one ``[rows, T]`` int32 tensor per
sequence field and a ``[rows]`` int32 length tensor, gathered and placed with the rows.

CTR caches carry their split (``split`` column, fixed when preparing since the vocabularies are fitted on
the training rows). MovieLens caches (fields ``user``, ``item``) are split here, by ``data.split``:
``random`` (exact ``split_ratio``, seeded by ``data.split_seed``) or ``time`` (the cache is in timestamp
order: the first 80% train, the next 10% validation, the last 10% test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    """Rows of one split, on the run's device: ``x`` [rows, fields] int32 codes, ``label`` [rows]; with behaviour
    sequences, ``seq`` (sequence field name -> [rows, T] int32 codes, post-padded with 0) and ``seq_len``
    ([rows] int32 valid lengths, shared by the aligned sequence fields). Without sequences ``seq`` is empty and
    ``seq_len`` None."""

    x: torch.Tensor
    label: torch.Tensor
    seq: dict[str, torch.Tensor] = field(default_factory=dict)
    seq_len: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


class SplitData:
    """One split's rows, resident on the device or pinned on the CPU; batches come out on the device."""

    def __init__(self, name: str, x: torch.Tensor, label: torch.Tensor, device: torch.device,
                 seq: dict[str, torch.Tensor] | None = None, seq_len: torch.Tensor | None = None) -> None:
        self.name = name
        self.x = x
        self.label = label
        self.device = device
        self.seq = seq or {}
        self.seq_len = seq_len

    @property
    def resident(self) -> bool:
        return self.x.device == self.device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def rows(self, index: torch.Tensor | slice) -> OfflineBatch:
        if not self.resident and isinstance(index, torch.Tensor):
            index = index.cpu()
        seq_len = self.seq_len[index] if self.seq_len is not None else None
        batch = OfflineBatch(self.x[index], self.label[index], {k: v[index] for k, v in self.seq.items()}, seq_len)
        if self.resident:
            return batch

        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "cpu" and self.device.type == "cuda":
                t = t.pin_memory()
            return t.to(self.device, non_blocking=True)

        return OfflineBatch(move(batch.x), move(batch.label), {k: move(v) for k, v in batch.seq.items()},
                            move(seq_len) if seq_len is not None else None)

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


@dataclass
class Sequences:
    """One split's behaviour sequences as loaded: name -> ``[rows, T]`` int32 codes, and the lengths."""

    items: dict[str, np.ndarray]
    lengths: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.items.values()) + self.lengths.nbytes


def _place(x: np.ndarray, label: np.ndarray, task: TaskSpec, device: torch.device, resident: bool, name: str,
           sequences: Sequences | None = None) -> SplitData:
    tensors = [torch.from_numpy(x), torch.from_numpy(label).to(torch.float32 if task.is_binary else torch.int64)]
    if sequences is not None:
        tensors += [torch.from_numpy(a) for a in sequences.items.values()] + [torch.from_numpy(sequences.lengths)]
    if resident:
        tensors = [t.to(device) for t in tensors]
    elif device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    if sequences is None:
        return SplitData(name, tensors[0], tensors[1], device)
    seq = dict(zip(sequences.items, tensors[2:-1]))
    return SplitData(name, tensors[0], tensors[1], device, seq, tensors[-1])


def _resident(placement: str, device: torch.device, n_bytes: int) -> bool:
    if placement not in PLACEMENTS:
        raise UserError(f"runner.data_on_device must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement != "auto" or device.type != "cuda":
        return placement != "pinned" or device.type != "cuda"
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes <= free // 2


def _load_ctr(prepared: PreparedData, task: TaskSpec, max_rows: int | None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Sequences] | None]:
    schema = prepared.schema
    if not task.is_binary:
        raise UserError(f"dataset {schema.dataset!r} has 0/1 click labels: use task=binary")
    names = schema.field_names
    caps = _caps(schema.splits or {}, max_rows)
    xs = {s: np.empty((caps[s], len(names)), dtype=np.int32) for s in SPLITS}
    labels = {s: np.empty(caps[s], dtype=np.int8) for s in SPLITS}
    length_column = str(schema.extra.get("length_column", "hist_len"))
    columns = {f.name: [f"{f.name}_{t}" for t in range(int(f.length or 0))] for f in schema.sequence_fields}
    sequences = {s: Sequences({name: np.empty((caps[s], len(c)), dtype=np.int32) for name, c in columns.items()},
                              np.empty(caps[s], dtype=np.int32)) for s in SPLITS} if columns else None
    seq_columns = [c for cs in columns.values() for c in cs] + ([length_column] if columns else [])
    filled = dict.fromkeys(SPLITS, 0)
    for block in block_paths(prepared.directory):
        if all(filled[s] == caps[s] for s in SPLITS):
            break
        frame = pl.read_parquet(block, columns=[*names, *seq_columns, "label", "split"])
        for code, s in enumerate(SPLITS):
            room = caps[s] - filled[s]
            if room == 0:
                continue
            part = frame.filter(pl.col("split") == code).head(room)
            rows = slice(filled[s], filled[s] + part.height)
            xs[s][rows] = part.select(names).to_numpy()
            labels[s][rows] = part["label"].to_numpy()
            if sequences is not None:
                for name, cs in columns.items():
                    sequences[s].items[name][rows] = part.select(cs).to_numpy()
                sequences[s].lengths[rows] = part[length_column].to_numpy()
            filled[s] += part.height
    return xs, labels, sequences


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


def _shard(xs: dict[str, np.ndarray], labels: dict[str, np.ndarray], sequences: dict[str, Sequences] | None,
           rank: int, world: int) -> dict[str, int]:
    """Keep process ``rank``'s share of ``world``: training rows rank, rank + world, ... (the same count on
    every process; the last ``n % world`` rows are left out) and the test split on rank 0 only (it alone tests);
    behaviour sequences alike."""
    n = len(xs["train"])
    per_process = n // world
    parts = {"train": slice(rank, rank + per_process * world, world), **({"test": slice(0, 0)} if rank else {})}
    for split, rows in parts.items():
        xs[split], labels[split] = xs[split][rows], labels[split][rows]
        if sequences:
            kept = sequences[split]
            sequences[split] = Sequences({k: a[rows] for k, a in kept.items.items()}, kept.lengths[rows])
    return {"processes": world, "train_rows_per_process": per_process, "train_rows_left_out": n - per_process * world}


def load_offline(prepared: PreparedData, task: TaskSpec, device: torch.device, data_cfg: DatasetConfig, *,
                 max_rows: int | None = None, placement: str = "auto", process: tuple[int, int] = (0, 1)
                 ) -> OfflineData:
    """The prepared dataset's three splits as tensors (see the module docstring). ``process``: (rank, world
    size) of a data-parallel run, which holds only its shard of the training rows (:func:`_shard`)."""
    schema = prepared.schema
    sequences: dict[str, Sequences] | None = None
    if schema.label == "click":
        xs, labels, sequences = _load_ctr(prepared, task, max_rows)
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
    sharding = _shard(xs, labels, sequences, rank, world) if world > 1 else None
    n_bytes = sum(x.nbytes + labels[s].nbytes * (4 if task.is_binary else 8) for s, x in xs.items())
    n_bytes += sum(q.nbytes for q in sequences.values()) if sequences else 0
    resident = _resident(placement, device, n_bytes)
    splits = {s: _place(xs[s], labels[s], task, device, resident, s, sequences[s] if sequences else None)
              for s in SPLITS}
    names = schema.field_names
    user_index = names.index(schema.user_field) if schema.user_field in names else None
    rows = {s: len(splits[s]) for s in SPLITS}
    if sharding:  # the training rows of the run, not of this process (rank 0, which writes, holds the test rows)
        rows["train"] = sharding["train_rows_per_process"] * world
    info = {**rule, "rows": rows, "max_rows": max_rows, "on_device": resident, "fields": len(names),
            **({"data_parallel": sharding} if sharding else {})}
    if schema.sequence_fields:
        info["sequences"] = {f.name: {"length": f.length, "shares_table_with": f.shares_table_with}
                             for f in schema.sequence_fields}
    return OfflineData(splits["train"], splits["valid"], splits["test"], list(schema.fields), task, user_index, info)
