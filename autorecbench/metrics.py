"""Exact evaluation metrics, vectorised on the device; per-frequency buckets and windows along the stream.

Binary task (predictions are P(y=1)): accuracy at threshold 0.5 (p >= 0.5 predicts 1), MSE (the ESAPN
paper's Eq. 3 on probabilities), logloss, and exact AUC (Mann-Whitney with tied scores counted 1/2).
Multiclass task (predictions are class probabilities): accuracy of the argmax, cross-entropy (Eq. 4), and
one-vs-rest macro AUC over the classes that have both positives and negatives.
"""

from __future__ import annotations

import math

import torch

from autorecbench.data.schema import TaskSpec

EPS = 1e-7
BINARY_METRICS = ("accuracy", "mse", "logloss", "auc")
MULTICLASS_METRICS = ("accuracy", "ce", "auc")


def metric_names(task: TaskSpec) -> tuple[str, ...]:
    return BINARY_METRICS if task.is_binary else MULTICLASS_METRICS


def auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact ROC AUC: P(score of a random positive > random negative) + 1/2 P(tie). NaN for one class."""
    labels = labels.to(torch.bool)
    n_pos = labels.sum().to(torch.float64)
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=scores.device)
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mid_rank = ends - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each distinct score
    rank_sum = mid_rank[inverse][labels].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def logloss(prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of P(y=1) ``prob``, clipped to [EPS, 1 - EPS] (float64)."""
    label = label.to(torch.float64)
    clipped = prob.to(torch.float64).clamp(EPS, 1 - EPS)
    return -(label * clipped.log() + (1 - label) * (1 - clipped).log()).mean()


def cross_entropy(probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class probabilities ``probs`` (Eq. 4), the true class's clipped at EPS (float64)."""
    p_true = probs.gather(1, label.to(torch.int64)[:, None]).squeeze(1).to(torch.float64)
    return -p_true.clamp_min(EPS).log().mean()


def binary_metrics(prob: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    label = label.to(torch.float64)
    p = prob.to(torch.float64)
    return {
        "accuracy": ((p >= 0.5).to(torch.float64) == label).to(torch.float64).mean(),
        "mse": ((label - p) ** 2).mean(),
        "logloss": logloss(prob, label),
        "auc": auc(prob, label),
    }


def multiclass_metrics(probs: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    label = label.to(torch.int64)
    aucs = [auc(probs[:, c], label == c) for c in range(probs.shape[1])]
    valid = [a for a in aucs if not torch.isnan(a)]
    macro = torch.stack(valid).mean() if valid else torch.tensor(math.nan, dtype=torch.float64)
    return {
        "accuracy": (probs.argmax(dim=1) == label).to(torch.float64).mean(),
        "ce": cross_entropy(probs, label),
        "auc": macro,
    }


def task_metrics(task: TaskSpec, pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """All metrics of ``task`` as Python floats (one device sync)."""
    if pred.shape[0] == 0:
        return {name: math.nan for name in metric_names(task)}
    values = binary_metrics(pred, label) if task.is_binary else multiclass_metrics(pred, label)
    stacked = torch.stack([v.to(torch.float64).cpu() for v in values.values()]).tolist()
    return dict(zip(values.keys(), stacked))


def frequency_bucket(freq: torch.Tensor) -> torch.Tensor:
    """Power-of-two bucket of a frequency >= 1: 0 -> {1}, 1 -> {2, 3}, 2 -> {4..7}, 3 -> {8..15}, ..."""
    return torch.floor(torch.log2(freq.to(torch.float64))).to(torch.int64)


def bucket_bounds(bucket: int) -> tuple[int, int]:
    return 2**bucket, 2 ** (bucket + 1) - 1


def bucket_label(bucket: int) -> str:
    lo, hi = bucket_bounds(bucket)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def group_auc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """gAUC: the exact AUC within each group (e.g. user), averaged with the group's number of rows as weight,
    over the groups that have both positives and negatives (as FuxiCTR's gAUC). NaN when no group has both.

    Vectorised: one stable sort by (group, score), mid-ranks of tied scores within a group, then per-group
    Mann-Whitney sums with ``index_add_``.
    """
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    g, s, y = groups[order], scores[order], labels[order].to(torch.float64)
    n = g.numel()
    if n == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    new_group = torch.ones(n, dtype=torch.bool, device=g.device)
    new_group[1:] = g[1:] != g[:-1]
    gid = torch.cumsum(new_group, 0) - 1
    new_run = new_group.clone()
    new_run[1:] |= s[1:] != s[:-1]
    rid = torch.cumsum(new_run, 0) - 1
    position = torch.arange(n, device=g.device)
    rank = (position - position[new_group][gid] + 1).to(torch.float64)  # 1-based rank within the group
    n_runs = int(rid[-1]) + 1
    run_rank = torch.zeros(n_runs, dtype=torch.float64, device=g.device).index_add_(0, rid, rank)
    mid_rank = (run_rank / torch.bincount(rid, minlength=n_runs).to(torch.float64))[rid]
    n_groups = int(gid[-1]) + 1
    size = torch.bincount(gid, minlength=n_groups).to(torch.float64)
    n_pos = torch.zeros(n_groups, dtype=torch.float64, device=g.device).index_add_(0, gid, y)
    n_neg = size - n_pos
    rank_pos = torch.zeros(n_groups, dtype=torch.float64, device=g.device).index_add_(0, gid, mid_rank * y)
    both = (n_pos > 0) & (n_neg > 0)
    if not bool(both.any()):
        return torch.tensor(math.nan, dtype=torch.float64, device=g.device)
    auc_g = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    return (auc_g * size[both]).sum() / size[both].sum()
