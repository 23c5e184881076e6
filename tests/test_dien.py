"""DIEN (``models/dien.py``): padding changes nothing, the evolving GRUs and the attention against step-by-step
brute force, the auxiliary loss (Eq. 6) against a loop over rows and positions, the hook that adds it to the
training loss, and one tiny run through the CLI on synthetic Alimama data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

from autorecbench.data.offline import OfflineBatch
from autorecbench.data.schema import TaskSpec
from autorecbench.methods.offline_common import training_loss
from autorecbench.models.backbones import logloss
from autorecbench.models.dien import DIEN, AttentionGRU
from conftest import read_run, run_cli, run_folders
from offline_helpers import run
from test_sequence_models import SMALL, backbone, batch

T = 5


def dien(**model: object) -> DIEN:
    m = backbone("dien", **model)
    assert isinstance(m, DIEN)
    return m


def behaviours(m: DIEN, seq: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([m.embedding.embed_field(1, seq["hist_cate"]), m.embedding.embed_field(2, seq["hist_brand"])], -1)


def gru_states(cell: nn.GRUCell, inputs: torch.Tensor) -> list[torch.Tensor]:
    """h_1 .. h_n of one row's inputs ``[n, I]``, one ``nn.GRUCell`` step at a time from h_0 = 0."""
    h, out = torch.zeros(1, cell.hidden_size), []
    for x in inputs:
        h = cell(x[None], h)
        out.append(h[0])
    return out


def test_padded_positions_change_nothing() -> None:
    m = dien(activation="dice")
    x, seq, lengths = batch()
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    noisy = {k: torch.where(pad, torch.randint(1, 6, v.shape, dtype=torch.int32), v) for k, v in seq.items()}
    assert not all(torch.equal(noisy[k], seq[k]) for k in seq)
    m.eval()
    assert torch.allclose(m(x, noisy, lengths), m(x, seq, lengths), atol=1e-6)
    m.train()
    losses = []
    for codes in (seq, noisy):
        m.negative_generator = None  # the same negatives for both
        m.zero_grad()
        loss = m(x, codes, lengths).sum() + m.auxiliary_loss()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


@pytest.mark.parametrize("mode", ["augru", "aigru"])
def test_attention_one_everywhere_is_a_gru_step_by_step(mode: str) -> None:
    torch.manual_seed(1)
    layer = AttentionGRU(4, 3, mode)
    inputs = torch.randn(4, T, 4)
    lengths = torch.tensor([5, 2, 0, 1])
    valid = (torch.arange(T)[None, :] < lengths[:, None]).float()
    final = layer(inputs, valid, lengths)  # attention 1 on the valid positions
    for i, n in enumerate(lengths.tolist()):
        expected = gru_states(layer.cell, inputs[i, :n])[-1] if n else torch.zeros(3)
        assert torch.allclose(final[i], expected, atol=1e-6)


def test_augru_and_agru_are_eq_10_to_12_step_by_step() -> None:
    torch.manual_seed(2)
    inputs, attention = torch.randn(3, T, 4), torch.rand(3, T)
    lengths = torch.full((3,), T)
    for mode in ("augru", "agru"):
        layer = AttentionGRU(4, 3, mode)
        (w_r, w_z, w_n), (u_r, u_z, u_n) = layer.cell.weight_ih.chunk(3), layer.cell.weight_hh.chunk(3)
        (b_r, b_z, b_n), (c_r, c_z, c_n) = layer.cell.bias_ih.chunk(3), layer.cell.bias_hh.chunk(3)
        got = layer(inputs, attention, lengths)
        for i in range(3):
            h = torch.zeros(3)
            for t in range(T):
                x, a = inputs[i, t], attention[i, t]
                u = 1 - torch.sigmoid(w_z @ x + b_z + u_z @ h + c_z)  # the paper's update gate (Eq. 2)
                r = torch.sigmoid(w_r @ x + b_r + u_r @ h + c_r)
                candidate = torch.tanh(w_n @ x + b_n + r * (u_n @ h + c_n))
                gate = a * u if mode == "augru" else a  # Eq. 11 / Eq. 10
                h = (1 - gate) * h + gate * candidate
            assert torch.allclose(got[i], h, atol=1e-6), mode


def test_attention_is_the_softmax_of_eq_8_over_valid_positions() -> None:
    m = dien()
    x, seq, lengths = batch()
    states = torch.randn(6, T, 6)
    target = torch.randn(6, 6)
    a = m.attention_scores(states, target, lengths)
    for i, n in enumerate(lengths.tolist()):
        expected = torch.zeros(T)
        if n:
            scores = torch.stack([states[i, t] @ m.attention.weight @ target[i] for t in range(n)])
            expected[:n] = torch.softmax(scores, 0)
        assert torch.allclose(a[i], expected.detach(), atol=1e-6)


def test_auxiliary_loss_is_eq_6_by_brute_force_and_reaches_the_training_loss() -> None:
    m = dien(aux_weight=0.7)
    x, seq, lengths = batch()
    m.train()
    m.negative_generator = None
    logits = m(x, seq, lengths)
    auxiliary = m.auxiliary_loss()
    assert auxiliary is not None and m.auxiliary_loss() is None  # returned once
    m.negative_generator = None
    codes = m.draw_negatives(torch.Size((6, T - 1)), x.device)  # the draws the forward made
    assert all(int(c.min()) >= 1 for c in codes) and int(codes[0].max()) < 9 and int(codes[1].max()) < 6
    cell = nn.GRUCell(6, 6)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in m.extractor.state_dict().items()})
    items = behaviours(m, seq)
    negative = torch.cat([m.embedding.embed_field(1, codes[0]), m.embedding.embed_field(2, codes[1])], -1)
    terms = []
    for i, n in enumerate(lengths.tolist()):
        states = gru_states(cell, items[i, :n])
        for t in range(n - 1):
            terms.append(-torch.log(torch.sigmoid(states[t] @ items[i, t + 1]))
                         - torch.log(1 - torch.sigmoid(states[t] @ negative[i, t])))
    assert torch.allclose(auxiliary, 0.7 * torch.stack(terms).mean(), atol=1e-5)
    # the offline training steps add it; evaluation has none
    task = TaskSpec.from_name("binary")
    label = torch.tensor([1.0, 0, 1, 0, 0, 1])
    m.negative_generator = None
    loss = training_loss(task, m, m, OfflineBatch(x, label, seq, lengths))
    assert torch.allclose(loss, logloss(task, logits, label) + auxiliary, atol=1e-6)
    m.eval()
    m(x, seq, lengths)
    assert m.auxiliary_loss() is None
    m.train()
    off = dien(aux_weight=0.0)
    off(x, seq, lengths)
    assert off.auxiliary_loss() is None


def test_cli_runs_dien_on_synthetic_alimama_and_lists_its_choices(home: Path) -> None:
    run_cli("run", "model=dien", "model.evolution=augru", *SMALL, "-q", home=home, check=True)
    (folder,) = run_folders(home)
    info = read_run(folder)
    assert info["status"] == "complete" and info["model"] == "dien"
    metrics = pl.read_parquet(folder / "metrics.parquet").filter(pl.col("split") == "test")
    values = dict(zip(metrics["metric"], metrics["value"]))
    assert 0 < values["auc"] < 1 and values["logloss"] > 0
    listing = run_cli("methods", home=home, check=True).stdout
    assert "dien" in listing and "aux_weight" in listing


def test_same_seed_same_numbers_and_the_auxiliary_loss_changes_training(tmp_path: Path) -> None:
    overrides = [*SMALL, "model=dien"]
    first = run(tmp_path, overrides)[1]
    second = run(tmp_path, overrides)[1]
    assert first.headline == second.headline and first.metrics == second.metrics
    without = run(tmp_path, [*overrides, "model.aux_weight=0"])[1]
    assert without.metrics != first.metrics
