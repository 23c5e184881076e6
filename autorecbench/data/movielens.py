"""Loaders for the MovieLens family in the publishers' exact raw formats.

| format name       | file                        | layout                                                         |
| ----------------- | --------------------------- | -------------------------------------------------------------- |
| ``ratings_csv``   | ``ratings.csv`` (ml-20m, ml-latest, ml-latest-small) | header ``userId,movieId,rating,timestamp``, comma-separated, half stars 0.5–5.0 |
| ``grouplens_tsv`` | ``u.data`` (ml-100k)         | tab-separated, no header: user, item, rating 1–5, timestamp    |
| ``recbole_atomic``| ``ml-100k.inter`` (RecBole)  | tab-separated, header of ``name:type`` tokens                   |
| ``ratings_dat``   | ``ratings.dat`` (ml-1m)      | ``UserID::MovieID::Rating::Timestamp``, no header, ratings 1–5 |

Every reader returns the rows in file order as columns ``user_raw``, ``item_raw`` (Int64), ``rating``
(Float64) and ``timestamp`` (Int64, Unix seconds). Any malformed row raises
:class:`~autorecbench.errors.DataFormatError` naming the file and the 1-based line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from autorecbench.data.textfile import (
    check,
    header_fields,
    parse_float,
    parse_int,
    read_lines,
    split_fields,
)
from autorecbench.errors import DataFormatError, quoted

COLUMNS = ["user_raw", "item_raw", "rating", "timestamp"]
RATINGS_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
ATOMIC_REQUIRED = {"user_id": "user_raw", "item_id": "item_raw", "rating": "rating", "timestamp": "timestamp"}


def _typed(fields: pl.DataFrame, path: Path, *, half_stars: bool, timestamp_float: bool = False) -> pl.DataFrame:
    """Validate and type the four string columns of a ratings file."""
    user = parse_int(fields, "user_raw", "user id", path, minimum=0)
    item = parse_int(fields, "item_raw", "item id", path, minimum=0)
    rating = parse_float(fields, "rating", "rating", path)
    if half_stars:
        bad = (rating < 0.5) | (rating > 5.0) | ((rating * 2).round(0) != rating * 2)
        check(fields, bad, "rating", "rating out of range: expected half stars 0.5 to 5.0", path)
    else:
        bad = (rating < 1) | (rating > 5) | (rating.round(0) != rating)
        check(fields, bad, "rating", "rating out of range: expected an integer from 1 to 5", path)
    if timestamp_float:
        ts_float = parse_float(fields, "timestamp", "timestamp", path)
        check(fields, (ts_float < 0) | (ts_float.round(0) != ts_float), "timestamp",
              "timestamp must be a whole number of seconds >= 0", path)
        timestamp = ts_float.cast(pl.Int64)
    else:
        timestamp = parse_int(fields, "timestamp", "timestamp", path, minimum=0)
    return pl.DataFrame({"user_raw": user, "item_raw": item, "rating": rating, "timestamp": timestamp})


def read_ratings_csv(path: Path) -> pl.DataFrame:
    """ml-20m / ml-latest / ml-latest-small ``ratings.csv`` (UTF-8, header, comma-separated)."""
    lines = read_lines(path)
    first = lines.row(0, named=True)
    found = header_fields(first["text"], ",")
    if found != RATINGS_CSV_HEADER:
        raise DataFormatError(
            path, f"expected header {','.join(RATINGS_CSV_HEADER)!r}, found {quoted(first['text'])}", line=first["line"]
        )
    body = lines.slice(1)
    if body.height == 0:
        raise DataFormatError(path, "no ratings after the header")
    return _typed(split_fields(body, ",", COLUMNS, path), path, half_stars=True)


def read_grouplens_tsv(path: Path) -> pl.DataFrame:
    """ml-100k ``u.data``: ``user id \\t item id \\t rating \\t timestamp``, no header."""
    lines = read_lines(path)
    return _typed(split_fields(lines, "\t", COLUMNS, path), path, half_stars=False)


def read_ratings_dat(path: Path) -> pl.DataFrame:
    """ml-1m ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, no header."""
    lines = read_lines(path)
    return _typed(split_fields(lines, "::", COLUMNS, path), path, half_stars=False)


def read_recbole_atomic(path: Path) -> pl.DataFrame:
    """RecBole atomic ``.inter`` file: tab-separated with a ``name:type`` header (e.g. ``user_id:token``).

    Columns are matched by name; extra columns are allowed and ignored.
    """
    lines = read_lines(path)
    first = lines.row(0, named=True)
    tokens = header_fields(first["text"], "\t")
    names = []
    for token in tokens:
        name, colon, kind = token.partition(":")
        if not colon or not name or not kind:
            raise DataFormatError(path, f"header field {quoted(token)} is not of the form name:type", line=first["line"])
        names.append(name)
    missing = [n for n in ATOMIC_REQUIRED if n not in names]
    if missing:
        raise DataFormatError(path, f"header lacks required field(s) {', '.join(missing)}", line=first["line"])
    if len(set(names)) != len(names):
        raise DataFormatError(path, "header repeats a field name", line=first["line"])
    body = lines.slice(1)
    if body.height == 0:
        raise DataFormatError(path, "no interactions after the header")
    renamed = [ATOMIC_REQUIRED.get(n, f"extra_{i}") for i, n in enumerate(names)]
    fields = split_fields(body, "\t", renamed, path).select("line", *COLUMNS)
    return _typed(fields, path, half_stars=False, timestamp_float=True)


READERS: dict[str, Callable[[Path], pl.DataFrame]] = {
    "ratings_csv": read_ratings_csv,
    "grouplens_tsv": read_grouplens_tsv,
    "ratings_dat": read_ratings_dat,
    "recbole_atomic": read_recbole_atomic,
}
