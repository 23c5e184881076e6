"""The AutoFIS/PIN protocol options of the CTR loaders (AutoIAS' Table 1 data): negative down-sampling, quantile
buckets of the integer fields, the last-day split, Avazu's mday, the two presets, and that the existing presets'
caches stay exactly as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from autorecbench.config import compose, validate
from autorecbench.data.cache import DatasetConfig, missing_message
from autorecbench.data.ctr import CTROptions, bucket_codes, quantile_buckets, row_uniform
from autorecbench.errors import UserError
from test_ctr_loaders import avazu_row, criteo_row, encoded, prepare_file

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def _criteo_text(n: int, seed: int = 0) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    rows = [criteo_row(int(y), {1: int(v)}, {1: f"{int(c):08x}"})
            for y, v, c in zip(labels, rng.integers(0, 500, n), rng.integers(0, 30, n))]
    return "\n".join(rows) + "\n", labels


def test_negative_down_sampling_keeps_every_positive_and_the_stated_share_of_negatives(tmp_path: Path) -> None:
    text, labels = _criteo_text(8000)
    rate = 0.3
    options = {"negative_keep_rate": rate, "negative_seed": 5, "split_ratio": [0.8, 0.1, 0.1]}
    prepared = prepare_file(tmp_path, "train.txt", text, **options)
    frame = encoded(prepared)
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    assert int(frame["label"].sum()) == n_pos  # every positive
    kept = frame.height - n_pos
    assert abs(kept - rate * n_neg) < 4 * math.sqrt(n_neg * rate * (1 - rate)), (kept, rate * n_neg)
    schema = json.loads((prepared.directory / "schema.json").read_text())
    assert schema["extra"]["negatives_dropped"] == n_neg - kept and schema["rows_in_file"] == len(labels)
    assert schema["options"]["negative_keep_rate"] == rate and schema["options"]["negative_seed"] == 5
    # The same rows whatever the chunk size (a hash of the line, not a stream of draws) ...
    again = prepare_file(tmp_path / "small-chunks", "train.txt", text, chunk_bytes=1 << 16, **options)
    assert encoded(again).equals(frame)
    # ... and exactly the rows the hash keeps; another seed keeps others.
    u = row_uniform(5, 0, np.arange(1, len(labels) + 1))
    assert kept == int(((labels == 0) & (u < rate)).sum())
    other = encoded(prepare_file(tmp_path / "seed6", "train.txt", text, **{**options, "negative_seed": 6}))
    assert other.height != frame.height or not other.equals(frame)
    # Control: rate 1 (the default) keeps every row.
    full = prepare_file(tmp_path / "all", "train.txt", text, split_ratio=[0.8, 0.1, 0.1])
    assert encoded(full).height == len(labels) and full.schema.options["negative_keep_rate"] == 1.0
    assert full.schema.extra["negatives_dropped"] == 0


def test_row_uniform_is_uniform_and_seeded() -> None:
    u = row_uniform(0, 0, np.arange(1, 200_001))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 19_000
    assert not np.array_equal(u, row_uniform(1, 0, np.arange(1, 200_001)))
    assert not np.array_equal(u[:1000], row_uniform(0, 1, np.arange(1, 1001)))


def test_quantile_buckets_are_equal_frequency_on_training_values() -> None:
    counts = pl.DataFrame({"I1": [0, 1, 2, 3, 5, 8, 100], "len": [40, 10, 10, 10, 10, 10, 10]}).cast({"len": pl.UInt32})
    # 100 rows, 5 buckets: a value goes to floor(rows before it * 5 / 100); value 0 alone fills two buckets' worth
    buckets = quantile_buckets(counts, "I1", 5)
    assert buckets["I1"].to_list() == [0, 1, 3, 8] and buckets["len"].to_list() == [40, 20, 20, 20]
    codes = bucket_codes(pl.Series([-7, 0, 1, 2, 4, 5, 99, 100, 10**9]), buckets["I1"])
    assert codes.to_list() == [2, 2, 3, 3, 4, 4, 5, 5, 5]  # below the first edge: the first bucket
    uniform = pl.DataFrame({"v": list(range(1000)), "len": [1] * 1000}).cast({"len": pl.UInt32})
    assert quantile_buckets(uniform, "v", 4)["len"].to_list() == [250] * 4


def test_quantile_transform_end_to_end(tmp_path: Path) -> None:
    text, _ = _criteo_text(4000)
    prepared = prepare_file(tmp_path, "train.txt", text, int_transform="quantile", int_buckets=8,
                            split_ratio=[0.8, 0.1, 0.1])
    frame = encoded(prepared)
    train = frame.filter(pl.col("split") == 0)
    shares = train["I1"].value_counts()["count"].to_numpy() / train.height
    assert prepared.schema.cardinality("I1") == 2 + 8 and np.all(np.abs(shares - 1 / 8) < 0.02)
    vocab = pl.read_parquet(prepared.directory / "vocab" / "I1.parquet")
    assert vocab["meaning"][2].startswith("v < ") and vocab["meaning"][-1].startswith("v >= ")
    raw = np.array([int(line.split("\t")[1]) for line in text.splitlines()])
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(frame["I1"].to_numpy()[order]) >= 0)  # buckets follow the values
    assert prepared.schema.cardinality("C1") <= 32  # categorical fields keep their vocabularies
    with pytest.raises(UserError, match="no integer fields"):
        prepare_file(tmp_path / "avazu", "train.csv", AVAZU_HEADER + "\n" + avazu_row() + "\n", family="avazu",
                     int_transform="quantile")


def test_last_day_split_on_day_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for day in range(3):
        (raw / f"day_{day}").write_text(_criteo_text(1000, seed=day)[0])
    cfg = DatasetConfig.from_mapping({"name": "criteo-1tb", "family": "criteo", "path": str(raw),
                                      "processed_dir": str(tmp_path / "processed"), "days": [0, 1, 2],
                                      "sources": [{"file": "day_{day}", "format": "criteo_tsv"}],
                                      "split": "last_day", "split_ratio": [0.9, 0.1, 0.0]})
    from autorecbench.data.cache import prepare

    prepared = prepare(cfg)
    split = encoded(prepared)["split"].to_numpy()
    assert (split[2000:] == 2).all() and (split[:2000] != 2).all()  # day 2 is the test split
    assert int((split[:2000] == 1).sum()) == 200  # 10% of the training days, exactly
    assert prepared.schema.extra["split"]["rule"] == "last_day"


def test_avazu_mday_field(tmp_path: Path) -> None:
    rows = [avazu_row(click=i % 2, hour=hour) for i, hour in enumerate(["14102100", "14102523", "14103012"])]
    prepared = prepare_file(tmp_path, "train.csv", AVAZU_HEADER + "\n" + "\n".join(rows) + "\n", family="avazu",
                            split_ratio=[1.0, 0.0, 0.0], time_fields=["hour", "weekday", "mday"])
    names = prepared.schema.field_names
    assert names[-3:] == ["hour", "weekday", "mday"] and "weekend" not in names and len(names) == 24
    vocab = pl.read_parquet(prepared.directory / "vocab" / "mday.parquet")
    mapping = dict(zip(vocab["code"].to_list(), vocab["token"].to_list()))
    assert [mapping[c] for c in encoded(prepared)["mday"].to_list()] == ["21", "25", "30"]
    with pytest.raises(UserError, match="time_fields"):
        prepare_file(tmp_path / "bad", "train.csv", AVAZU_HEADER + "\n" + rows[0] + "\n", family="avazu",
                     time_fields=["minute"])


def test_existing_presets_keep_their_fingerprints() -> None:
    """The options added for the AutoFIS protocol do not enter the fingerprint at their defaults."""
    assert set(CTROptions().fingerprint_options()) == {"split", "split_seed", "split_ratio", "min_count",
                                                         "int_transform", "int_missing", "skip_bad_rows", "fields",
                                                         "user_field", "days"}
    for name in ("criteo", "avazu", "criteo-1tb", "synthetic-criteo"):
        options = DatasetConfig.from_mapping(compose([f"data={name}"]).data).options()
        assert not {"negative_keep_rate", "int_buckets", "time_fields"} & set(options), name


def test_the_autofis_presets() -> None:
    criteo = compose(["data=criteo-1tb-autofis", "method=autoias"])
    validate(criteo)
    c = DatasetConfig.from_mapping(criteo.data)
    assert c.days == list(range(8)) and c.split == "last_day" and c.min_count == 20
    assert c.int_transform == "quantile" and 0 < c.negative_keep_rate < 0.1 and c.path.endswith("raw/criteo-1tb")
    assert "day_7" in missing_message(c)
    avazu = DatasetConfig.from_mapping(compose(["data=avazu-autofis"]).data)
    assert avazu.split_ratio == [0.7, 0.1, 0.2] and avazu.min_count == 20 and avazu.time_fields == ["hour", "weekday", "mday"]
    with pytest.raises(UserError, match="negative_keep_rate"):
        DatasetConfig.from_mapping(compose(["data=criteo", "data.negative_keep_rate=0"]).data)
