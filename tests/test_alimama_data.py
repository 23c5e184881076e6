"""The Alimama loader (four files, behaviour histories) on hand-written files with every quirk, each malformed-row
kind naming its file and line, the history search against brute force, and the DSIN preset's row counts on
generated files against a brute-force pandas reference of the same rules."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pytest

from autorecbench.data.alimama import AlimamaOptions, draw_users, gather_histories, history_windows
from autorecbench.data.cache import DatasetConfig, PreparedData, prepare
from autorecbench.data.ctr import MISSING, OOV, block_paths
from autorecbench.data.synthetic_alimama import AlimamaGenerator, generate_alimama
from autorecbench.errors import DataFormatError, UserError

D03, D11, D12, D13 = 1_493_740_800, 1_494_432_000, 1_494_518_400, 1_494_604_800  # 00:00 China time (UTC+8)
PROFILE_HEADER = ("userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
                  "new_user_class_level ")  # the published trailing space
PROFILE = [PROFILE_HEADER, "1,0,5,2,3,,3,0,", "2,1,6,1,2,2,3,1,3", "3,0,5,2,3,1,1,0,2", "4,2,7,1,4,3,2,0,1"]
ADS = ["adgroup_id,cate_id,campaign_id,customer,brand,price", "10,100,1000,500,9000,12.5", "11,101,1001,501,NULL,3.0",
       "12,100,1002,500,9001,100000.0"]
SAMPLES = ["user,time_stamp,adgroup_id,pid,nonclk,clk",
           f"1,{D11 + 3600},10,430548_1007,1,0",
           f"1,{D12 + 7200},11,430539_1007,0,1",
           f"1,{D13 + 100},12,430548_1007,1,0",
           f"2,{D11 + 50},10,430548_1007,1,0",
           f"2,{D13 + 500},13,430548_1007,0,1",  # ad 13 has no ad_feature row
           f"3,{D12 + 10},12,430539_1007,1,0",
           f"4,{D13 + 36000},11,430548_1007,1,0",  # 05-13 10:00 China time, 02:00 UTC
           f"5,{D12 + 100},10,430548_1007,0,1"]  # user 5 has no profile row
LOG = ["user,time_stamp,btag,cate,brand",
       f"1,{D03 - 10},pv,99,9000",  # before 2017-05-03: not in a history
       f"1,{D12 + 20},pv,100,9000",  # file order is not time order
       f"1,{D11 + 100},pv,100,9000",
       f"1,{D11 + 3600},pv,101,NULL",  # the same second as a sample: not strictly before it
       f"1,{D11 + 200},cart,102,9000",  # not pv
       f"1,{D12 + 10},pv,103,9002",
       f"1,{D13 + 50},pv,104,",
       f"2,{D11 + 10},pv,100,9000",
       f"2,{D11 + 20},pv,101,9000",  # user 2 has 2 behaviours: empty histories (DSIN: more than 2 needed)
       f"3,{D11 + 10},pv,101,9001",
       f"3,{D11 + 20},fav,104,9001",
       f"3,{D11 + 30},pv,100,9000",
       f"3,{D12 + 5},pv,103,9002",
       f"7,{D12 + 5},pv,105,9002"]  # a user without samples
FILES = {"raw_sample.csv": SAMPLES, "ad_feature.csv": ADS, "user_profile.csv": PROFILE, "behavior_log.csv": LOG}
TINY = {"user_fraction": 1.0, "max_seq_len": 3, "vocabulary_rows": "all"}  # every id has a code: rows found by id


def write(raw: Path, files: dict[str, list[str]], newline: str = "\n", gz: bool = False, bom: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        data = (("\ufeff" if bom else "") + newline.join(lines) + newline).encode()
        target = raw / (f"{name}.gz" if gz else name)
        target.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def config(tmp_path: Path, raw: Path, **options: Any) -> DatasetConfig:
    return DatasetConfig.from_mapping({
        "name": "alimama", "family": "alimama", "path": str(raw), "processed_dir": str(tmp_path / "processed"),
        "sources": [{"file": "raw_sample.csv", "format": "alimama_csv",
                     "companions": ["ad_feature.csv", "user_profile.csv", "behavior_log.csv"]}], **options})


def prepare_files(tmp_path: Path, files: dict[str, list[str]] | None = None, **options: Any) -> PreparedData:
    raw = tmp_path / "raw"
    write(raw, files or FILES)
    return prepare(config(tmp_path, raw, **{**TINY, **options}))


def rows(prepared: PreparedData) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in block_paths(prepared.directory)])


def code(prepared: PreparedData, field: str, token: str) -> int:
    vocab = pl.read_parquet(prepared.directory / "vocab" / f"{field}.parquet")
    return int(vocab.filter(pl.col("token") == token)["code"][0])


def sample(frame: pl.DataFrame, prepared: PreparedData, user: int, adgroup: int) -> dict[str, Any]:
    return frame.filter((pl.col("userid") == code(prepared, "userid", str(user)))
                        & (pl.col("adgroup_id") == code(prepared, "adgroup_id", str(adgroup)))).row(0, named=True)


def history(row: dict[str, Any], name: str = "hist_cate", length: int = 3) -> list[int]:
    return [row[f"{name}_{t}"] for t in range(length)]


# ---------------------------------------------------------------- the quirks and the preprocessing

def test_quirks_histories_codes_and_china_time_split(tmp_path: Path) -> None:
    prepared = prepare_files(tmp_path)
    s, frame = prepared.schema, rows(prepared)
    assert s.family == "alimama" and s.label == "click" and s.user_field == "userid"
    assert [f.name for f in s.fields][:3] == ["userid", "adgroup_id", "pid"] and len(s.fields) == 16
    assert [(f.name, f.kind, f.shares_table_with, f.length) for f in s.sequence_fields] == [
        ("hist_cate", "sequence", "cate_id", 3), ("hist_brand", "sequence", "brand", 3)]
    assert {f.name: f.cardinality for f in s.sequence_fields} == {"hist_cate": s.cardinality("cate_id"),
                                                                 "hist_brand": s.cardinality("brand")}
    # user 5 has no profile row: dropped (missing_profile=drop); ad 13 has none: kept with missing values
    assert s.n_rows == 7 == frame.height and s.extra["samples_in_file"] == 8
    assert s.splits == {"train": 2, "valid": 2, "test": 3}  # days 05-11, 05-12, 05-13 China time
    c = {v: code(prepared, "cate_id", str(v)) for v in (99, 100, 101, 103, 104)}
    assert sorted(c.values()) == list(range(2, 7))  # joint codes: 0 padding, 1 missing, then raw order
    first = sample(frame, prepared, 1, 10)  # the log's D11+3600 row is the same second: not before
    assert history(first) == [c[100], 0, 0] and first["hist_len"] == 1 and first["split"] == 0
    second = sample(frame, prepared, 1, 11)  # the last 3 strictly before, oldest first; 99 is before 05-03
    assert history(second) == [c[101], c[103], c[100]] and second["hist_len"] == 3 and second["split"] == 1
    assert history(second, "hist_brand") == [MISSING, code(prepared, "brand", "9002"), code(prepared, "brand", "9000")]
    third = sample(frame, prepared, 1, 12)
    assert history(third) == [c[103], c[100], c[104]] and third["split"] == 2
    assert history(third, "hist_brand")[-1] == MISSING  # an empty log brand
    assert sample(frame, prepared, 2, 10)["hist_len"] == 0  # 2 behaviours: empty (min_user_behaviours 3)
    assert history(sample(frame, prepared, 3, 12)) == [c[101], c[100], c[103]]  # the fav row dropped
    assert sample(frame, prepared, 4, 11)["hist_len"] == 0
    # targets share the codes: ad 11's brand is NULL -> missing; ad 10's cate is 100
    assert second["brand"] == MISSING and first["cate_id"] == c[100]
    missing_ad = sample(frame, prepared, 2, 13)
    assert [missing_ad[f] for f in ("campaign_id", "customer", "cate_id", "brand", "price")] == [MISSING] * 5
    # empty profile levels -> missing; price bucket floor(4 ln(1 + p) + 0.5); pid strings
    assert first["pvalue_level"] == MISSING and first["new_user_class_level"] == MISSING
    assert first["price"] == code(prepared, "price", str(int(np.floor(4 * np.log1p(12.5) + 0.5))))
    assert {first["pid"], second["pid"]} == {code(prepared, "pid", "430548_1007"), code(prepared, "pid", "430539_1007")}
    assert s.options["preset"] == "dsin" and s.options["user_fraction"] == 1.0 and s.options["max_seq_len"] == 3


def test_gzip_crlf_bom_and_blank_lines_read_the_same(tmp_path: Path) -> None:
    plain = rows(prepare_files(tmp_path / "a"))
    raw = tmp_path / "b" / "raw"
    files = {**FILES, "behavior_log.csv": [*LOG[:3], "", *LOG[3:]]}
    write(raw, files, newline="\r\n", gz=True, bom=True)
    packed = prepare(config(tmp_path / "b", raw, **TINY))
    assert [p["path"].endswith(".gz") for p in packed.schema.source["files"]] == [True] * 4
    assert rows(packed).equals(plain)


def test_utc_days_missing_profile_keep_missing_ad_drop_and_longer_histories(tmp_path: Path) -> None:
    utc = prepare_files(tmp_path / "utc", utc_offset_hours=0).schema  # the DSIN code's UTC cut
    assert utc.splits == {"train": 4, "valid": 2, "test": 1} and utc.extra["split"]["test_day"] == "2017-05-13"
    keep = prepare_files(tmp_path / "keep", missing_profile="keep", missing_ad="drop")
    frame = rows(keep)
    assert keep.schema.n_rows == 7  # user 5 kept (missing profile), ad 13's sample dropped
    no_profile = sample(frame, keep, 5, 10)
    assert [no_profile[f] for f in ("cms_segid", "age_level", "new_user_class_level")] == [MISSING] * 3
    trained = rows(prepare_files(tmp_path / "train", vocabulary_rows="train"))  # only ad 10 is in training rows
    assert trained.filter(pl.col("adgroup_id") == OOV).height == 5
    longer = rows(prepare_files(tmp_path / "t5", max_seq_len=5, min_user_behaviours=1))
    assert [c for c in longer.columns if c.startswith("hist_cate_")] == [f"hist_cate_{t}" for t in range(5)]
    assert sorted(longer["hist_len"].to_list()) == [0, 1, 2, 2, 3, 4, 5]  # user 2 now has its 2 behaviours


def test_user_draw_is_pandas_sample_of_the_profile_rows() -> None:
    users = np.arange(1000, 1997) * 7
    frame = pd.DataFrame({"userid": users})
    assert np.array_equal(draw_users(users, 0.25, 1024), frame.sample(frac=0.25, random_state=1024)["userid"].values)
    assert np.array_equal(draw_users(users, 1.0, 1024), users)


def test_bars_preset_min_count_and_drops(tmp_path: Path) -> None:
    prepared = prepare_files(tmp_path, preset="bars", min_count=2, vocabulary_rows="all")
    s = prepared.schema
    assert s.options["preset"] == "bars" and s.options["missing_ad"] == "drop" and s.options["min_count"] == 2
    assert s.n_rows == 6 and s.expected == {"rows": 25_029_426, "test": 3_099_515}
    frame = rows(prepared)
    assert frame.filter(pl.col("userid") == OOV).height == 3  # users 2, 3, 4 have one row each: below min_count
    assert frame.filter(pl.col("userid") == code(prepared, "userid", "1")).height == 3


@pytest.mark.parametrize(("options", "fragment"), [
    ({"preset": "din"}, "data.preset must be one of dsin, bars"),
    ({"user_fraction": 0}, "data.user_fraction must be in (0, 1]"),
    ({"user_fraction": 0.5, "missing_profile": "keep"}, "missing_profile=keep needs data.user_fraction=1"),
    ({"btags": ["pv", "click"]}, "data.btags must list some of pv, cart, fav, buy"),
    ({"behaviour_start": "May 3"}, "data.behaviour_start must be a date"),
    ({"max_seq_len": 0}, "data.max_seq_len must be >= 1"),
    ({"missing_ad": "maybe"}, "data.missing_ad must be drop or keep"),
    ({"user_fractions": 0.5}, "unknown data option(s) for the alimama family: user_fractions"),
])
def test_bad_options(tmp_path: Path, options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UserError) as caught:
        config(tmp_path, tmp_path, **options)
    assert fragment in str(caught.value)


# ---------------------------------------------------------------- malformed rows

def replaced(name: str, index: int, line: str) -> dict[str, list[str]]:
    lines = list(FILES[name])
    lines[index] = line
    return {**FILES, name: lines}


@pytest.mark.parametrize(("name", "index", "line", "fragment"), [
    ("raw_sample.csv", 3, f"1,{D12},11,430539_1007,0,2", "clk must be 0 or 1: '2'"),
    ("raw_sample.csv", 4, f"2,{D11},10,430548_1007,1,1", "nonclk + clk must be 1 (nonclk,clk): '1,1'"),
    ("raw_sample.csv", 2, f"u1,{D11},10,430548_1007,1,0", "user is not an integer id"),
    ("ad_feature.csv", 2, "10,abc,1000,500,9000,12.5", "cate_id is not an integer id"),
    ("user_profile.csv", 3, "2,1,6,1,2,2,3,1,x", "new_user_class_level is not an integer, empty or NULL"),
    ("raw_sample.csv", 5, "2,1494432050.0,10,430548_1007,1,0", "time_stamp is not an integer Unix time"),
    ("behavior_log.csv", 6, f"1,{D11 + 200},click,102,9000", "btag must be one of pv, cart, fav, buy: 'click'"),
    ("behavior_log.csv", 4, f"1,{D11 + 100},pv,100", "expected 5 ','-separated fields, found 4"),
    ("ad_feature.csv", 3, "11,101,1001,501,NULL,-3", "price is not a non-negative number"),
    ("ad_feature.csv", 3, "10,101,1001,501,NULL,3.0", "adgroup_id 10 is listed twice (first on line 2)"),
])
def test_malformed_row_names_file_and_line(tmp_path: Path, name: str, index: int, line: str, fragment: str) -> None:
    with pytest.raises(DataFormatError) as caught:
        prepare_files(tmp_path, replaced(name, index, line))
    assert str(caught.value).startswith(f"{tmp_path / 'raw' / name}:{index + 1}: ")
    assert fragment in str(caught.value)
    assert not list((tmp_path / "processed").iterdir())  # nothing left behind


@pytest.mark.parametrize("name", list(FILES))
def test_wrong_header(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataFormatError, match=rf"{name}:1: expected the header"):
        prepare_files(tmp_path, replaced(name, 0, FILES[name][0].replace("_", "-")))


def test_skip_bad_rows_drops_counts_and_reports_the_first(tmp_path: Path) -> None:
    files = replaced("behavior_log.csv", 6, f"1,{D11 + 200},click,102,9000")
    files["raw_sample.csv"] = [*SAMPLES, f"3,{D12 + 20},12,430539_1007,1,1"]
    prepared = prepare_files(tmp_path, files, skip_bad_rows=True)
    assert prepared.schema.extra["skipped_rows"] == 2 and prepared.schema.n_rows == 7
    assert prepared.schema.extra["first_skipped"].startswith(f"{tmp_path / 'raw' / 'raw_sample.csv'}:10: nonclk + clk")


def test_missing_companion_file_is_named(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write(raw, {k: v for k, v in FILES.items() if k != "behavior_log.csv"})
    with pytest.raises(UserError, match="behavior_log.csv not found in .* \\(beside raw_sample.csv"):
        prepare(config(tmp_path, raw, **TINY))


# ---------------------------------------------------------------- the history search against brute force

def test_history_search_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    log = np.stack([rng.integers(0, 40, n), rng.integers(0, 200, n)], axis=1)  # few times: many ties
    order = np.lexsort((log[:, 1], log[:, 0]))  # by user, then time, stable
    users, times = log[order, 0], log[order, 1]
    codes = rng.integers(2, 99, n)[order]
    s_users, s_times = rng.integers(0, 45, 500), rng.integers(0, 220, 500)
    for length, minimum in ((7, 1), (50, 3), (1, 80)):
        end, lengths = history_windows(users, times, s_users, s_times, length, minimum)
        got = gather_histories(codes, end, lengths, length)
        for i in range(s_users.size):
            mine = np.flatnonzero(users == s_users[i])
            before = codes[mine[times[mine] < s_times[i]]][-length:] if mine.size >= minimum else np.array([], int)
            assert lengths[i] == before.size
            assert got[i].tolist() == before.tolist() + [0] * (length - before.size)


# ---------------------------------------------------------------- the DSIN preset against pandas

def dsin_reference(raw: Path, length: int, minimum: int) -> tuple[pd.DataFrame, dict[tuple[int, int, int], list[int]]]:
    """The DSIN preset's rules, brute force with pandas (as the DSIN scripts): the split of every kept sample
    and the raw cate history of each (user, time, adgroup)."""
    profile = pd.read_csv(raw / "user_profile.csv")
    samples = pd.read_csv(raw / "raw_sample.csv")
    log = pd.read_csv(raw / "behavior_log.csv")
    drawn = profile.sample(frac=0.25, random_state=1024)["userid"]
    samples = samples[samples["user"].isin(drawn)].copy()
    log = log[(log["btag"] == "pv") & log["user"].isin(drawn) & (log["time_stamp"] >= D03)]
    day = (samples["time_stamp"] + 8 * 3600) // 86400
    days = sorted(day.unique())
    samples["split"] = np.where(day == days[-1], 2, np.where(day == days[-2], 1, 0))
    histories = {}
    by_user = {u: g.sort_values("time_stamp", kind="stable") for u, g in log.groupby("user")}
    for user, time, ad in samples[["user", "time_stamp", "adgroup_id"]].itertuples(index=False):
        events = by_user.get(user)
        if events is None or len(events) < minimum:  # DSIN: only users with more than 2 behaviours
            histories[(user, time, ad)] = []
            continue
        histories[(user, time, ad)] = events.loc[events["time_stamp"] < time, "cate"].tolist()[-length:]
    return samples, histories


def test_dsin_preset_row_counts_and_histories_match_a_pandas_reference(tmp_path: Path) -> None:
    raw = tmp_path / "generated"
    generate_alimama(AlimamaGenerator(seed=3, users=800, ads=120, samples=20_000, events_min=1, events_max=12), raw)
    # the dsin preset (25% of the users, seed 1024); more behaviours required than DSIN's 3, so that some
    # users of this small file get empty histories
    prepared = prepare(config(tmp_path, raw, max_seq_len=40, min_user_behaviours=60))
    s = prepared.schema
    reference, histories = dsin_reference(raw, 40, 60)
    profile_rows = len(pd.read_csv(raw / "user_profile.csv"))  # 5% of the users have none
    assert s.n_rows == len(reference) and s.extra["users_drawn"] == round(0.25 * profile_rows) < 200
    assert s.splits == {name: int((reference["split"] == i).sum()) for i, name in enumerate(("train", "valid", "test"))}
    assert s.extra["positives"]["test"] == int(reference.loc[reference["split"] == 2, "clk"].sum())
    frame = rows(prepared)
    cates = {c: t for c, t in pl.read_parquet(prepared.directory / "vocab" / "cate_id.parquet")
             .select("code", "token").iter_rows()}
    users = {c: int(t) for c, t in pl.read_parquet(prepared.directory / "vocab" / "userid.parquet")
             .select("code", "token").iter_rows() if c >= 2}
    ads = {c: int(t) for c, t in pl.read_parquet(prepared.directory / "vocab" / "adgroup_id.parquet")
           .select("code", "token").iter_rows() if c >= 2}
    # the history of every sample whose user and ad are in the vocabularies (user+ad+time is unique here)
    assert 0 < frame["hist_len"].mean() < 40 and (frame["hist_len"] == 0).sum() > 0
    checked = 0
    for row in frame.filter(pl.col("userid").is_in(list(users)) & pl.col("adgroup_id").is_in(list(ads))).head(400).iter_rows(named=True):
        user, ad = users[row["userid"]], ads[row["adgroup_id"]]
        matches = reference[(reference["user"] == user) & (reference["adgroup_id"] == ad)]
        if len(matches) != 1:
            continue
        expected = histories[(user, int(matches["time_stamp"].iloc[0]), ad)]
        assert [int(cates[row[f"hist_cate_{t}"]]) for t in range(row["hist_len"])] == expected
        checked += 1
    assert checked > 100


def test_generator_defaults_are_the_yaml_and_the_first_design_pins_what_changed() -> None:
    import json
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from autorecbench.config import compose
    from autorecbench.data.synthetic_alimama import FIRST_DESIGN, FIRST_DESIGN_OVERRIDES

    yaml = OmegaConf.to_container(compose(["data=synthetic-alimama"]).data.generator)
    assert isinstance(yaml, dict) and yaml.pop("kind") == "alimama"
    assert yaml == json.loads(json.dumps(asdict(AlimamaGenerator())))  # tuples as lists
    # the AMEIR checks and the bench pin the first design: every pinned value differs from today's default
    assert all(value != yaml[key] for key, value in FIRST_DESIGN.items())
    pinned = compose(["data=synthetic-alimama", *FIRST_DESIGN_OVERRIDES]).data.generator
    assert {key: pinned[key] for key in FIRST_DESIGN} == FIRST_DESIGN
