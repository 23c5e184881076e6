"""Click-through-rate datasets (Criteo, Avazu): raw text -> validated, encoded Parquet blocks, in bounded memory.

The raw file is read in chunks of ``chunk_bytes`` of text (``textfile.iter_line_chunks``); each chunk is
validated and turned into one raw *token* per field by the format's parser (``criteo.py``, ``avazu.py``), so
memory stays bounded by the chunk size and the vocabularies, never by the file. Then:

0. **negative down-sampling** (``negative_keep_rate`` < 1, the AutoFIS/PIN Criteo-8d protocol): every
   positive row is kept and a negative row is kept with that probability, decided by a seeded hash of
   (``negative_seed``, file, line): the same rows whatever the chunk size, before anything else happens;
1. **split**: every row gets train / valid / test (``splits.py``): random 8:1:1 with a seed, or by time;
2. **vocabularies** are counted on the *training rows only*; per field, a token seen at least ``min_count``
   times in training keeps its own code (2, 3, ... in token order), every other token shares the field's
   out-of-vocabulary code 0, and an empty raw value is the field's "missing" code 1 (so a field's cardinality
   is ``2 + kept tokens``). Tokens of the validation and test rows that training never saw are OOV. With
   ``int_transform: quantile`` a numeric field (Criteo's I1-I13) is instead cut into ``int_buckets``
   equal-frequency buckets of its training values (a value heavier than a bucket is a bucket of its own; the
   buckets' lower edges are training values, and any value falls into the bucket of the largest edge at or
   below it, so unseen values of the other splits get a bucket too; ``min_count`` does not apply);
3. **encoding**: the blocks are rewritten as int32 codes per field plus ``label`` (int8) and ``split`` (int8),
   ``part-00000.parquet``, ... in file order, with ``vocab/<field>.parquet`` (code, token, count).

Malformed rows (wrong field count, bad label, non-integer, bad hex, bad ``hour``) raise a DataFormatError
naming file and line, unless ``skip_bad_rows`` is on: then they are dropped, counted and the first is
reported. Options and their defaults are :class:`CTROptions`; the presets per dataset live in ``conf/data``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from autorecbench.data.splits import (
    SPLITS,
    TRAIN,
    check_rule,
    equal_parts,
    last_day_split,
    random_split,
    split_by_day,
)
from autorecbench.data.textfile import iter_line_chunks
from autorecbench.errors import DataFormatError, UserError, quoted

OOV, MISSING = 0, 1  # reserved codes in every field
FIRST_CODE = 2
INT_TRANSFORMS = ("log_square", "identity", "quantile")
INT_MISSING = ("own", "zero")


@dataclass(frozen=True)
class CTROptions:
    """Preprocessing options of a CTR dataset (``data.*`` keys); all but ``chunk_bytes`` enter the cache
    fingerprint.

    ``int_transform``: ``log_square`` (BARS/FuxiCTR code): an integer v > 2 becomes the bucket
    ``floor(ln(v)^2)``, a smaller one stays its own category (so 0, 1, 2 and each negative value stay distinct
    from the buckets and from each other); ``identity``: every integer is its own category.
    ``int_missing``: ``own`` (an empty integer is the field's missing value) or ``zero`` (an empty integer reads
    as 0, as BARS' Criteo_x4 configs do with ``na_value: 0``).
    ``quantile``: equal-frequency buckets of the training values (``int_buckets`` of them; the module
    docstring). ``fields``: keep only these fields, in this order (None: all). ``user_field``: the field that
    identifies a user, for gAUC (None: no gAUC). ``negative_keep_rate`` / ``negative_seed``: negative
    down-sampling (module docstring). ``time_fields``: the fields a format derives from its timestamp (Avazu:
    from ``hour``; None: the format's default).

    Options added after cache version 2 enter the fingerprint only when they differ from their defaults, so
    that the caches (and numbers) of the presets that do not use them stay exactly as they were.
    """

    split: str = "random"
    split_seed: int = 2018
    split_ratio: tuple[float, ...] = (0.8, 0.1, 0.1)
    min_count: int = 1
    int_transform: str = "log_square"
    int_missing: str = "own"
    skip_bad_rows: bool = False
    fields: tuple[str, ...] | None = None
    user_field: str | None = None
    days: tuple[int, ...] | None = None
    chunk_bytes: int = 64 << 20
    negative_keep_rate: float = 1.0
    negative_seed: int = 0
    int_buckets: int = 1000
    time_fields: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_rule(self.split, self.split_ratio)
        if self.min_count < 1:
            raise UserError(f"data.min_count must be >= 1, got {self.min_count}")
        if self.int_transform not in INT_TRANSFORMS:
            raise UserError(f"data.int_transform must be one of {', '.join(INT_TRANSFORMS)}, got {self.int_transform!r}")
        if self.int_missing not in INT_MISSING:
            raise UserError(f"data.int_missing must be one of {', '.join(INT_MISSING)}, got {self.int_missing!r}")
        if self.chunk_bytes < 1024:
            raise UserError("data.chunk_bytes must be >= 1024")
        if not 0 < self.negative_keep_rate <= 1:
            raise UserError(f"data.negative_keep_rate must be in (0, 1], got {self.negative_keep_rate}")
        if self.int_buckets < 2:
            raise UserError(f"data.int_buckets must be >= 2, got {self.int_buckets}")

    def recorded_options(self) -> dict[str, Any]:
        """Every preprocessing option with its value (``schema.json``), also those at their defaults."""
        options = asdict(self)
        options.pop("chunk_bytes")  # how much is read at a time never changes the result
        return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}

    def fingerprint_options(self) -> dict[str, Any]:
        options = self.recorded_options()
        if self.negative_keep_rate == 1.0:  # later options: fingerprinted only where used (class docstring)
            options.pop("negative_keep_rate")
            options.pop("negative_seed")
        if self.int_transform != "quantile":
            options.pop("int_buckets")
        if self.time_fields is None:
            options.pop("time_fields")
        return options


# ---------------------------------------------------------------- malformed rows

@dataclass
class BadRows:
    """Collects the malformed rows of a file: the first one is an error, or (``skip``) all are dropped and
    counted."""

    skip: bool
    count: int = 0
    first: str | None = None
    _first_key: tuple[int, int] | None = field(default=None, repr=False)

    def apply(self, path: Path, frame: pl.DataFrame, problems: list[tuple[pl.Series, Callable[[dict[str, Any]], str]]],
              file_index: int = 0) -> pl.DataFrame:
        """``problems``: (mask of bad rows, message for a bad row). Returns ``frame`` without the bad rows."""
        earliest: tuple[int, str] | None = None
        combined: pl.Series | None = None
        for mask, describe in problems:
            if not mask.any():
                continue
            index = int(mask.arg_true()[0])
            line = int(frame["line"][index])
            if earliest is None or line < earliest[0]:
                earliest = (line, describe(frame.row(index, named=True)))
            combined = mask if combined is None else (combined | mask)
        if earliest is None or combined is None:
            return frame
        error = DataFormatError(path, earliest[1], line=earliest[0])
        if not self.skip:
            raise error
        self.count += int(combined.sum())
        key = (file_index, earliest[0])
        if self._first_key is None or key < self._first_key:
            self._first_key, self.first = key, str(error)
        return frame.filter(~combined)


def field_count_problem(lines: pl.DataFrame, separator: str, expected: int) -> tuple[pl.Series, Callable[[dict[str, Any]], str]]:
    counts = lines["text"].str.count_matches(separator, literal=True) + 1
    shown = "tab" if separator == "\t" else repr(separator)

    def describe(row: dict[str, Any]) -> str:
        found = row["text"].count(separator) + 1
        return f"expected {expected} {shown}-separated fields, found {found}"

    return counts != expected, describe


def split_columns(lines: pl.DataFrame, separator: str, names: list[str]) -> pl.DataFrame:
    """``line``, ``text`` and one string column per name (rows with another field count get garbage that
    callers mask out)."""
    return lines.with_columns(
        pl.col("text").str.split_exact(separator, len(names) - 1).struct.rename_fields(names).alias("_f")
    ).unnest("_f")


@dataclass(frozen=True)
class Check:
    """A value check: rows where ``bad`` holds are malformed; the message gets the offending value of
    ``column`` appended."""

    bad: pl.Expr
    column: str
    message: str


def value_problems(frame: pl.DataFrame, ok: pl.Series, checks: list[Check]
                   ) -> list[tuple[pl.Series, Callable[[dict[str, Any]], str]]]:
    """Evaluate every check in one pass over ``frame`` (among the ``ok`` rows only)."""
    masks = frame.select([c.bad.fill_null(True).alias(f"_{i}") for i, c in enumerate(checks)])

    def describe(check: Check) -> Callable[[dict[str, Any]], str]:
        return lambda row: f"{check.message}: {quoted(row[check.column])}"

    return [(masks[f"_{i}"] & ok, describe(c)) for i, c in enumerate(checks)]


# ---------------------------------------------------------------- formats

def int_token(expr: pl.Expr, transform: str) -> pl.Expr:
    """Token of an integer value (null stays null = missing).

    ``log_square``: v > 2 -> ``floor(ln(v)^2) + 2`` (the bucket, shifted past 2 so buckets never collide with
    the small values); v <= 2 -> v itself. So tokens <= 2 are raw values and a token t >= 3 is bucket t - 2.
    """
    if transform in ("identity", "quantile"):  # quantile: raw values, bucketed once the training rows are known
        return expr
    bucket = expr.clip(lower_bound=3).cast(pl.Float64).log().pow(2).floor().cast(pl.Int64) + 2
    return pl.when(expr > 2).then(bucket).otherwise(expr)


class CTRFormat(ABC):
    """A published raw format: how one chunk of lines becomes validated tokens.

    ``parse`` returns one column per field of ``fields`` (Int64 or String tokens; null = missing), ``label``
    (Int8, 0/1), ``day`` (Int32, null when the format has no time: then ``equal_days`` cuts the rows into
    that many equal consecutive "days" for ``split=time``) and ``line`` (the row's line in its file).
    ``numeric_fields`` are the integer fields ``int_transform`` applies to. ``fields`` is the format's own
    list unless a subclass derives it from the options (Avazu's ``time_fields``).
    """

    name: ClassVar[str]
    fields: list[str]
    numeric_fields: ClassVar[tuple[str, ...]] = ()
    equal_days: ClassVar[int | None] = None

    def __init__(self, options: CTROptions) -> None:
        self.options = options
        if options.int_transform == "quantile" and not self.numeric_fields:
            raise UserError(f"data.int_transform=quantile: the {self.name} format has no integer fields to bucket")

    @abstractmethod
    def parse(self, lines: pl.DataFrame, path: Path, bad: BadRows, *, first_chunk: bool, file_day: int | None,
              file_index: int) -> pl.DataFrame: ...

    def token_label(self, fieldname: str, token: Any) -> str:
        """Human-readable meaning of a token, for the vocabulary files."""
        return str(token)


# ---------------------------------------------------------------- the build

@dataclass
class CTRBuild:
    """What a preparation produced (the rest of the schema comes from the config)."""

    fields: list[tuple[str, int]]  # (name, cardinality)
    n_rows: int
    splits: dict[str, int]
    positives: dict[str, int]
    skipped_rows: int
    first_skipped: str | None
    sha256: list[str]
    day_span: tuple[int, int] | None  # first and last day (days since 1970-01-01) when the format has dates
    split_rule: dict[str, Any]
    vocab_kept: dict[str, int]
    negatives_dropped: int = 0


_DAY_FILE = re.compile(r"day_(\d+)")


def file_day(path: Path) -> int | None:
    """The day number of a Criteo 1TB file name (``day_3``, ``day_3.gz``), else None."""
    match = _DAY_FILE.fullmatch(path.name.removesuffix(".gz"))
    return int(match.group(1)) if match else None


def _select_fields(fmt: CTRFormat, options: CTROptions) -> list[str]:
    if options.fields is None:
        return list(fmt.fields)
    unknown = [f for f in options.fields if f not in fmt.fields]
    if unknown or not options.fields or len(set(options.fields)) != len(options.fields):
        raise UserError(f"data.fields: unknown or repeated field(s) {unknown or list(options.fields)}; "
                        f"the {fmt.name} format has {', '.join(fmt.fields)}")
    return list(options.fields)


_GOLDEN = 0x9E3779B97F4A7C15


def row_uniform(seed: int, file_index: int, lines: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per row, a hash (splitmix64) of (seed, file, line): the same for a row whatever
    chunk it is read in."""
    with np.errstate(over="ignore"):
        key = (np.uint64(file_index) << np.uint64(40)) | lines.astype(np.uint64)
        z = key + np.uint64((seed * _GOLDEN + _GOLDEN) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def keep_rows(tokens: pl.DataFrame, options: CTROptions, file_index: int) -> pl.Series:
    """Negative down-sampling: every positive, and each negative with probability ``negative_keep_rate``."""
    u = row_uniform(options.negative_seed, file_index, tokens["line"].to_numpy())
    return pl.Series((tokens["label"].to_numpy() == 1) | (u < options.negative_keep_rate))


def _tokenize(fmt: CTRFormat, files: list[Path], fields: list[str], options: CTROptions, tokens_dir: Path
              ) -> tuple[list[Path], list[int], BadRows, list[str], int]:
    """Pass 1: raw chunks -> token blocks (one Parquet file per chunk); also the negatives dropped."""
    tokens_dir.mkdir()
    blocks: list[Path] = []
    sizes: list[int] = []
    bad = BadRows(skip=options.skip_bad_rows)
    digests = []
    dropped = 0
    for index, path in enumerate(files):
        digest = hashlib.sha256()
        first = True
        for lines in iter_line_chunks(path, options.chunk_bytes, digest):
            tokens = fmt.parse(lines, path, bad, first_chunk=first, file_day=file_day(path), file_index=index)
            first = False
            if options.negative_keep_rate < 1:
                kept = tokens.filter(keep_rows(tokens, options, index))
                dropped += tokens.height - kept.height
                tokens = kept
            if tokens.height == 0:
                continue
            block = tokens_dir / f"tokens-{len(blocks):05d}.parquet"
            tokens.select(*fields, "label", "day").write_parquet(block)
            blocks.append(block)
            sizes.append(tokens.height)
        digests.append(digest.hexdigest())
    if not sizes:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise DataFormatError(where, "no data rows" + (f" ({bad.count} malformed rows skipped)" if bad.count else ""))
    return blocks, sizes, bad, digests, dropped


def _assign_splits(fmt: CTRFormat, blocks: list[Path], n: int, options: CTROptions, what: str
                   ) -> tuple[np.ndarray, dict[str, Any], tuple[int, int] | None]:
    days = pl.concat([pl.read_parquet(b, columns=["day"]) for b in blocks])["day"]
    has_days = days.null_count() < len(days)
    span = (int(days.min()), int(days.max())) if has_days else None  # type: ignore[arg-type]
    if options.split == "random":
        rule = {"rule": "random", "seed": options.split_seed, "ratio": list(options.split_ratio)}
        return random_split(n, options.split_ratio, options.split_seed), rule, span
    if has_days:
        if days.null_count():
            raise UserError(f"{what}: data.split={options.split} needs a day for every row")
        day = days.to_numpy()
        rule = {"rule": options.split, "by": "day", "test_day": int(day.max())}
    elif fmt.equal_days:
        day = equal_parts(n, fmt.equal_days)
        rule = {"rule": options.split, "by": f"{fmt.equal_days} equal consecutive parts of the file"}
    else:
        raise UserError(f"{what}: the {fmt.name} format has no time to split by; use data.split=random")
    if options.split == "last_day":
        rule.update(seed=options.split_seed, ratio=list(options.split_ratio))
        out = last_day_split(day, options.split_ratio, options.split_seed, what)
    else:
        out = split_by_day(day, what)
    rule["days"] = int(np.unique(day).size)
    return out, rule, span


def _count_train_tokens(blocks: list[Path], sizes: list[int], split: np.ndarray, fields: list[str]
                        ) -> dict[str, pl.DataFrame]:
    """Pass 2: per field, how often each token occurs in the training rows (nulls = missing not counted)."""
    partial: dict[str, list[pl.DataFrame]] = {f: [] for f in fields}
    offset = 0
    for i, (block, size) in enumerate(zip(blocks, sizes)):
        train = pl.read_parquet(block, columns=fields).filter(pl.Series(split[offset:offset + size] == TRAIN))
        offset += size
        counted = pl.collect_all([train.lazy().group_by(f).len().drop_nulls(f) for f in fields])
        for f, frame in zip(fields, counted):
            partial[f].append(frame)
        if (i + 1) % 8 == 0:  # keep the running counts compact
            for f in fields:
                partial[f] = [pl.concat(partial[f]).group_by(f).agg(pl.col("len").sum())]
    return {f: pl.concat(parts).group_by(f).agg(pl.col("len").sum()) for f, parts in partial.items()}


def write_vocabulary(vocab_dir: Path, name: str, counts: pl.DataFrame, min_count: int, n_counted: int,
                     label: Callable[[Any], str] = str, missing: str = "empty raw value") -> pl.DataFrame:
    """Codes of one field from its token counts (columns ``name``, ``len``; nulls not counted): a token seen at
    least ``min_count`` times keeps a code (FIRST_CODE, ... in token order), the others share OOV. Writes
    ``vocab/<name>.parquet`` (code, token, meaning, count; ``n_counted`` rows were counted, so the missing
    code's count is what the tokens do not cover) and returns the kept tokens with their ``code``."""
    kept = counts.filter(pl.col("len") >= min_count).sort(name)
    kept = kept.with_columns((pl.int_range(pl.len(), dtype=pl.Int32) + FIRST_CODE).alias("code"))
    pl.DataFrame({
        "code": [OOV, MISSING] + kept["code"].to_list(),
        "token": ["<OOV>", "<missing>"] + [str(t) for t in kept[name].to_list()],
        "meaning": ["out of vocabulary", missing] + [label(t) for t in kept[name].to_list()],
        "count": [int(counts.filter(pl.col("len") < min_count)["len"].sum()),
                  n_counted - int(counts["len"].sum())] + kept["len"].to_list(),
    }, schema={"code": pl.Int32, "token": pl.String, "meaning": pl.String, "count": pl.Int64}
    ).write_parquet(vocab_dir / f"{name}.parquet")
    return kept


def encode(name: str, vocab: pl.DataFrame, column: str | None = None) -> pl.Expr:
    """Codes of the tokens in ``column`` (default ``name``) under ``vocab`` (from :func:`write_vocabulary`):
    null -> MISSING, a token without a code -> OOV."""
    value = pl.col(column or name)
    return (pl.when(value.is_null()).then(pl.lit(MISSING, pl.Int32))
            .otherwise(value.replace_strict(vocab[name], vocab["code"], default=OOV, return_dtype=pl.Int32))
            .alias(name))


def build_ctr(fmt: CTRFormat, files: list[Path], out: Path) -> CTRBuild:
    """Read ``files`` (one dataset, in order) and write the encoded blocks and vocabularies into ``out``."""
    options = fmt.options
    fields = _select_fields(fmt, options)
    if options.user_field is not None and options.user_field not in fields:
        raise UserError(f"data.user_field {options.user_field!r} is not one of the fields: {', '.join(fields)}")
    what = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{{{','.join(p.name for p in files)}}}"
    tokens_dir = out / "_tokens"
    blocks, sizes, bad, digests, dropped = _tokenize(fmt, files, fields, options, tokens_dir)
    n = sum(sizes)
    split, rule, span = _assign_splits(fmt, blocks, n, options, what)

    counts = _count_train_tokens(blocks, sizes, split, fields)
    n_train = int((split == TRAIN).sum())
    vocab_dir = out / "vocab"
    vocab_dir.mkdir()
    vocabs: dict[str, pl.DataFrame] = {}
    quantile = [f for f in fields if f in fmt.numeric_fields] if options.int_transform == "quantile" else []
    for f in fields:
        if f in quantile:  # equal-frequency buckets: every training value falls in one
            kept = quantile_buckets(counts[f], f, options.int_buckets)
            vocabs[f] = write_vocabulary(vocab_dir, f, kept, 1, n_train, dict(zip(kept[f].to_list(),
                                         bucket_labels(kept[f].to_list()))).__getitem__)
        else:
            vocabs[f] = write_vocabulary(vocab_dir, f, counts[f], options.min_count, n_train,
                                         lambda t, f=f: fmt.token_label(f, t))
    del counts

    per_split = np.zeros(3, dtype=np.int64)
    positives = np.zeros(3, dtype=np.int64)
    offset = 0
    for i, (block, size) in enumerate(zip(blocks, sizes)):
        frame = pl.read_parquet(block)
        labels = split[offset:offset + size]
        offset += size
        encoded = frame.select(
            *[pl.when(pl.col(f).is_null()).then(pl.lit(MISSING, pl.Int32)).otherwise(bucket_codes(frame[f], vocabs[f][f]))
              .alias(f) if f in quantile else encode(f, vocabs[f]) for f in fields],
            pl.col("label").cast(pl.Int8),
            pl.Series("split", labels, dtype=pl.Int8),
        )
        encoded.write_parquet(out / f"part-{i:05d}.parquet")
        per_split += np.bincount(labels, minlength=3)
        positives += np.bincount(labels, weights=frame["label"].to_numpy(), minlength=3).astype(np.int64)
    shutil.rmtree(tokens_dir)
    return CTRBuild(
        fields=[(f, FIRST_CODE + vocabs[f].height) for f in fields],
        n_rows=n,
        splits={name: int(c) for name, c in zip(SPLITS, per_split)},
        positives={name: int(c) for name, c in zip(SPLITS, positives)},
        skipped_rows=bad.count,
        first_skipped=bad.first,
        sha256=digests,
        day_span=span,
        split_rule=rule,
        vocab_kept={f: vocabs[f].height for f in fields},
        negatives_dropped=dropped,
    )


def quantile_buckets(counts: pl.DataFrame, field: str, n_buckets: int) -> pl.DataFrame:
    """Equal-frequency buckets of a field's training values (``counts``: distinct value, ``len``): each value
    goes to bucket ``floor(rows before it * n_buckets / rows)``; returns one row per bucket, its lower edge (the
    smallest training value in it) as ``field`` and its training rows as ``len``, in value order."""
    ordered = counts.sort(field)
    sizes = ordered["len"].to_numpy().astype(np.int64)
    if sizes.size == 0:
        return ordered.clear()
    before = np.cumsum(sizes) - sizes
    bucket = before * n_buckets // int(sizes.sum())
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    return pl.DataFrame({field: ordered[field].gather(starts),
                         "len": np.add.reduceat(sizes, starts).astype(np.uint32)}).cast({"len": ordered["len"].dtype})


def bucket_codes(values: pl.Series, edges: pl.Series) -> pl.Series:
    """The code of each value's bucket: the bucket of the largest lower edge at or below it (values below the
    first edge go to the first bucket). Nulls get a placeholder the caller replaces with MISSING."""
    if edges.len() == 0:  # no training value at all: everything is out of vocabulary
        return pl.Series(np.full(values.len(), OOV, dtype=np.int32), dtype=pl.Int32)
    position = np.searchsorted(edges.to_numpy(), values.fill_null(0).to_numpy(), side="right") - 1
    return pl.Series(np.clip(position, 0, None).astype(np.int32) + FIRST_CODE, dtype=pl.Int32)


def bucket_labels(edges: list[int]) -> list[str]:
    """What each quantile bucket holds, for the vocabulary files."""
    if len(edges) == 1:
        return ["any value"]
    inner = [f"{lo} <= v < {hi}" for lo, hi in zip(edges[1:], edges[2:])]
    return [f"v < {edges[1]}", *inner, f"v >= {edges[-1]}"] if edges else []


def block_paths(directory: Path) -> list[Path]:
    """The encoded blocks of a prepared CTR cache, in file order."""
    return sorted(directory.glob("part-*.parquet"))
