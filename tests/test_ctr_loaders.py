"""Criteo and Avazu loaders on hand-written files in the published formats, with every quirk."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.ctr import block_paths
from autorecbench.data.splits import random_split, split_counts
from autorecbench.data.textfile import iter_line_chunks
from autorecbench.errors import DataFormatError, MissingDataError, UserError

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
ALL_TRAIN = {"split_ratio": [1.0, 0.0, 0.0]}


def criteo_row(label: int | str = 0, ints: dict[int, Any] | None = None, cats: dict[int, str] | None = None) -> str:
    """A Criteo line: ``ints`` / ``cats`` map 1-based field numbers to raw values (others empty)."""
    ints, cats = ints or {}, cats or {}
    return "\t".join([str(label), *[str(ints.get(i, "")) for i in range(1, 14)],
                      *[cats.get(i, "") for i in range(1, 27)]])


def avazu_row(id_: str = "1000009418151094273", click: int | str = 0, hour: str = "14102100", **values: Any) -> str:
    defaults = {"C1": "1005", "banner_pos": "0", "site_id": "1fbe01fe", "site_domain": "f3845767",
                "site_category": "28905ebd", "app_id": "ecad2386", "app_domain": "7801e8d9",
                "app_category": "07d7df22", "device_id": "a99f214a", "device_ip": "ddd2926e",
                "device_model": "44956a24", "device_type": "1", "device_conn_type": "2", "C14": "15706",
                "C15": "320", "C16": "50", "C17": "1722", "C18": "0", "C19": "35", "C20": "-1", "C21": "79"}
    defaults.update({k: str(v) for k, v in values.items()})
    return ",".join([id_, str(click), hour, *defaults.values()])


def prepare_file(tmp_path: Path, name: str, text: str | bytes, family: str = "criteo", **options: Any) -> PreparedData:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    data = gzip.compress(data, mtime=0) if name.endswith(".gz") else data
    if not (raw / name).is_file() or (raw / name).read_bytes() != data:  # same file: same fingerprint
        (raw / name).write_bytes(data)
    fmt = "criteo_tsv" if family == "criteo" else "avazu_csv"
    file = name.removesuffix(".gz")
    cfg = DatasetConfig.from_mapping({"name": family, "family": family, "path": str(raw),
                                      "processed_dir": str(tmp_path / "processed"),
                                      "sources": [{"file": file, "format": fmt}], **options})
    return prepare(cfg)


def encoded(prepared: PreparedData) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in block_paths(prepared.directory)])


def tokens(prepared: PreparedData, field: str) -> list[str]:
    """Each row's token of ``field`` (``<OOV>``, ``<missing>`` or the raw token), in file order."""
    vocab = pl.read_parquet(prepared.directory / "vocab" / f"{field}.parquet")
    mapping = dict(zip(vocab["code"].to_list(), vocab["token"].to_list()))
    return [mapping[c] for c in encoded(prepared)[field].to_list()]


def meanings(prepared: PreparedData, field: str) -> list[str]:
    vocab = pl.read_parquet(prepared.directory / "vocab" / f"{field}.parquet")
    mapping = dict(zip(vocab["code"].to_list(), vocab["meaning"].to_list()))
    return [mapping[c] for c in encoded(prepared)[field].to_list()]


# ---------------------------------------------------------------- Criteo: values and vocabularies

def test_criteo_integer_transform_missing_and_hex(tmp_path: Path) -> None:
    values = ["", 0, 1, 2, 3, 4, 5, -1, 1000]
    rows = [criteo_row(i % 2, {1: v, 2: -3 if i == 0 else ""}, {1: "68fd1e64" if i % 3 else "", 26: "0a1b2c3d"})
            for i, v in enumerate(values)]
    prepared = prepare_file(tmp_path, "train.txt", "\n".join(rows) + "\n", **ALL_TRAIN)
    s = prepared.schema
    assert s.n_rows == 9 and s.label == "click" and s.splits == {"train": 9, "valid": 0, "test": 0}
    assert s.field_names == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert meanings(prepared, "I1") == ["empty raw value", "v = 0", "v = 1", "v = 2", "floor(ln(v)^2) = 1",
                                        "floor(ln(v)^2) = 1", "floor(ln(v)^2) = 2", "v = -1", "floor(ln(v)^2) = 47"]
    codes = encoded(prepared)
    i1 = codes["I1"].to_list()
    assert i1[0] == 1 and len(set(i1)) == 8 and i1[4] == i1[5]  # missing; 3 and 4 share bucket 1
    assert s.cardinality("I1") == 2 + 7  # OOV, missing, 7 kept tokens
    assert meanings(prepared, "I2")[:2] == ["v = -3", "empty raw value"]
    assert tokens(prepared, "C1")[:3] == ["<missing>", str(0x68FD1E64), str(0x68FD1E64)]
    assert meanings(prepared, "C1")[1] == "68fd1e64" and meanings(prepared, "C26")[0] == "0a1b2c3d"
    assert set(tokens(prepared, "C2")) == {"<missing>"} and s.cardinality("C2") == 2
    assert codes["label"].to_list() == [i % 2 for i in range(9)]
    assert codes.schema["I1"] == pl.Int32 and codes.schema["label"] == pl.Int8 and codes.schema["split"] == pl.Int8


def test_criteo_transform_options(tmp_path: Path) -> None:
    rows = "\n".join(criteo_row(0, {1: v}) for v in ["", 0, 3, 4]) + "\n"
    zero = prepare_file(tmp_path / "a", "train.txt", rows, int_missing="zero", **ALL_TRAIN)
    assert meanings(zero, "I1") == ["v = 0", "v = 0", "floor(ln(v)^2) = 1", "floor(ln(v)^2) = 1"]
    identity = prepare_file(tmp_path / "b", "train.txt", rows, int_transform="identity", **ALL_TRAIN)
    assert meanings(identity, "I1") == ["empty raw value", "v = 0", "v = 3", "v = 4"]


def test_min_count_oov_per_field_and_vocabulary_from_training_rows_only(tmp_path: Path) -> None:
    # split=time on the Kaggle file: 7 equal consecutive "days"; 14 rows -> rows 11-12 valid, 13-14 test.
    c1 = ["aaaaaaaa"] * 6 + ["bbbbbbbb"] * 3 + ["cccccccc"] + ["dddddddd", "aaaaaaaa"] + ["aaaaaaaa", "eeeeeeee"]
    text = "\n".join(criteo_row(i % 2, {3: i}, {1: v}) for i, v in enumerate(c1)) + "\n"
    prepared = prepare_file(tmp_path, "train.txt", text, split="time", min_count=2)
    s = prepared.schema
    assert s.splits == {"train": 10, "valid": 2, "test": 2}
    assert encoded(prepared)["split"].to_list() == [0] * 10 + [1, 1, 2, 2]
    assert s.extra["split"]["rule"] == "time" and s.extra["split"]["days"] == 7
    assert tokens(prepared, "C1") == ([str(0xAAAAAAAA)] * 6 + [str(0xBBBBBBBB)] * 3 + ["<OOV>"]
                                      + ["<OOV>", str(0xAAAAAAAA), str(0xAAAAAAAA), "<OOV>"])
    assert s.cardinality("C1") == 4
    vocab = pl.read_parquet(prepared.directory / "vocab" / "C1.parquet")
    assert vocab["count"].to_list() == [1, 0, 6, 3]  # OOV (c, in training), missing, a, b: training rows only
    # I3 holds 0..13: in training 0, 1, 2 and bucket 2 (v = 5) are seen once -> OOV with min_count 2; buckets
    # 1 (3, 4), 3 (6, 7) and 4 (8, 9) twice; the validation and test values (buckets 5, 6) never -> OOV.
    assert meanings(prepared, "I3") == (["out of vocabulary"] * 3 + ["floor(ln(v)^2) = 1"] * 2 + ["out of vocabulary"]
                                        + ["floor(ln(v)^2) = 3"] * 2 + ["floor(ln(v)^2) = 4"] * 2
                                        + ["out of vocabulary"] * 4)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_criteo_line_ends_blank_lines_gzip(tmp_path: Path, newline: str) -> None:
    rows = [criteo_row(1, {1: 5}, {1: "68fd1e64"}), criteo_row(0, {2: -2}), criteo_row(1)]
    text = newline.join([rows[0], "", rows[1], rows[2]])  # a blank line, no final newline
    plain = prepare_file(tmp_path / "plain", "train.txt", text, **ALL_TRAIN)
    packed = prepare_file(tmp_path / "gz", "train.txt.gz", text, **ALL_TRAIN)
    assert encoded(plain).equals(encoded(packed))
    assert encoded(plain)["label"].to_list() == [1, 0, 1]
    assert packed.schema.source["path"].endswith("train.txt.gz")


def test_chunked_reading_keeps_exact_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "lines.txt"
    path.write_bytes(b"\xef\xbb\xbfa\tb\n\nc\td\r\n" + b"x" * 50 + b"\n\n\nlast")
    for chunk in (4, 16, 1 << 20):
        lines = [row for frame in iter_line_chunks(path, chunk) for row in frame.rows()]
        assert lines == [(1, "a\tb"), (3, "c\td"), (4, "x" * 50), (7, "last")]


# ---------------------------------------------------------------- Criteo: malformed rows

GOOD = criteo_row(0, {1: 1}, {1: "68fd1e64"})


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("\t".join(GOOD.split("\t")[:-1]), "expected 40 tab-separated fields, found 39"),
        (GOOD + "\t", "expected 40 tab-separated fields, found 41"),
        (criteo_row(0, {5: "1.5"}), "I5 is not an integer: '1.5'"),
        (criteo_row(0, {2: "abc"}), "I2 is not an integer: 'abc'"),
        (criteo_row(0, cats={3: "68FD1E64"}), "C3 is not 8 lowercase hex digits: '68FD1E64'"),
        (criteo_row(0, cats={3: "68fd1e6"}), "C3 is not 8 lowercase hex digits: '68fd1e6'"),
        (criteo_row(0, cats={26: "zzzzzzzz"}), "C26 is not 8 lowercase hex digits"),
        (criteo_row(2), "label must be 0 or 1: '2'"),
        (criteo_row(""), "label must be 0 or 1: ''"),
    ],
)
def test_criteo_malformed_row_names_file_and_line(tmp_path: Path, bad: str, fragment: str) -> None:
    text = "\n".join([GOOD, GOOD, bad, GOOD]) + "\n"
    with pytest.raises(DataFormatError) as info:
        prepare_file(tmp_path, "train.txt", text)
    assert f"train.txt:3: {fragment}" in str(info.value)
    assert not (tmp_path / "processed").exists() or list((tmp_path / "processed").iterdir()) == []


def test_criteo_first_bad_line_wins_across_checks_and_chunks(tmp_path: Path) -> None:
    lines = [GOOD] * 60
    lines[40] = criteo_row(0, cats={2: "XYZ"})  # line 41: bad hex
    lines[45] = "\t".join(GOOD.split("\t")[:5])  # line 46: wrong field count
    text = "\n".join(lines) + "\n"
    with pytest.raises(DataFormatError, match=r"train\.txt:41: C2 is not 8 lowercase hex"):
        prepare_file(tmp_path / "a", "train.txt", text, chunk_bytes=1024)
    lines[30] = criteo_row(0, {13: "x"})  # line 31 now comes first, in another chunk
    with pytest.raises(DataFormatError, match=r"train\.txt:31: I13 is not an integer"):
        prepare_file(tmp_path / "b", "train.txt", "\n".join(lines) + "\n", chunk_bytes=1024)


def test_skip_bad_rows_drops_counts_and_reports(tmp_path: Path) -> None:
    lines = [criteo_row(i % 2, {1: i}) for i in range(10)]
    lines[2] = criteo_row(0, {1: "x"})
    lines[6] = "1\t2"
    lines[7] = criteo_row(0, cats={1: "nothex!!"})
    prepared = prepare_file(tmp_path, "train.txt", "\n".join(lines) + "\n", skip_bad_rows=True, chunk_bytes=1024,
                            **ALL_TRAIN)
    s = prepared.schema
    assert s.n_rows == 7 and s.rows_in_file == 10 and s.extra["skipped_rows"] == 3
    assert "train.txt:3: I1 is not an integer" in s.extra["first_skipped"]
    assert meanings(prepared, "I1") == ["v = 0", "v = 1", "floor(ln(v)^2) = 1", "floor(ln(v)^2) = 1",
                                        "floor(ln(v)^2) = 2", "floor(ln(v)^2) = 4", "floor(ln(v)^2) = 4"]


def test_empty_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="train.txt: empty file"):
        prepare_file(tmp_path / "a", "train.txt", "")
    with pytest.raises(DataFormatError, match="train.txt: empty file"):
        prepare_file(tmp_path / "b", "train.txt", "\n\n")
    raw = tmp_path / "c" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.txt.gz").write_bytes(gzip.compress(("\n".join([GOOD] * 2000) + "\n").encode())[:-50])
    cfg = DatasetConfig.from_mapping({"name": "criteo", "family": "criteo", "path": str(raw),
                                      "processed_dir": str(tmp_path / "c" / "processed"),
                                      "sources": [{"file": "train.txt", "format": "criteo_tsv"}]})
    with pytest.raises(DataFormatError, match="train.txt.gz: truncated gzip"):
        prepare(cfg)
    assert list((tmp_path / "c" / "processed").iterdir()) == []


# ---------------------------------------------------------------- Criteo 1TB day files

def _day_config(raw: Path, tmp: Path, days: list[int], **options: Any) -> DatasetConfig:
    return DatasetConfig.from_mapping({"name": "criteo-1tb", "family": "criteo", "path": str(raw),
                                       "processed_dir": str(tmp / "processed"), "days": days,
                                       "sources": [{"file": "day_{day}", "format": "criteo_tsv"}], **options})


def test_criteo_1tb_day_files_selected_days_and_time_split(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "day_0").write_text("\n".join(criteo_row(0, {1: d}) for d in range(3)) + "\n")
    (raw / "day_1.gz").write_bytes(gzip.compress(("\n".join(criteo_row(1, {1: 7}) for _ in range(3)) + "\n").encode()))
    (raw / "day_2").write_text("\n".join(criteo_row(0) for _ in range(4)) + "\n")
    prepared = prepare(_day_config(raw, tmp_path, [0, 1, 2], split="time"))
    s = prepared.schema
    assert s.splits == {"train": 3, "valid": 3, "test": 4} and s.n_rows == 10
    assert [f["path"].rsplit("/", 1)[1] for f in s.source["files"]] == ["day_0", "day_1.gz", "day_2"]
    assert encoded(prepared)["label"].to_list() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    two_days = prepare(_day_config(raw, tmp_path, [2, 0]))
    assert two_days.schema.n_rows == 7 and two_days.directory != prepared.directory
    with pytest.raises(UserError, match="at least 3 days"):
        prepare(_day_config(raw, tmp_path / "x", [0, 2], split="time"))
    with pytest.raises(MissingDataError, match="day_5"):
        prepare(_day_config(raw, tmp_path, [0, 5]))


# ---------------------------------------------------------------- Avazu

def test_avazu_header_id_hour_fields_and_c20(tmp_path: Path) -> None:
    rows = [
        avazu_row("18446744073709551615", 1, "14102100"),  # 20 digits > int64; Tuesday 2014-10-21, 00h
        avazu_row("10000949271186029916", 0, "14102523", C20="100084"),  # Saturday 23h
        avazu_row("5", 1, "14102605", site_id=""),  # Sunday 05h, an empty value
    ]
    prepared = prepare_file(tmp_path, "train", "\n".join([AVAZU_HEADER, *rows]) + "\n", family="avazu", **ALL_TRAIN)
    s = prepared.schema
    assert "id" not in s.field_names and "click" not in s.field_names and len(s.field_names) == 24
    assert s.field_names[-3:] == ["hour", "weekday", "weekend"] and s.field_names[0] == "C1"
    assert tokens(prepared, "hour") == ["0", "23", "5"]
    assert tokens(prepared, "weekday") == ["2", "6", "0"]  # 0 = Sunday
    assert tokens(prepared, "weekend") == ["0", "1", "1"]
    assert tokens(prepared, "C20") == ["-1", "100084", "-1"]
    assert tokens(prepared, "site_id") == ["1fbe01fe", "1fbe01fe", "<missing>"]
    assert encoded(prepared)["label"].to_list() == [1, 0, 1]
    assert s.time_min == 16364 * 86400  # 2014-10-21


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (avazu_row("12a4"), "id is not a decimal string of 1-20 digits: '12a4'"),
        (avazu_row("123456789012345678901"), "id is not a decimal string"),
        (avazu_row(click=2), "click must be 0 or 1: '2'"),
        (avazu_row(hour="14103224"), "hour is not a valid YYMMDDHH: '14103224'"),
        (avazu_row(hour="14133000"), "hour is not a valid YYMMDDHH"),
        (avazu_row(hour="1410210"), "hour is not a valid YYMMDDHH: '1410210'"),
        (avazu_row(C1="x5"), "C1 is not an integer: 'x5'"),
        (avazu_row() + ",1", "expected 24 ','-separated fields, found 25"),
    ],
)
def test_avazu_malformed_row_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    text = "\n".join([AVAZU_HEADER, avazu_row(), line]) + "\n"
    with pytest.raises(DataFormatError) as info:
        prepare_file(tmp_path, "train.csv", text, family="avazu")
    assert f"train.csv:3: {fragment}" in str(info.value)


def test_avazu_header_required(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"train:1: expected the Avazu header"):
        prepare_file(tmp_path, "train", avazu_row() + "\n", family="avazu")
    with pytest.raises(DataFormatError, match="no data rows"):
        prepare_file(tmp_path / "b", "train.gz", AVAZU_HEADER + "\n", family="avazu")


def test_avazu_time_split_last_day_test_day_before_valid(tmp_path: Path) -> None:
    hours = [f"141021{h:02d}" for h in range(3)] + ["14102200", "14102900", "14102923", "14103000"]
    rows = [avazu_row(str(i), i % 2, h) for i, h in enumerate(hours)]
    prepared = prepare_file(tmp_path, "train.gz", "\n".join([AVAZU_HEADER, *rows]), family="avazu", split="time")
    assert encoded(prepared)["split"].to_list() == [0, 0, 0, 0, 1, 1, 2]
    assert prepared.schema.extra["split"] == {"rule": "time", "by": "day", "test_day": 16373, "days": 4}


# ---------------------------------------------------------------- options, fingerprint, splits

def test_fields_user_field_and_fingerprint(tmp_path: Path) -> None:
    text = "\n".join(criteo_row(i % 2, {1: i}, {1: "68fd1e64"}) for i in range(30)) + "\n"
    first = prepare_file(tmp_path, "train.txt", text, fields=["C1", "I1"], user_field="I1")
    assert first.schema.field_names == ["C1", "I1"] and first.schema.user_field == "I1"
    assert set(encoded(first).columns) == {"C1", "I1", "label", "split"}
    assert prepare_file(tmp_path, "train.txt", text, fields=["C1", "I1"], user_field="I1").directory == first.directory
    again = prepare_file(tmp_path, "train.txt", text, fields=["C1", "I1"], user_field="I1", chunk_bytes=2048)
    assert again.reused and again.directory == first.directory  # chunk size never changes the result
    other = prepare_file(tmp_path, "train.txt", text, fields=["C1", "I1"], user_field="I1", min_count=3)
    assert not other.reused and other.directory != first.directory
    with pytest.raises(UserError, match="data.fields"):
        prepare_file(tmp_path, "train.txt", text, fields=["C1", "nope"])
    with pytest.raises(UserError, match="user_field"):
        prepare_file(tmp_path, "train.txt", text, fields=["C1"], user_field="I1")


def test_random_split_is_exact_seeded_and_uniform() -> None:
    n = 10_001
    labels = random_split(n, [0.8, 0.1, 0.1], seed=2018, chunk=1000)
    assert np.bincount(labels).tolist() == list(split_counts(n, [0.8, 0.1, 0.1])) == [8001, 1000, 1000]
    assert np.array_equal(labels, random_split(n, [0.8, 0.1, 0.1], seed=2018, chunk=1000))
    assert not np.array_equal(labels, random_split(n, [0.8, 0.1, 0.1], seed=1, chunk=1000))
    test_rows = np.flatnonzero(labels == 2)
    assert abs(test_rows.mean() - n / 2) < 0.05 * n  # spread over the whole file, not a block
    assert split_counts(45_840_617, [0.8, 0.1, 0.1]) == (36_672_493, 4_584_062, 4_584_062)  # BARS Criteo_x4


def test_bad_ctr_options(tmp_path: Path) -> None:
    for options, fragment in [({"min_count": 0}, "min_count"), ({"split": "hash"}, "data.split"),
                              ({"split_ratio": [0.5, 0.5]}, "split_ratio"), ({"int_transform": "log2"}, "int_transform"),
                              ({"family": "nope"}, "family")]:
        with pytest.raises(UserError, match=fragment):
            prepare_file(tmp_path, "train.txt", GOOD + "\n", **options)
