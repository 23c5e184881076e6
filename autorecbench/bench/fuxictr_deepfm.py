"""FuxiCTR's DeepFM trained on the rows ``bench.ctr`` trains ours on (``python -m autorecbench.bench.ctr --fuxictr``).

FuxiCTR (``pip install "autorecbench[bench]"``: fuxictr 2.3.10) ships its layers and ``BaseModel`` (training
step, optimiser, loss, loaders); its DeepFM lives in the repository's model zoo, not in the wheel, so
:class:`FuxiDeepFM` assembles it from the wheel's layers as the zoo's DeepFM does: ``FeatureEmbedding`` (one
``nn.Embedding`` per field, N(0, 1e-4^2)), ``FactorizationMachine`` (first-order weights + bias + the FM's
product sum), ``MLP_Block`` (Linear -> BatchNorm -> ReLU -> Dropout, then the output layer), a sigmoid and
binary cross-entropy, torch's Adam over every parameter (FuxiCTR's ``adam``).

Same as ours (``train_epoch``): the prepared rows (the same training rows, as codes of 39 categorical fields
with the same vocabularies), embedding size, MLP, batch-norm, dropout, batch size, Adam and learning rate, one
epoch, torch threads. FuxiCTR's own behaviour is kept and listed: its ``train_step`` clips the gradient norm to
10 (``max_gradient_norm``, its default) and reads the loss back (``loss.item()``) at every step, and its
``NpzDataLoader`` (``--fuxictr-workers``, default 1 worker process, its default) collates every batch from rows
of one float64 array. Timed: one pass of FuxiCTR's ``train_epoch`` loop (loader, ``train_step``, the loss read)
without its end-of-epoch evaluation and checkpoint — what ours times as ``train_step_seconds``, which also
includes taking the batches (gathers from the resident splits) — and, separately, the ``train_step`` calls
alone on batches taken from the loader beforehand.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

LABEL = "label"


def _feature_map(names: list[str], cardinalities: list[int], embedding_dim: int, folder: Path) -> Any:
    from fuxictr.features import FeatureMap

    feature_map = FeatureMap("autorecbench-bench", str(folder))
    feature_map.features = OrderedDict((name, {"type": "categorical", "source": "", "vocab_size": int(card)})
                                       for name, card in zip(names, cardinalities))
    feature_map.labels = [LABEL]
    feature_map.num_fields = len(names)
    feature_map.total_features = int(sum(cardinalities))
    feature_map.default_emb_dim = embedding_dim
    feature_map.set_column_index()
    return feature_map


def _model_class() -> type:
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class FuxiDeepFM(BaseModel):  # type: ignore[misc,valid-type]
        """DeepFM from FuxiCTR's layers: sigmoid(FM(X, E) + MLP(flatten(E)))."""

        def __init__(self, feature_map: Any, embedding_dim: int, hidden: list[int], dropout: float,
                     batch_norm: bool, learning_rate: float, gpu: int, model_root: str) -> None:
            super().__init__(feature_map, model_id="DeepFM", gpu=gpu, verbose=0, model_root=model_root,
                             metrics=["AUC", "logloss"], reduce_lr_on_plateau=False)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1, hidden_units=hidden,
                                 hidden_activations="ReLU", output_activation=None, dropout_rates=dropout,
                                 batch_norm=batch_norm)
            self.compile("adam", "binary_crossentropy", learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            x = self.get_inputs(inputs)
            emb = self.embedding_layer(x)
            return {"y_pred": self.output_activation(self.fm(x, emb) + self.mlp(emb.flatten(start_dim=1)))}

    return FuxiDeepFM


def _write_npz(path: Path, names: list[str], x: torch.Tensor, label: torch.Tensor) -> str:
    columns = {name: x[:, j].cpu().numpy() for j, name in enumerate(names)}
    np.savez(path, **columns, **{LABEL: label.cpu().numpy().astype(np.float32)})
    return str(path)


def train_fuxictr(data: Any, model_cfg: Any, batch_size: int, learning_rate: float, device: torch.device,
                  folder: Path, workers: int) -> dict[str, Any]:
    """FuxiCTR's DeepFM for one epoch over ``data.train`` (our ``OfflineData``) with ``model_cfg``'s sizes;
    samples/s of its training loop and (over a second epoch) of its steps alone, and its test AUC after the first."""
    from fuxictr.pytorch.dataloaders.npz_dataloader import NpzDataLoader

    from autorecbench import envinfo

    names = [f.name for f in data.fields]
    cardinalities = [f.cardinality for f in data.fields]
    dim, hidden = int(model_cfg.embedding_dim), [int(h) for h in model_cfg.hidden]
    feature_map = _feature_map(names, cardinalities, dim, folder)
    train_path = _write_npz(folder / "train.npz", names, data.train.x, data.train.label)
    test_path = _write_npz(folder / "test.npz", names, data.test.x, data.test.label)
    torch.manual_seed(0)
    model = _model_class()(feature_map, dim, hidden, float(model_cfg.dropout), bool(model_cfg.batch_norm),
                           learning_rate, 0 if device.type == "cuda" else -1, str(folder / "models"))
    model._max_gradient_norm = 10.0  # what fit() sets before its epochs (FuxiCTR's default)
    train = NpzDataLoader(feature_map, train_path, batch_size=batch_size, shuffle=True, num_workers=workers)
    model.train()
    started = time.perf_counter()
    for batch in train:  # train_epoch's loop without the evaluation at the epoch's end
        model.train_step(batch).item()
    epoch_seconds = time.perf_counter() - started
    test = NpzDataLoader(feature_map, test_path, batch_size=50_000, shuffle=False, num_workers=0)
    metrics = model.evaluate(test)
    # Then a second epoch, its batches taken from the loader first: the steps alone.
    batches = list(train)
    model.train()
    started = time.perf_counter()
    for batch in batches:
        model.train_step(batch).item()
    steps_seconds = time.perf_counter() - started
    rows = len(data.train)
    return {
        "stage": "fuxictr",
        "train_rows": rows,
        "samples_per_second": rows / epoch_seconds,
        "steps_samples_per_second": rows / steps_seconds,
        "loader_workers": workers,
        "device": str(device),
        "test_auc": float(metrics["AUC"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_rss_bytes": envinfo.peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }
