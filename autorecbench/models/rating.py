"""The deep recommendation model of the ESAPN paper (Liu et al., SIGIR 2020, §2.2, Figure 2).

Given one unified embedding per field (user, item), each of dimension d_n:
    e -> batch-norm -> tanh                      (per field, "following [28]")
    h_1 = tanh(W_1 [e_u : e_i] + b_1), ..., h_m  (MLP, m hidden layers, 512 units in §3.2)
    output: sigmoid(w^T h_m + b) for the binary task, softmax(W h_m + b) for the 5-class task.
Losses: MSE on the sigmoid output (Eq. 3) for binary, cross-entropy (Eq. 4) for multiclass.

Choices the paper leaves open, as config values (``conf/model/rating_mlp.yaml``):
- ``batch_norm: batch`` normalises with the statistics of the batch being processed, in prediction too,
  like the official code (which never calls ``eval()``); ``running`` uses running statistics when predicting.
- The paper writes ``tanh(W x) + b``; we use the standard ``tanh(W x + b)`` (the official code does too).
  On the CPU tanh is computed as ``2 sigmoid(2x) - 1`` (:mod:`autorecbench.models.activations`: the same
  function, within 2e-7, three times faster there).
- ``loss_reduction: mean`` as Eq. 3/4; the official code sums over the batch (``sum``).
- ``head: paper`` is the model above. ``official`` is the official code's inference head
  (``RS_MLP.transfrom``): batch-norm on the concatenated embeddings without tanh, then each hidden layer
  ``tanh(BN(W h + b))`` — batch-norm in the hidden layers, which the paper does not have. Whatever tanh the
  official code applies to the embeddings before that head (its per-size batch-norm + tanh for ESAPN, DARTS and
  AutoEmb; none for FIXED) is the method's part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from autorecbench.data.schema import TaskSpec
from autorecbench.errors import UserError
from autorecbench.models.registry import register_model
from autorecbench.models.activations import Tanh, tanh


def embedding_norm(dim: int, batch_norm: str, affine: bool = True) -> nn.BatchNorm1d:
    if batch_norm not in ("batch", "running"):
        raise UserError(f"model.batch_norm must be 'batch' or 'running', got {batch_norm!r}")
    return nn.BatchNorm1d(dim, affine=affine, track_running_stats=batch_norm == "running")


HEADS = ("paper", "official")


@register_model("rating_mlp")
class RatingMLP(nn.Module):
    def __init__(
        self,
        n_fields: int,
        dim: int,
        n_outputs: int,
        hidden: Sequence[int] = (512,),
        batch_norm: str = "batch",
        head: str = "paper",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head = head
        # Per-field batch-norm is batch-norm of the concatenation: the statistics are per channel either way.
        self.norms = nn.ModuleList(embedding_norm(dim, batch_norm) for _ in range(n_fields))
        layers: list[nn.Module] = []
        width = n_fields * dim
        for h in hidden:
            layers += [nn.Linear(width, h), *([embedding_norm(h, batch_norm)] if head == "official" else []), Tanh()]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.mlp = nn.Sequential(*layers)

    @staticmethod
    def check_config(cfg: DictConfig) -> None:
        embedding_norm(1, str(cfg.batch_norm))
        reduce_loss(torch.zeros(1), str(cfg.loss_reduction))
        if any(int(h) < 1 for h in cfg.hidden):
            raise UserError(f"model.hidden sizes must be >= 1, got {list(cfg.hidden)}")
        if str(cfg.get("head", "paper")) not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got {cfg.head!r}")

    def forward(self, fields: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, n_outputs]`` from one ``[batch, dim]`` embedding per field; with ``rows`` (an index)
        the logits of those rows only, exactly as in the full batch: the batch-norm statistics come from every
        row (with the official head, whose hidden layers normalise too, every row runs the whole head)."""
        normed = [norm(e) for norm, e in zip(self.norms, fields)]
        if self.head == "official":
            logits = self.mlp(torch.cat(normed, dim=1))
            return logits if rows is None else logits.index_select(0, rows)
        if rows is not None:
            normed = [x.index_select(0, rows) for x in normed]
        return self.mlp(torch.cat([tanh(x) for x in normed], dim=1))


def output_probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """P(y=1) ``[batch]`` for binary, class probabilities ``[batch, classes]`` for multiclass."""
    if task.is_binary:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)


def per_example_loss(task: TaskSpec, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. 3 (squared error of the sigmoid output) or Eq. 4 (cross-entropy), one value per example."""
    if task.is_binary:
        return (torch.sigmoid(logits[:, 0]) - label) ** 2
    return F.cross_entropy(logits, label, reduction="none")


def reduce_loss(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise UserError(f"model.loss_reduction must be 'mean' or 'sum', got {reduction!r}")
