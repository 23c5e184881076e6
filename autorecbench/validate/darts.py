"""DARTS' planted-truth validation (:mod:`autorecbench.validate.size_search`): the oracle puts all weight on the
target size; the null keeps the uniform weights α starts with (its search step does nothing)."""

from __future__ import annotations

from autorecbench.methods.darts import Darts
from autorecbench.validate.base import register_validation
from autorecbench.validate.size_search import FrozenSearch, SizeSearchValidation, SoftOracle


class DartsOracle(SoftOracle, Darts):
    pass


class DartsUniform(FrozenSearch, Darts):
    pass


@register_validation
class DartsValidation(SizeSearchValidation):
    method = "darts"
    oracle_class = DartsOracle
    null_class = DartsUniform
