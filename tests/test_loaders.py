"""Loaders on hand-written files in each published format (with their quirks) and on the real files."""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from autorecbench.data.movielens import (
    read_grouplens_tsv,
    read_ratings_csv,
    read_ratings_dat,
    read_recbole_atomic,
)
from autorecbench.errors import DataFormatError

CSV_HEADER = "userId,movieId,rating,timestamp"


def write(path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def rows(frame: pl.DataFrame) -> list[tuple]:
    return [tuple(r) for r in frame.select("user_raw", "item_raw", "rating", "timestamp").iter_rows()]


# ---------------------------------------------------------------- well-formed files with quirks

@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("trailing", [True, False])
def test_ratings_csv_line_endings(tmp_path: Path, newline: str, trailing: bool) -> None:
    lines = [CSV_HEADER, "1,31,2.5,1260759144", "1,1029,3.0,1260759179", "7,3,0.5,964982703"]
    text = newline.join(lines) + (newline if trailing else "")
    frame = read_ratings_csv(write(tmp_path / "ratings.csv", text))
    assert rows(frame) == [(1, 31, 2.5, 1260759144), (1, 1029, 3.0, 1260759179), (7, 3, 0.5, 964982703)]
    assert frame.schema["user_raw"] == pl.Int64 and frame.schema["timestamp"] == pl.Int64


def test_ratings_csv_quoted_fields_bom_and_blank_lines(tmp_path: Path) -> None:
    text = '\ufeff"userId","movieId","rating","timestamp"\n"1","31","2.5","1260759144"\n\n2,5,5.0,1\n\n'
    frame = read_ratings_csv(write(tmp_path / "ratings.csv", text))
    assert rows(frame) == [(1, 31, 2.5, 1260759144), (2, 5, 5.0, 1)]


def test_ratings_csv_gzip(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv.gz"
    path.write_bytes(gzip.compress(f"{CSV_HEADER}\n1,2,4.5,10\n".encode()))
    assert rows(read_ratings_csv(path)) == [(1, 2, 4.5, 10)]


def test_grouplens_udata(tmp_path: Path) -> None:
    frame = read_grouplens_tsv(write(tmp_path / "u.data", "196\t242\t3\t881250949\r\n186\t302\t3\t891717742"))
    assert rows(frame) == [(196, 242, 3.0, 881250949), (186, 302, 3.0, 891717742)]


def test_ratings_dat(tmp_path: Path) -> None:
    frame = read_ratings_dat(write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"))
    assert rows(frame) == [(1, 1193, 5.0, 978300760), (1, 661, 3.0, 978302109)]


def test_recbole_atomic_maps_columns_by_header(tmp_path: Path) -> None:
    text = "item_id:token\tuser_id:token\tother:float\ttimestamp:float\trating:float\n242\t196\t0.1\t881250949\t3\n"
    frame = read_recbole_atomic(write(tmp_path / "x.inter", text))
    assert rows(frame) == [(196, 242, 3.0, 881250949)]


# ---------------------------------------------------------------- malformed input: file and line

@pytest.mark.parametrize(
    ("name", "text", "line", "fragment"),
    [
        ("ratings.csv", "userId,itemId,rating,timestamp\n1,2,3,4\n", 1, "expected header"),
        ("ratings.csv", "1,2,3.0,4\n", 1, "expected header"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.0,4\n1,2,3.0\n", 3, "expected 4"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.0,4\n1,2,3.0,4,5\n", 3, "found 5"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.0,4\nabc,2,3.0,4\n", 3, "user id is not an integer: 'abc'"),
        ("ratings.csv", f"{CSV_HEADER}\n1,x2,3.0,4\n", 2, "item id is not an integer"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,good,4\n", 2, "rating is not a number"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,5.5,4\n", 2, "rating out of range"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,0.0,4\n", 2, "rating out of range"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.3,4\n", 2, "half stars"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.0,\n", 2, "timestamp is not an integer"),
        ("ratings.csv", f"{CSV_HEADER}\n1,2,3.0,-5\n", 2, "timestamp must be >= 0"),
        ("ratings.csv", f"{CSV_HEADER}\r\n\r\n1,2,3.0,4\r\n1,,3.0,4\r\n", 4, "item id is not an integer: ''"),
        ("u.data", "1\t2\t3\t4\n1\t2\t6\t4\n", 2, "expected an integer from 1 to 5"),
        ("u.data", "1\t2\t3\t4\n1 2 3 4\n", 2, "expected 4 tab-separated fields, found 1"),
        ("u.data", "1\t2\t3.5\t4\n", 1, "integer from 1 to 5"),
        ("ratings.dat", "1::2::3::4\n1::2::3\n", 2, "expected 4"),
        ("x.inter", "user_id\titem_id\trating\ttimestamp\n1\t2\t3\t4\n", 1, "name:type"),
        ("x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n", 1, "timestamp"),
        ("x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\t3\t4.5\n", 2, "whole number"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, name: str, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path / name, text)
    reader = {"ratings.csv": read_ratings_csv, "u.data": read_grouplens_tsv, "ratings.dat": read_ratings_dat,
              "x.inter": read_recbole_atomic}[name]
    with pytest.raises(DataFormatError) as err:
        reader(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "empty file"), (b"\n\n\r\n", "empty file"), (f"{CSV_HEADER}\n".encode(), "no ratings after the header")],
)
def test_empty_files(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=fragment) as err:
        read_ratings_csv(path)
    assert str(err.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="file not found"):
        read_ratings_csv(tmp_path / "nope.csv")


def test_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress((CSV_HEADER + "\n" + "1,2,3.0,4\n" * 5000).encode())
    path = tmp_path / "ratings.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="truncated gzip") as err:
        read_ratings_csv(path)
    assert str(err.value).startswith(str(path))


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="gzip"):
        read_ratings_csv(path)


# ---------------------------------------------------------------- the real files

def test_real_ml_latest_small(ml_latest_small_dir: Path) -> None:
    frame = read_ratings_csv(ml_latest_small_dir / "ratings.csv")
    assert frame.height == 100_836
    assert frame["user_raw"].n_unique() == 610
    assert frame["item_raw"].n_unique() == 9_724
    assert sorted(frame["rating"].unique().to_list()) == [x / 2 for x in range(1, 11)]


def test_real_ml100k_atomic_and_grouplens_agree(ml100k_dir: Path, tmp_path: Path) -> None:
    atomic = read_recbole_atomic(ml100k_dir / "ml-100k.inter")
    assert atomic.height == 100_000
    assert atomic["user_raw"].n_unique() == 943
    assert atomic["item_raw"].n_unique() == 1_682
    # The same ratings written as GroupLens u.data (tab-separated, no header) read back identically.
    udata = tmp_path / "u.data"
    lines = (ml100k_dir / "ml-100k.inter").read_text().splitlines()[1:]
    udata.write_text("\n".join(lines) + "\n")
    assert read_grouplens_tsv(udata).equals(atomic)
