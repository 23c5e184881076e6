"""ESAPN's planted-truth validation (:mod:`autorecbench.validate.size_search`): oracle sizes from the truth, and
the null that always enlarges, both through ESAPN's own size store, model and runner (the policy is not
consulted)."""

from __future__ import annotations

import torch

from autorecbench.data.stream import StreamBatch
from autorecbench.methods.esapn import Esapn
from autorecbench.validate.base import register_validation
from autorecbench.validate.size_search import WITHIN, SizeSearchValidation, TruthTargets


class EsapnOracle(TruthTargets, Esapn):
    """Lines 8-9 enlarge an entity while it is below its target size (one step per batch, as ESAPN may)."""

    def policy_step(self, valid: StreamBatch) -> None:
        pass

    def enlarges(self, field: str, batch: StreamBatch, size_index: torch.Tensor) -> torch.Tensor:
        ids = batch.user if field == "user" else batch.item
        return size_index < self.targets[field].index_select(0, ids)


class EsapnAlwaysEnlarge(Esapn):
    """Lines 8-9 enlarge every entity below the top size: sizes follow the appearances alone."""

    def policy_step(self, valid: StreamBatch) -> None:
        pass

    def enlarges(self, field: str, batch: StreamBatch, size_index: torch.Tensor) -> torch.Tensor:
        return size_index < len(self.sizes) - 1


@register_validation
class EsapnValidation(SizeSearchValidation):
    method = "esapn"
    oracle_class = EsapnOracle
    null_class = EsapnAlwaysEnlarge
    by_design = {WITHIN: "the policy's state is (frequency, current size) (§2.3.2), the same for the two items of "
                         "a pair, so it cannot tell the rich one from the flat one"}
