"""The shared supernet machinery (``models/supernet.py``): the architecture space, ordinal slices against standalone
layers, batched scoring against one-at-a-time scoring, the generator and REINFORCE on a two-armed toy, costs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autorecbench.metrics import auc
from autorecbench.models import supernet as sn


def small_space() -> sn.ArchSpace:
    return sn.ArchSpace([sn.Component("size", ("a", "b"), (2, 4, 8)), sn.Component("op", ("x",), ("sum", "max"))])


def test_space_size_enumeration_sampling_and_json() -> None:
    space = small_space()
    assert space.size() == 3**2 * 2 and math.isclose(space.log10_size(), math.log10(18))
    archs = list(space.enumerate())
    assert len(archs) == 18 and len({tuple(torch.cat([a["size"], a["op"]]).tolist()) for a in archs}) == 18
    with pytest.raises(ValueError, match="more than the limit"):
        next(space.enumerate(limit=10))
    drawn = space.sample_uniform(500, torch.Generator().manual_seed(0))
    again = space.sample_uniform(500, torch.Generator().manual_seed(0))
    assert drawn["size"].shape == (500, 2) and drawn["op"].shape == (500, 1)
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    assert set(drawn["size"].flatten().tolist()) == {0, 1, 2} and set(drawn["op"].flatten().tolist()) == {0, 1}
    one = sn.ArchSpace.select(drawn, 3)
    assert space.to_json(one)["size"]["a"] in (2, 4, 8)
    back = space.from_json(space.to_json(one))
    assert all(torch.equal(back[k], one[k]) for k in one)
    largest = space.constant({"size": 8, "op": "max"})
    assert torch.equal(space.values(largest, "size"), torch.tensor([8, 8])) and largest["op"].tolist() == [1]
    with pytest.raises(ValueError):
        space.check({"size": torch.tensor([0, 3]), "op": torch.tensor([0])})  # index 3 of 3 choices


def test_ordinal_mask_is_eq9_identity_block() -> None:
    mask = sn.ordinal_mask(torch.tensor([[1, 3], [4, 0]]), 4)
    assert mask.tolist() == [[[1, 0, 0, 0], [1, 1, 1, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]]
    v = torch.randn(4)
    eq9 = torch.cat([torch.eye(2), torch.zeros(2, 2)], dim=1).T  # [I^{d*}; 0], d_n x d*
    assert torch.allclose(v @ eq9, (v * sn.ordinal_mask(torch.tensor(2), 4))[:2])


def test_ordinal_linear_slices_equal_standalone_layers() -> None:
    torch.manual_seed(0)
    layer = sn.OrdinalLinear(16, 8, groups=3)
    x = torch.randn(5, 3, 16)
    for d_in, d_out in ((16, 8), (4, 2), (7, 5)):
        sliced = layer(x, d_in, d_out)
        for g in range(3):
            standalone = layer.child(g, d_in, d_out)
            assert torch.allclose(sliced[:, g], standalone(x[:, g, :d_in]), atol=1e-6)
        # masked: zero-padded input, masked output = the slice, zero-padded
        padded = x * sn.ordinal_mask(torch.tensor(d_in), 16)
        masked = layer.masked(padded, sn.ordinal_mask(torch.tensor(d_out), 8))
        assert torch.allclose(masked[..., :d_out], sliced, atol=1e-6) and not masked[..., d_out:].any()
    no_bias = sn.OrdinalLinear(4, 4, bias=False)
    assert no_bias.bias is None and no_bias.child(0, 2, 3).bias is None


def test_ordinal_embedding_masks_equal_child_tables() -> None:
    torch.manual_seed(0)
    emb = sn.OrdinalEmbedding([5, 7, 3], max_dim=8, init_std=1.0)
    x = torch.tensor([[0, 6, 2], [4, 1, 0]], dtype=torch.int32)
    dims = torch.tensor([[2, 8, 4], [1, 1, 1]])
    masked = emb.masked(x, dims)
    assert masked.shape == (2, 2, 3, 8)
    for s in range(2):
        for f in range(3):
            d = int(dims[s, f])
            table = emb.child_table(f, d)
            assert torch.equal(masked[s, :, f, :d], table[x[:, f].long()])
            assert torch.equal(emb.sliced(x, f, d), table[x[:, f].long()])
            assert not masked[s, :, f, d:].any()


def test_batched_auc_equals_exact_auc_row_by_row_with_ties() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (300,))
    scores = torch.randn(6, 300)
    scores[1] = torch.round(scores[1])  # many ties
    scores[2] = 0.0  # all tied: 0.5
    got = sn.batched_auc(scores, labels)
    want = torch.stack([auc(scores[k], labels) for k in range(6)])
    assert torch.allclose(got, want, atol=1e-12) and got[2] == 0.5
    assert torch.isnan(sn.batched_auc(scores, torch.ones(300))).all()


def test_batched_children_equal_one_at_a_time() -> None:
    torch.manual_seed(0)
    space = small_space()
    emb = sn.OrdinalEmbedding([10, 10], 8, 1.0)
    x = torch.randint(0, 10, (400, 2), dtype=torch.int32)
    labels = torch.randint(0, 2, (400,))

    def scores(rows: torch.Tensor, archs: dict[str, torch.Tensor]) -> torch.Tensor:
        e = emb.masked(rows, space.values(archs, "size"))  # [k, B, 2, 8]
        summed = e.sum(dim=(2, 3))
        return torch.where(archs["op"][:, :1] == 1, e.amax(dim=(2, 3)), summed)

    archs = space.sample_uniform(7, torch.Generator().manual_seed(1))
    batched = sn.score_children(scores, archs, x, labels, chunk=3, rows=150)
    one_by_one = torch.stack([sn.batched_auc(scores(x, sn.ArchSpace.select(archs, slice(k, k + 1))), labels)[0]
                              for k in range(7)])
    assert torch.allclose(batched, one_by_one)
    assert sn.child_scores(scores, archs, x, chunk=2, rows=77).shape == (7, 400)


def test_generator_log_probabilities_argmax_and_marginals() -> None:
    torch.manual_seed(0)
    space = small_space()
    gen = sn.PolicyGenerator(space, state_dim=4, hidden=(8, 8))
    sampled = gen.sample(32, torch.Generator().manual_seed(0))
    assert torch.allclose(gen.log_prob(sampled.arch), sampled.log_prob, atol=1e-6)
    assert (sampled.entropy > 0).all() and sampled.log_prob.requires_grad
    greedy = gen.argmax()
    space.check(greedy)
    assert all(torch.equal(greedy[k], gen.argmax()[k]) for k in greedy)
    marginals = gen.marginals(64)
    assert marginals["size"].shape == (2, 3) and torch.allclose(marginals["size"].sum(1), torch.ones(2))


def test_moving_baseline_follows_eq_22_23() -> None:
    baseline = sn.MovingBaseline(0.9)
    first = baseline.rewards(torch.tensor([0.6, 0.7]))
    assert torch.allclose(first, torch.tensor([-0.05, 0.05]))  # τ̄ starts at the first mean, 0.65
    expected = 0.65
    for tau in (0.6, 0.7):
        expected = 0.9 * expected + 0.1 * tau
    assert math.isclose(float(baseline.value), expected, rel_tol=1e-6)
    second = baseline.rewards(torch.tensor([0.8]))
    assert math.isclose(float(second[0]), 0.8 - expected, rel_tol=1e-5)


def _two_armed(reward_of_arm: tuple[float, float], steps: int, seed: int) -> float:
    """REINFORCE (Eq. 20-23) on one binary decision; returns the final P(arm 1)."""
    torch.manual_seed(seed)
    space = sn.ArchSpace([sn.Component("arm", ("pull",), (0, 1))])
    gen = sn.PolicyGenerator(space, state_dim=4, hidden=(8,))
    optimizer = torch.optim.Adam(gen.parameters(), lr=0.05)
    baseline = sn.MovingBaseline(0.9)
    rng = torch.Generator().manual_seed(seed)
    means = torch.tensor(reward_of_arm)
    for _ in range(steps):
        sampled = gen.sample(4, rng)
        arm = sampled.arch["arm"][:, 0]
        tau = means[arm] + 0.05 * torch.randn(4, generator=rng)
        optimizer.zero_grad()
        sn.reinforce_loss(sampled.log_prob, baseline.rewards(tau)).backward()
        optimizer.step()
    return float(gen.marginals(1)["arm"][0, 1])


def test_reinforce_gradient_points_to_the_better_arm() -> None:
    torch.manual_seed(0)
    space = sn.ArchSpace([sn.Component("arm", ("pull",), (0, 1))])
    gen = sn.PolicyGenerator(space, state_dim=4, hidden=(8,))
    sampled = gen.sample(4000, torch.Generator().manual_seed(0))
    reward = sampled.arch["arm"][:, 0].float() - 0.5  # arm 1 pays 1, arm 0 pays 0 (baseline 0.5)
    logits_before = gen.heads[0](gen.start[None])[0].detach()
    sn.reinforce_loss(sampled.log_prob, reward).backward()
    with torch.no_grad():
        for p in gen.parameters():
            if p.grad is not None:  # (the last component's state embedding feeds nothing)
                p -= 0.1 * p.grad  # one step along ∇J (the loss is −J)
    logits_after = gen.heads[0](gen.start[None])[0].detach()
    assert (logits_after[1] - logits_after[0]) > (logits_before[1] - logits_before[0])
    assert _two_armed((0.6, 0.7), steps=100, seed=0) > 0.9  # the better arm wins
    assert _two_armed((0.7, 0.6), steps=100, seed=0) < 0.1
    # Control, equal arms: the policy drifts on the noise, but to either arm, not to a favourite.
    control = [_two_armed((0.65, 0.65), steps=100, seed=s) for s in range(4)]
    assert 0.2 < sum(control) / 4 < 0.8, control


def test_arch_cost_counts_parameters_and_matmul_flops() -> None:
    net = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    cost = sn.arch_cost(net, torch.randn(64, 10), repeats=2)
    assert cost.parameters == 10 * 5 + 5 + 5 + 1
    assert cost.parameter_bytes == 4 * cost.parameters
    assert cost.flops_per_example == 2 * (10 * 5 + 5 * 1)
    assert cost.qps > 0 and net.training
