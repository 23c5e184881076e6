"""Avazu in its published raw format (format name ``avazu_csv``): Kaggle ``train`` / ``train.gz`` / ``train.csv``.

Comma-separated with the header
``id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21``;
40,428,967 rows in time order, 2014-10-21 .. 2014-10-30.

As BARS' Avazu_x4 (FuxiCTR code): ``id`` (a decimal string of up to 20 digits, which overflows int64) is read
as a string, checked, and dropped; ``hour`` (``YYMMDDHH``) becomes three fields, ``hour`` (hour of day,
``hour[6:8]``), ``weekday`` (0 = Sunday) and ``weekend`` (Saturday or Sunday) — ``time_fields`` chooses among
these and ``mday`` (day of the month, which the AutoFIS/PIN preprocessing adds); every other column is a
categorical field: the integer columns (``C1``, ``banner_pos``, ``device_type``, ``device_conn_type``,
``C14``–``C21``; ``C20`` uses -1) by their integer value, the hashed-id columns (``site_*``, ``app_*``,
``device_id``, ``device_ip``, ``device_model``) by their string. An empty value is the field's missing value.

Malformed rows: a field count other than 24, an ``id`` that is not 1–20 digits, a ``click`` other than 0/1,
an ``hour`` that is not a valid ``YYMMDDHH``, a non-integer in an integer column. ``split=time`` puts the last
day in the test split and the day before it in validation.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from autorecbench.data.ctr import (
    BadRows,
    Check,
    CTRFormat,
    CTROptions,
    field_count_problem,
    split_columns,
    value_problems,
)
from autorecbench.data.textfile import header_fields
from autorecbench.errors import DataFormatError, UserError, quoted

HEADER = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
          "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
          "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
INT_COLUMNS = ["C1", "banner_pos", "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19",
               "C20", "C21"]
STRING_COLUMNS = ["site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
                  "device_ip", "device_model"]
RAW_FIELDS = [c for c in HEADER[3:]]  # every column after id, click, hour, in file order
TIME_FIELDS = ["hour", "weekday", "weekend"]  # the default (BARS Avazu_x4)
DERIVED = ("hour", "weekday", "weekend", "mday")


class AvazuFormat(CTRFormat):
    name = "avazu_csv"
    fields = [*RAW_FIELDS, *TIME_FIELDS]

    def __init__(self, options: CTROptions) -> None:
        super().__init__(options)
        if options.time_fields is not None:
            unknown = [f for f in options.time_fields if f not in DERIVED]
            if unknown or len(set(options.time_fields)) != len(options.time_fields):
                raise UserError(f"data.time_fields: unknown or repeated {unknown or list(options.time_fields)}; "
                                f"choose among {', '.join(DERIVED)}")
            self.fields = [*RAW_FIELDS, *options.time_fields]

    def parse(self, lines: pl.DataFrame, path: Path, bad: BadRows, *, first_chunk: bool, file_day: int | None,
              file_index: int) -> pl.DataFrame:
        if first_chunk:
            head = lines.row(0, named=True)
            if header_fields(head["text"], ",") != HEADER:
                raise DataFormatError(path, f"expected the Avazu header {','.join(HEADER)!r}, found {quoted(head['text'])}",
                                      line=head["line"])
            lines = lines.slice(1)
        count_bad, describe_count = field_count_problem(lines, ",", len(HEADER))
        frame = split_columns(lines, ",", HEADER)
        hour = pl.col("hour")
        date = pl.concat_str(pl.lit("20"), hour.str.slice(0, 6)).str.to_date("%Y%m%d", strict=False)
        bad_hour = ~hour.str.contains(r"^\d{8}$") | date.is_null() | (hour.str.slice(6, 2).cast(pl.Int32, strict=False) > 23)
        checks = [
            Check(~pl.col("id").str.contains(r"^\d{1,20}$"), "id", "id is not a decimal string of 1-20 digits"),
            Check(~pl.col("click").is_in(["0", "1"]), "click", "click must be 0 or 1"),
            Check(bad_hour, "hour", "hour is not a valid YYMMDDHH"),
        ]
        checks += [Check((pl.col(n) != "") & pl.col(n).cast(pl.Int64, strict=False).is_null(), n, f"{n} is not an integer")
                   for n in INT_COLUMNS]
        problems = [(count_bad, describe_count), *value_problems(frame, ~count_bad, checks)]
        frame = bad.apply(path, frame, problems, file_index)
        weekday = date.dt.weekday() % 7  # polars: Monday 1 .. Sunday 7 -> Sunday 0, as strftime('%w')
        derived = {
            "hour": hour.str.slice(6, 2).cast(pl.Int64),
            "weekday": weekday.cast(pl.Int64),
            "weekend": weekday.is_in([0, 6]).cast(pl.Int64),
            "mday": date.dt.day().cast(pl.Int64),
        }
        return frame.select(
            *[pl.col(name).cast(pl.Int64, strict=False).alias(name) if name in INT_COLUMNS
              else pl.when(pl.col(name) == "").then(None).otherwise(pl.col(name)).alias(name)
              for name in RAW_FIELDS],
            *[derived[name].alias(name) for name in self.fields[len(RAW_FIELDS):]],
            pl.col("click").cast(pl.Int8).alias("label"),
            date.cast(pl.Int32).alias("day"),
            pl.col("line"),
        )
