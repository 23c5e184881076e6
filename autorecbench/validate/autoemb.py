"""AutoEmb's planted-truth validation (:mod:`autorecbench.validate.size_search`): the oracle puts all weight on
the target size; the null keeps the randomly initialised controllers (its search step does nothing)."""

from __future__ import annotations

from autorecbench.methods.autoemb import AutoEmb
from autorecbench.validate.base import register_validation
from autorecbench.validate.size_search import WITHIN, FrozenSearch, SizeSearchValidation, SoftOracle


class AutoEmbOracle(SoftOracle, AutoEmb):
    pass


class AutoEmbFrozen(FrozenSearch, AutoEmb):
    pass


@register_validation
class AutoEmbValidation(SizeSearchValidation):
    method = "autoemb"
    oracle_class = AutoEmbOracle
    null_class = AutoEmbFrozen
    by_design = {WITHIN: "the controller reads (frequency, previous weights), and the previous weights are its own "
                         "outputs for the same frequencies: the two items of a pair look alike to it"}
