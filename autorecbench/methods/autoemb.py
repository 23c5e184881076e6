"""AutoEmb (Zhao et al., arXiv 2002.11252 / ICDM 2021; survey Eq. 19-20; the ESAPN paper's baseline, §3.3).

The same per-size embeddings, maps and soft weighted sum as DARTS (:class:`SoftSelectionMethod`), but the
weights come from two controller networks (users, items), not from free per-entity parameters: a controller
reads the row's frequency (mapped to an embedding + batch-norm) and the entity's previous soft weights (its
"context"; zeros before its first appearance, as the official baseline) → Linear(·, 512) → batch-norm → tanh
→ Linear(512, K) → softmax (:class:`StateMLP`). So entities of equal frequency and history get equal
weights, and the weights follow an entity's popularity as it changes along the stream.

Search: each batch the controllers take one first-order Adam step (``search_lr`` 1e-4, the official rate) on
a validation batch from history, the model weights fixed; then the model weights take one Adam step (``lr``
1e-3) on the current batch with the controllers' weights fixed, and each entity's weights at its last row
of the batch become its "previous weights".

Choices left open, as config values (``conf/method/autoemb.yaml``): ``frequency_encoding: exact`` with
``frequency_cap: 1000`` and ``frequency_dim: 32`` (see :mod:`autorecbench.models.controller`), ``hidden:
512``, ``validation``, ``embedding_optimizer`` (embedding tables; the controllers are small dense networks
trained by plain Adam), ``init_std``.
"""

from __future__ import annotations

import torch
from torch import nn

from autorecbench.data.stream import StreamBatch
from autorecbench.methods.base import MethodContext, register_method, set_training
from autorecbench.methods.sizesearch import FIELDS, SoftSelectionMethod, last_rows
from autorecbench.models.controller import FrequencyEncoder, StateMLP
from autorecbench.train.optim import flat_adam, tensor_bytes


@register_method
class AutoEmb(SoftSelectionMethod):
    name = "autoemb"
    description = "Soft embedding-size selection by frequency-aware controller networks"
    paper = "Zhao et al., arXiv 2002.11252 (survey Eq. 19-20); ESAPN §3.3 baseline"

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
        self.search_optimizer = flat_adam(self.controllers.parameters(), float(cfg.search_lr))

    def weights(self, field: str, batch: StreamBatch, train: bool = False) -> torch.Tensor:
        ids, freq = self._ids(batch, field)
        controller = set_training(self.controllers[field], train)
        return torch.softmax(controller(freq, self.previous[field].index_select(0, ids)), dim=1)

    def search_parameters(self) -> list[nn.Parameter]:
        return list(self.controllers.parameters())

    def after_training(self, batch: StreamBatch, weights: dict[str, torch.Tensor]) -> None:
        for f in FIELDS:
            ids = self._ids(batch, f)[0]
            last = last_rows(ids)
            self.previous[f][ids[last]] = weights[f][last]

    def state_bytes(self, field: str) -> int:
        return tensor_bytes(self.previous[field])
