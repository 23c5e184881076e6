"""Optimisers shared by the methods.

Embedding tables are most of the parameters and a batch touches few of their rows, so how Adam treats
untouched rows matters for speed and is part of the algorithm:
- ``lazy`` (default): tables produce sparse gradients and ``torch.optim.SparseAdam`` updates the moments
  and values of the rows in the batch only (TensorFlow's LazyAdam). Cost per step ~ rows touched.
- ``dense``: plain Adam over every row at every step, as the papers' code does (``torch.optim.Adam``).
  Rows not in the batch still move while their first moment decays. Cost per step ~ table size.
The two are not the same algorithm; results record which one ran.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autorecbench.errors import UserError

EMBEDDING_OPTIMIZERS = ("lazy", "dense")


def check_mode(mode: str) -> str:
    if mode not in EMBEDDING_OPTIMIZERS:
        raise UserError(f"embedding_optimizer must be one of {', '.join(EMBEDDING_OPTIMIZERS)}, got {mode!r}")
    return mode


def embedding_table(n: int, dim: int, mode: str, init_std: float) -> nn.Embedding:
    """An ``n x dim`` table initialised N(0, init_std^2), with sparse gradients in ``lazy`` mode."""
    table = nn.Embedding(n, dim, sparse=check_mode(mode) == "lazy")
    nn.init.normal_(table.weight, 0.0, init_std)
    return table


def fused_adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its fused kernel where every parameter is a float tensor on CPU or CUDA (the
    same update rule in one kernel per step instead of ~10 multi-tensor passes: 3x faster per step on the
    small networks the streaming methods update at every batch; results agree with the loop implementation
    to ~1 ulp, not bit for bit), the multi-tensor implementation otherwise."""
    params = list(params)
    fused = bool(params) and all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
                                 for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None, foreach=None if fused else True)


class SplitAdam:
    """Adam over dense parameters plus lazy (SparseAdam) or dense Adam over embedding tables, stepped together."""

    def __init__(
        self,
        embeddings: Iterable[nn.Parameter],
        dense: Iterable[nn.Parameter],
        lr: float,
        mode: str,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool = False,
    ) -> None:
        # ``fused``: :func:`fused_adam` for the dense parameters (streaming methods step at every small batch);
        # else torch's default Adam.
        def dense_adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            if fused:
                return fused_adam(params, lr, betas, eps)
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)

        embeddings, dense = list(embeddings), list(dense)
        self.mode = check_mode(mode)
        self.optimizers: list[torch.optim.Optimizer] = []
        if self.mode == "lazy":
            if embeddings:
                self.optimizers.append(torch.optim.SparseAdam(embeddings, lr=lr, betas=betas, eps=eps))
            if dense:
                self.optimizers.append(dense_adam(dense))
        else:
            self.optimizers.append(dense_adam(embeddings + dense))
        self._embedding_ids = {id(p) for p in embeddings}

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def embedding_state_bytes(self) -> int:
        """Bytes of optimiser state (Adam moments) held for the embedding tables."""
        return self.state_bytes(self._embedding_ids)

    def state_bytes(self, params: Iterable[nn.Parameter] | set[int]) -> int:
        """Bytes of optimiser state held for ``params`` (parameters, or a set of their ``id``s)."""
        ids = params if isinstance(params, set) else {id(p) for p in params}
        total = 0
        for opt in self.optimizers:
            for param, state in opt.state.items():
                if id(param) in ids:
                    total += sum(tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
        return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's storage really holds (not ``numel * itemsize`` of a view)."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return int(t.untyped_storage().nbytes())
