"""The offline protocol in process: backbones, the training loop (early stopping, restoring the best
weights, evaluation schedule), the data pipeline, gAUC, FIXED's memory report and reproducibility."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from autorecbench.config import compose
from autorecbench.data.cache import DatasetConfig, prepare
from autorecbench.data.offline import OfflineBatch, OfflineData, SplitData, load_offline
from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.metrics import auc, group_auc
from autorecbench.methods.base import MethodContext, method_class
from autorecbench.models.backbones import DeepFM, build_backbone
from autorecbench.models.layers import MLP, fm_vector, inner_products
from autorecbench.runners.offline import OfflineConfig, OfflineProtocol, TrainLoop

BINARY, MULTI = TaskSpec("binary", 2), TaskSpec("multiclass", 5)
FIELDS = [FieldSpec("a", 5), FieldSpec("b", 7), FieldSpec("c", 3)]
BACKBONES = ["lr", "fm", "dnn", "wide_deep", "deepfm", "ipnn"]


def model_cfg(name: str) -> object:
    return compose([f"model={name}"]).model


def batch_x(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in FIELDS], 1).to(torch.int32)


# ---------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("task", [BINARY, MULTI])
def test_backbones_build_from_the_schema(name: str, task: TaskSpec) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, FIELDS, task, model_cfg(name))
    logits = model(batch_x())
    assert logits.shape == (64, task.n_outputs) and torch.isfinite(logits).all()
    total = sum(f.cardinality for f in FIELDS)
    first_order = total * task.n_outputs + task.n_outputs
    embedding = total * 16
    mlp_in = {"dnn": 3 * 16, "wide_deep": 3 * 16, "deepfm": 3 * 16, "ipnn": 3 * 16 + 3}.get(name)
    mlp = 0 if mlp_in is None else (mlp_in * 128 + 128 + 2 * 128) + (128 * 128 + 128 + 2 * 128) + 128 * task.n_outputs + task.n_outputs
    fm_proj = 16 * task.n_outputs if name in ("fm", "deepfm") and task.n_outputs > 1 else 0
    expected = {"lr": first_order, "fm": first_order + embedding + fm_proj, "dnn": embedding + mlp,
                "wide_deep": first_order + embedding + mlp, "deepfm": first_order + embedding + mlp + fm_proj,
                "ipnn": embedding + mlp}[name]
    assert sum(p.numel() for p in model.parameters()) == expected


def test_fm_identity_and_inner_products() -> None:
    e = torch.randn(8, 4, 3, dtype=torch.float64)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    explicit = torch.stack([(e[:, i] * e[:, j]).sum(-1) for i, j in pairs], 1)
    assert torch.allclose(inner_products(e), explicit)
    assert torch.allclose(fm_vector(e).sum(-1), explicit.sum(1))


def test_pair_gate_hook_matches_the_plain_fm() -> None:
    torch.manual_seed(0)
    model = build_backbone("deepfm", FIELDS, BINARY, model_cfg("deepfm"))
    assert isinstance(model, DeepFM)
    nn.init.normal_(model.embedding.table.weight)  # type: ignore[union-attr]
    model.eval()
    x = batch_x()
    plain = model(x)
    model.set_pair_gate(nn.Identity())
    assert torch.allclose(model(x), plain, atol=1e-5)

    class DropFirstPair(nn.Module):
        def forward(self, products: torch.Tensor) -> torch.Tensor:
            return products * torch.tensor([0.0, 1.0, 1.0])

    model.set_pair_gate(DropFirstPair())
    e = model.embedding(x)  # type: ignore[misc]
    assert torch.allclose(plain - model(x), (e[:, 0] * e[:, 1]).sum(-1, keepdim=True), atol=1e-5)


def test_mlp_layer_order_follows_the_paper() -> None:
    mlp = MLP(10, [128, 128], batch_norm=True, dropout=0.2, activation="relu")
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 and mlp.out_dim == 128


# ---------------------------------------------------------------- data pipeline

def toy_data(n_train: int = 200, n_valid: int = 100, seed: int = 0) -> OfflineData:
    g = torch.Generator().manual_seed(seed)

    def split(name: str, n: int) -> SplitData:
        x = torch.randint(0, 5, (n, 3), generator=g, dtype=torch.int32)
        label = (torch.rand(n, generator=g) < 0.5).to(torch.float32)
        return SplitData(name, x, label, torch.device("cpu"))

    return OfflineData(split("train", n_train), split("valid", n_valid), split("test", n_valid), FIELDS, BINARY,
                       user_index=0, split_info={"rule": "toy"})


def test_batches_cover_every_row_once_in_seeded_order() -> None:
    data = toy_data(n_train=201)
    split = data.train
    assert split.bounds(50)[-1] == (150, 201)  # a last batch of one row joins the one before
    orders = []
    for seed in (0, 0, 1):
        rows = torch.cat([b.x for b in split.batches(50, torch.Generator().manual_seed(seed))])
        assert rows.shape == split.x.shape
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, split.x.tolist()))
        orders.append(rows)
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])


def test_valid_batches_cycle_through_the_validation_split() -> None:
    data = toy_data(n_valid=100)
    loop = TrainLoop(OfflineConfig(batch_size=40, valid_batch_size=30), data)
    seen = [loop.valid_batch() for _ in range(8)]  # 30, 30, 30, 10, then a new order
    assert [len(b) for b in seen] == [30, 30, 30, 10, 30, 30, 30, 10]
    first_pass = torch.cat([b.label for b in seen[:4]])
    assert first_pass.sum() == data.valid.label.sum()


def test_movielens_splits_for_offline_runs(tmp_path: Path) -> None:
    cfg = DatasetConfig.from_mapping({
        "name": "synthetic", "family": "movielens", "path": str(tmp_path / "raw"),
        "processed_dir": str(tmp_path / "processed"), "sources": [{"file": "ratings.csv", "format": "ratings_csv"}],
        "generator": {"kind": "movielens", "n_users": 50, "n_items": 40, "n_interactions": 1000}})
    prepared = prepare(cfg)
    data = load_offline(prepared, MULTI, torch.device("cpu"), cfg)
    assert (len(data.train), len(data.valid), len(data.test)) == (800, 100, 100)
    assert data.train.label.dtype == torch.int64 and data.user_index == 0 and data.split_info["rule"] == "random"
    cfg.split = "time"
    timed = load_offline(prepared, BINARY, torch.device("cpu"), cfg, max_rows=500)
    assert (len(timed.train), len(timed.valid), len(timed.test)) == (400, 50, 50)
    import polars as pl

    frame = pl.read_parquet(prepared.interactions_path)  # time-ordered: the first rows train
    assert timed.train.x[:, 0].tolist() == frame["user"][:400].to_list()


# ---------------------------------------------------------------- the training loop

class Scheduled(nn.Module):
    """A 'model' whose quality per epoch is scripted: predictions separate the classes by ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


def test_early_stopping_restores_the_best_weights() -> None:
    data = toy_data()
    module = Scheduled()
    schedule = [0.2, 3.0, 0.5, 0.4, 0.3, 5.0]  # best at epoch 2; patience 2 stops after epoch 4
    steps_per_epoch = len(data.train.bounds(50))
    noise = torch.Generator().manual_seed(1)
    valid_noise = torch.randn(len(data.valid), generator=noise)

    def step(batch: OfflineBatch, loop: TrainLoop) -> torch.Tensor:
        with torch.no_grad():
            module.w.fill_(schedule[loop.step // steps_per_epoch])
        return torch.tensor(1.0 / (1 + loop.step))

    def predict(batch: OfflineBatch) -> torch.Tensor:
        return torch.sigmoid(module.w * (2 * batch.label - 1) + valid_noise[: len(batch)])

    loop = TrainLoop(OfflineConfig(batch_size=50, epochs=6, patience=2, eval_batch_size=1000), data)
    result = loop.fit("fit", step, predict, module)
    assert result.best_epoch == 2 and result.best_step == 2 * steps_per_epoch and result.stopped_early
    assert result.epochs_run == 4 and result.evaluations == 4 and result.samples == 4 * 200
    assert float(module.w.detach()) == 3.0  # restored, not the last epoch's 0.4
    aucs = [r["value"] for r in loop.history if r["metric"] == "auc"]
    assert aucs[1] == max(aucs) and len(aucs) == 4
    assert {r["metric"] for r in loop.history if r["split"] == "valid"} == {"accuracy", "mse", "logloss", "auc", "gauc"}
    losses = [r["value"] for r in loop.history if r["metric"] == "loss"]
    assert losses[0] == pytest.approx(sum(1.0 / (1 + s) for s in range(4)) / 4)


def test_evaluation_every_k_steps() -> None:
    data = toy_data()
    module = Scheduled()
    loop = TrainLoop(OfflineConfig(batch_size=50, epochs=2, patience=10, eval_every=3), data)
    result = loop.fit("search", lambda b, lp: torch.tensor(0.5), lambda b: torch.full((len(b),), 0.5), module)
    epochs = sorted({r["epoch"] for r in loop.history})
    assert epochs == [0.75, 1.5, 2.0] and result.steps == 8 and not result.stopped_early
    assert {r["stage"] for r in loop.history} == {"search"}
    assert result.best_value == 0.5 and result.best_epoch == 0.75  # constant scores: never better than the first


def test_group_auc_matches_per_group_auc() -> None:
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 30, (3000,), generator=g)
    scores = torch.randint(0, 20, (3000,), generator=g).to(torch.float32)  # many ties
    labels = (torch.rand(3000, generator=g) < 0.4).to(torch.float32)
    total = weight = 0.0
    for k in groups.unique():
        mask = groups == k
        value = float(auc(scores[mask], labels[mask]))
        if not math.isnan(value):
            total += value * int(mask.sum())
            weight += int(mask.sum())
    assert float(group_auc(scores, labels, groups)) == pytest.approx(total / weight, abs=1e-12)
    assert math.isnan(float(group_auc(scores, torch.ones(3000), groups)))


# ---------------------------------------------------------------- FIXED offline, end to end in process

def _synthetic_run(tmp_path: Path, model: str, **runner: object) -> tuple[dict, object]:
    cfg = compose(["data=synthetic-criteo", f"model={model}", f"paths.root={tmp_path}",
                   "data.generator.rows=3000", "data.generator.n_fields=6", "data.generator.n_informative=3",
                   "data.generator.n_pairs=1", "data.generator.cardinality_max=20"])
    data_cfg = DatasetConfig.from_mapping(cfg.data)
    prepared = prepare(data_cfg)
    options = OmegaConf.to_container(cfg.runner, resolve=True)
    options.pop("name")
    options.update(epochs=3, **runner)
    torch.manual_seed(0)
    protocol = OfflineProtocol(OfflineConfig(**options))
    data = protocol.load(prepared, BINARY, torch.device("cpu"), data_cfg)
    method = method_class("fixed", "offline")(MethodContext(prepared.schema, BINARY, cfg.method, cfg.model,
                                                            torch.device("cpu"), 0))
    out = protocol.run(method, data)
    return {"out": out, "memory": method.memory(), "architecture": method.architecture()}, prepared.schema


def test_fixed_offline_is_reproducible_and_reports_memory(tmp_path: Path) -> None:
    first, schema = _synthetic_run(tmp_path, "deepfm")
    second, _ = _synthetic_run(tmp_path, "deepfm")
    assert first["out"].headline == second["out"].headline
    assert first["out"].tables["epochs"] == second["out"].tables["epochs"]
    total = sum(f.cardinality for f in schema.fields)
    memory = first["memory"]
    assert memory.embedding_bytes == total * 16 * 4 and memory.embedding_parameters == total * 16
    assert memory.embedding_optimizer_bytes == 2 * total * 16 * 4 + 4  # dense Adam: two moments and a step count
    assert memory.dims == {f.name: {"16": f.cardinality} for f in schema.fields}
    assert first["architecture"]["embedding_dim"] == {f.name: 16 for f in schema.fields}
    cost = first["out"].cost
    assert cost["search_seconds"] < 1 and cost["train_seconds"] > 0 and cost["train_samples_per_second"] > 0
    assert {r["split"] for r in first["out"].metrics} == {"test", "valid", "fit"}
    lr, _ = _synthetic_run(tmp_path, "lr")
    assert lr["memory"].embedding_bytes == 0 and lr["memory"].parameters == total + 1
