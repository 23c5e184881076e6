"""Data-parallel offline training under ``torchrun``: the process group and what the offline loop asks of it.

``torchrun --nproc_per_node=N autorecbench run ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`start` joins the process group
— gloo when the runs are on the CPU, NCCL on GPUs, each process on ``cuda:LOCAL_RANK`` — and :func:`current`
is the :class:`Distributed` context the offline loop (``runners/offline.py``) consults:

- The training split is sharded: process r holds rows r, r + N, r + 2N, ... of it (the same number on every
  process: up to N - 1 rows are left out, and counted) and steps through its shard in batches of
  ``runner.batch_size / N`` rows, so one step of the N processes sees ``runner.batch_size`` rows, as one step
  of a single process does.
- The model a method trains goes through ``DistributedDataParallel`` (:meth:`Distributed.parallel`): backward
  averages the gradients across processes, so every process takes the same optimiser step. Weights stepped
  outside that backward (bi-level steps on a validation batch) average their gradients with
  :meth:`Distributed.average`; each process takes its share (every N-th row) of the same validation batch.
- Batch-norm normalises with each process's own rows (``batch_size / N``; no synchronised batch-norm, which
  torch has for GPUs only); DDP hands rank 0's running statistics to every process at each training forward.
- Rank 0 alone evaluates (validation and test) and hands the metrics to the others
  (:meth:`Distributed.from_main`), so early stopping decides the same everywhere; rank 0 alone writes the run
  folder, whose ``run.json`` records ``world_size``.
- Random numbers: building models draws the same numbers on every process (the run's seed), while training
  steps draw from a stream of their own per process (:meth:`Distributed.seed_streams`), so dropout masks and
  Gumbel noise differ between the processes' rows as they would between the rows of one batch.

In one process (no ``torchrun``, or ``--nproc_per_node=1``) every operation is the identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from autorecbench.errors import RunFailed, UserError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Per-process step streams: seed + STREAM_STRIDE * (rank + 1), far from the seeds users sweep.
STREAM_STRIDE = 1_000_003


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when it is not set)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


@dataclass
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo | nccl; None in a single process
    _streams: dict[str, Any] = field(default_factory=dict, repr=False)  # "shared" / "own" RNG states

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def info(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}

    def device(self, device: torch.device) -> torch.device:
        """Each process trains on the GPU of its ``LOCAL_RANK`` (``device=cuda`` under torchrun)."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ---------------------------------------------------------------- data

    def batch_size(self, global_batch: int) -> int:
        """Rows per step on this process (a step of all processes sees ``global_batch`` rows)."""
        return global_batch // self.world_size

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows (every ``world_size``-th) of a batch every process holds whole."""
        return tensor[self.rank::self.world_size] if self.active else tensor

    # ---------------------------------------------------------------- training

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel (rank 0's weights and buffers copied to every
        process now, gradients averaged in backward); ``module`` itself in one process."""
        if not self.active:
            return module
        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def average(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Average floating-point ``tensors`` across processes, in place (e.g. gradients of weights stepped
        outside a :meth:`parallel` module, or batch-norm statistics); nothing in one process."""
        if not self.active:
            return
        import torch.distributed as dist

        for tensor in tensors:
            if tensor is not None and tensor.is_floating_point():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(self.world_size)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over processes (a copy; ``tensor`` itself in one process)."""
        if not self.active:
            return tensor
        out = tensor.clone()
        self.average([out])
        return out

    def in_step(self, module: nn.Module) -> bool:
        """Whether every process holds the same weights of ``module`` (bit for bit; True in one process): the
        check that data-parallel training kept the processes in step."""
        if not self.active:
            return True
        import torch.distributed as dist

        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
            rank0 = mine.clone()
            dist.broadcast(rank0, src=0)
            same = torch.tensor([float(torch.equal(mine, rank0))], device=mine.device)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
        return bool(same.item())

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0 only, its result handed to every process. An error on rank 0 is raised on
        every process (as :class:`RunFailed` on the others), so none waits for a result that never comes."""
        if not self.active:
            return compute()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.is_main:
            try:
                result = compute()
            except Exception as exc:
                payload[0] = ("error", f"on rank 0: {exc}")
                dist.broadcast_object_list(payload, src=0)
                raise
            payload[0] = ("ok", result)
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            raise RunFailed(value)
        return value

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the others after it (e.g. preparing a dataset cache once)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # ---------------------------------------------------------------- random numbers

    def seed_streams(self, seed: int, device: torch.device) -> None:
        """Give training steps a random stream of this process's own (seed + 1,000,003 · (rank + 1)); the
        stream everything else draws from stays the same on every process."""
        if not self.active:
            return
        shared = _rng_state(device)
        torch.manual_seed(seed + STREAM_STRIDE * (self.rank + 1))
        self._streams = {"own": _rng_state(device), "device": device}
        _set_rng_state(shared, device)

    def own_stream(self, step: Callable[..., T]) -> Callable[..., T]:
        """``step`` drawing its random numbers from this process's own stream (``step`` itself in one
        process, or before :meth:`seed_streams`)."""
        if not self.active or "own" not in self._streams:
            return step
        device = self._streams["device"]

        def in_own_stream(*args: Any, **kwargs: Any) -> T:
            shared = _rng_state(device)
            _set_rng_state(self._streams["own"], device)
            try:
                return step(*args, **kwargs)
            finally:
                self._streams["own"] = _rng_state(device)
                _set_rng_state(shared, device)

        return in_own_stream


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


_CURRENT = Distributed()


def current() -> Distributed:
    """This process's context: the one :func:`start` made, or rank 0 of 1."""
    return _CURRENT


def start(device_type: str) -> Distributed:
    """Join the process group torchrun's variables describe (gloo for ``cpu``, NCCL for ``cuda``); rank 0 of 1
    without them. Idempotent."""
    global _CURRENT
    world = world_size_from_env()
    if world == 1 or _CURRENT.active:
        return _CURRENT
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start data-parallel runs with "
                        "torchrun --nproc_per_node=N autorecbench run ...")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = backend_for(device_type)
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise UserError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                            "give torchrun --nproc_per_node at most that many")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    _CURRENT = Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    return _CURRENT


def stop() -> None:
    """Leave the process group (at the end of a command)."""
    global _CURRENT
    if _CURRENT.active:
        import torch.distributed as dist

        dist.destroy_process_group()
    _CURRENT = Distributed()
