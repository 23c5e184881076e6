"""A prepared dataset as device-resident tensors in stream order, cut into mini-batches by slicing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl
import torch

from autorecbench.data.cache import PreparedData
from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError


@dataclass
class BatchGroups:
    """A batch's rows grouped by id, with static shapes only (``[rows]`` tensors, no host synchronisation):
    one stable sort, a cumulative sum and segment sums, so a step built on it can be compiled with
    ``fullgraph=True`` or captured in a CUDA graph.

    ``group``: each row's group (distinct ids numbered 0, 1, ... in increasing id order; fewer groups than rows
    leave the top numbers unused); ``rank``: the row's 0-based rank among its id's rows (row order); ``count``:
    how many rows its id has; ``last_row``: the index of its id's last row.
    """

    group: torch.Tensor
    rank: torch.Tensor
    count: torch.Tensor
    last_row: torch.Tensor

    @property
    def leader(self) -> torch.Tensor:
        """Each id's first row."""
        return self.rank == 0

    @property
    def last(self) -> torch.Tensor:
        """Each id's last row."""
        return self.rank == self.count - 1

    def per_group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Each row's group total of ``values`` (``[rows, ...]``; rows summed in row order)."""
        sums = values.new_zeros(values.shape).index_add_(0, self.group, values)
        return sums.index_select(0, self.group)


def batch_groups(ids: torch.Tensor) -> BatchGroups:
    """:class:`BatchGroups` of ``ids`` (int64 ``[rows]``)."""
    n = ids.numel()
    row = torch.arange(n, device=ids.device)
    order = torch.sort(ids, stable=True).indices
    ordered = ids.index_select(0, order)
    new = torch.ones(n, dtype=torch.bool, device=ids.device)
    new[1:] = ordered[1:] != ordered[:-1]
    group_sorted = torch.cumsum(new, 0) - 1
    start_sorted = torch.cummax(torch.where(new, row, 0), 0).values  # position of each run's first row
    sizes = torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, group_sorted, torch.ones_like(row))
    group = torch.empty_like(row).index_copy_(0, order, group_sorted)
    rank = torch.empty_like(row).index_copy_(0, order, row - start_sorted)
    count = sizes.index_select(0, group)
    last = rank == count - 1
    last_of_group = torch.zeros_like(row).index_add_(0, group, torch.where(last, row, 0))  # one term per group
    return BatchGroups(group, rank, count, last_of_group.index_select(0, group))


def within_batch_rank(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: its 0-based rank among the rows with the same id (in row order), and how many rows that id
    has. One stable sort, no loops, static shapes (:func:`batch_groups`)."""
    groups = batch_groups(ids)
    return groups.rank, groups.count


def occurrence_index(ids: torch.Tensor) -> torch.Tensor:
    """1-based occurrence number of each row's id along the stream: the id's frequency at that row (the i-th
    row with a given id gets i, its first appearance 1)."""
    return within_batch_rank(ids)[0] + 1


@dataclass
class StreamBatch:
    """Rows of the stream: ``start:end`` for a slice, -1 for sampled rows (whose stream positions are
    ``row_index``). ``*_freq`` is each entity's occurrence number at that row (>= 1)."""

    index: int
    start: int
    end: int
    user: torch.Tensor
    item: torch.Tensor
    rating: torch.Tensor
    label: torch.Tensor
    user_freq: torch.Tensor
    item_freq: torch.Tensor
    row_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.user.numel())

    def positions(self) -> torch.Tensor:
        """Each row's position in the stream (int64, on the batch's device)."""
        if self.row_index is not None:
            return self.row_index
        return torch.arange(self.start, self.end, device=self.user.device)


@dataclass
class Stream:
    """All rows in stream order on one device, plus their labels for one task."""

    user: torch.Tensor
    item: torch.Tensor
    rating: torch.Tensor
    timestamp: torch.Tensor
    label: torch.Tensor
    user_freq: torch.Tensor
    item_freq: torch.Tensor
    n_users: int
    n_items: int
    task: TaskSpec
    order: str

    def __len__(self) -> int:
        return int(self.user.numel())

    def rows(self, index: torch.Tensor | slice, batch_index: int = -1) -> StreamBatch:
        """Any rows (a slice, or an index tensor for sampled history) as a batch."""
        # start/end locate a contiguous slice in the stream; sampled rows have none (-1).
        start, end = (index.start or 0, index.stop) if isinstance(index, slice) else (-1, -1)
        return StreamBatch(
            index=batch_index,
            start=start,
            end=end,
            user=self.user[index],
            item=self.item[index],
            rating=self.rating[index],
            label=self.label[index],
            user_freq=self.user_freq[index],
            item_freq=self.item_freq[index],
            row_index=None if isinstance(index, slice) else index,
        )

    def batch_bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """Consecutive [start, end) ranges of ``batch_size`` rows. A final remainder of one row joins the
        batch before it, since batch-norm needs at least two rows in a batch."""
        if batch_size < 2:
            raise UserError("runner.batch_size must be >= 2 (batch-norm needs two rows)")
        n = len(self)
        bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
            last = bounds.pop()
            bounds[-1] = (bounds[-1][0], last[1])
        return bounds


def load_stream(
    prepared: PreparedData,
    task: TaskSpec,
    device: torch.device,
    *,
    order: str = "time",
    order_seed: int = 0,
    max_rows: int | None = None,
) -> Stream:
    """Read the cache into tensors on ``device``.

    ``order=time`` keeps the cache's timestamp order (stable on ties); ``order=random`` applies a permutation
    drawn on the CPU from ``order_seed`` (so the same seed gives the same stream on every device).
    ``max_rows`` keeps only the first rows of the ordered stream.
    """
    frame = pl.read_parquet(prepared.interactions_path)
    cols = {name: torch.from_numpy(frame[name].to_numpy(writable=True)) for name in ("user", "item", "rating", "timestamp")}
    if order == "random":
        perm = torch.randperm(frame.height, generator=torch.Generator().manual_seed(int(order_seed)))
        cols = {k: v[perm] for k, v in cols.items()}
    elif order != "time":
        raise UserError(f"unknown runner.order {order!r}: choose time or random")
    if max_rows is not None:
        if max_rows < 2:
            raise UserError("runner.max_rows must be >= 2")
        cols = {k: v[:max_rows] for k, v in cols.items()}
    user = cols["user"].to(device=device, dtype=torch.int64)
    item = cols["item"].to(device=device, dtype=torch.int64)
    rating = cols["rating"].to(device=device, dtype=torch.float32)
    schema = prepared.schema
    return Stream(
        user=user,
        item=item,
        rating=rating,
        timestamp=cols["timestamp"].to(device),
        label=task.labels(rating),
        user_freq=occurrence_index(user),
        item_freq=occurrence_index(item),
        n_users=schema.n_users,
        n_items=schema.n_items,
        task=task,
        order=order,
    )


class StreamHistory:
    """What a method may look at besides the current batch: the rows already seen, and running counters.

    ``user_count`` / ``item_count`` hold how many interactions of each entity have been seen (and trained
    on) before the current batch; methods can read them as state. ``sample`` draws a validation batch from
    the history uniformly with replacement; ``last_batch`` is the batch just before the current one.
    ``eval_start``: the first row of the evaluation window when the runner has one (None otherwise), for methods
    that, like the official ESAPN code, treat the evaluation rows apart (its frequencies restart there).
    """

    def __init__(self, stream: Stream, eval_start: int | None = None) -> None:
        self.stream = stream
        self.eval_start = eval_start
        device = stream.user.device
        self.user_count = torch.zeros(stream.n_users, dtype=torch.int64, device=device)
        self.item_count = torch.zeros(stream.n_items, dtype=torch.int64, device=device)
        self.n_seen = 0
        self._last: tuple[int, int] | None = None

    def advance(self, batch: StreamBatch) -> None:
        """Called by the runner after the method has learned from ``batch``."""
        ones = torch.ones_like(batch.user)
        self.user_count.index_add_(0, batch.user, ones)
        self.item_count.index_add_(0, batch.item, ones)
        self.n_seen = batch.end
        self._last = (batch.start, batch.end)

    def state(self) -> dict[str, Any]:
        """The counters and position (for a checkpoint; the stream itself is reloaded)."""
        return {"user_count": self.user_count, "item_count": self.item_count, "n_seen": self.n_seen,
                "last": self._last}

    def load(self, state: dict[str, Any]) -> None:
        self.user_count.copy_(state["user_count"])
        self.item_count.copy_(state["item_count"])
        self.n_seen = int(state["n_seen"])
        self._last = None if state["last"] is None else (int(state["last"][0]), int(state["last"][1]))

    def last_batch(self) -> StreamBatch | None:
        if self._last is None:
            return None
        start, end = self._last
        return self.stream.rows(slice(start, end))

    def sample(self, n: int, generator: torch.Generator) -> StreamBatch | None:
        if self.n_seen == 0:
            return None
        idx = torch.randint(self.n_seen, (n,), generator=generator, device=generator.device)
        return self.stream.rows(idx.to(self.stream.user.device))
