"""Behaviour sequences in the offline pipeline: Dice, masked pooling and DIN's local activation unit against
brute force, the backbones' use of the histories, sequence batches, method compatibility, the CLI end to end
on synthetic Alimama data, and (slow) the planted truth: DIN should beat the sum-pooling DNN only when the click
signal lives in the sequence."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from autorecbench.data.offline import SplitData
from autorecbench.data.schema import FieldSpec, TaskSpec
from autorecbench.errors import UserError
from autorecbench.models.backbones import build_backbone
from autorecbench.models.layers import ACTIVATIONS, Dice, LocalActivationUnit, masked_sum, sequence_mask
from conftest import one_line_error, read_run, run_cli, run_folders
from offline_helpers import run, setup

FIELDS = [FieldSpec("user", 7), FieldSpec("cate_id", 9), FieldSpec("brand", 6)]
SEQUENCES = [FieldSpec("hist_cate", 9, "sequence", "cate_id", 5), FieldSpec("hist_brand", 6, "sequence", "brand", 5)]
MODEL = {"embedding_dim": 3, "hidden": [8], "batch_norm": False, "dropout": 0.0, "activation": "relu",
         "embedding_init_std": 0.5}
# A small synthetic Alimama file: 300 users, 4,000 samples, T = 10.
SMALL = ["data=synthetic-alimama", "data.generator.users=300", "data.generator.ads=120",
         "data.generator.samples=4000", "data.generator.events_max=20", "data.max_seq_len=10", "runner.epochs=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's in-process runs: the small file is generated and prepared once."""
    return tmp_path_factory.mktemp("alimama")


def batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in FIELDS], 1).to(torch.int32)
    lengths = torch.tensor([5, 3, 0, 1, 5, 2][:n], dtype=torch.int32)
    seq = {s.name: torch.randint(1, s.cardinality, (n, 5), generator=g).to(torch.int32) for s in SEQUENCES}
    mask = sequence_mask(lengths, 5)
    seq = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in seq.items()}  # post-padded with 0
    return x, seq, lengths


def backbone(name: str, **model: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": name, **MODEL, **model})
    return build_backbone(name, FIELDS, TaskSpec.from_name("binary"), cfg, sequences=SEQUENCES)


# ---------------------------------------------------------------- layers against brute force

def test_dice_is_the_formula_with_batch_then_running_statistics() -> None:
    torch.manual_seed(0)
    dice = Dice(4)
    nn.init.uniform_(dice.alpha, -0.5, 0.5)
    s = 2 + 3 * torch.randn(50, 6, 4)  # [B, T, C]: statistics over B and T per channel
    flat = s.reshape(-1, 4)
    p = torch.sigmoid((s - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-8))
    assert torch.allclose(dice(s), p * s + (1 - p) * dice.alpha * s, atol=1e-5)
    dice.eval()
    mean, var = dice.norm.running_mean, dice.norm.running_var
    p = torch.sigmoid((s - mean) / torch.sqrt(var + 1e-8))
    assert torch.allclose(dice(s), p * s + (1 - p) * dice.alpha * s, atol=1e-5)
    assert isinstance(ACTIVATIONS["prelu"](4), nn.PReLU) and ACTIVATIONS["prelu"](4).weight.shape == (4,)
    assert isinstance(ACTIVATIONS["dice"](4), Dice) and isinstance(ACTIVATIONS["relu"](4), nn.ReLU)


def test_masked_sum_and_sequence_mask() -> None:
    items = torch.randn(4, 5, 3)
    lengths = torch.tensor([0, 5, 2, 1])
    expected = torch.stack([items[i, : int(n)].sum(0) for i, n in enumerate(lengths)])
    assert torch.allclose(masked_sum(items, lengths), expected, atol=1e-6)
    assert sequence_mask(lengths, 5).sum(1).tolist() == [0, 5, 2, 1]


def test_embed_with_is_forward_and_embed_field_in_one_lookup() -> None:
    model = backbone("dnn")
    x, seq, _ = batch()
    lookups = [(1, seq["hist_cate"]), (2, seq["hist_brand"])]
    e, items = model.embedding.embed_with(x, lookups)
    assert torch.equal(e, model.embedding(x))
    for (j, codes), got in zip(lookups, items):
        assert torch.equal(got, model.embedding.embed_field(j, codes))
    assert not torch.equal(items[0], items[1])  # each sequence reads its own field's rows


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_local_activation_unit_is_the_mlp_over_the_concatenation(activation: str) -> None:
    torch.manual_seed(0)
    unit = LocalActivationUnit(6, (16, 4), activation)
    unit.eval()  # Dice with running statistics: each position on its own, as the brute force below
    items, target, lengths = torch.randn(3, 5, 6), torch.randn(3, 6), torch.tensor([5, 2, 0])
    weights = unit(items, target, lengths)
    for b in range(3):
        for t in range(5):
            z = torch.cat([items[b, t], target[b], items[b, t] - target[b], items[b, t] * target[b]])[None]
            expected = unit.out(unit.mlp(unit.first_activation(unit.first(z))))[0, 0] if t < lengths[b] else 0.0
            assert math.isclose(float(weights[b, t].detach()), float(torch.as_tensor(expected).detach()), abs_tol=1e-5)
    pooled = unit.pool(items, target, lengths)
    assert torch.allclose(pooled, (weights[..., None] * items).sum(1), atol=1e-6)
    assert torch.equal(pooled[2], torch.zeros(6))  # an empty history: no interest


# ---------------------------------------------------------------- backbones with sequences

def test_pooling_backbones_append_the_masked_history_sums() -> None:
    model = backbone("dnn")
    x, seq, lengths = batch()
    stack = model.field_stack(x, seq, lengths)
    e = model.embedding(x)
    table = model.embedding.table.weight
    offsets = model.embedding.offsets
    for i, (s, field) in enumerate(((("hist_cate"), 1), ("hist_brand", 2))):
        rows = table[(seq[s] + offsets[field]).long()]
        expected = torch.stack([rows[b, : int(lengths[b])].sum(0) for b in range(len(x))])
        assert torch.allclose(stack[:, 3 + i], expected, atol=1e-6)
    assert torch.equal(stack[:, :3], e) and model.mlp.net[0].in_features == 5 * 3
    for name in ("wide_deep", "deepfm"):
        assert backbone(name).n_stacked == 5
    for name in ("lr", "fm", "ipnn"):  # the categorical fields only
        flat = backbone(name)
        assert flat.sequence_specs == [] and torch.equal(flat(x, seq, lengths), flat(x))


def test_din_attends_with_the_target_and_ignores_padding() -> None:
    model = backbone("din", activation="dice")
    model.eval()
    x, seq, lengths = batch()
    out = model(x, seq, lengths)
    assert out.shape == (6, 1) and model.attention.first.in_features == 4 * 2 * 3  # [h, t, h-t, h*t], h = 2 fields
    noisy = {k: torch.where(sequence_mask(lengths, 5), v, torch.full_like(v, 3)) for k, v in seq.items()}
    assert torch.allclose(model(x, noisy, lengths), out, atol=1e-6)  # padding codes do not matter
    # the interest is the weighted sum of the behaviours [E_cate[hist_cate_t], E_brand[hist_brand_t]]
    items = torch.cat([model.embedding.embed_field(j, seq[n]) for j, n in ((1, "hist_cate"), (2, "hist_brand"))], -1)
    target = model.embedding(x)[:, [1, 2]].flatten(1)
    manual = model.head(model.mlp(torch.cat([model.embedding(x).flatten(1),
                                             model.attention.pool(items, target, lengths)], 1)))
    assert torch.allclose(manual, out, atol=1e-6)
    model.train()
    model(x, seq, lengths).sum().backward()
    grad = model.embedding.table.weight.grad
    history_only = int(seq["hist_cate"][0, 0]) + int(model.embedding.offsets[1])
    assert grad is not None and grad[history_only].abs().sum() > 0  # history items train the shared table


def test_din_needs_sequences_and_search_methods_refuse_pooling_backbones(root: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs behaviour sequences"):
        build_backbone("din", FIELDS, TaskSpec.from_name("binary"), OmegaConf.create({"name": "din", **MODEL}))
    with pytest.raises(UserError, match="model=din needs behaviour sequences"):
        setup(tmp_path, ["data=synthetic-criteo", "model=din", "data.generator.rows=500"])
    with pytest.raises(UserError, match="method autofis does not handle behaviour sequences"):
        setup(root, [*SMALL, "model=deepfm", "method=autofis"])
    with pytest.raises(UserError, match="method autodim does not handle behaviour sequences"):
        setup(root, [*SMALL, "model=dnn", "method=autodim"])
    s = setup(root, [*SMALL, "model=fm", "method=autofis"])  # FM ignores the sequences
    assert s.data.train.seq and s.data.train.seq_len is not None


def test_split_batches_carry_the_sequences(root: Path) -> None:
    s = setup(root, SMALL)
    train = s.data.train
    assert set(train.seq) == {"hist_cate", "hist_brand"} and train.seq["hist_cate"].shape == (len(train), 10)
    index = torch.tensor([5, 0, 17])
    rows = train.rows(index)
    assert torch.equal(rows.seq["hist_brand"], train.seq["hist_brand"][index]) and rows.seq_len.tolist() == \
        train.seq_len[index].tolist()
    pinned = SplitData("train", train.x, train.label, torch.device("cpu"), train.seq, train.seq_len)
    assert torch.equal(pinned.rows(index).seq["hist_cate"], rows.seq["hist_cate"])
    assert s.data.split_info["sequences"] == {"hist_cate": {"length": 10, "shares_table_with": "cate_id"},
                                              "hist_brand": {"length": 10, "shares_table_with": "brand"}}


# ---------------------------------------------------------------- end to end

def test_cli_prepares_runs_and_compares_din_on_synthetic_alimama(home: Path) -> None:
    done = run_cli("data", "prepare", "synthetic-alimama", *SMALL[1:-1], home=home, check=True)
    assert "histories hist_cate (shares cate_id), hist_brand (shares brand), T = 10" in done.stdout
    run_cli("run", "-m", "model=din,dnn", *SMALL, "-q", home=home, check=True)
    runs = {read_run(f)["model"]: f for f in run_folders(home)}
    info = read_run(runs["din"])
    assert info["status"] == "complete" and info["data"]["n_fields"] == 16 and info["split"]["sequences"]
    metrics = pl.read_parquet(runs["din"] / "metrics.parquet").filter(pl.col("split") == "test")
    values = dict(zip(metrics["metric"], metrics["value"]))
    assert 0 < values["auc"] < 1 and 0 < values["gauc"] < 1 and values["logloss"] > 0  # one epoch of 3k rows
    table = run_cli("compare", "results", "--format", "csv", home=home, check=True).stdout
    assert "din" in table and "dnn" in table


def test_cli_malformed_alimama_file_is_one_line_exit_2_and_no_cache(home: Path, tmp_path: Path) -> None:
    from test_alimama_data import FILES, write

    raw = tmp_path / "raw"
    lines = list(FILES["behavior_log.csv"])
    lines[3] = "1,1494518420,pv,100,9000,7"
    write(raw, {**FILES, "behavior_log.csv": lines})
    line = one_line_error(run_cli("run", "data=alimama", f"data.path={raw}", home=home))
    assert line == f"error: {raw / 'behavior_log.csv'}:4: expected 5 ','-separated fields, found 6"
    assert not (home / "data" / "processed").exists() or not any((home / "data" / "processed").iterdir())
    assert run_folders(home) == []


def test_same_seed_same_numbers(root: Path) -> None:
    overrides = [*SMALL, "model.activation=dice"]
    first = run(root, overrides)[1]
    second = run(root, overrides)[1]
    assert first.headline == second.headline and first.metrics == second.metrics


def history_reads_interest_auc(root: Path, overrides: list[str]) -> float:
    """AUC, over every cached row, of "how often the target's cate_id code is in hist_cate" for the planted
    "the ad's category is one of the user's interests today" (truth.npz): the signal as the model receives it."""
    import numpy as np

    s = setup(root, overrides)
    source = s.prepared.schema.source
    raw = Path((source.get("files") or [source])[0]["path"]).parent
    samples = pl.read_csv(raw / "raw_sample.csv")
    # the cache keeps raw_sample's file order (one partition), less the samples of users without a profile
    kept = samples["user"].is_in(pl.read_csv(raw / "user_profile.csv")["userid"].implode()).to_numpy()
    match = np.load(raw / "truth.npz")["interest_match"][kept]
    cache = pl.read_parquet(sorted(s.prepared.directory.glob("part-*.parquet")))
    assert cache.height == kept.sum() and (cache["label"].to_numpy() == samples["clk"].to_numpy()[kept]).all()
    history = cache.select(pl.col("^hist_cate_.*$")).to_numpy()
    count = (history == cache["cate_id"].to_numpy()[:, None]).sum(axis=1)
    wins = (count[match][:, None] > count[~match][None, :]).mean()
    ties = (count[match][:, None] == count[~match][None, :]).mean()
    return float(wins + ties / 2)


def test_prepared_histories_carry_the_planted_interest(root: Path) -> None:
    # the diagnosis of the DIN check below: the generator, loader, joint codes and time cut deliver the
    # interest (default file, test rows: target-in-history alone scores click AUC 0.67, the truth 0.73)
    assert history_reads_interest_auc(root, SMALL) > 0.85
    # control: behaviours off the interests (interest_focus=0), the same samples' truth
    assert history_reads_interest_auc(root, [*SMALL, "data.generator.interest_focus=0"]) < 0.6


# ---------------------------------------------------------------- planted truth (slow: 12 runs, 722 s loaded)

SIGNAL = 3.0  # the default interest_strength


@pytest.fixture(scope="module")
def planted_aucs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[float, str], float]:
    """Mean test AUC over seeds 0–2 of DIN and DNN on the default synthetic-alimama file (200k samples, T = 20)
    with the sequence signal (interest_strength 3) and without (0, the control): the README's table."""
    root = tmp_path_factory.mktemp("planted")
    aucs = {(strength, model): [float(run(root, ["data=synthetic-alimama", f"model={model}",
                                                 f"data.generator.interest_strength={strength}"],
                                          seed=seed)[1].headline["auc"]) for seed in range(3)]
            for strength in (SIGNAL, 0.0) for model in ("din", "dnn")}
    print({k: [round(a, 4) for a in v] for k, v in aucs.items()})
    return {k: sum(v) / len(v) for k, v in aucs.items()}


@pytest.mark.slow
def test_without_the_sequence_signal_din_and_dnn_are_within_0_01(planted_aucs: dict[tuple[float, str], float]
                                                                   ) -> None:
    assert abs(planted_aucs[0.0, "din"] - planted_aucs[0.0, "dnn"]) <= 0.01


@pytest.mark.slow
def test_din_beats_the_pooling_dnn_through_the_sequence_signal(planted_aucs: dict[tuple[float, str], float]) -> None:
    # the control file fails this (DIN ≈ DNN there), and so does DNN in DIN's place
    assert planted_aucs[SIGNAL, "din"] >= planted_aucs[SIGNAL, "dnn"] + 0.03
    assert not planted_aucs[0.0, "din"] >= planted_aucs[0.0, "dnn"] + 0.03
