"""Metrics against brute-force implementations; frequency buckets and occurrence counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autorecbench.data.schema import TaskSpec
from autorecbench.data.stream import occurrence_index
from autorecbench.metrics import (
    auc,
    binary_metrics,
    bucket_label,
    frequency_bucket,
    multiclass_metrics,
    task_metrics,
)


def brute_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 300
    scores = torch.randint(0, 20, (n,), generator=gen).float() / 20  # many ties
    labels = (torch.rand(n, generator=gen) < 0.4).long()
    assert float(auc(scores, labels)) == pytest.approx(brute_auc(scores.tolist(), labels.tolist()), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert float(auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]))) == 1.0
    assert float(auc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))) == 0.0
    assert float(auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))) == 0.5
    assert math.isnan(float(auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1]))))


def test_binary_metrics_against_formulas() -> None:
    gen = np.random.default_rng(0)
    p = gen.uniform(0, 1, 500).astype(np.float32)
    y = (gen.uniform(0, 1, 500) < p).astype(np.float32)
    got = {k: float(v) for k, v in binary_metrics(torch.from_numpy(p), torch.from_numpy(y)).items()}
    pd, yd = p.astype(np.float64), y.astype(np.float64)
    assert got["accuracy"] == pytest.approx(np.mean((pd >= 0.5) == (yd == 1)))
    assert got["mse"] == pytest.approx(np.mean((yd - pd) ** 2))
    assert got["logloss"] == pytest.approx(-np.mean(yd * np.log(pd) + (1 - yd) * np.log(1 - pd)), rel=1e-6)
    assert got["auc"] == pytest.approx(brute_auc(p.tolist(), y.astype(int).tolist()))


def test_multiclass_metrics_against_formulas() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 5, generator=gen)
    probs = torch.softmax(logits, dim=1)
    labels = torch.randint(0, 4, (400,), generator=gen)  # class 4 absent: left out of the macro AUC
    got = {k: float(v) for k, v in multiclass_metrics(probs, labels).items()}
    assert got["accuracy"] == pytest.approx((probs.argmax(1) == labels).double().mean().item())
    assert got["ce"] == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), labels).item(), rel=1e-6)
    per_class = [brute_auc(probs[:, c].tolist(), (labels == c).long().tolist()) for c in range(4)]
    assert got["auc"] == pytest.approx(sum(per_class) / 4)


def test_task_metrics_names() -> None:
    b = task_metrics(TaskSpec.from_name("binary"), torch.tensor([0.2, 0.8]), torch.tensor([0.0, 1.0]))
    m = task_metrics(TaskSpec.from_name("multiclass"), torch.full((2, 5), 0.2), torch.tensor([0, 1]))
    assert list(b) == ["accuracy", "mse", "logloss", "auc"]
    assert list(m) == ["accuracy", "ce", "auc"]


def test_task_labels_follow_the_paper() -> None:
    ratings = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0])
    assert TaskSpec.from_name("binary").labels(ratings).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert TaskSpec.from_name("multiclass").labels(ratings).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4]


def test_frequency_buckets() -> None:
    freq = torch.tensor([1, 2, 3, 4, 7, 8, 15, 16, 1023, 1024])
    assert frequency_bucket(freq).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 9, 10]
    assert [bucket_label(b) for b in range(4)] == ["1", "2-3", "4-7", "8-15"]


def test_occurrence_index_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30, (1000,), generator=gen)
    seen: dict[int, int] = {}
    expected = []
    for i in ids.tolist():
        seen[i] = seen.get(i, 0) + 1
        expected.append(seen[i])
    assert occurrence_index(ids).tolist() == expected


def test_cpu_tanh_through_the_logistic_function_matches_torch_tanh() -> None:
    from autorecbench.models.activations import tanh

    x = torch.linspace(-20, 20, 100001)
    assert float((tanh(x) - torch.tanh(x)).abs().max()) < 2.5e-7
    xd = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tanh, (xd,))
    a = torch.randn(300, 7, requires_grad=True)
    tanh(a).pow(3).sum().backward()
    mine = a.grad.clone()
    a.grad = None
    torch.tanh(a).pow(3).sum().backward()
    assert torch.allclose(mine, a.grad, atol=1e-6)


@pytest.mark.parametrize("track", [False, True])
def test_count_weighted_batch_norm_equals_batch_norm_on_the_expanded_rows(track: bool) -> None:
    """Distinct rows with counts: outputs, input/affine gradients and running statistics equal those of
    ``nn.BatchNorm1d`` on the batch with every row repeated its count (autorecbench.models.norm)."""
    from autorecbench.models.norm import _WeightedBatchNorm, batch_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([1, 3, 1, 2, 5, 1, 1, 4, 2])
    upstream = torch.randn(int(counts.sum()), 5, generator=gen, dtype=torch.float64)
    inverse = torch.repeat_interleave(torch.arange(9), counts)[torch.randperm(int(counts.sum()), generator=gen)]
    mine, theirs = (torch.nn.BatchNorm1d(5, track_running_stats=track).double() for _ in range(2))
    for m in (mine, theirs):
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    expanded = theirs(x[inverse])
    (expanded * upstream).sum().backward()
    want = [x.grad.clone(), theirs.weight.grad, theirs.bias.grad]
    x.grad = None
    weighted = batch_norm(mine, x, counts)
    assert torch.allclose(weighted[inverse], expanded, atol=1e-12)
    (weighted[inverse] * upstream).sum().backward()
    for got, expected in zip([x.grad, mine.weight.grad, mine.bias.grad], want):
        assert torch.allclose(got, expected, atol=1e-10)
    if track:
        assert torch.allclose(mine.running_mean, theirs.running_mean)
        assert torch.allclose(mine.running_var, theirs.running_var)
        assert int(mine.num_batches_tracked) == 1
        mine.eval(), theirs.eval()
        assert torch.allclose(batch_norm(mine, x, counts)[inverse], theirs(x[inverse]))  # running statistics
    p = (counts / counts.sum()).double()
    gamma = torch.rand(5, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g, b: _WeightedBatchNorm.apply(a, p, g, b, 1e-5)[0], (x, gamma, beta))
