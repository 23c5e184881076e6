"""AutoFIS: the gate (Eq. 26) and its re-train form (Eq. 28), GRDA on α and Adam on the rest in one step, and
the planted truth: the kept pairs recover the generator's planted interactions, and a file without
interactions keeps (almost) none.

The planted files are small, so GRDA's threshold c·γ^(1/2+μ)·n^μ is scaled to the step count: the official
c = 0.005 reaches a threshold of ≈ 1.8 after one pass over Criteo (≈ 18,000 steps of 2,000 rows); c = 0.04
reaches ≈ 2.2 after the 800 steps here (5 passes over 80,000 rows in batches of 500)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from autorecbench.config import compose, validate
from autorecbench.errors import UserError
from autorecbench.train.grda import GRDA
from autorecbench.methods.autofis import AutoFIS, PairGate
from autorecbench.models.backbones import FM
from autorecbench.train.optim import SplitAdam
from conftest import one_line_error, read_run, run_cli, run_folders
from offline_helpers import run, setup

# The planted file: 20 fields (8 informative), 6 planted pairs among the informative ones.
PLANTED = ["data=synthetic-criteo", "method=autofis", "model=fm", "data.generator.rows=100000",
           "data.generator.n_fields=20", "data.generator.n_informative=8", "data.generator.n_pairs=6",
           "data.generator.cardinality_min=4", "data.generator.cardinality_max=20", "runner.batch_size=500",
           "method.search_epochs=5", "method.grda_c=0.04", "runner.epochs=2"]
NO_INTERACTION = [*PLANTED, "data.generator.pair_strength=0"]
NO_SIGNAL = [*NO_INTERACTION, "data.generator.linear_std=0"]


@dataclass
class Recovery:
    planted: set[tuple[str, str]]
    kept: set[tuple[str, str]]
    informative: set[str]
    searched: dict[str, Any]
    auc: float  # test AUC after re-training

    @property
    def hits(self) -> int:
        return len(self.planted & self.kept)


def recovery(root: Path, overrides: list[str], seed: int) -> Recovery:
    s, out = run(root, [*overrides, f"data.generator.seed={seed}"], seed=seed, active_only=True)
    method = s.method
    assert isinstance(method, AutoFIS) and s.truth is not None
    return Recovery({tuple(p) for p in s.truth["planted_pairs"]}, {tuple(p) for p in method.searched["kept_pairs"]},
                    set(s.truth["informative_fields"]), method.searched, out.headline["auc"])


# ---------------------------------------------------------------- the gate and the optimisers

def test_pair_gate_is_batch_norm_without_affine_times_alpha() -> None:
    torch.manual_seed(0)
    products = 3 + 2 * torch.randn(64, 6)
    alpha = torch.tensor([0.6, 0.0, 1.5, -0.2, 0.6, 0.0])
    gate = PairGate(alpha, trainable=True)
    assert gate.bn.weight is None and gate.bn.bias is None and isinstance(gate.alpha, torch.nn.Parameter)
    normed = (products - products.mean(0)) / torch.sqrt(products.var(0, unbiased=False) + gate.bn.eps)
    assert torch.allclose(gate(products), normed * alpha, atol=1e-5)
    fixed = PairGate(alpha, trainable=False, mask=alpha != 0)
    assert "alpha" in dict(fixed.named_buffers()) and not list(fixed.parameters())  # Eq. 28: α* fixed
    assert torch.equal(fixed.mask, torch.tensor([1.0, 0, 1, 1, 1, 0]))


def test_search_steps_alpha_with_grda_and_the_rest_with_adam(tmp_path: Path) -> None:
    tiny = ["data=synthetic-criteo", "method=autofis", "model=deepfm", "data.generator.rows=3000",
            "data.generator.n_fields=5", "data.generator.n_informative=3", "data.generator.n_pairs=1",
            "data.generator.cardinality_max=10", "runner.batch_size=300", "method.search_epochs=1",
            "runner.epochs=1", "method.grda_c=0.2", "method.hidden=[32]"]
    s = setup(tmp_path, tiny, active_only=True)
    method = s.method
    assert isinstance(method, AutoFIS) and (method.grda_c, method.grda_mu) == (0.2, 0.8)  # μ: DeepFM's default
    grdas: list[GRDA] = []
    original = GRDA.__init__

    def spy(self: GRDA, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        grdas.append(self)

    GRDA.__init__ = spy  # type: ignore[method-assign]
    try:
        searched = method.search(s.loop())
    finally:
        GRDA.__init__ = original  # type: ignore[method-assign]
    (grda,) = grdas
    (alpha,) = grda.param_groups[0]["params"]
    assert alpha.shape == (10,) and grda.state[alpha]["step"] == 8  # 2400 rows / 300: one GRDA step per batch
    assert torch.equal(alpha.detach(), torch.tensor(searched["alpha"]))
    dual, t = grda.state[alpha]["dual"], GRDA.threshold(8, 1.0, 0.2, 0.8)
    assert torch.allclose(alpha.detach(), torch.sign(dual) * (dual.abs() - t).clamp_min(0))
    assert searched["n_kept"] == int((alpha != 0).sum()) < 10  # GRDA zeroed some gates exactly

    method.build(searched)  # Eq. 28: a fresh model, α* fixed, removed pairs masked
    model = method.module()
    assert isinstance(model, FM) and isinstance(model.fm.gate, PairGate)
    assert torch.equal(model.fm.gate.mask, (alpha.detach() != 0).float())
    assert all(p is not model.fm.gate.alpha for p in model.parameters())
    assert [len(layer.weight) for layer in model.mlp.net if isinstance(layer, torch.nn.Linear)] == [32]


def test_mlp_layers_are_the_codes_and_the_learning_rate_decays_per_fifth(tmp_path: Path) -> None:
    """``batch_norm_affine: false`` (the default): every MLP layer is ``BN(W h) + b`` with a batch-norm without
    scale or shift and the bias after it, as the official code's; ``lr_decay`` multiplies Adam's learning rate
    after every ``1/lr_decay_parts`` of a pass, in the search and in the re-train."""
    tiny = ["data=synthetic-criteo", "method=autofis", "model=deepfm", "data.generator.rows=3000",
            "data.generator.n_fields=5", "data.generator.n_informative=3", "data.generator.n_pairs=1",
            "data.generator.cardinality_max=10", "runner.batch_size=300", "method.search_epochs=1",
            "runner.epochs=1", "method.hidden=[32,16]", "method.lr_decay=0.5", "method.lr_decay_parts=2"]
    s = setup(tmp_path, tiny, active_only=True)
    method = s.method
    assert isinstance(method, AutoFIS)
    factors: list[float] = []
    original = SplitAdam.scale_lr

    def spy(self: SplitAdam, factor: float) -> None:
        factors.append(factor)
        original(self, factor)

    SplitAdam.scale_lr = spy  # type: ignore[method-assign]
    try:
        out = s.run()
    finally:
        SplitAdam.scale_lr = original  # type: ignore[method-assign]
    assert out.info["offline"]["fit"]["steps"] == 8 and factors == [0.5, 0.5]  # step 4 of 8, in both stages
    assert all(g["lr"] == pytest.approx(5e-4) for o in method.optimizer.optimizers for g in o.param_groups)
    layers = list(method.module().mlp.net)
    assert [type(m).__name__ for m in layers[:4]] == ["Linear", "BatchNorm1d", "AddBias", "ReLU"]
    linear, norm, bias = layers[:3]
    assert linear.bias is None and norm.weight is None and norm.bias is None
    h = torch.randn(64, linear.in_features)
    norm.train()
    z = h @ linear.weight.T
    expected = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + norm.eps) + bias.bias
    assert torch.allclose(bias(norm(linear(h))), expected, atol=1e-5)
    plain = setup(tmp_path, [*tiny, "method.batch_norm_affine=true"], active_only=True).method
    plain.build({"alpha": [0.6] * 10})
    assert [type(m).__name__ for m in list(plain.module().mlp.net)[:3]] == ["Linear", "BatchNorm1d", "ReLU"]


def test_defaults_follow_the_official_code() -> None:
    cfg = compose(["data=synthetic-criteo", "method=autofis", "model=deepfm"])
    assert cfg.method.alpha_init == 0.6 and cfg.method.alpha_init_range == 0.001 and cfg.method.grda_lr == 1.0
    assert cfg.method.batch_norm_affine is False and cfg.method.lr_decay == 1.0 and cfg.method.retrain_alpha == "fixed"
    assert list(cfg.method.hidden) == [700] * 5 and cfg.runner.batch_size == 2000
    for bad, fragment in ((["model=dnn"], "model=fm or model=deepfm"), (["method.retrain_alpha=maybe"], "retrain_alpha"),
                          (["method.grda_c=-1"], "grda_c"), (["method.lr_decay=0"], "lr_decay")):
        with pytest.raises(UserError, match=fragment):
            validate(compose(["data=synthetic-criteo", "method=autofis", *bad]))


# ---------------------------------------------------------------- planted truth

def _check_planted(r: Recovery) -> None:
    print(f"recall {r.hits}/{len(r.planted)}, precision {r.hits}/{len(r.kept)}, test AUC {r.auc:.4f}")
    assert r.hits / len(r.planted) >= 0.8 and r.hits / len(r.kept) >= 0.5, (r.planted, r.kept)


def test_recovers_planted_pairs_one_seed(tmp_path: Path) -> None:
    r = recovery(tmp_path, PLANTED, seed=0)
    _check_planted(r)
    assert r.searched["n_pairs"] == 190 and r.searched["sparsity"] > 0.9
    assert r.auc > 0.85 and r.searched["search_valid_auc"] > 0.85


def test_no_signal_file_keeps_no_pairs(tmp_path: Path) -> None:
    r = recovery(tmp_path, [*NO_SIGNAL, "method.search_epochs=2"], seed=0)
    assert len(r.kept) <= 2 and abs(r.auc - 0.5) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_pairs_over_three_seeds(tmp_path: Path, seed: int) -> None:
    _check_planted(recovery(tmp_path, PLANTED, seed=seed))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_interaction_file_keeps_few_weak_pairs(tmp_path: Path, seed: int) -> None:
    """Without any signal no gate survives. With first-order effects but no interactions a minority of gates
    survive, all weak and each touching an informative field: an FM pair can carry one field's first-order
    effect (<(a_i, 1), (1, b_j)> = a_i + b_j) until the first-order weights take it over; GRDA's growing
    threshold removes them with more steps (7-15 of 190 left after 1,600 steps). The planted pairs' gates on
    the same generator are far stronger, so a threshold on |α| separates the two."""
    none = recovery(tmp_path, NO_SIGNAL, seed=seed)
    r = recovery(tmp_path, NO_INTERACTION, seed=seed)
    planted = recovery(tmp_path, PLANTED, seed=seed)
    alpha = dict(zip(map(tuple, planted.searched["pairs"]), planted.searched["alpha"]))
    weakest_planted = min(abs(alpha[p]) for p in planted.planted & planted.kept)
    strongest = max((abs(a) for a in r.searched["alpha"]), default=0.0)
    print(f"no signal: {len(none.kept)} of 190 kept; no interaction: {len(r.kept)} of 190 kept, max |α| "
          f"{strongest:.3f}; weakest recovered planted gate {weakest_planted:.3f}")
    assert len(none.kept) <= 2
    assert len(r.kept) <= 0.25 * 190 and all(a in r.informative or b in r.informative for a, b in r.kept)
    assert strongest < 0.3 < weakest_planted


@pytest.mark.slow
def test_deepfm_search_recovers_planted_pairs(tmp_path: Path) -> None:
    """DeepFM with a smaller MLP than the official 5 x 700 (CPU time), c scaled as above from 5e-4."""
    _check_planted(recovery(tmp_path, [*PLANTED, "model=deepfm", "method.grda_c=0.006", "method.hidden=[256,256]"],
                            seed=0))


# ---------------------------------------------------------------- CLI

def test_autofis_cli_run_records_pairs_and_exit_2_on_bad_model(home: Path) -> None:
    small = ["data.generator.rows=4000", "data.generator.n_fields=6", "data.generator.n_informative=3",
             "data.generator.n_pairs=1", "data.generator.cardinality_max=10", "runner.epochs=1",
             "runner.batch_size=500", "method.grda_c=0.1"]
    run_cli("run", "data=synthetic-criteo", "method=autofis", "model=fm", *small, "-q", home=home, check=True)
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["offline"]["searched"] and info["searched_architecture"]["n_pairs"] == 741  # all 39 raw fields
    pairs = pl.read_parquet(folder / "pairs.parquet")
    assert pairs.height == 741 and pairs["kept"].sum() == info["searched_architecture"]["n_kept"]
    search = pl.read_parquet(folder / "search.parquet")
    assert set(search["split"]) == {"valid", "test"} and "auc" in set(search["metric"])
    line = one_line_error(run_cli("run", "data=synthetic-criteo", "method=autofis", "model=ipnn", home=home))
    assert "AutoFIS searches on model=fm or model=deepfm" in line
