"""Reading delimited text files line by line with exact 1-based line numbers for error messages.

Every loader reads its file as one string column of raw lines (polars, vectorised), then validates and
splits it. Keeping the raw line lets a malformed row be reported as ``file:line: what is wrong`` instead
of a parser's generic error. Plain files and ``.gz`` files are both accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from autorecbench.errors import DataFormatError, quoted

# Unit separator: never present in the published formats, so each line lands in one column.
_NO_SPLIT = "\x1f"


def _text_column(source: Path | io.BytesIO, path: Path) -> pl.DataFrame:
    """Every line of ``source`` as one string column ``text`` (blank lines as nulls, so row i is line i+1)."""
    try:
        return pl.read_csv(
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
    frame = _text_column(source, path).with_row_index("line", offset=1).with_columns(
        pl.col("text").str.strip_suffix("\r").str.strip_prefix("\ufeff")
    )
    frame = frame.filter(pl.col("text").is_not_null() & (pl.col("text") != ""))
    if frame.height == 0:
        raise DataFormatError(path, "empty file (no non-blank lines)")
    return frame


def _unquote(expr: pl.Expr) -> pl.Expr:
    """Trim spaces and one pair of surrounding double quotes, as CSV writers that quote everything do."""
    expr = expr.str.strip_chars(" ")
    is_quoted = expr.str.starts_with('"') & expr.str.ends_with('"') & (expr.str.len_chars() >= 2)
    return pl.when(is_quoted).then(expr.str.slice(1, expr.str.len_chars() - 2)).otherwise(expr)


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
        raise DataFormatError(path, f"{what} is not an integer: {quoted(value)}", line=line)
    if minimum is not None:
        low = values < minimum
        if low.any():
            line, value = _first_bad(frame, low, column)
            raise DataFormatError(path, f"{what} must be >= {minimum}, found {quoted(value)}", line=line)
    return values


def parse_float(frame: pl.DataFrame, column: str, what: str, path: Path) -> pl.Series:
    """``column`` as finite Float64; anything else is an error naming its line."""
    raw = frame[column]
    values = raw.cast(pl.Float64, strict=False)
    bad = values.is_null() | ~values.is_finite()
    if bad.any():
        line, value = _first_bad(frame, bad, column)
        raise DataFormatError(path, f"{what} is not a number: {quoted(value)}", line=line)
    return values


def check(frame: pl.DataFrame, bad: pl.Series, column: str, message: str, path: Path) -> None:
    """Raise for the first row where ``bad`` holds; ``message`` gets the offending value appended."""
    if bad.any():
        line, value = _first_bad(frame, bad, column)
        raise DataFormatError(path, f"{message}, found {quoted(value)}", line=line)


# ---------------------------------------------------------------- chunked reading (bounded memory)

class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that feeds every byte it reads into a hash (the file's sha256 in one pass)."""

    def __init__(self, raw: io.BufferedReader, digest: "hashlib._Hash") -> None:
        self.raw = raw
        self.digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self.raw.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n or 0


def frame_of_lines(data: bytes, first_line: int, path: Path) -> pl.DataFrame:
    """``data`` (whole lines) as columns ``line`` (1-based Int64, counting from ``first_line``) and ``text`` (CR
    stripped); blank lines are dropped, their numbers kept for the others."""
    frame = _text_column(io.BytesIO(data), path).with_row_index("line", offset=first_line).with_columns(
        pl.col("line").cast(pl.Int64), pl.col("text").str.strip_suffix("\r")
    )
    return frame.filter(pl.col("text").is_not_null() & (pl.col("text") != ""))


def iter_byte_chunks(
    path: Path, chunk_bytes: int = 64 << 20, digest: "hashlib._Hash | None" = None
) -> Iterator[tuple[bytes, int]]:
    """The text of ``path`` (plain or ``.gz``) in pieces of about ``chunk_bytes`` that end at a line end (the
    last may lack one), each with the 1-based number of its first line; a leading BOM is stripped. Memory
    stays bounded by the chunk size whatever the file size; ``digest``, when given, receives the file's raw
    bytes (compressed ones for ``.gz``). Pieces may hold blank lines.

    Raises DataFormatError for a missing, empty, truncated or corrupt file.
    """
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(path, "empty file")
    next_line = 1
    carry = b""
    with path.open("rb") as handle:
        raw: io.RawIOBase | io.BufferedReader = _HashingReader(handle, digest) if digest is not None else handle
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        while True:
            try:
                block = stream.read(chunk_bytes)
            except EOFError:
                raise DataFormatError(path, "truncated gzip file (compressed stream ended early)") from None
            except (gzip.BadGzipFile, zlib.error, OSError) as exc:
                raise DataFormatError(path, f"corrupt gzip file ({exc})") from None
            last = not block
            data = carry + block
            if not last:
                cut = data.rfind(b"\n")
                if cut < 0:  # one line longer than the chunk: keep reading
                    carry = data
                    continue
                data, carry = data[: cut + 1], data[cut + 1 :]
            elif not data:
                break
            if next_line == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if data:
                yield data, next_line
            next_line += data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            if last:
                break


def iter_line_chunks(
    path: Path, chunk_bytes: int = 64 << 20, digest: "hashlib._Hash | None" = None
) -> Iterator[pl.DataFrame]:
    """The lines of ``path`` (plain or ``.gz``) in chunks of about ``chunk_bytes`` of text, each as columns
    ``line`` (1-based Int64, exact across chunks) and ``text`` (CR and a leading BOM stripped). Blank lines
    are dropped, their numbers kept for the others. Memory stays bounded by the chunk size whatever the
    file size; ``digest``, when given, receives the file's raw bytes (compressed ones for ``.gz``).

    Raises DataFormatError for a missing, empty, truncated or corrupt file.
    """
    seen_text = False
    for data, first_line in iter_byte_chunks(path, chunk_bytes, digest):
        frame = frame_of_lines(data, first_line, path)
        if frame.height:
            seen_text = True
            yield frame
    if not seen_text:
        raise DataFormatError(path, "empty file (no non-blank lines)")
