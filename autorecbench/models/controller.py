"""Small networks that read an entity's state: ESAPN's policy networks and AutoEmb's controllers.

Both follow the official ESAPN code's shape (the papers give only "an MLP"):

    frequency -> Embedding(rows, frequency_dim) -> batch-norm          (ESAPN §2.3.3: "map the frequency into
    [that ⊕ extra state] -> Linear(., hidden) -> batch-norm -> tanh      an embedding representation")
    -> Linear(hidden, outputs)                                          (logits; softmax by the caller)

``extra`` is the one-hot current size (ESAPN's state s = (f, e), §2.3.2) or the entity's previous soft weights
(AutoEmb, the official baseline's "popularity + last weights" controller).

Frequency encodings (a choice the papers leave open, ``frequency_encoding``):
- ``exact``: one embedding row per frequency value 1..cap; frequencies above ``frequency_cap`` share the last
  row. The official code uses one row per value with no cap (its table has max-frequency rows).
- ``log2``: one row per power-of-two bucket (1, 2-3, 4-7, ...) up to the cap's bucket.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from autorecbench.errors import UserError
from autorecbench.models.activations import Tanh
from autorecbench.models.norm import batch_norm
from autorecbench.models.rating import embedding_norm

FREQUENCY_ENCODINGS = ("exact", "log2")


class FrequencyEncoder(nn.Module):
    def __init__(self, encoding: str, cap: int, dim: int, batch_norm: str) -> None:
        super().__init__()
        if encoding not in FREQUENCY_ENCODINGS:
            raise UserError(f"frequency_encoding must be one of {', '.join(FREQUENCY_ENCODINGS)}, got {encoding!r}")
        if cap < 1 or dim < 1:
            raise UserError("frequency_cap and frequency_dim must be >= 1")
        self.encoding, self.cap = encoding, int(cap)
        rows = self.cap + 1 if encoding == "exact" else int(math.floor(math.log2(self.cap))) + 1
        self.embedding = nn.Embedding(rows, dim)
        self.norm = embedding_norm(dim, batch_norm)

    def index(self, freq: torch.Tensor) -> torch.Tensor:
        capped = freq.clamp(1, self.cap)
        if self.encoding == "exact":
            return capped
        return torch.floor(torch.log2(capped.to(torch.float64))).to(torch.int64)

    def forward(self, freq: torch.Tensor) -> torch.Tensor:
        return self.embed(self.index(freq))

    def embed(self, index: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """From frequency indices (:meth:`index`); ``counts``: see :func:`~autorecbench.models.norm.batch_norm`."""
        return batch_norm(self.norm, self.embedding(index), counts)


class StateMLP(nn.Module):
    """Logits over ``outputs`` choices from (frequency, extra state)."""

    def __init__(self, encoder: FrequencyEncoder, extra_dim: int, hidden: int, outputs: int, batch_norm: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlp = nn.Sequential(
            nn.Linear(encoder.embedding.embedding_dim + extra_dim, hidden),
            embedding_norm(hidden, batch_norm),
            Tanh(),
            nn.Linear(hidden, outputs),
        )

    def forward(self, freq: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, outputs]``, one row per batch row."""
        return self.from_index(self.encoder.index(freq), extra)

    def from_index(self, freq_index: torch.Tensor, extra: torch.Tensor,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` from frequency indices (:meth:`FrequencyEncoder.index`). With ``counts`` each input
        row stands for that many rows of the batch (distinct states): batch-norm statistics weigh it so, and
        each output equals the output of every row it stands for (:func:`~autorecbench.models.norm.batch_norm`)."""
        linear, norm, act, out = self.mlp
        hidden = batch_norm(norm, linear(torch.cat([self.encoder.embed(freq_index, counts), extra], dim=1)), counts)
        return out(act(hidden))
