"""Alimama (Taobao display-ad clicks, Tianchi dataset 56): four raw files -> encoded Parquet with behaviour
histories, in bounded memory (format name ``alimama_csv``, family ``alimama``).

| file | header | rows |
| --- | --- | --- |
| ``raw_sample.csv`` | ``user,time_stamp,adgroup_id,pid,nonclk,clk`` | 26,557,961 |
| ``ad_feature.csv`` | ``adgroup_id,cate_id,campaign_id,customer,brand,price`` | 846,811 |
| ``user_profile.csv`` | ``userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level `` (trailing space) | 1,061,768 |
| ``behavior_log.csv`` | ``user,time_stamp,btag,cate,brand`` | 723,268,134 (23 GB) |

Accepted quirks: the trailing space of the last ``user_profile`` name (with or without it), empty profile
levels (any profile column may be empty: the field's missing value), the literal ``NULL`` (or an empty value)
as ``brand``, a float ``price``, ``pid`` strings such as ``430548_1007``, samples whose user has no profile row
or whose ad has no ``ad_feature`` row (``missing_profile`` / ``missing_ad``: dropped, or kept with the
missing value), ``btag`` ∈ {pv, cart, fav, buy}, gzip-compressed files (``<name>.gz``), CRLF line ends, a BOM,
blank lines. Malformed rows stop the preparation with ``file:line: what is wrong`` (``skip_bad_rows``: dropped,
counted, the first reported): a wrong header, a wrong column count, a non-integer id or time (ids must be
non-negative, times Unix seconds in [0, 2^32)), ``clk`` or ``nonclk`` ∉ {0, 1}, ``nonclk + clk ≠ 1``, an unknown
``btag``, a price that is not a non-negative number; an ``adgroup_id`` or ``userid`` listed twice in its table.

Preprocessing (every option in :class:`AlimamaOptions`, the presets in :data:`PRESETS`, both recorded in
``schema.json``), as the DSIN code (github shenweichen/DSIN, ``0_gen_sampled_data.py``, ``1_gen_sessions.py``,
``2_gen_din_input.py``) that AMEIR §3.1 follows:

1. **users**: ``user_fraction`` of ``user_profile``'s rows, drawn exactly as pandas'
   ``user_profile.sample(frac, random_state=user_seed)`` (NumPy ``RandomState(seed).permutation(n)[:round(frac n)]``
   over the file's rows), so the DSIN preset keeps the DSIN code's users; only their samples are kept. Users
   without a profile row are never drawn (``missing_profile=keep`` keeps them only with ``user_fraction=1``).
2. **behaviours**: rows of the drawn users with ``btag`` in ``btags`` (DSIN: ``pv``) and
   ``time_stamp >= behaviour_start`` (00:00 of that day in the ``utc_offset_hours`` time zone).
3. **cate / brand**: label-encoded *jointly* over ``ad_feature`` and the drawn users' ``btags`` behaviours (any
   time), so a history item and a target share one code space and one embedding table. Code 0 is the
   padding of the histories (and the out-of-vocabulary code), 1 a ``NULL`` brand (DSIN: ``fillna(-1)``, its
   own value), 2.. the values in increasing order; ``min_count`` counts a value's rows in that population.
4. **histories**: per sample, the user's last ``max_seq_len`` behaviours with ``time_stamp`` strictly before the
   sample's, oldest first, post-padded with 0 (``hist_cate_0..T-1``, ``hist_brand_0..T-1``, ``hist_len``). Ties
   in time keep the log's file order (DSIN's ``sort_values`` is not stable). A user with fewer than
   ``min_user_behaviours`` behaviours in the window gets empty histories (DSIN: ``len(session) > 2``).
5. **fields** (16, one code each; 0 out of vocabulary, 1 missing, ``vocab/<field>.parquet``): ``userid``,
   ``adgroup_id``, ``pid``, the 8 profile columns, ``campaign_id``, ``customer``, ``cate_id``, ``brand`` and
   ``price`` bucketed as ``floor(4 ln(1 + price) + 0.5)`` (DSIN standard-scales it as a dense input; AMEIR's
   N = 16 needs it categorical: the bucket keeps ~4 buckets per factor e of price). Vocabularies are counted on
   the training rows (``vocabulary_rows=all``: every row, as DSIN's ``LabelEncoder`` over all data).
6. **split** by day in the ``utc_offset_hours`` zone (default China time, UTC+8): the last day is the test
   split, the day before it validation, the rest training. The DSIN code cuts at 2017-05-13 00:00 *UTC*
   (08:00 China time) and has no validation split: ``utc_offset_hours=0`` gives its cut.

Memory stays bounded by the chunk size and the partition size, never by the behaviour log: the log is
scanned in ``chunk_bytes`` pieces (polars), filtered, and spread over partitions by ``user % P`` (P from the
file size and ``partition_bytes``); each partition is then sorted by (user, time) on its own and every
sample's history found with one vectorised ``searchsorted`` on the key ``user * 2^32 + time``. The samples
(a few int columns per row) stay in memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from autorecbench.data.ctr import (
    FIRST_CODE,
    MISSING,
    OOV,
    BadRows,
    Check,
    encode,
    field_count_problem,
    split_columns,
    value_problems,
    write_vocabulary,
)
from autorecbench.data.splits import SPLITS, TRAIN, split_by_day
from autorecbench.data.textfile import frame_of_lines, header_fields, iter_byte_chunks
from autorecbench.errors import DataFormatError, UserError

FORMAT = "alimama_csv"
BTAGS = ("pv", "cart", "fav", "buy")
PROFILE_FIELDS = ["cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
                  "occupation", "new_user_class_level"]
AD_FIELDS = ["campaign_id", "customer", "cate_id", "brand", "price"]
FIELDS = ["userid", "adgroup_id", "pid", *PROFILE_FIELDS, *AD_FIELDS]
JOINT_FIELDS = ("cate_id", "brand")  # encoded together with the behaviour log's cate / brand
SEQUENCES = {"hist_cate": "cate_id", "hist_brand": "brand"}  # sequence field -> the field whose table it shares
LENGTH_COLUMN = "hist_len"
TIME_LIMIT = 2**32  # times are Unix seconds below 2^32 (the search key packs them with the user id)
ID_LIMIT = 2**31


@dataclass(frozen=True)
class RawTable:
    """One published file: its header and what each column must hold."""

    file: str
    header: tuple[str, ...]  # as published (user_profile's last name ends with a space)
    ids: tuple[str, ...] = ()  # non-negative integers below 2^31
    times: tuple[str, ...] = ()  # Unix seconds in [0, 2^32)
    optional_ints: tuple[str, ...] = ()  # an integer, empty or the literal NULL (= missing)
    prices: tuple[str, ...] = ()  # non-negative numbers
    strings: tuple[str, ...] = ()  # non-empty

    @property
    def names(self) -> list[str]:
        return [h.strip() for h in self.header]

    def fast_schema(self) -> dict[str, Any]:
        types = {**dict.fromkeys(self.ids + self.times, pl.Int64), **dict.fromkeys(self.prices, pl.Float64)}
        return {n: types.get(n, pl.String) for n in self.names}


RAW_SAMPLE = RawTable("raw_sample.csv", ("user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"),
                      ids=("user", "adgroup_id"), times=("time_stamp",), strings=("pid", "nonclk", "clk"))
AD_FEATURE = RawTable("ad_feature.csv", ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"),
                      ids=("adgroup_id", "cate_id", "campaign_id", "customer"), optional_ints=("brand",),
                      prices=("price",))
USER_PROFILE = RawTable("user_profile.csv", ("userid", *PROFILE_FIELDS[:-1], "new_user_class_level "),
                        ids=("userid",), optional_ints=tuple(PROFILE_FIELDS))
BEHAVIOR_LOG = RawTable("behavior_log.csv", ("user", "time_stamp", "btag", "cate", "brand"),
                        ids=("user", "cate"), times=("time_stamp",), optional_ints=("brand",), strings=("btag",))
TABLES = (RAW_SAMPLE, AD_FEATURE, USER_PROFILE, BEHAVIOR_LOG)
FILES = [t.file for t in TABLES]


# ---------------------------------------------------------------- options and presets

PRESETS: dict[str, dict[str, Any]] = {
    # DSIN code (AMEIR §3.1): 25% of the users (seed 1024), pv from 2017-05-03, T = 50, every value kept.
    "dsin": {"user_fraction": 0.25, "user_seed": 1024, "btags": ["pv"], "behaviour_start": "2017-05-03",
             "max_seq_len": 50, "min_count": 1, "min_user_behaviours": 3, "missing_profile": "drop",
             "missing_ad": "keep", "vocabulary_rows": "train", "utc_offset_hours": 8},
    # BARS TaobaoAd_x1: all users, samples without a user or ad profile dropped, min count 10, T = 50. Its
    # behaviour filter (the DMR preprocessing) is not published with it: pv from 2017-05-03 as DSIN.
    "bars": {"user_fraction": 1.0, "user_seed": 1024, "btags": ["pv"], "behaviour_start": "2017-05-03",
             "max_seq_len": 50, "min_count": 10, "min_user_behaviours": 1, "missing_profile": "drop",
             "missing_ad": "drop", "vocabulary_rows": "train", "utc_offset_hours": 8},
}
# The counts a preset's cache is checked against (`autorecbench data prepare` warns when they differ):
# BARS TaobaoAd_x1 publishes 21,929,911 train (05-06..05-12; here train + validation) and 3,099,515 test rows.
PRESET_EXPECTED: dict[str, dict[str, int] | None] = {"dsin": None, "bars": {"rows": 25_029_426, "test": 3_099_515}}
DROP_KEEP = ("drop", "keep")
VOCABULARY_ROWS = ("train", "all")


@dataclass(frozen=True)
class AlimamaOptions:
    """The ``data.*`` options of the ``alimama`` family (``conf/data/alimama.yaml``). A value left ``None``
    takes the preset's (:data:`PRESETS`); all but ``chunk_bytes`` and ``partition_bytes`` enter the
    fingerprint, resolved."""

    preset: str = "dsin"
    user_fraction: float | None = None
    user_seed: int | None = None
    btags: tuple[str, ...] | None = None
    behaviour_start: str | None = None  # YYYY-MM-DD in the utc_offset_hours zone; "none": no lower bound
    max_seq_len: int | None = None
    min_count: int | None = None
    min_user_behaviours: int | None = None
    missing_profile: str | None = None
    missing_ad: str | None = None
    vocabulary_rows: str | None = None
    utc_offset_hours: int | None = None
    skip_bad_rows: bool = False
    chunk_bytes: int = 64 << 20
    partition_bytes: int = 512 << 20

    @staticmethod
    def from_mapping(values: dict[str, Any]) -> AlimamaOptions:
        known = {f.name for f in fields(AlimamaOptions)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown data option(s) for the alimama family: {', '.join(unknown)}")
        preset = str(values.get("preset") or "dsin")
        if preset not in PRESETS:
            raise UserError(f"data.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        merged = {**PRESETS[preset], **{k: v for k, v in values.items() if v is not None}, "preset": preset}
        merged["btags"] = tuple(merged["btags"])
        return AlimamaOptions(**merged)

    def __post_init__(self) -> None:
        if self.user_fraction is None:  # unresolved: from_mapping fills it
            return
        if not 0 < float(self.user_fraction) <= 1:
            raise UserError(f"data.user_fraction must be in (0, 1], got {self.user_fraction}")
        if not self.btags or any(b not in BTAGS for b in self.btags):
            raise UserError(f"data.btags must list some of {', '.join(BTAGS)}, got {list(self.btags or [])}")
        if self.max_seq_len is None or self.max_seq_len < 1:
            raise UserError(f"data.max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.min_count is None or self.min_count < 1 or (self.min_user_behaviours or 0) < 1:
            raise UserError("data.min_count and data.min_user_behaviours must be >= 1")
        for key in ("missing_profile", "missing_ad"):
            if getattr(self, key) not in DROP_KEEP:
                raise UserError(f"data.{key} must be drop or keep, got {getattr(self, key)!r}")
        if self.missing_profile == "keep" and self.user_fraction < 1:
            raise UserError("data.missing_profile=keep needs data.user_fraction=1: users are drawn from user_profile's "
                            "rows, so a user without a profile row is never drawn")
        if self.vocabulary_rows not in VOCABULARY_ROWS:
            raise UserError(f"data.vocabulary_rows must be train or all, got {self.vocabulary_rows!r}")
        if not -12 <= int(self.utc_offset_hours or 0) <= 14:
            raise UserError(f"data.utc_offset_hours must be a time-zone offset in [-12, 14], got {self.utc_offset_hours}")
        self.start_time()  # validates the date
        if self.chunk_bytes < 1024 or self.partition_bytes < 1024:
            raise UserError("data.chunk_bytes and data.partition_bytes must be >= 1024")

    def start_time(self) -> int | None:
        """``behaviour_start`` as Unix seconds (00:00 of that day in the configured time zone), or None."""
        if self.behaviour_start in (None, "none"):
            return None
        try:
            day = dt.date.fromisoformat(str(self.behaviour_start))
        except ValueError:
            raise UserError(f"data.behaviour_start must be a date YYYY-MM-DD or none, got {self.behaviour_start!r}") from None
        return (day - dt.date(1970, 1, 1)).days * 86_400 - int(self.utc_offset_hours or 0) * 3_600

    def fingerprint_options(self) -> dict[str, Any]:
        options = asdict(self)
        for key in ("chunk_bytes", "partition_bytes"):  # how much is read at a time never changes the result
            options.pop(key)
        options["btags"] = list(self.btags or ())
        return options

    def day(self, times: pl.Expr) -> pl.Expr:
        """Day number (days since 1970-01-01 in the configured time zone) of Unix times."""
        return ((times + int(self.utc_offset_hours or 0) * 3_600) // 86_400).cast(pl.Int32)


# ---------------------------------------------------------------- reading and validating the raw files

def _checks(table: RawTable) -> list[Check]:
    """Every value check of ``table``'s columns (the slow path, which names the line)."""
    def integer(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.Int64, strict=False)

    checks = [Check(integer(c).is_null() | (integer(c) < 0) | (integer(c) >= ID_LIMIT), c,
                    f"{c} is not an integer id (0 <= id < 2^31)") for c in table.ids]
    checks += [Check(integer(c).is_null() | (integer(c) < 0) | (integer(c) >= TIME_LIMIT), c,
                     f"{c} is not an integer Unix time in seconds") for c in table.times]
    checks += [Check(~pl.col(c).is_in(["", "NULL"]) & integer(c).is_null(), c, f"{c} is not an integer, empty or NULL")
               for c in table.optional_ints]
    price = pl.col("price").cast(pl.Float64, strict=False)
    checks += [Check(price.is_null() | ~price.is_finite() | (price < 0), c, f"{c} is not a non-negative number")
               for c in table.prices]
    checks += [Check(pl.col(c) == "", c, f"{c} is empty") for c in table.strings]
    if table is RAW_SAMPLE:
        checks += [Check(~pl.col(c).is_in(["0", "1"]), c, f"{c} must be 0 or 1") for c in ("nonclk", "clk")]
        checks.append(Check(pl.col("nonclk").cast(pl.Int8, strict=False) + pl.col("clk").cast(pl.Int8, strict=False) != 1,
                            "nonclk,clk", "nonclk + clk must be 1 (nonclk,clk)"))
    if table is BEHAVIOR_LOG:
        checks.append(Check(~pl.col("btag").is_in(BTAGS), "btag", f"btag must be one of {', '.join(BTAGS)}"))
    return checks


def _typed(frame: pl.DataFrame, table: RawTable) -> pl.DataFrame:
    """Validated string columns -> typed columns (the fast path's output types)."""
    out = []
    for name in table.names:
        col = pl.col(name)
        if name in table.ids or name in table.times:
            col = col.cast(pl.Int64)
        elif name in table.optional_ints:
            col = col.cast(pl.Int64, strict=False)
        elif name in table.prices:
            col = col.cast(pl.Float64)
        elif name in table.strings:
            col = pl.when(col == "").then(None).otherwise(col)
        out.append(col.alias(name))
    return frame.select(out)


def _slow_parse(data: bytes, first_line: int, path: Path, table: RawTable, bad: BadRows, file_index: int,
                keep_line: bool = False) -> pl.DataFrame:
    """Line by line (vectorised), naming the first bad row's line; ``bad`` raises or drops."""
    lines = frame_of_lines(data, first_line, path)
    names = table.names
    count_bad, describe = field_count_problem(lines, ",", len(names))
    frame = split_columns(lines, ",", names)
    if table is RAW_SAMPLE:
        frame = frame.with_columns(pl.concat_str(["nonclk", "clk"], separator=",").alias("nonclk,clk"))
    problems = [(count_bad, describe), *value_problems(frame, ~count_bad, _checks(table))]
    frame = bad.apply(path, frame, problems, file_index)
    typed = _typed(frame, table)
    return typed.with_columns(frame["line"]) if keep_line else typed


def _fast_parse(data: bytes, table: RawTable) -> pl.DataFrame | None:
    """polars' CSV reader on a valid piece (several times faster); None when anything is off, so the slow path
    finds and names the problem."""
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if data.count(b",") != (len(table.names) - 1) * n_lines:  # every line has exactly the header's columns
        return None
    try:
        frame = pl.read_csv(io.BytesIO(data), has_header=False, new_columns=table.names, schema=table.fast_schema(),
                            quote_char=None)
    except (pl.exceptions.PolarsError, ValueError):
        return None
    if frame.height != n_lines:
        return None
    ok = [pl.col(c).is_not_null() & (pl.col(c) >= 0) & (pl.col(c) < ID_LIMIT) for c in table.ids]
    ok += [pl.col(c).is_not_null() & (pl.col(c) >= 0) & (pl.col(c) < TIME_LIMIT) for c in table.times]
    ok += [pl.col(c).is_null() | (pl.col(c) == "NULL") | pl.col(c).cast(pl.Int64, strict=False).is_not_null()
           for c in table.optional_ints]
    ok += [pl.col(c).is_not_null() & pl.col(c).is_finite() & (pl.col(c) >= 0) for c in table.prices]
    ok += [pl.col(c).is_not_null() for c in table.strings]
    if table is RAW_SAMPLE:
        ok += [pl.col(c).is_in(["0", "1"]) for c in ("nonclk", "clk")]
        ok.append(pl.col("nonclk") != pl.col("clk"))
    if table is BEHAVIOR_LOG:
        ok.append(pl.col("btag").is_in(BTAGS))
    if not frame.select(pl.all_horizontal(ok).all()).item():
        return None
    return frame.with_columns(pl.col(c).cast(pl.Int64, strict=False) for c in table.optional_ints)


def _header(data: bytes, path: Path, table: RawTable) -> bytes:
    """Check the first line against the published header; return the rest of ``data``."""
    end = data.find(b"\n")
    head, rest = (data, b"") if end < 0 else (data[:end], data[end + 1:])
    text = head.decode("utf-8", errors="replace").rstrip("\r")
    if header_fields(text, ",") != table.names:
        raise DataFormatError(path, f"expected the header {','.join(table.header)!r}, found {text[:200]!r}", line=1)
    return rest


def read_table(path: Path, table: RawTable, bad: BadRows, chunk_bytes: int, digest: Any = None, *,
               file_index: int = 0, fast: bool = True) -> Iterator[pl.DataFrame]:
    """``path`` in validated, typed chunks (header checked and dropped; see the module docstring). ``fast``:
    try polars' CSV reader first on each chunk (the slow path only where a chunk has a problem)."""
    seen = False
    for data, first_line in iter_byte_chunks(path, chunk_bytes, digest):
        if first_line == 1:
            data, first_line = _header(data, path, table), 2
            seen = True
            if not data.strip():
                continue
        frame = _fast_parse(data, table) if fast else None
        if frame is None:
            frame = _slow_parse(data, first_line, path, table, bad, file_index)
        if frame.height:
            yield frame
    if not seen:
        raise DataFormatError(path, "empty file")


def _read_small(path: Path, table: RawTable, bad: BadRows, options: AlimamaOptions, digest: Any, key: str,
                file_index: int) -> pl.DataFrame:
    """A whole table (ad_feature, user_profile) in which every ``key`` is listed once."""
    parts = []
    for data, first_line in iter_byte_chunks(path, options.chunk_bytes, digest):
        if first_line == 1:
            data, first_line = _header(data, path, table), 2
        parts.append(_slow_parse(data, first_line, path, table, bad, file_index, keep_line=True))
    frame = pl.concat(parts)
    repeated = frame.filter(pl.col(key).is_duplicated())
    if repeated.height:
        value = repeated[key][0]
        lines = repeated.filter(pl.col(key) == value)["line"]
        raise DataFormatError(path, f"{key} {value} is listed twice (first on line {lines[0]})", line=int(lines[1]))
    return frame.drop("line")


# ---------------------------------------------------------------- the build

@dataclass
class AlimamaBuild:
    """What a preparation produced (the rest of the schema comes from the config)."""

    fields: list[tuple[str, int]]
    sequences: list[tuple[str, str, int]]  # (name, shared field, T)
    n_rows: int
    splits: dict[str, int]
    positives: dict[str, int]
    skipped_rows: int
    first_skipped: str | None
    sha256: dict[str, str]
    day_span: tuple[int, int]
    split_rule: dict[str, Any]
    vocab_kept: dict[str, int]
    counts: dict[str, Any] = field(default_factory=dict)


def _lookup(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of each value in the sorted ``keys`` and whether it is there (one vectorised search)."""
    if keys.size == 0:
        return np.zeros(values.shape, dtype=np.int64), np.zeros(values.shape, dtype=bool)
    row = np.minimum(np.searchsorted(keys, values), keys.size - 1)
    return row, keys[row] == values


def _codes(vocab: pl.DataFrame, name: str, values: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """Codes of integer tokens under a vocabulary from ``write_vocabulary`` (sorted tokens): OOV when absent,
    MISSING where ``missing``."""
    row, found = _lookup(vocab[name].to_numpy(), values)
    codes = vocab["code"].to_numpy() if vocab.height else np.zeros(1, dtype=np.int32)
    out = np.where(found, codes[row], OOV).astype(np.int32)
    if missing is not None:
        out[missing] = MISSING
    return out


def draw_users(profile_users: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """pandas' ``user_profile.sample(frac=fraction, random_state=seed)`` over the file's rows: the users drawn."""
    if fraction >= 1:
        return profile_users
    n = profile_users.size
    return profile_users[np.random.RandomState(seed).permutation(n)[: round(fraction * n)]]


def history_windows(log_users: np.ndarray, log_times: np.ndarray, users: np.ndarray, times: np.ndarray,
                    length: int, min_user_behaviours: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, where its history ends in the log (exclusive) and how long it is.

    The log is sorted by (user, time); a sample's history is its user's last ``length`` rows with a time
    strictly before the sample's. One ``searchsorted`` on the key ``user * 2^32 + time`` finds them all. Users
    with fewer than ``min_user_behaviours`` rows in the log get length 0."""
    key = (log_users.astype(np.int64) << 32) | log_times.astype(np.int64)
    user_key = users.astype(np.int64) << 32
    end = np.searchsorted(key, user_key | times.astype(np.int64), side="left")
    begin = np.searchsorted(key, user_key, side="left")
    lengths = np.minimum(end - begin, length)
    if min_user_behaviours > 1:
        total = np.searchsorted(key, user_key + (1 << 32), side="left") - begin
        lengths[total < min_user_behaviours] = 0
    return end, lengths


def gather_histories(codes: np.ndarray, end: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
    """``[samples, length]`` int32: rows ``end - len .. end - 1`` of ``codes`` (oldest first), post-padded with 0."""
    positions = np.arange(length)
    valid = positions[None, :] < lengths[:, None]
    if codes.size == 0:
        return np.zeros((end.size, length), dtype=np.int32)
    index = np.clip(end[:, None] - lengths[:, None] + positions[None, :], 0, codes.size - 1)
    return np.where(valid, codes[index], 0).astype(np.int32)


def _count(frame: pl.DataFrame, column: str, name: str | None = None) -> pl.DataFrame:
    return frame.group_by(column).len().drop_nulls(column).rename({column: name or column})


def _weighted_count(counts: pl.DataFrame, key: str, table: pl.DataFrame, column: str) -> pl.DataFrame:
    """Token counts of a table's ``column`` weighted by how often each ``key`` occurs (``counts``: key, len)."""
    return (counts.join(table.select(key, column), on=key, how="inner").group_by(column)
            .agg(pl.col("len").sum()).drop_nulls(column))


class _Partitions:
    """The filtered behaviour log spread over ``n`` partition folders by ``user % n``, in buffered flushes."""

    def __init__(self, directory: Path, n: int, flush_rows: int = 8_000_000) -> None:
        self.directory = directory
        self.n = n
        self.flush_rows = flush_rows
        self.buffer: list[pl.DataFrame] = []
        self.buffered = 0
        self.flushes = 0
        self.rows = 0
        directory.mkdir()

    def add(self, frame: pl.DataFrame) -> None:
        self.buffer.append(frame)
        self.buffered += frame.height
        if self.buffered >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        frame = pl.concat(self.buffer).with_columns((pl.col("user") % self.n).alias("_part"))
        for (part,), group in frame.partition_by("_part", as_dict=True, maintain_order=True).items():
            group.drop("_part").write_parquet(self.directory / f"p{int(part):04d}-{self.flushes:05d}.parquet",
                                              compression="lz4")
        self.rows += frame.height
        self.flushes += 1
        self.buffer, self.buffered = [], 0

    def read(self, part: int) -> pl.DataFrame:
        files = sorted(self.directory.glob(f"p{part:04d}-*.parquet"))  # flush order = file order
        if not files:
            return pl.DataFrame(schema={"user": pl.Int32, "time_stamp": pl.UInt32, "cate": pl.Int64, "brand": pl.Int64})
        return pl.read_parquet(files)


def build_alimama(options: AlimamaOptions, paths: dict[str, Path], out: Path,
                  progress: Callable[[str], None] | None = None) -> AlimamaBuild:
    """Read the four files (``paths``: published file name -> path) and write the encoded parts into ``out``."""
    say = progress or (lambda message: None)
    bad = BadRows(skip=options.skip_bad_rows)
    digests = {name: hashlib.sha256() for name in FILES}
    length = int(options.max_seq_len)  # type: ignore[arg-type]

    # users and their profiles
    profile = _read_small(paths[USER_PROFILE.file], USER_PROFILE, bad, options, digests[USER_PROFILE.file],
                          "userid", FILES.index(USER_PROFILE.file))
    drawn = draw_users(profile["userid"].to_numpy(), float(options.user_fraction), int(options.user_seed))  # type: ignore[arg-type]
    drawn_set = pl.Series("user", np.sort(drawn)).implode()
    profile = profile.filter(pl.col("userid").is_in(drawn_set)).sort("userid")
    ads = _read_small(paths[AD_FEATURE.file], AD_FEATURE, bad, options, digests[AD_FEATURE.file], "adgroup_id",
                      FILES.index(AD_FEATURE.file)).sort("adgroup_id")
    ads = ads.with_columns((4.0 * pl.col("price").log1p() + 0.5).floor().cast(pl.Int64).alias("price"))
    say(f"{profile.height:,} users drawn, {ads.height:,} ads")

    # samples: the drawn users' rows (all users: missing_profile=keep with user_fraction 1)
    keep_all_users = options.missing_profile == "keep"
    pids: dict[str, int] = {}
    parts, samples_in_file = [], 0
    for frame in read_table(paths[RAW_SAMPLE.file], RAW_SAMPLE, bad, options.chunk_bytes, digests[RAW_SAMPLE.file],
                            file_index=FILES.index(RAW_SAMPLE.file)):
        samples_in_file += frame.height
        if not keep_all_users:
            frame = frame.filter(pl.col("user").is_in(drawn_set))
        for pid in frame["pid"].unique(maintain_order=True).to_list():
            pids.setdefault(pid, len(pids))
        parts.append(frame.select(
            pl.col("user").cast(pl.Int32), pl.col("time_stamp").cast(pl.UInt32), pl.col("adgroup_id").cast(pl.Int32),
            pl.col("pid").replace_strict(list(pids), list(pids.values()), return_dtype=pl.Int32),
            pl.col("clk").cast(pl.Int8).alias("label")))
    if not parts:
        raise DataFormatError(paths[RAW_SAMPLE.file], "no data rows")
    samples = pl.concat(parts)
    del parts
    if options.missing_ad == "drop":
        samples = samples.filter(pl.col("adgroup_id").is_in(ads["adgroup_id"].cast(pl.Int32).implode()))
    if samples.height == 0:
        raise UserError(f"{paths[RAW_SAMPLE.file]}: no samples left for the drawn users (data.user_fraction, "
                        "data.missing_profile, data.missing_ad)")
    days = samples.select(options.day(pl.col("time_stamp").cast(pl.Int64)))["time_stamp"].to_numpy()
    split = split_by_day(days, str(paths[RAW_SAMPLE.file]))
    samples = samples.with_columns(pl.Series("split", split, dtype=pl.Int8))
    say(f"{samples.height:,} samples kept of {samples_in_file:,}")

    # vocabularies of the 14 fields that are not the log's (counted on the training rows)
    counted = samples.filter(pl.col("split") == TRAIN) if options.vocabulary_rows == "train" else samples
    n_counted = counted.height
    vocab_dir = out / "vocab"
    vocab_dir.mkdir()
    vocabs: dict[str, pl.DataFrame] = {}
    user_counts = _count(counted, "user", "userid")
    ad_counts = _count(counted, "adgroup_id")
    vocabs["userid"] = write_vocabulary(vocab_dir, "userid", user_counts, options.min_count or 1, n_counted)
    vocabs["adgroup_id"] = write_vocabulary(vocab_dir, "adgroup_id", ad_counts, options.min_count or 1, n_counted)
    pid_names = {i: p for p, i in pids.items()}
    pid_counts = _count(counted, "pid").with_columns(pl.col("pid").replace_strict(pid_names, return_dtype=pl.String))
    vocabs["pid"] = write_vocabulary(vocab_dir, "pid", pid_counts, options.min_count or 1, n_counted)
    for name in PROFILE_FIELDS:
        counts = _weighted_count(user_counts, "userid", profile.with_columns(pl.col("userid").cast(pl.Int32)), name)
        vocabs[name] = write_vocabulary(vocab_dir, name, counts, options.min_count or 1, n_counted,
                                        missing="empty value or no profile row")
    ad_keyed = ads.with_columns(pl.col("adgroup_id").cast(pl.Int32))
    for name in ("campaign_id", "customer", "price"):
        counts = _weighted_count(ad_counts, "adgroup_id", ad_keyed, name)
        vocabs[name] = write_vocabulary(vocab_dir, name, counts, options.min_count or 1, n_counted,
                                        (lambda t: f"floor(4 ln(1 + price) + 0.5) = {t}") if name == "price" else str,
                                        missing="no ad_feature row")

    # the behaviour log: filter, count the joint vocabulary, spread over partitions
    log_path = paths[BEHAVIOR_LOG.file]
    estimate = log_path.stat().st_size * (4 if log_path.suffix == ".gz" else 1)
    n_parts = max(1, math.ceil(estimate / options.partition_bytes))
    partitions = _Partitions(out / "_log", n_parts)
    sample_users = samples["user"].unique().sort().cast(pl.Int64).implode()
    start = options.start_time()
    joint_counts: dict[str, list[pl.DataFrame]] = {"cate_id": [_count(ads, "cate_id")], "brand": [_count(ads, "brand")]}
    log_in_file = log_drawn = 0
    for i, frame in enumerate(read_table(log_path, BEHAVIOR_LOG, bad, options.chunk_bytes, digests[BEHAVIOR_LOG.file],
                                         file_index=FILES.index(BEHAVIOR_LOG.file))):
        log_in_file += frame.height
        frame = frame.filter(pl.col("btag").is_in(list(options.btags or ())))
        if not keep_all_users:
            frame = frame.filter(pl.col("user").is_in(drawn_set))
        log_drawn += frame.height
        joint_counts["cate_id"].append(_count(frame, "cate", "cate_id"))
        joint_counts["brand"].append(_count(frame, "brand"))
        if (i + 1) % 16 == 0:  # keep the running counts compact
            joint_counts = {k: [pl.concat(v).group_by(k).agg(pl.col("len").sum())] for k, v in joint_counts.items()}
        window = pl.col("user").is_in(sample_users)
        if start is not None:
            window &= pl.col("time_stamp") >= start
        partitions.add(frame.filter(window).select(pl.col("user").cast(pl.Int32), pl.col("time_stamp").cast(pl.UInt32),
                                                   "cate", "brand"))
        if (i + 1) % 32 == 0:
            say(f"behaviour log: {log_in_file:,} rows read")
    partitions.flush()
    log_total = sum(int(c["len"].sum()) for c in joint_counts["cate_id"])
    for name in JOINT_FIELDS:
        counts = pl.concat(joint_counts[name]).group_by(name).agg(pl.col("len").sum())
        vocabs[name] = write_vocabulary(vocab_dir, name, counts, options.min_count or 1, log_total,
                                        missing="NULL brand or no ad_feature row")
    say(f"behaviour log: {log_in_file:,} rows, {partitions.rows:,} in the window, {n_parts} partition(s)")

    # per-ad and per-user codes, looked up by id
    ad_ids = ads["adgroup_id"].to_numpy()
    ad_codes = {name: _codes(vocabs[name], name, ads[name].fill_null(-1).to_numpy(), ads[name].is_null().to_numpy())
                for name in AD_FIELDS}
    profile_ids = profile["userid"].to_numpy()
    profile_codes = {name: _codes(vocabs[name], name, profile[name].fill_null(-1).to_numpy(),
                                  profile[name].is_null().to_numpy()) for name in PROFILE_FIELDS}
    pid_code = np.full(len(pids), OOV, dtype=np.int32)
    for token, code in zip(vocabs["pid"]["pid"].to_list(), vocabs["pid"]["code"].to_list()):
        pid_code[pids[token]] = code

    seq_names = [f"{s}_{t}" for s in SEQUENCES for t in range(length)]
    per_split = np.zeros(3, dtype=np.int64)
    positives = np.zeros(3, dtype=np.int64)
    lengths_sum = empty = 0
    samples = samples.with_columns((pl.col("user") % n_parts).alias("_part"))
    for part in range(n_parts):
        rows = samples.filter(pl.col("_part") == part)
        if rows.height == 0:
            continue
        log = partitions.read(part)
        # null brand -> MISSING, a value without a code -> OOV = 0 (the padding code)
        log = log.with_columns(encode("cate_id", vocabs["cate_id"], "cate").alias("_cate_id"),
                               encode("brand", vocabs["brand"], "brand").alias("_brand"))
        log = log.sort(["user", "time_stamp"], maintain_order=True)
        users, times = rows["user"].to_numpy(), rows["time_stamp"].to_numpy()
        end, lens = history_windows(log["user"].to_numpy(), log["time_stamp"].to_numpy(), users, times, length,
                                    int(options.min_user_behaviours or 1))
        histories = [gather_histories(log[f"_{shared}"].to_numpy(), end, lens, length) for shared in SEQUENCES.values()]
        ad_row, ad_found = _lookup(ad_ids, rows["adgroup_id"].to_numpy())
        user_row, user_found = _lookup(profile_ids, users)
        columns: dict[str, np.ndarray] = {
            "userid": _codes(vocabs["userid"], "userid", users),
            "adgroup_id": _codes(vocabs["adgroup_id"], "adgroup_id", rows["adgroup_id"].to_numpy()),
            "pid": pid_code[rows["pid"].to_numpy()],
        }
        for name in PROFILE_FIELDS:
            columns[name] = np.where(user_found, profile_codes[name][user_row], MISSING).astype(np.int32)
        for name in AD_FIELDS:
            columns[name] = np.where(ad_found, ad_codes[name][ad_row], MISSING).astype(np.int32)
        frame = pl.DataFrame({name: columns[name] for name in FIELDS})
        hist = pl.from_numpy(np.concatenate(histories, axis=1), schema=seq_names, orient="row")
        frame = pl.concat([frame, hist, pl.DataFrame({LENGTH_COLUMN: lens.astype(np.int32)}),
                           rows.select("label", "split")], how="horizontal")
        frame.write_parquet(out / f"part-{part:05d}.parquet")
        labels = rows["split"].to_numpy()
        per_split += np.bincount(labels, minlength=3)
        positives += np.bincount(labels, weights=rows["label"].to_numpy(), minlength=3).astype(np.int64)
        lengths_sum += int(lens.sum())
        empty += int((lens == 0).sum())
    shutil.rmtree(partitions.directory)
    say("parts written")

    n_rows = samples.height
    uniq_days = np.unique(days)
    return AlimamaBuild(
        fields=[(name, FIRST_CODE + vocabs[name].height) for name in FIELDS],
        sequences=[(name, shared, length) for name, shared in SEQUENCES.items()],
        n_rows=n_rows,
        splits={name: int(c) for name, c in zip(SPLITS, per_split)},
        positives={name: int(c) for name, c in zip(SPLITS, positives)},
        skipped_rows=bad.count,
        first_skipped=bad.first,
        sha256={name: digest.hexdigest() for name, digest in digests.items()},
        day_span=(int(uniq_days[0]), int(uniq_days[-1])),
        split_rule={"rule": "time", "by": f"day (UTC{int(options.utc_offset_hours or 0):+d})",
                    "test_day": str(dt.date(1970, 1, 1) + dt.timedelta(days=int(uniq_days[-1]))),
                    "days": int(uniq_days.size)},
        vocab_kept={name: vocabs[name].height for name in FIELDS},
        counts={"samples_in_file": samples_in_file, "users_drawn": int(drawn.size),
                "behaviours_in_file": log_in_file, "behaviours_of_drawn_users": log_drawn,
                "behaviours_in_window": partitions.rows, "partitions": n_parts,
                "mean_history_length": lengths_sum / max(n_rows, 1), "empty_histories": empty},
    )
