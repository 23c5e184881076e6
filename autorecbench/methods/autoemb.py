"""AutoEmb (Zhao et al., arXiv 2002.11252 / ICDM 2021; survey Eq. 19-20; the ESAPN paper's baseline, §3.3).

The same per-size embeddings, maps and soft weighted sum as DARTS (:class:`SoftSelectionMethod`), but the
weights come from two controller networks (users, items), not from free per-entity parameters: a controller
reads the row's frequency (mapped to an embedding + batch-norm) and the entity's previous soft weights (its
"context") → Linear(·, 512) → batch-norm → tanh → Linear(512, K) → softmax (:class:`StateMLP`). So entities of
equal frequency and history get equal weights, and the weights follow an entity's popularity as it changes
along the stream. This is the ESAPN repository's AutoEmb baseline (``baselines/AutoEmb/train_autoemb.py``,
``Policy_Type`` 1: popularity embedding + last weights); the original AutoEmb paper is not in the project's
papers, the survey's Eq. 19-20 describe it.

Search: each batch the controllers take one first-order Adam step (``search_lr`` 1e-4, the official rate) on
a validation batch from history, the model weights fixed; then the model weights take one Adam step (``lr``
1e-3) on the current batch with the controllers' weights fixed, and each entity's weights at its last row
of the batch become its "previous weights".

Deviations from the papers and the official baseline, each with the switch that undoes it:
- ``frequency_cap: 1000``: frequencies above share the last frequency-embedding row; the official table has one
  row per frequency up to the largest (set the cap above the stream's largest frequency).
- ``embedding_optimizer: lazy`` (tables); the official plain Adam over every row: ``dense``.
- ``model.loss_reduction: mean``; the official code sums: ``sum``.
- ``model.head: paper``; the official head (batch-norm without tanh, batch-norm in the hidden layer): ``official``.
- Eq. 20's 1/K is kept (no effect after the rating model's batch-norm, see :mod:`autorecbench.methods.darts`).

Choices left open, as config values (``conf/method/autoemb.yaml``), defaults from the official code:
- ``initial_previous: official``: before an entity's first row its previous weights are [1, 0, ..., 0] for the
  binary task (MSE) and [1.5, 0, ..., 0] for the 5-class task (CE), as the official code initialises them;
  ``zeros`` starts them at 0.
- ``norm_affine: shared`` (as DARTS); ``frequency_encoding: exact`` with ``frequency_dim: 32`` (see
  :mod:`autorecbench.models.controller`), ``hidden: 512``, ``validation``, ``init_std``.
- ``static_shapes: auto`` (CUDA: true, CPU: false): the tables' rows are gathered copies stepped by
  :class:`~autorecbench.train.optim.RowAdam` with ``true`` (as DARTS, :mod:`autorecbench.methods.darts`).
"""

from __future__ import annotations

import torch
from torch import nn

from omegaconf import DictConfig

from autorecbench.data.stream import StreamBatch, batch_groups
from autorecbench.errors import UserError
from autorecbench.methods.base import MethodContext, register_method, set_training
from autorecbench.methods.sizesearch import FIELDS, SoftSelectionMethod
from autorecbench.models.controller import FrequencyEncoder, StateMLP
from autorecbench.train.optim import flat_adam, tensor_bytes

INITIAL_PREVIOUS = ("official", "zeros")


@register_method
class AutoEmb(SoftSelectionMethod):
    name = "autoemb"
    description = "Soft embedding-size selection by frequency-aware controller networks"
    paper = "Zhao et al., arXiv 2002.11252 (survey Eq. 19-20); ESAPN §3.3 baseline"
    fidelity = "faithful, deviations documented"
    deviations = "frequency capped at 1000; lazy Adam (official: dense); mean reduction (official: sum); the paper's head"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        k = len(self.sizes)
        self.controllers = nn.ModuleDict({
            f: StateMLP(FrequencyEncoder(str(cfg.frequency_encoding), int(cfg.frequency_cap), int(cfg.frequency_dim),
                                         self.batch_norm), k, int(cfg.hidden), k, self.batch_norm)
            for f in FIELDS
        }).to(ctx.device)
        self.previous = {f: torch.zeros(self.n_entities[f], k, device=ctx.device) for f in FIELDS}
        if str(cfg.initial_previous) == "official":
            for table in self.previous.values():  # the official baseline's start: [1, 0, ...] (MSE), [1.5, 0, ...] (CE)
                table[:, 0] = 1.0 if ctx.task.is_binary else 1.5
        self.search_optimizer = flat_adam(self.controllers.parameters(), float(cfg.search_lr))

    def weights(self, field: str, batch: StreamBatch, train: bool = False) -> torch.Tensor:
        ids, freq = self._ids(batch, field)
        controller = set_training(self.controllers[field], train)
        return torch.softmax(controller(freq, self.previous[field].index_select(0, ids)), dim=1)

    def search_parameters(self) -> list[nn.Parameter]:
        return list(self.controllers.parameters())

    def entity_weights(self, field: str) -> torch.Tensor:
        """Each entity's previous weights: the controller's output at its last row (the initial ones if it
        never appeared)."""
        return self.previous[field]

    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        super().check_config(cfg)
        if str(cfg.initial_previous) not in INITIAL_PREVIOUS:
            raise UserError(f"method.initial_previous must be one of {', '.join(INITIAL_PREVIOUS)}, "
                            f"got {cfg.initial_previous!r}")

    def after_training(self, batch: StreamBatch, weights: dict[str, torch.Tensor]) -> None:
        for f in FIELDS:  # every row writes its entity's last row's weights: static shapes, one value per entity
            ids = self._ids(batch, f)[0]
            self.previous[f].index_copy_(0, ids, weights[f].index_select(0, batch_groups(ids).last_row))

    def state_bytes(self, field: str) -> int:
        return tensor_bytes(self.previous[field])
