"""Train / validation / test splits for the offline protocol, as one int8 label per row (0, 1, 2).

Three rules (``data.split``):
- ``random``: an exact ``split_ratio`` split (default 8:1:1) drawn with ``split_seed``. Validation and test
  get ``round(n * ratio)`` rows each and training the rest, as BARS' Criteo_x4 folds (45,840,617 rows ->
  36,672,493 / 4,584,062 / 4,584,062). Unlike BARS (StratifiedKFold on the label) it is not stratified.
  Drawn chunk by chunk (multivariate hypergeometric counts per chunk, shuffled within the chunk), so it is a
  uniformly random assignment with the exact counts while memory stays at one byte per row.
- ``time``: by time. With a day per row (Avazu's date, Criteo 1TB's day file) the last day is the test
  split, the day before it validation, the rest training. Without one (Criteo Kaggle ``train.txt``, whose
  rows are in time order over 7 days; a MovieLens cache, ordered by timestamp) the rows are cut into
  ``n_parts`` equal consecutive "days" (7 for Criteo), or split by ``split_ratio`` along the time order.
- ``last_day``: the last day is the test split; the earlier rows are split at random (exact counts, seeded)
  into training and validation in the proportion of ``split_ratio``'s first two shares (its third share is
  unused): the AutoFIS/PIN Criteo-8d protocol, days 0-6 train (10% of them validation), day 7 test.
"""

from __future__ import annotations

import numpy as np

from autorecbench.errors import UserError

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_RULES = ("random", "time", "last_day")


def check_rule(rule: str, ratio: list[float] | tuple[float, ...]) -> None:
    if rule not in SPLIT_RULES:
        raise UserError(f"data.split must be one of {', '.join(SPLIT_RULES)}, got {rule!r}")
    if len(ratio) != 3 or any(r < 0 for r in ratio) or not abs(sum(ratio) - 1.0) < 1e-6 or ratio[0] <= 0:
        raise UserError(f"data.split_ratio must be three shares (train, valid, test) summing to 1, got {list(ratio)}")


def split_counts(n: int, ratio: list[float] | tuple[float, ...]) -> tuple[int, int, int]:
    """Rows per split: validation and test ``round(n * share)``, training the rest."""
    valid = int(round(n * ratio[1]))
    test = int(round(n * ratio[2]))
    return n - valid - test, valid, test


def random_split(n: int, ratio: list[float] | tuple[float, ...], seed: int, chunk: int = 1 << 20) -> np.ndarray:
    """Seeded exact random assignment of ``n`` rows to train/valid/test (int8 labels in row order)."""
    rng = np.random.default_rng(seed)
    remaining = np.array(split_counts(n, ratio), dtype=np.int64)
    out = np.empty(n, dtype=np.int8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        take = rng.multivariate_hypergeometric(remaining, m) if m < remaining.sum() else remaining.copy()
        labels = np.repeat(np.arange(3, dtype=np.int8), take)
        rng.shuffle(labels)
        out[start : start + m] = labels
        remaining -= take
    return out


def equal_parts(n: int, n_parts: int) -> np.ndarray:
    """Part index (0 .. n_parts-1) of each of ``n`` consecutive rows cut into equal parts."""
    return (np.arange(n, dtype=np.int64) * n_parts // max(n, 1)).astype(np.int32)


def split_by_day(day: np.ndarray, what: str) -> np.ndarray:
    """Last day -> test, the day before -> validation, earlier days -> training."""
    days = np.unique(day)
    if days.size < 3:
        raise UserError(f"data.split=time needs at least 3 days in {what}, found {days.size}")
    out = np.full(day.shape, TRAIN, dtype=np.int8)
    out[day == days[-2]] = VALID
    out[day == days[-1]] = TEST
    return out


def last_day_split(day: np.ndarray, ratio: list[float] | tuple[float, ...], seed: int, what: str) -> np.ndarray:
    """Last day -> test; the other rows at random into training and validation by ``ratio[0] : ratio[1]``."""
    days = np.unique(day)
    if days.size < 2:
        raise UserError(f"data.split=last_day needs at least 2 days in {what}, found {days.size}")
    test = day == days[-1]
    out = np.full(day.shape, TEST, dtype=np.int8)
    share = ratio[1] / (ratio[0] + ratio[1])
    out[~test] = random_split(int((~test).sum()), (1 - share, share, 0.0), seed)
    return out


def ordered_split(n: int, ratio: list[float] | tuple[float, ...]) -> np.ndarray:
    """Rows already in time order: the first share trains, then validation, then test."""
    n_train, n_valid, _ = split_counts(n, ratio)
    out = np.full(n, TEST, dtype=np.int8)
    out[:n_train] = TRAIN
    out[n_train : n_train + n_valid] = VALID
    return out
