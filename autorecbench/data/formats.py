"""The registry of raw click-log formats (``SourceSpec.format`` in a dataset YAML names one).

Explicit on purpose: a format module defines its ``CTRFormat`` subclass and this module lists it, so the
loader (``cache.py``) imports the registry and the registry imports the formats, never the other way round.
Adding a format: one module beside ``criteo.py`` and one entry in ``CTR_FORMATS``.
"""

from __future__ import annotations

from autorecbench.data.avazu import AvazuFormat
from autorecbench.data.criteo import CriteoFormat
from autorecbench.data.ctr import CTRFormat

CTR_FORMATS: dict[str, type[CTRFormat]] = {cls.name: cls for cls in (CriteoFormat, AvazuFormat)}


def ctr_formats() -> dict[str, type[CTRFormat]]:
    return CTR_FORMATS
