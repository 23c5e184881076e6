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
        self.step_count = 0
        self._step = torch.zeros((), dtype=torch.float32, device=first.device)  # the fused kernel's step input
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

    @torch.no_grad()
    def step(self) -> None:
        self._bind_grads()
        self.step_count += 1
        b1, b2 = self.betas
        if self._fused:
            self._step.fill_(self.step_count)
            try:
                torch._fused_adam_([self.flat], [self.grad], [self.exp_avg], [self.exp_avg_sq], [], [self._step],
                                   amsgrad=False, lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps,
                                   maximize=False)
                return
            except (RuntimeError, NotImplementedError):  # no fused kernel for this device in this torch build
                self._fused = False
        self.exp_avg.lerp_(self.grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(self.grad, self.grad, value=1 - b2)
        denom = self.exp_avg_sq.sqrt().div_(math.sqrt(1 - b2**self.step_count)).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - b1**self.step_count))

    @property
    def state(self) -> dict[nn.Parameter, dict[str, torch.Tensor]]:
        """Per-parameter views of the moments (``torch.optim.Optimizer.state``'s shape)."""
        return {p: {"exp_avg": self.exp_avg[part].view_as(p), "exp_avg_sq": self.exp_avg_sq[part].view_as(p)}
                for p, part in zip(self.params, self._slices)}


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
                self.optimizers.append(torch.optim.Adam(embeddings, lr=lr, betas=betas, eps=eps, fused=flat or None))
        if dense:
            self.optimizers.append(flat_adam(dense, lr, betas, eps) if flat
                                   else torch.optim.Adam(dense, lr=lr, betas=betas, eps=eps))
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


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes the tensor's storage really holds (not ``numel * itemsize`` of a view)."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return int(t.untyped_storage().nbytes())
