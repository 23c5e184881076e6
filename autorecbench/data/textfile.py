"""Reading delimited text files line by line with exact 1-based line numbers for error messages.

Every loader reads its file as one string column of raw lines (polars, vectorised), then validates and
splits it. Keeping the raw line lets a malformed row be reported as ``file:line: what is wrong`` instead
of a parser's generic error. Plain files and ``.gz`` files are both accepted.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import polars as pl

from autorecbench.errors import DataFormatError

# Unit separator: never present in the published formats, so each line lands in one column.
_NO_SPLIT = "\x1f"


def read_lines(path: Path) -> pl.DataFrame:
    """All lines of ``path`` as columns ``line`` (1-based, u32) and ``text`` (str, CR and BOM stripped).

    Empty lines are dropped (their numbers are kept for the others). Raises DataFormatError for an empty
    or corrupt file.
    """
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "empty file")
    source: Path | io.BytesIO = path
    if path.suffix == ".gz":
        try:
            source = io.BytesIO(gzip.decompress(path.read_bytes()))
        except EOFError:
            raise DataFormatError(path, "truncated gzip file (compressed stream ended early)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise DataFormatError(path, f"corrupt gzip file ({exc})") from None
        if source.getbuffer().nbytes == 0:
            raise DataFormatError(path, "empty file")
    try:
        frame = pl.read_csv(
            source,
            has_header=False,
            separator=_NO_SPLIT,
            quote_char=None,
            new_columns=["text"],
            schema={"text": pl.String},
            encoding="utf8-lossy",
        )
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFormatError(path, f"unreadable as text lines ({first})") from None
    frame = frame.with_row_index("line", offset=1).with_columns(
        pl.col("text").str.strip_suffix("\r").str.strip_prefix("\ufeff")
    )
    frame = frame.filter(pl.col("text").is_not_null() & (pl.col("text") != ""))
    if frame.height == 0:
        raise DataFormatError(path, "empty file (no non-blank lines)")
    return frame


def _unquote(expr: pl.Expr) -> pl.Expr:
    """Trim spaces and one pair of surrounding double quotes, as CSV writers that quote everything do."""
    expr = expr.str.strip_chars(" ")
    quoted = expr.str.starts_with('"') & expr.str.ends_with('"') & (expr.str.len_chars() >= 2)
    return pl.when(quoted).then(expr.str.slice(1, expr.str.len_chars() - 2)).otherwise(expr)


def split_fields(lines: pl.DataFrame, separator: str, names: list[str], path: Path) -> pl.DataFrame:
    """Split ``text`` into exactly ``len(names)`` string columns; any other field count is an error."""
    expected = len(names)
    counts = lines["text"].str.count_matches(separator, literal=True) + 1
    wrong = counts != expected
    if wrong.any():
        row = lines.filter(wrong).row(0, named=True)
        found = int(counts.filter(wrong)[0])
        shown = "tab" if separator == "\t" else repr(separator)
        raise DataFormatError(path, f"expected {expected} {shown}-separated fields, found {found}", line=row["line"])
    split = (
        lines.select(
            "line",
            pl.col("text").str.split_exact(separator, expected - 1).struct.rename_fields(names).alias("f"),
        )
        .unnest("f")
        .with_columns(_unquote(pl.col(n)).alias(n) for n in names)
    )
    return split


def header_fields(text: str, separator: str) -> list[str]:
    return [f.strip().strip('"') for f in text.split(separator)]


def _first_bad(frame: pl.DataFrame, bad: pl.Series, column: str) -> tuple[int, str]:
    row = frame.filter(bad).row(0, named=True)
    return int(row["line"]), row[column]


def parse_int(frame: pl.DataFrame, column: str, what: str, path: Path, *, minimum: int | None = None) -> pl.Series:
    """``column`` as Int64; a non-integer (or empty, or below ``minimum``) value is an error naming its line."""
    raw = frame[column]
    values = raw.cast(pl.Int64, strict=False)
    bad = values.is_null()
    if bad.any():
        line, value = _first_bad(frame, bad, column)
        raise DataFormatError(path, f"{what} is not an integer: {value!r}", line=line)
    if minimum is not None:
        low = values < minimum
        if low.any():
            line, value = _first_bad(frame, low, column)
            raise DataFormatError(path, f"{what} must be >= {minimum}, found {value!r}", line=line)
    return values


def parse_float(frame: pl.DataFrame, column: str, what: str, path: Path) -> pl.Series:
    """``column`` as finite Float64; anything else is an error naming its line."""
    raw = frame[column]
    values = raw.cast(pl.Float64, strict=False)
    bad = values.is_null() | ~values.is_finite()
    if bad.any():
        line, value = _first_bad(frame, bad, column)
        raise DataFormatError(path, f"{what} is not a number: {value!r}", line=line)
    return values


def check(frame: pl.DataFrame, bad: pl.Series, column: str, message: str, path: Path) -> None:
    """Raise for the first row where ``bad`` holds; ``message`` gets the offending value appended."""
    if bad.any():
        line, value = _first_bad(frame, bad, column)
        raise DataFormatError(path, f"{message}, found {value!r}", line=line)
