"""The Parquet cache: fingerprints, reuse, rebuilds, ordering, id encoding, atomicity; the synthetic generator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from autorecbench.data.cache import DatasetConfig, SourceSpec, prepare
from autorecbench.data.synthetic import MovieLensGenerator, generate_movielens
from autorecbench.errors import DataFormatError, MissingDataError

HEADER = "userId,movieId,rating,timestamp\n"


def config(tmp_path: Path, raw: Path, **options) -> DatasetConfig:
    return DatasetConfig(name="tiny", path=str(raw), sources=[SourceSpec("ratings.csv", "ratings_csv")],
                         processed_dir=str(tmp_path / "processed"), **options)


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    # File order differs from time order; rows 2 and 4 tie on timestamp 50.
    (folder / "ratings.csv").write_text(
        HEADER + "10,100,4.0,300\n10,200,3.5,50\n20,100,1.0,100\n30,300,5.0,50\n20,300,2.5,400\n"
    )
    return folder


def test_prepare_orders_by_time_stably_and_encodes_ids(tmp_path: Path, raw: Path) -> None:
    prepared = prepare(config(tmp_path, raw))
    frame = pl.read_parquet(prepared.interactions_path)
    assert frame["timestamp"].to_list() == [50, 50, 100, 300, 400]
    users = pl.read_parquet(prepared.directory / "users.parquet")
    items = pl.read_parquet(prepared.directory / "items.parquet")
    assert users["user_raw"].to_list() == [10, 20, 30] and users["user"].to_list() == [0, 1, 2]
    assert items["item_raw"].to_list() == [100, 200, 300]
    # Tie on timestamp 50 keeps file order: (10, 200) before (30, 300).
    assert frame.select("user", "item").rows()[:2] == [(0, 1), (2, 2)]
    assert frame.schema["user"] == pl.Int32 and frame.schema["rating"] == pl.Float32
    s = prepared.schema
    assert (s.n_rows, s.n_users, s.n_items, s.time_min, s.time_max) == (5, 3, 3, 50, 400)
    assert json.loads((prepared.directory / "schema.json").read_text())["source"]["sha256"]


def test_prepare_twice_reuses_and_option_change_rebuilds(tmp_path: Path, raw: Path) -> None:
    first = prepare(config(tmp_path, raw))
    again = prepare(config(tmp_path, raw))
    assert not first.reused and again.reused and again.directory == first.directory
    filtered = prepare(config(tmp_path, raw, min_user_count=2))
    assert not filtered.reused and filtered.directory != first.directory
    assert filtered.schema.n_rows == 4  # user 30 has one rating
    assert filtered.schema.rows_in_file == 5


def test_changed_raw_file_rebuilds(tmp_path: Path, raw: Path) -> None:
    first = prepare(config(tmp_path, raw))
    path = raw / "ratings.csv"
    path.write_text(path.read_text() + "40,100,3.0,500\n")
    os.utime(path, ns=(first.schema.source["mtime_ns"] + 10**9,) * 2)
    second = prepare(config(tmp_path, raw))
    assert not second.reused and second.schema.n_rows == 6


def test_failed_prepare_leaves_nothing(tmp_path: Path, raw: Path) -> None:
    (raw / "ratings.csv").write_text(HEADER + "1,2,3.0,4\n1,2,9.0,5\n")
    with pytest.raises(DataFormatError, match=r"ratings.csv:3: rating out of range"):
        prepare(config(tmp_path, raw))
    processed = tmp_path / "processed"
    assert not processed.exists() or list(processed.iterdir()) == []


def test_missing_raw_file_says_where(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path / "nowhere")
    cfg.url = "https://example.org/x.zip"
    with pytest.raises(MissingDataError, match=r"ratings.csv not found in .*nowhere.*https://example.org/x.zip"):
        prepare(cfg)


def test_gz_source_is_found(tmp_path: Path, raw: Path) -> None:
    import gzip

    data = (raw / "ratings.csv").read_bytes()
    (raw / "ratings.csv").unlink()
    (raw / "ratings.csv.gz").write_bytes(gzip.compress(data))
    assert prepare(config(tmp_path, raw)).schema.n_rows == 5


def test_synthetic_generator_is_deterministic_and_real_format(tmp_path: Path) -> None:
    spec = MovieLensGenerator(seed=3, n_users=50, n_items=40, n_interactions=2000)
    a = generate_movielens(spec, tmp_path / "a")
    b = generate_movielens(spec, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().startswith(HEADER)
    c = generate_movielens(MovieLensGenerator(seed=4, n_users=50, n_items=40, n_interactions=2000), tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()
    truth = np.load(tmp_path / "a" / "truth.npz")
    assert truth["user_factors"].shape == (50, 8) and truth["item_bias"].shape == (40,)


def test_synthetic_zipf_frequencies_and_rating_model(tmp_path: Path) -> None:
    spec = MovieLensGenerator(seed=0, n_users=500, n_items=300, n_interactions=50_000, noise=0.1)
    path = generate_movielens(spec, tmp_path / "z")
    frame = pl.read_csv(path)
    counts = frame.group_by("userId").len().sort("len", descending=True)["len"].to_numpy()
    # Zipf with exponent 1: the top user holds about 1/H_500 ~ 15% of interactions; the median very few.
    assert counts[0] / counts.sum() > 0.08
    assert counts[0] > 20 * np.median(counts)
    truth = np.load(tmp_path / "z" / "truth.npz")
    u, i = frame["userId"].to_numpy() - 1, frame["movieId"].to_numpy() - 1
    score = spec.mu + truth["user_bias"][u] + truth["item_bias"][i] + np.einsum(
        "nd,nd->n", truth["user_factors"][u], truth["item_factors"][i])
    expected = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
    # With small noise most ratings equal the noiseless rounding of the planted score.
    assert np.mean(frame["rating"].to_numpy() == expected) > 0.6


def test_synthetic_through_config(tmp_path: Path) -> None:
    cfg = DatasetConfig(name="synthetic", path=str(tmp_path / "raw"), sources=[SourceSpec("ratings.csv", "ratings_csv")],
                        processed_dir=str(tmp_path / "processed"),
                        generator={"kind": "movielens", "seed": 1, "n_users": 30, "n_items": 20, "n_interactions": 500})
    prepared = prepare(cfg)
    assert prepared.schema.n_rows == 500
    assert prepare(cfg).reused
