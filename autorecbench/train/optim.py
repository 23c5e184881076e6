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

import itertools
import math
from collections.abc import Iterable
from typing import Any

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


class FlatAdam:
    """Adam over the small dense networks the streaming methods step at every batch, with parameters,
    gradients and both moments each in one flat tensor: a step is one call of torch's fused Adam kernel
    (``torch._fused_adam_``, the kernel of ``torch.optim.Adam(fused=True)``) on four tensors, where
    ``torch.optim.Adam`` walks its parameter list in Python and runs the kernel once per parameter (ESAPN's
    rating model and maps are 28 tensors: ~0.2 ms of overhead per step on this CPU, twice per batch).

    The parameters are re-homed as views of the flat buffer (``p.data``), and their ``.grad`` are views of a
    flat gradient buffer that backward accumulates into and :meth:`zero_grad` zeroes. This is PyTorch's
    ``zero_grad(set_to_none=False)`` convention — the default of the PyTorch 1.x the papers' code ran on: a
    parameter that gets no gradient in a step (e.g. an ESAPN map no entity of the batch passes through) is
    stepped with a zero gradient (its moments decay and it keeps moving with its momentum), where
    ``set_to_none=True`` would skip it. Updates equal ``torch.optim.Adam``'s with zeroed gradients up to float
    rounding (tested). Where the fused kernel is missing (older torch builds) the same update runs as six
    elementwise operations on the flat tensors.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list({id(p): p for p in params}.values())
        if not self.supports(self.params):
            raise ValueError("FlatAdam needs float parameters, all of one dtype on one CPU or CUDA device")
        first = self.params[0]
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        n = sum(p.numel() for p in self.params)
        self.flat = torch.empty(n, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        # The step count lives on the device (the fused kernel's input): a step reads nothing back to the host,
        # so it can be compiled with fullgraph=True or replayed from a CUDA graph.
        self._step = torch.zeros((), dtype=torch.float32, device=first.device)
        self._fused = hasattr(torch, "_fused_adam_")
        ends = itertools.accumulate(p.numel() for p in self.params)
        self._slices = [slice(end - p.numel(), end) for p, end in zip(self.params, ends)]
        self._grad_views: list[torch.Tensor] = []
        with torch.no_grad():
            for p, part in zip(self.params, self._slices):
                self.flat[part].copy_(p.reshape(-1))
                p.data = self.flat[part].view_as(p)
                p.grad = self.grad[part].view_as(p)
                self._grad_views.append(p.grad)

    @staticmethod
    def supports(params: list[nn.Parameter]) -> bool:
        """Whether ``params`` can share flat buffers: float, one dtype, one CPU or CUDA device."""
        return bool(params) and all(
            p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
            and p.device == params[0].device and p.dtype == params[0].dtype for p in params)

    def _bind_grads(self) -> None:
        """Re-attach gradient views that someone replaced or set to None (their values are kept)."""
        for p, view in zip(self.params, self._grad_views):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the flat gradient buffer (``set_to_none`` is accepted and ignored: gradients stay views)."""
        self._bind_grads()
        self.grad.zero_()

    @property
    def step_count(self) -> int:
        """Steps taken (read back from the device)."""
        return int(self._step)

    @torch.no_grad()
    def step(self, enabled: torch.Tensor | None = None) -> None:
        """One Adam step; ``enabled`` (a bool device scalar): take it only where true, else leave parameters,
        moments and step count as they were — a data-dependent skip without reading the flag back to the host."""
        if enabled is not None:
            kept = [t.clone() for t in (self.flat, self.exp_avg, self.exp_avg_sq, self._step)]
            self.step()
            for now, before in zip((self.flat, self.exp_avg, self.exp_avg_sq, self._step), kept):
                now.copy_(torch.where(enabled, now, before))
            return
        self._bind_grads()
        self._step.add_(1)
        b1, b2 = self.betas
        if self._fused:
            try:
                torch._fused_adam_([self.flat], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self._step],
                                   amsgrad=False, lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps,
                                   maximize=False)
                return
            except (RuntimeError, NotImplementedError):  # no fused kernel for this device in this torch build
                self._fused = False
        step = self.step_count  # only builds without the fused kernel read the count back
        self.exp_avg.lerp_(self.grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(self.grad, self.grad, value=1 - b2)
        denom = self.exp_avg_sq.sqrt().div_(math.sqrt(1 - b2**step)).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - b1**step))

    @property
    def state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Per-parameter views of the moments (``torch.optim.Optimizer.state``'s shape)."""
        return {p: {"exp_avg": self.exp_avg[part].view_as(p), "exp_avg_sq": self.exp_avg_sq[part].view_as(p)}
                for p, part in zip(self.params, self._slices)}


class RowAdam:
    """Lazy Adam (``torch.optim.SparseAdam``'s algorithm and arithmetic) for embedding tables read by plain
    gathers, with static shapes only: a step takes the gathered rows' indices and the gradients of the gathered
    copies (``[rows, d]``, one per batch row), sums the rows of each index (:class:`BatchGroups`, as
    ``coalesce`` does) and updates moments and values of those indices only. Duplicate rows compute the same
    new values and write them all (``index_copy_``), so the result does not depend on which write lands last.
    The step count is a device tensor: nothing is read back to the host (``fullgraph`` compile, CUDA graphs).
    Bias corrections are computed in float64 on the device, as SparseAdam computes them in Python floats.
    """

    def __init__(self, tables: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.tables = list(tables)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.exp_avg = [torch.zeros_like(t) for t in self.tables]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.tables]
        self.step_count = torch.zeros((), dtype=torch.float64, device=self.tables[0].device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero: each step's gradients belong to that step's gathered copies."""

    def advance(self) -> torch.Tensor:
        """Count one optimiser step; returns the step size ``lr sqrt(1 - β2^t) / (1 - β1^t)`` (a device scalar)."""
        self.step_count.add_(1)
        b1, b2 = self.betas
        return self.lr * torch.sqrt(1 - b2**self.step_count) / (1 - b1**self.step_count)

    @torch.no_grad()
    def update(self, k: int, index: torch.Tensor, grad: torch.Tensor, groups: Any, step_size: torch.Tensor) -> None:
        """Table ``k``'s rows ``index`` (``[rows]``, the batch's ids) with ``grad`` (``[rows, d]``); ``groups``:
        :func:`~autorecbench.data.stream.batch_groups` of ``index``."""
        adam_rows_(self.tables[k], self.exp_avg[k], self.exp_avg_sq[k], index, groups.per_group_sum(grad),
                   step_size, self.betas, self.eps)

    def state_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in (*self.exp_avg, *self.exp_avg_sq))


def adam_rows_(table: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, index: torch.Tensor,
               grad: torch.Tensor, step_size: torch.Tensor, betas: tuple[float, float], eps: float) -> None:
    """SparseAdam's arithmetic on rows ``index`` whose gradients ``grad`` are already summed per index (rows of
    one index carry the same values, so their writes agree)."""
    b1, b2 = betas
    old_m = exp_avg.index_select(0, index)
    old_v = exp_avg_sq.index_select(0, index)
    m_update = grad.sub(old_m).mul_(1 - b1)
    v_update = grad.pow(2).sub_(old_v).mul_(1 - b2)
    exp_avg.index_copy_(0, index, old_m + m_update)
    exp_avg_sq.index_copy_(0, index, old_v + v_update)
    numer = m_update.add_(old_m)
    denom = v_update.add_(old_v).sqrt_().add_(eps)
    values = table.index_select(0, index)
    table.index_copy_(0, index, values + numer.div_(denom).mul_(-step_size.to(values.dtype)))


def flat_adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8) -> FlatAdam | torch.optim.Adam:
    """:class:`FlatAdam` where every parameter is a float tensor on one CPU or CUDA device, else
    ``torch.optim.Adam`` (multi-tensor implementation)."""
    params = list(params)
    if FlatAdam.supports(params):
        return FlatAdam(params, lr, betas, eps)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


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
        flat: bool = False,
    ) -> None:
        # ``flat``: :func:`flat_adam` for the dense parameters (the streaming methods step at every small batch)
        # and torch's fused kernel for dense-mode tables; else torch's default Adam. The tables never go into a
        # FlatAdam: its flat copy would make them views of one buffer.
        embeddings, dense = list(embeddings), list(dense)
        self.mode = check_mode(mode)
        self.optimizers: list[torch.optim.Optimizer | FlatAdam] = []
        if embeddings:
            if self.mode == "lazy":
                self.optimizers.append(torch.optim.SparseAdam(embeddings, lr=lr, betas=betas, eps=eps))
            else:
                self.optimizers.append(torch.optim.Adam(embeddings, lr=lr, betas=betas, eps=eps,
                                                        fused=flat or fused_on(embeddings)))
        if dense:
            self.optimizers.append(flat_adam(dense, lr, betas, eps) if flat
                                   else torch.optim.Adam(dense, lr=lr, betas=betas, eps=eps, fused=fused_on(dense)))
        self._embedding_ids = {id(p) for p in embeddings}

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)  # FlatAdam zeroes its flat buffer instead

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate by ``factor`` (a step of a learning-rate decay)."""
        for opt in self.optimizers:
            if isinstance(opt, FlatAdam):
                opt.lr *= factor
            else:
                for group in opt.param_groups:
                    group["lr"] *= factor

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


def fused_on(params: list[nn.Parameter]) -> bool | None:
    """torch's fused Adam kernel (one launch for all parameters) where every parameter is a float CUDA tensor;
    None (torch's default, the multi-tensor ``foreach`` implementation) elsewhere, so CPU runs keep their
    numbers."""
    cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return True if cuda else None


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's storage really holds (not ``numel * itemsize`` of a view)."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return int(t.untyped_storage().nbytes())
