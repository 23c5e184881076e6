"""In-process offline runs of the search methods on synthetic files with planted truth (no CLI start-up)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from autorecbench.config import compose
from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.offline import OfflineData
from autorecbench.data.schema import TaskSpec
from autorecbench.execute import seed_everything
from autorecbench.methods.base import MethodContext, OfflineMethod, method_class
from autorecbench.runners.base import RunOutput
from autorecbench.runners.offline import OfflineConfig, OfflineProtocol, TrainLoop


@dataclass
class Setup:
    """A composed config with its prepared data, the method built from it and the runner's loop."""

    cfg: Any
    prepared: PreparedData
    data: OfflineData
    method: OfflineMethod
    protocol: OfflineProtocol
    truth: dict[str, Any] | None

    def loop(self) -> TrainLoop:
        return TrainLoop(self.protocol.cfg, self.data)

    def run(self) -> RunOutput:
        return self.protocol.run(self.method, self.data)


def _truth(prepared: PreparedData) -> dict[str, Any] | None:
    files = prepared.schema.source.get("files") or [prepared.schema.source]
    path = Path(files[0]["path"]).parent / "truth.json"
    return json.loads(path.read_text()) if path.is_file() else None


def setup(root: Path, overrides: list[str], seed: int = 0, task: str = "binary", active_only: bool = False) -> Setup:
    """Compose ``overrides`` under ``root``, prepare the data and build the method (nothing run yet).
    ``active_only``: keep only the generator's active fields (the others of the raw format are constant)."""
    base = [f"paths.root={root}", f"seed={seed}", f"task={task}", *overrides]
    cfg = compose(base)
    prepared = prepare(DatasetConfig.from_mapping(cfg.data))
    truth = _truth(prepared)
    if active_only and truth is not None:
        cfg = compose([*base, "data.fields=[" + ",".join(truth["active_fields"]) + "]"])
        prepared = prepare(DatasetConfig.from_mapping(cfg.data))
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    options = OmegaConf.to_container(cfg.runner, resolve=True)
    assert isinstance(options, dict)
    options.pop("name")
    seed_everything(seed, True)
    protocol = OfflineProtocol(OfflineConfig(**options))
    spec = TaskSpec.from_name(task)
    data = protocol.load(prepared, spec, torch.device("cpu"), data_cfg)
    method = method_class(str(cfg.method.name), "offline")(
        MethodContext(prepared.schema, spec, cfg.method, cfg.model, torch.device("cpu"), seed))
    return Setup(cfg, prepared, data, method, protocol, truth)


def run(root: Path, overrides: list[str], **kwargs: Any) -> tuple[Setup, RunOutput]:
    s = setup(root, overrides, **kwargs)
    return s, s.run()
