"""AutoDim: the search embedding (candidates unified by per-field maps, batch-norm and tanh, Gumbel selection,
both variants), the re-trained mixed-size embedding and its bytes, and the planted truth: pure-noise fields end
with smaller sizes than informative fields, measured as a statistic over seeds against the null's.

The planted file (``autorecbench/validate/autodim.py``): 10 fields, 5 informative, every pair of informative
fields interacting through rank-16 factors (so an informative field needs a large size), 5 pure-noise fields.
A useless field's α only moves once its large candidates over-fit the training rows and lose on validation, so
the search runs 40 epochs without early stopping and α moves with Adam at 0.01 (the default 1e-3 is meant for
the paper's millions of steps).

The separation was once checked per seed as ``max(noise) < min(informative)``: a coin flip that thread counts
decided (on a fresh 2-core machine seed 1 of the shared variant gave noise [2, 2, 2, 8, 2] and informative
[32, 64, 32, 8, 64]: 8 < 8 fails, though 24 of the 25 field pairs are ordered and one is tied). The check is now the share of
ordered pairs over three seeds, with a margin of 0.3 over the null's."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from autorecbench.config import compose, validate
from autorecbench.errors import UserError
from autorecbench.methods.autodim import AutoDim, MixedDimEmbedding, SearchEmbedding
from autorecbench.validate.autodim import AutoDimValidation
from conftest import one_line_error, read_run, run_cli, run_folders
from offline_helpers import run

TINY = ["data=synthetic-criteo", "method=autodim", "data.generator.rows=3000", "data.generator.n_fields=5",
        "data.generator.n_informative=3", "data.generator.n_pairs=1", "data.generator.cardinality_max=20",
        "runner.batch_size=300", "runner.epochs=2"]
CANDIDATES = [2, 4, 8, 16, 32, 64]


def _embedding(shared: bool, noise: str = "example", squash: bool = False) -> SearchEmbedding:
    torch.manual_seed(0)
    return SearchEmbedding([5, 7, 3], CANDIDATES, 64, init_std=0.1, shared=shared, sparse=False, affine=True,
                           scale_init=1.0, noise=noise, squash=squash)


def _x(n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in (5, 7, 3)], 1).to(torch.int32)


# ---------------------------------------------------------------- the layers

@pytest.mark.parametrize("shared", [False, True])
def test_search_embedding_unifies_and_selects_one_candidate(shared: bool) -> None:
    emb = _embedding(shared)
    assert [t.weight.shape[1] for t in emb.tables] == ([64] if shared else CANDIDATES)
    assert emb.norms[0].num_features == 3 * 64 and emb.arch.shape == (3, 6)
    x = _x()
    emb.train()
    candidates = torch.stack(emb.candidate_outputs(x), dim=2)  # [B, F, A, U]; normalised per (field, unit)
    assert candidates.shape == (32, 3, 6, 64) and candidates.mean(0).abs().max() < 1e-5
    out = emb(x)
    matches = (out[:, :, None, :] - candidates).abs().amax(-1) < 1e-5  # [B, F, A]: which candidate came out
    assert (matches.sum(-1) == 1).all()  # hard: exactly one candidate per example and field
    assert len(matches.float().argmax(-1).unique()) > 1  # and per example (gumbel_noise=example)
    emb.eval()
    with torch.no_grad():
        emb.arch[:, 3] = 5.0
    evaluated = emb(x)
    expected = torch.stack(emb.candidate_outputs(x), dim=2)[:, :, 3]
    assert torch.allclose(evaluated, expected) and emb.derive() == [16, 16, 16]  # argmax α when evaluating


def test_gradients_reach_every_alpha_and_weight_sharing_uses_the_first_columns() -> None:
    emb = _embedding(shared=True, noise="batch")
    emb.train()
    emb(_x()).pow(2).sum().backward()
    assert (emb.arch.grad != 0).all()  # straight-through: every α_fa gets a gradient
    emb.zero_grad()
    emb.eval()
    with torch.no_grad():
        emb.arch[:, 1] = 9.0  # every field picks size 4
    emb(_x()).pow(2).sum().backward()
    touched = emb.tables[0].weight.grad.abs().sum(0) > 0
    assert touched[:4].all() and not touched[4:].any()


def test_mixed_dim_embedding_holds_one_table_per_size() -> None:
    torch.manual_seed(0)
    cards, dims = [5, 7, 3, 4], [8, 2, 8, 64]
    emb = MixedDimEmbedding(cards, dims, 64, init_std=0.1, sparse=False, batch_norm=True, affine=True, scale_init=1e-4)
    assert {g.table.weight.shape for g in emb.groups} == {(7, 2), (5 + 3, 8), (4, 64)} and emb.field_dims == dims
    x = torch.stack([torch.randint(0, c, (16,)) for c in cards], 1).to(torch.int32)
    assert emb(x).shape == (16, 4, 64) and float(emb.norm.weight[0].detach()) == pytest.approx(1e-4)
    plain = MixedDimEmbedding(cards, dims, 64, init_std=0.1, sparse=False, batch_norm=False, affine=True, scale_init=1,
                              squash=False)
    out = plain(x)
    for field in range(4):  # each field: its own table row through its own map, in field order
        group = next(g for g in plain.groups if field in g.fields.tolist())
        k = group.fields.tolist().index(field)
        row = group.table.weight[group.offsets[k] + x[:, field]]
        assert torch.allclose(out[:, field], row @ group.weight[k] + group.bias[k], atol=1e-6)


def test_tanh_follows_the_batch_norm_when_switched_on() -> None:
    """``unified_activation: tanh`` (the default): tanh(BN(W e + b)) in the search and the re-train; ``none``: BN
    only. The same weights give exactly tanh of the other's output."""
    x = _x()
    squashed, plain = _embedding(False, squash=True), _embedding(False, squash=False)
    squashed.train(), plain.train()
    for a, b in zip(squashed.candidate_outputs(x), plain.candidate_outputs(x)):
        assert torch.allclose(a, torch.tanh(b), atol=1e-6) and a.abs().max() < 1
    torch.manual_seed(0)
    cards, dims = [5, 7, 3], [8, 2, 8]
    on = MixedDimEmbedding(cards, dims, 64, 0.1, False, batch_norm=True, affine=True, scale_init=1.0, squash=True)
    torch.manual_seed(0)
    off = MixedDimEmbedding(cards, dims, 64, 0.1, False, batch_norm=True, affine=True, scale_init=1.0, squash=False)
    assert torch.allclose(on(x), torch.tanh(off(x)), atol=1e-6)
    cfg = compose(TINY)
    assert cfg.method.unified_activation == "tanh"
    with pytest.raises(UserError, match="unified_activation"):
        validate(compose([*TINY, "method.unified_activation=relu"]))


# ---------------------------------------------------------------- end to end

@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_search_then_retrain_records_dims_and_bytes(tmp_path: Path, variant: str) -> None:
    s, out = run(tmp_path, [*TINY, f"method.variant={variant}"], active_only=True)
    method = s.method
    assert isinstance(method, AutoDim)
    arch = method.architecture()
    fields = [f.name for f in s.prepared.schema.fields]
    assert set(arch["chosen_dim"]) == set(fields) and set(arch["chosen_dim"].values()) <= set(CANDIDATES)
    for name, alpha in arch["alpha"].items():
        assert len(alpha) == 6 and sum(alpha) == pytest.approx(1) and CANDIDATES[alpha.index(max(alpha))] == arch["chosen_dim"][name]
    cards = {f.name: f.cardinality for f in s.prepared.schema.fields}
    memory = method.memory()
    assert memory.embedding_bytes == arch["embedding_bytes"] == sum(cards[f] * d * 4 for f, d in arch["chosen_dim"].items())
    assert memory.dims == {f: {str(arch["chosen_dim"][f]): cards[f]} for f in fields}
    assert arch["fixed_bytes_unified_dim"] == sum(cards.values()) * 64 * 4
    assert arch["fixed_bytes_model_dim"] == sum(cards.values()) * 16 * 4
    assert out.cost["search_seconds"] > 0 and 0 <= out.headline["auc"] <= 1 and out.info["offline"]["fit"]["steps"] > 0
    assert [f["stage"] for f in out.info["offline"]["search"]["fits"]] == ["search"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["separate", "shared"])
def test_noise_fields_get_smaller_sizes_over_three_seeds(tmp_path: Path, variant: str) -> None:
    """A statistic over seeds with a stated margin, not a strict inequality per seed (which thread counts flipped:
    a noise field and an informative field both at 8 failed ``max(noise) < min(informative)``): the share of
    (informative, noise) field pairs in which the informative field got the larger size (ties 1/2), averaged over
    3 seeds, must reach 0.8 (a uniformly random choice does so with probability 0.2%) and clear the null's
    (measured on the same seeds) by 0.3, and the re-trained tables must hold fewer bytes than FIXED at the unified
    size on average. Through the validation's own ``measure`` (``autorecbench/validate/autodim.py``: the planted
    file, 40 search epochs)."""
    validation = AutoDimValidation(method_overrides=[f"method.variant={variant}"])
    method, null = [], []
    for seed in (0, 1, 2):
        found = {s.name: s.value for s in validation.measure("planted", "method", seed, False, tmp_path)}
        chance = {s.name: s.value for s in validation.measure("planted", "null", seed, False, tmp_path)}
        print(f"{variant}, seed {seed}: share {found['noise_smaller_share']:.2f} (null {chance['noise_smaller_share']:.2f}), "
              f"bytes / FIXED@64 {found['bytes_vs_fixed']:.2f}, AUC - FIXED@64 {found['auc_minus_fixed']:+.4f}")
        method.append(found)
        null.append(chance)
    share = sum(m["noise_smaller_share"] for m in method) / 3
    null_share = sum(n["noise_smaller_share"] for n in null) / 3
    assert share >= null_share + 0.3 and share >= 0.8
    assert sum(m["bytes_vs_fixed"] for m in method) / 3 < 1


# ---------------------------------------------------------------- CLI

def test_autodim_cli_run_and_bad_options(home: Path) -> None:
    run_cli("run", *TINY, "-q", home=home, check=True)
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["offline"]["searched"] and len(info["searched_architecture"]["chosen_dim"]) == 39
    dims = pl.read_parquet(folder / "dims.parquet")
    assert dims.height == 39 * 6 and dims.filter(pl.col("chosen")).height == 39
    line = one_line_error(run_cli("run", *TINY, "method.variant=tied", home=home))
    assert "method.variant must be one of separate, shared" in line
    for bad, fragment in ((["method.candidates=[8]"], "at least two distinct sizes"),
                          (["method.gumbel_noise=never"], "gumbel_noise")):
        with pytest.raises(UserError, match=fragment):
            validate(compose([*TINY, *bad]))
