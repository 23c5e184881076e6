"""DARTS for embedding sizes, the ESAPN paper's baseline (Liu et al., SIGIR 2020, §3.3; Liu et al., ICLR 2019).

Every user and every item holds one embedding per candidate size (one ``n x 222`` table per field for
{2, 4, 8, 16, 64, 128}) and its own architecture weights α (one logit per size, initialised equal, as the
official baseline). Each size's embedding is mapped to the largest size by its own linear map (survey
Eq. 19), batch-normalised and squashed by tanh; the unified embedding is the softmax(α)-weighted sum (Eq. 20)
and enters the ESAPN rating model.

Search (first-order DARTS, :meth:`SoftSelectionMethod.learn`): each batch, α of the entities in a validation
batch from history takes one Adam step (``search_lr`` 1e-4, the official baseline's rate) on the validation
loss, the model weights fixed; then the model weights take one Adam step (``lr`` 1e-3) on the current batch,
α fixed.

Deviations from the papers and the official baseline (``baselines/Darts/train_darts.py``), each with the
switch that undoes it:
- ``embedding_optimizer: lazy``: the embedding table and α update only the rows their batch touches
  (SparseAdam); ``dense``: plain Adam over every row (the official code; α of entities not in the validation
  batch then keep drifting on their decaying momentum).
- ``model.loss_reduction: mean``; the official code sums: ``sum``.
- ``model.head: paper``: the unified embedding goes through the rating model's batch-norm + tanh (§2.2) and a
  tanh MLP; the official head is batch-norm without tanh and batch-norm in the hidden layer: ``official``.
- Eq. 20's 1/K factor (the survey) is kept; the official code sums without it. No switch: the rating model's
  batch-norm removes any constant scale (outputs equal up to its eps).

Choices the paper leaves open, as config values (``conf/method/darts.yaml``), defaults from the official code:
- ``norm_affine: shared``: per-size batch-norm statistics with one (γ, β) for all sizes (the official code's one
  ``BatchNorm1d`` applied to each size's block) before tanh (survey Eq. 19-20: "magnitude-comparable");
  ``per_size``: one per size.
- ``validation: last_batch`` or ``history``; ``init_std: 1.0`` (N(0, 1) embeddings); α initialised equal.
- ``static_shapes: auto`` (CUDA: true, CPU: false): with ``true`` and lazy Adam the tables' and α's rows are
  gathered copies stepped by :class:`~autorecbench.train.optim.RowAdam` (SparseAdam's arithmetic without
  sparse tensors), so the step compiles with ``fullgraph=True`` and replays from a CUDA graph; the same update up
  to the order of float additions of duplicate rows' gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from autorecbench.data.stream import StreamBatch, batch_groups
from autorecbench.methods.base import MethodContext, register_method
from autorecbench.methods.sizesearch import FIELDS, SoftSelectionMethod
from autorecbench.train.optim import RowAdam, SplitAdam, tensor_bytes


@register_method
class Darts(SoftSelectionMethod):
    name = "darts"
    description = "Soft embedding-size selection with per-entity architecture weights (first-order DARTS)"
    paper = "Liu et al., SIGIR 2020, §3.3 (DARTS baseline)"
    fidelity = "faithful, deviations documented"
    deviations = "lazy Adam for the tables and α (official: dense); mean reduction (official: sum); the paper's head"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        mode = str(ctx.cfg.embedding_optimizer)
        self.alpha = nn.ModuleDict({
            f: nn.Embedding(self.n_entities[f], len(self.sizes), sparse=mode == "lazy") for f in FIELDS
        })
        for table in self.alpha.values():
            nn.init.zeros_(table.weight)  # softmax(0) = uniform over the sizes
        self.alpha.to(ctx.device)
        if self.static:  # α's rows are gathered copies, stepped by RowAdam (static shapes)
            self.search_optimizer = RowAdam([t.weight.detach() for t in self.alpha.values()], float(ctx.cfg.search_lr))
        else:
            self.search_optimizer = SplitAdam(self.search_parameters(), [], float(ctx.cfg.search_lr), mode, flat=True)
        self._alpha_rows: dict[str, torch.Tensor] = {}  # the static search step's gathered α rows...
        self._alpha_grads: tuple[torch.Tensor, ...] = ()  # ...and their gradients

    def weights(self, field: str, batch: StreamBatch, train: bool = False) -> torch.Tensor:
        ids = self._ids(batch, field)[0]
        if not (self.static and train):
            return torch.softmax(self.alpha[field](ids), dim=1)
        rows = self.alpha[field].weight.detach().index_select(0, ids).requires_grad_()
        self._alpha_rows = {**self._alpha_rows, field: rows}  # a new dict: no mutation outlives the step
        return torch.softmax(rows, dim=1)

    def search_backward(self, loss: torch.Tensor) -> None:
        if not self.static:
            return super().search_backward(loss)
        # autograd.grad, not backward(inputs=...): the α rows are created inside the step (fullgraph tracing)
        self._alpha_grads = torch.autograd.grad(loss, [self._alpha_rows[f] for f in FIELDS])

    def search_update(self, valid: StreamBatch) -> None:
        if not self.static:
            return super().search_update(valid)
        step = self.search_optimizer.advance()
        for k, f in enumerate(FIELDS):
            ids = self._ids(valid, f)[0]
            self.search_optimizer.update(k, ids, self._alpha_grads[k], batch_groups(ids), step)
        self._alpha_rows, self._alpha_grads = {}, ()  # nothing of the step outlives it

    def entity_weights(self, field: str) -> torch.Tensor:
        return torch.softmax(self.alpha[field].weight.detach(), dim=1)

    def search_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.alpha.values()]

    def state_bytes(self, field: str) -> int:
        return tensor_bytes(self.alpha[field].weight)
