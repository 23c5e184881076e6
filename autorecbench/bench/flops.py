"""FLOPs of one DeepFM training sample, and the machine's matrix-product FLOP rate (``bench.ctr``).

What is counted (per training sample, forward and backward; multiply and add are one FLOP each):

- the MLP's and output layer's matrix products (AutoLoss Eq. 5-6): forward ``2 in out`` per layer; backward
  ``2 in out`` for the gradient of the weights and ``2 in out`` for the gradient of the layer's input (the first
  layer's too: the embeddings are trained), so ``6 sum(in out)`` in all;
- the FM term (Eq. 4) as ``fm_vector`` computes it, ``0.5 ((sum_i e_i)^2 - sum_i e_i^2)`` summed over d, and its
  backward: ``3 F d + 2 d - 1`` and ``4 F d + 5 d`` (the elements the arithmetic kernels write, a reduction
  counting its additions; checked against a count of the kernels torch runs, ``tests/test_bench_flops.py``).

Left out (memory-bound, not FLOPs of the model's maths): the embedding gathers and their scatter-add, the
first-order term (a gather and a sum of F weights), the layers' bias additions, batch-norm, ReLU, dropout, the
loss and Adam. The share of the matmul rate is therefore a lower bound on how well the hardware is used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# FM forward, per sample: the field sum ((F-1) d additions), total*total (d), e*e (F d), its field sum
# ((F-1) d), the difference (d), the 0.5 scale (d), the sum over d (d - 1): 3 F d + 2 d - 1.
# FM backward, as autograd runs it: the 0.5 scale (d), the difference's negation (d), total*total's two
# products and their sum (3 d), e*e's two products and their sum (3 F d), the field sum's gradient broadcast to
# every field and added to the squares' gradient (F d): 4 F d + 5 d.


def fm_forward_flops(n_fields: int, embedding_dim: int) -> int:
    return 3 * n_fields * embedding_dim + 2 * embedding_dim - 1


def fm_backward_flops(n_fields: int, embedding_dim: int) -> int:
    return 4 * n_fields * embedding_dim + 5 * embedding_dim


@dataclass(frozen=True)
class DeepFMFlops:
    """FLOPs of one training sample (forward + backward) of DeepFM's MLP and FM, as counted above."""

    mlp_forward: int
    mlp_backward: int
    fm_forward: int
    fm_backward: int

    @property
    def total(self) -> int:
        return self.mlp_forward + self.mlp_backward + self.fm_forward + self.fm_backward


def layer_widths(n_fields: int, embedding_dim: int, hidden: Sequence[int], n_outputs: int = 1) -> list[tuple[int, int]]:
    """(in, out) of each matrix product of DeepFM's deep part: the MLP's layers and the output layer."""
    widths = [n_fields * embedding_dim, *hidden, n_outputs]
    return list(zip(widths[:-1], widths[1:]))


def deepfm_flops(n_fields: int, embedding_dim: int, hidden: Sequence[int], n_outputs: int = 1) -> DeepFMFlops:
    """Per-sample FLOPs of DeepFM with ``n_fields`` fields of ``embedding_dim`` and MLP ``hidden``."""
    if n_outputs != 1:
        raise ValueError("the FM count is for the binary FM (one logit)")
    products = sum(i * o for i, o in layer_widths(n_fields, embedding_dim, hidden, n_outputs))
    return DeepFMFlops(mlp_forward=2 * products, mlp_backward=4 * products,
                       fm_forward=fm_forward_flops(n_fields, embedding_dim),
                       fm_backward=fm_backward_flops(n_fields, embedding_dim))


@dataclass(frozen=True)
class MatmulRate:
    """FLOP/s of ``[m, k] @ [k, n]`` float32 products, timed back to back for at least ``seconds``."""

    m: int
    k: int
    n: int
    flops_per_second: float
    repeats: int


def matmul_rate(m: int, k: int, n: int, device: torch.device, seconds: float = 0.5) -> MatmulRate:
    """The rate of one matrix product on ``device`` with torch's current threads (``2 m k n`` FLOPs per product;
    a few warm-up products first, the rate of the fastest of three timed blocks)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device)
    b = torch.randn(k, n, generator=generator).to(device)
    out = torch.empty(m, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    # Enough products for a block of seconds / 3, from one timed product.
    started = time.perf_counter()
    torch.mm(a, b, out=out)
    sync()
    repeats = max(1, int(seconds / 3 / max(time.perf_counter() - started, 1e-9)))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - started) / repeats)
    return MatmulRate(m, k, n, 2 * m * k * n / best, repeats)
