"""Criteo in its published raw format (format name ``criteo_tsv``).

| file | layout |
| --- | --- |
| Kaggle Display Advertising Challenge ``train.txt`` | no header, tab-separated, ``\\n`` line ends, 40 columns: ``label`` (0/1), ``I1``–``I13`` (integers, may be empty, may be negative: I2), ``C1``–``C26`` (8 lowercase hex digits, may be empty); 45,840,617 rows in time order over 7 days |
| Criteo 1TB ``day_0`` … ``day_23`` (optionally ``.gz``) | the same 40 columns, one file per day; ``data.days`` picks which |

Every field becomes a categorical token (``ctr.py`` encodes them):
- ``I1``–``I13``: ``int_transform`` (default ``log_square``: v > 2 -> bucket ``floor(ln(v)^2)``, else v kept as
  its own category, BARS/FuxiCTR code with the small values kept distinct; ``quantile``: ``int_buckets``
  equal-frequency buckets of the training values, the AutoFIS/PIN Criteo-8d preprocessing); empty -> the
  field's missing value (``int_missing: zero`` reads it as 0 instead, as BARS' configs).
- ``C1``–``C26``: the 32-bit value of the hex string; empty -> missing.

Malformed rows: a field count other than 40, a label other than 0/1, a non-integer I value, a C value that
is not 8 lowercase hex digits. The Kaggle file has no time column: ``split=time`` cuts it into 7 equal
consecutive "days" (days 1–5 train, 6 validation, 7 test); with 1TB day files each file is its own day.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from autorecbench.data.ctr import (
    BadRows,
    Check,
    CTROptions,
    CTRFormat,
    field_count_problem,
    int_token,
    split_columns,
    value_problems,
)
from autorecbench.errors import UserError

INT_FIELDS = [f"I{i}" for i in range(1, 14)]
CAT_FIELDS = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *INT_FIELDS, *CAT_FIELDS]
HEX = r"^[0-9a-f]{8}$"


class CriteoFormat(CTRFormat):
    name = "criteo_tsv"
    fields = [*INT_FIELDS, *CAT_FIELDS]
    numeric_fields = tuple(INT_FIELDS)
    equal_days = 7

    def __init__(self, options: CTROptions) -> None:
        super().__init__(options)
        if options.time_fields is not None:
            raise UserError("data.time_fields: the Criteo format has no timestamp to derive fields from")

    def parse(self, lines: pl.DataFrame, path: Path, bad: BadRows, *, first_chunk: bool, file_day: int | None,
              file_index: int) -> pl.DataFrame:
        count_bad, describe_count = field_count_problem(lines, "\t", len(COLUMNS))
        frame = split_columns(lines, "\t", COLUMNS)
        checks = [Check(~pl.col("label").is_in(["0", "1"]), "label", "label must be 0 or 1")]
        checks += [Check((pl.col(n) != "") & pl.col(n).cast(pl.Int64, strict=False).is_null(), n, f"{n} is not an integer")
                   for n in INT_FIELDS]
        checks += [Check((pl.col(n) != "") & ~pl.col(n).str.contains(HEX), n, f"{n} is not 8 lowercase hex digits")
                   for n in CAT_FIELDS]
        problems = [(count_bad, describe_count), *value_problems(frame, ~count_bad, checks)]
        frame = bad.apply(path, frame, problems, file_index)
        ints = []
        for name in INT_FIELDS:
            value = pl.col(name).cast(pl.Int64, strict=False)
            if self.options.int_missing == "zero":
                value = value.fill_null(0)
            ints.append(int_token(value, self.options.int_transform).alias(name))
        return frame.select(
            *ints,
            *[pl.col(name).str.to_integer(base=16, strict=False).alias(name) for name in CAT_FIELDS],
            pl.col("label").cast(pl.Int8),
            pl.lit(file_day, dtype=pl.Int32).alias("day"),
            pl.col("line"),
        )

    def token_label(self, fieldname: str, token: Any) -> str:
        if fieldname in CAT_FIELDS:
            return f"{int(token):08x}"
        if self.options.int_transform == "log_square" and int(token) > 2:
            return f"floor(ln(v)^2) = {int(token) - 2}"
        return f"v = {int(token)}"
