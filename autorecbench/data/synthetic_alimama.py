"""Synthetic Alimama data (``generator.kind: alimama``): the four files in the published format, with every
quirk, from a known click model; they go through the real loader (``alimama.py``).

World (options of :class:`AlimamaGenerator`): ``users`` with profiles (``missing_profile_rate`` of them have no
``user_profile`` row; ``pvalue_level`` / ``new_user_class_level`` empty at ``empty_level_rate``), ``ads`` over
``categories`` × ``brands`` (``NULL`` brand at ``null_brand_rate``; float prices), two ``pid`` values, samples
over the last ``sample_days`` of ``behaviour_days`` China-time days ending 2017-05-13 (as the real data).

Behaviours: every user has ``interests`` interest categories per day (diverse interests, DIN §1), each drawn
uniformly (each kept from the day before with probability ``interest_stay``). Each day a user makes
``events_min``–``events_max`` ``pv`` events at uniform times; an event's category is one of today's interests
(uniformly) with probability ``interest_focus``, else a Zipf draw; its brand
is the category's usual brand with probability 0.7. ``other_btag_rate`` adds ``cart`` / ``fav`` / ``buy``
events (the presets drop them). With ``order_pair_rate`` > 0 an event is followed, with that probability, by
one of category π⁻¹(its category) (π a fixed permutation), which plants the bigrams of the order signal.

Samples: a sample of user u on day d sits just after u's j-th event of that day (j uniform in
[``events_min``, that day's count], so at least ``events_min`` − 1 of today's events precede it; at the same
second as that event with probability ``tie_rate``, so "strictly before" matters). Its ad is, with
probability ``interest_ad_share``, one of today's interest categories, else a Zipf draw over the ads. Click:

    logit = b + Σ_{f ∈ linear_fields} w_f[x_f]                                  (w ~ N(0, linear_std²))
              + pair_strength / √r · Σ_{(f, g) ∈ pairs} ⟨A_fg[x_f], B_fg[x_g]⟩
              + triple_strength / √r · Σ_{(f, g, h) ∈ triples} Σ_k A[x_f]_k B[x_g]_k C[x_h]_k
              + interest_strength · 1[cate(ad) ∈ interests(u, d)]
              + order_strength · min(3, #{t : cate_t = c*, cate_{t−1} = π(c*)})
    click ~ Bernoulli(sigmoid(logit))

with factors ~ N(0, 1) of rank r (``pair_rank``, ``triple_rank``) centred under the samples' value frequencies
(so a planted pair or triple has no lower-order effect), c* the ad's category, the count over the user's last
``order_window`` ``pv`` events strictly before the sample and from 2017-05-03 (the DSIN preset's window), and b
set so that the mean click probability is ``base_ctr``. The interest term is visible only through the
behaviour sequence: the interests are redrawn every day, so neither the user nor the ad alone predicts it;
with several interests a day a sum of the history's embeddings blurs them, while attention with the target
as query picks out the matching behaviours (the case DIN was built for).
``interest_strength = 0`` switches it off (the control file); ``order_strength`` is the order-sensitive,
target-aware signal of the AMEIR checks (off by default). The click model uses a user's drawn profile also
when the profile row is withheld from the file.

Defaults (the second design; README, Alimama: "Planted truth, measured"): the file the issue describes, a click
that happens mostly when the ad's category is one of today's interests (``interest_strength`` 3, half the
impressions from an interest: P(match | click) = 0.94), the field terms weak (``linear_std`` 0.1, pair and triple
0.3), a history that is a clean proxy of today's interests (``interest_focus`` 0.9; 15–40 events a day, so at
least 14 of T = 20 history items are the sample's own day; background categories with a mild ``zipf`` 0.5),
1,000 users and 200 ads for 200,000 samples (their id embeddings overfit later), and 20% clicks
(``base_ctr``; Alimama's 5% is an option: four times the positives). The first design (``FIRST_DESIGN``) made
the fields dominate: DIN and DNN both stayed at the fields-only level there.

``truth.json``: options, planted fields, π, bias, click rate; ``truth.npz`` (per ``raw_sample.csv`` row, in file
order): ``p_click``, ``interest_match``, ``order_count``, ``interests`` (raw cate ids). The behaviour log is
written per block of ``chunk_users`` users, so any size fits in memory (``make bench`` writes 50M rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from autorecbench.data.alimama import AD_FEATURE, BEHAVIOR_LOG, RAW_SAMPLE, USER_PROFILE, gather_histories, history_windows
from autorecbench.errors import UserError

GENERATOR_VERSION = 1
LAST_DAY_START = 1_494_604_800  # 2017-05-13 00:00 China time (UTC+8)
WINDOW_START = 1_493_740_800  # 2017-05-03 00:00 China time: the DSIN preset's first behaviour day
DAY = 86_400
PIDS = ("430548_1007", "430539_1007")
# profile columns: values 0..n-1 written as the offsets below (the real files' ranges)
PROFILE_VALUES = {"cms_segid": (20, 0), "cms_group_id": (13, 0), "final_gender_code": (2, 1), "age_level": (7, 0),
                  "pvalue_level": (3, 1), "shopping_level": (3, 1), "occupation": (2, 0),
                  "new_user_class_level": (4, 1)}
MAY_BE_EMPTY = ("pvalue_level", "new_user_class_level")
MODEL_FIELDS = ("userid", "adgroup_id", "pid", *PROFILE_VALUES, "campaign_id", "customer", "cate_id", "brand")


# The first design's defaults that the redesign for DIN's check changed (README, Alimama: "Planted truth,
# measured"). AMEIR's validation, reproduction and tests and the Alimama bench were designed and measured on
# them, so they pin them: FIRST_DESIGN_OVERRIDES go before one's own overrides (a later override wins).
FIRST_DESIGN: dict[str, Any] = {
    "users": 3000, "ads": 400, "events_min": 5, "events_max": 60, "zipf": 1.1, "base_ctr": 0.05, "linear_std": 0.3,
    "pair_strength": 0.8, "triple_strength": 0.8, "interest_strength": 2.0, "interest_focus": 0.7,
    "interest_ad_share": 0.3}
FIRST_DESIGN_OVERRIDES = [f"data.generator.{k}={v}" for k, v in FIRST_DESIGN.items()]


@dataclass(frozen=True)
class AlimamaGenerator:
    seed: int = 0
    users: int = 1000
    ads: int = 200
    categories: int = 40
    brands: int = 30
    campaigns: int = 200
    customers: int = 100
    samples: int = 200_000
    sample_days: int = 8
    behaviour_days: int = 12
    events_min: int = 15
    events_max: int = 40
    other_btag_rate: float = 0.1
    tie_rate: float = 0.1
    missing_profile_rate: float = 0.05
    empty_level_rate: float = 0.3
    null_brand_rate: float = 0.1
    zipf: float = 0.5
    base_ctr: float = 0.2
    linear_fields: tuple[str, ...] = ("age_level", "pid", "customer")
    linear_std: float = 0.1
    pairs: tuple[tuple[str, ...], ...] = (("age_level", "cate_id"),)
    pair_strength: float = 0.3
    pair_rank: int = 2
    triples: tuple[tuple[str, ...], ...] = (("cms_group_id", "pid", "brand"),)
    triple_strength: float = 0.3
    triple_rank: int = 2
    interests: int = 3
    interest_strength: float = 3.0
    interest_focus: float = 0.9
    interest_stay: float = 0.0
    interest_ad_share: float = 0.5
    order_strength: float = 0.0
    order_window: int = 20
    order_pair_rate: float = 0.0
    chunk_users: int = 20_000

    def __post_init__(self) -> None:
        for name in ("users", "ads", "categories", "interests", "brands", "campaigns", "customers", "samples",
                     "events_min", "pair_rank", "triple_rank", "order_window", "chunk_users"):
            if getattr(self, name) < 1:
                raise UserError(f"data.generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.ads < self.categories:
            raise UserError("data.generator.ads must be >= categories (every category has an ad)")
        if not 3 <= self.sample_days <= self.behaviour_days:
            raise UserError("data.generator: need 3 <= sample_days <= behaviour_days (train, validation, test days)")
        if self.events_max < self.events_min:
            raise UserError("data.generator.events_max must be >= events_min")
        rates = ("other_btag_rate", "tie_rate", "missing_profile_rate", "empty_level_rate", "null_brand_rate",
                 "interest_focus", "interest_stay", "interest_ad_share", "order_pair_rate")
        for name in rates:
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"data.generator.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.base_ctr < 1:
            raise UserError("data.generator.base_ctr must be in (0, 1)")
        planted = [*self.linear_fields, *(f for p in self.pairs for f in p), *(f for t in self.triples for f in t)]
        unknown = sorted({f for f in planted if f not in MODEL_FIELDS})
        if unknown:
            raise UserError(f"data.generator: unknown field(s) {unknown}; planted terms use {', '.join(MODEL_FIELDS)}")
        if any(len(p) != 2 for p in self.pairs) or any(len(t) != 3 for t in self.triples):
            raise UserError("data.generator.pairs lists field pairs, data.generator.triples field triples")

    def key(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def _distinct(rng: np.random.Generator, n: int, upper: int) -> np.ndarray:
    return np.sort(rng.choice(upper, size=n, replace=False) + 1).astype(np.int64)


@dataclass
class _World:
    """Everything drawn before the behaviours: ids, profiles, ads, interests and the samples' users and ads."""

    user_ids: np.ndarray
    profile: dict[str, np.ndarray]  # per user: value index (the last index of a MAY_BE_EMPTY column = empty)
    has_profile: np.ndarray
    ad_ids: np.ndarray
    ad_values: dict[str, np.ndarray]  # per ad: cate_id, brand (index; `brands` = NULL), campaign_id, customer
    price: np.ndarray
    cate_ids: np.ndarray
    brand_ids: np.ndarray
    usual_brand: np.ndarray  # per category
    interest: np.ndarray  # [users, behaviour_days, interests] category index
    successor: np.ndarray  # category -> π^-1(category): the planted next category
    s_user: np.ndarray
    s_day: np.ndarray  # index into the behaviour days
    s_ad: np.ndarray
    s_pid: np.ndarray


def _draw_world(spec: AlimamaGenerator, rng: np.random.Generator) -> _World:
    n_u, n_a = spec.users, spec.ads
    profile = {}
    for name, (n, _) in PROFILE_VALUES.items():
        values = rng.choice(n, size=n_u, p=_zipf(n, 0.5)[rng.permutation(n)])
        if name in MAY_BE_EMPTY:
            values[rng.random(n_u) < spec.empty_level_rate] = n  # the empty value
        profile[name] = values
    category = np.concatenate([rng.permutation(spec.categories),
                               rng.choice(spec.categories, size=n_a - spec.categories, p=_zipf(spec.categories, spec.zipf))])
    usual_brand = rng.integers(0, spec.brands, size=spec.categories)
    brand = np.where(rng.random(n_a) < 0.7, usual_brand[category], rng.integers(0, spec.brands, size=n_a))
    brand[rng.random(n_a) < spec.null_brand_rate] = spec.brands  # NULL
    ad_values = {"cate_id": category, "brand": brand, "campaign_id": rng.integers(0, spec.campaigns, size=n_a),
                 "customer": rng.choice(spec.customers, size=n_a, p=_zipf(spec.customers, spec.zipf))}
    k = spec.interests
    interest = np.empty((n_u, spec.behaviour_days, k), dtype=np.int64)
    interest[:, 0] = rng.integers(0, spec.categories, size=(n_u, k))
    for d in range(1, spec.behaviour_days):
        stay = rng.random((n_u, k)) < spec.interest_stay
        interest[:, d] = np.where(stay, interest[:, d - 1], rng.integers(0, spec.categories, size=(n_u, k)))
    s_user = rng.choice(n_u, size=spec.samples, p=_zipf(n_u, 0.6)[rng.permutation(n_u)])
    s_day = rng.integers(spec.behaviour_days - spec.sample_days, spec.behaviour_days, size=spec.samples)
    # the ad: from today's interest category (interest_ad_share, uniform among its ads) or a Zipf draw
    s_ad = rng.choice(n_a, size=spec.samples, p=_zipf(n_a, spec.zipf)[rng.permutation(n_a)])
    chosen = np.flatnonzero(rng.random(spec.samples) < spec.interest_ad_share)
    by_category = np.argsort(category, kind="stable")
    first = np.searchsorted(category[by_category], np.arange(spec.categories))
    count = np.bincount(category, minlength=spec.categories)
    wanted = interest[s_user[chosen], s_day[chosen], rng.integers(0, k, size=chosen.size)]
    s_ad[chosen] = by_category[first[wanted] + np.floor(rng.random(chosen.size) * count[wanted]).astype(np.int64)]
    return _World(
        user_ids=_distinct(rng, n_u, n_u * 50), profile=profile, has_profile=rng.random(n_u) >= spec.missing_profile_rate,
        ad_ids=_distinct(rng, n_a, n_a * 100), ad_values=ad_values,
        price=np.round(np.exp(rng.normal(4.0, 1.5, size=n_a)), 1),
        cate_ids=_distinct(rng, spec.categories, 13_000), brand_ids=_distinct(rng, spec.brands, 460_000),
        usual_brand=usual_brand, interest=interest, successor=rng.permutation(spec.categories),
        s_user=s_user, s_day=s_day, s_ad=s_ad, s_pid=rng.integers(0, len(PIDS), size=spec.samples),
    )


def _sample_values(spec: AlimamaGenerator, w: _World) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per sample, the value index of every field the click model may use, and each field's cardinality."""
    values = {"userid": w.s_user, "adgroup_id": w.s_ad, "pid": w.s_pid}
    sizes = {"userid": spec.users, "adgroup_id": spec.ads, "pid": len(PIDS)}
    for name, (n, _) in PROFILE_VALUES.items():
        values[name], sizes[name] = w.profile[name][w.s_user], n + 1
    for name, n in (("cate_id", spec.categories), ("brand", spec.brands + 1), ("campaign_id", spec.campaigns),
                    ("customer", spec.customers)):
        values[name], sizes[name] = w.ad_values[name][w.s_ad], n
    return values, sizes


def _centred_factors(rng: np.random.Generator, values: np.ndarray, size: int, rank: int) -> np.ndarray:
    factor = rng.normal(size=(size, rank))
    return factor - np.bincount(values, minlength=size) @ factor / values.size


def _static_logits(spec: AlimamaGenerator, values: dict[str, np.ndarray], sizes: dict[str, int],
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The click model's terms that do not depend on the behaviours, and its parameters."""
    logits = np.zeros(spec.samples)
    params: dict[str, np.ndarray] = {}
    for f in spec.linear_fields:
        params[f"linear_{f}"] = rng.normal(0.0, spec.linear_std, size=sizes[f])
        logits += params[f"linear_{f}"][values[f]]
    for terms, strength, rank, tag in ((spec.pairs, spec.pair_strength, spec.pair_rank, "pair"),
                                       (spec.triples, spec.triple_strength, spec.triple_rank, "triple")):
        for fields in terms:
            factors = [_centred_factors(rng, values[f], sizes[f], rank) for f in fields]
            product = np.ones((spec.samples, rank))
            for f, factor in zip(fields, factors):
                params[f"{tag}_{'__'.join(fields)}_{f}"] = factor
                product *= factor[values[f]]
            logits += strength / np.sqrt(rank) * product.sum(axis=1)
    return logits, params


def _events(spec: AlimamaGenerator, w: _World, users: np.ndarray, rng: np.random.Generator
            ) -> tuple[pl.DataFrame, np.ndarray]:
    """The pv events of the consecutive users ``users``, sorted by (user, day, time): columns user, time, cate,
    brand (indices) and rank (position within the user-day); and the first row of each (user, day)."""
    days = spec.behaviour_days
    first_day = LAST_DAY_START - (days - 1) * DAY
    n_ud = users.size * days
    counts = rng.integers(spec.events_min, spec.events_max + 1, size=n_ud)
    width = int(counts.max())
    valid = np.arange(width)[None, :] < counts[:, None]
    times = rng.integers(0, DAY, size=(n_ud, width))
    times = np.sort(np.where(valid, times, DAY), axis=1)  # the valid prefix, in time order
    interest = w.interest[users].reshape(n_ud, spec.interests)
    focus = rng.random((n_ud, width)) < spec.interest_focus
    which = rng.integers(0, spec.interests, size=(n_ud, width))
    cats = np.where(focus, np.take_along_axis(interest, which, axis=1),
                    rng.choice(spec.categories, size=(n_ud, width), p=_zipf(spec.categories, spec.zipf)))
    if spec.order_pair_rate > 0:  # plant bigrams: an event followed by one of category π^-1(its category)
        plant = rng.random((n_ud, width)) < spec.order_pair_rate
        for t in range(1, width):
            cats[:, t] = np.where(plant[:, t], w.successor[cats[:, t - 1]], cats[:, t])
    ud = np.repeat(np.arange(n_ud), width).reshape(n_ud, width)[valid]
    cate = cats[valid]
    brand = np.where(rng.random(cate.size) < 0.7, w.usual_brand[cate], rng.integers(0, spec.brands, size=cate.size))
    frame = pl.DataFrame({
        "user": users[ud // days], "time": first_day + (ud % days) * DAY + times[valid], "cate": cate,
        "brand": brand, "rank": np.broadcast_to(np.arange(width), (n_ud, width))[valid].astype(np.int32),
    })
    return frame, np.concatenate([[0], np.cumsum(counts)[:-1]])


def _log_text(spec: AlimamaGenerator, w: _World, pv: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """pv events plus other btags as ``behavior_log.csv`` rows (raw ids), shuffled."""
    n_other = int(round(pv.height * spec.other_btag_rate))
    other = pv.sample(n_other, seed=int(rng.integers(2**31)), with_replacement=True).with_columns(
        pl.Series("btag", rng.choice(["cart", "fav", "buy"], size=n_other)),
        pl.Series("cate", rng.integers(0, spec.categories, size=n_other)))
    rows = pl.concat([pv.with_columns(pl.lit("pv").alias("btag")).select("user", "time", "btag", "cate", "brand"),
                      other.select("user", "time", "btag", "cate", "brand")])
    rows = rows.sample(fraction=1.0, shuffle=True, seed=int(rng.integers(2**31)))
    return rows.select(
        pl.Series("user", w.user_ids[rows["user"].to_numpy()]), pl.col("time").alias("time_stamp"), "btag",
        pl.Series("cate", w.cate_ids[rows["cate"].to_numpy()]), pl.Series("brand", w.brand_ids[rows["brand"].to_numpy()]))


def generate_alimama(spec: AlimamaGenerator, directory: Path) -> Path:
    """Write the four files and the planted truth into ``directory``; returns ``raw_sample.csv``."""
    rng = np.random.default_rng(spec.seed)
    w = _draw_world(spec, rng)
    values, sizes = _sample_values(spec, w)
    static, params = _static_logits(spec, values, sizes, rng)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    s_time = np.zeros(spec.samples, dtype=np.int64)
    order_count = np.zeros(spec.samples, dtype=np.int64)
    target = w.ad_values["cate_id"][w.s_ad]
    with (tmp / BEHAVIOR_LOG.file).open("wb") as log_file:
        log_file.write((",".join(BEHAVIOR_LOG.header) + "\n").encode())
        for start in range(0, spec.users, spec.chunk_users):
            block = np.arange(start, min(start + spec.chunk_users, spec.users))
            brng = np.random.default_rng([spec.seed, 1, start])
            pv, first = _events(spec, w, block, brng)
            # each sample sits after its user's j-th event of the day (j >= events_min), maybe at the same second
            rows = np.flatnonzero((w.s_user >= block[0]) & (w.s_user <= block[-1]))
            ud = (w.s_user[rows] - block[0]) * spec.behaviour_days + w.s_day[rows]
            count = np.diff(np.append(first, pv.height))[ud]
            j = spec.events_min - 1 + np.floor(brng.random(rows.size) * (count - spec.events_min + 1)).astype(np.int64)
            shift = np.where(brng.random(rows.size) < spec.tie_rate, 0, brng.integers(1, 600, size=rows.size))
            day_end = LAST_DAY_START - (spec.behaviour_days - 1 - w.s_day[rows]) * DAY + DAY - 1
            s_time[rows] = np.minimum(pv["time"].to_numpy()[first[ud] + j] + shift, day_end)
            # the order signal over the last order_window pv events strictly before the sample, in the window
            window = pv.filter(pl.col("time") >= WINDOW_START).sort("user", "time", "rank", maintain_order=True)
            end, lengths = history_windows(window["user"].to_numpy(), window["time"].to_numpy(), w.s_user[rows],
                                           s_time[rows], spec.order_window, 1)
            history = gather_histories(window["cate"].to_numpy() + 1, end, lengths, spec.order_window) - 1
            c = target[rows]
            pairs = (history[:, 1:] == c[:, None]) & (history[:, :-1] == w.successor[c][:, None])
            order_count[rows] = np.minimum(3, pairs.sum(axis=1))
            _log_text(spec, w, pv, brng).write_csv(log_file, include_header=False)

    match = (target[:, None] == w.interest[w.s_user, w.s_day]).any(axis=1)
    logits = static + spec.interest_strength * match + spec.order_strength * order_count
    bias = _calibrate(logits, spec.base_ctr)
    p_click = 1 / (1 + np.exp(-(logits + bias)))
    clicks = (rng.random(spec.samples) < p_click).astype(np.int8)
    order = rng.permutation(spec.samples)  # raw_sample.csv rows in random order
    pl.DataFrame({"user": w.user_ids[w.s_user], "time_stamp": s_time, "adgroup_id": w.ad_ids[w.s_ad],
                  "pid": np.array(PIDS)[w.s_pid], "nonclk": 1 - clicks, "clk": clicks})[order].write_csv(
        tmp / RAW_SAMPLE.file)
    _write_tables(spec, w, tmp, rng)
    np.savez_compressed(tmp / "truth.npz", p_click=p_click[order].astype(np.float32), interest_match=match[order],
                        order_count=order_count[order].astype(np.int8),
                        interests=w.cate_ids[w.interest[w.s_user, w.s_day]][order], **params)
    truth = {
        "generator": "alimama", **asdict(spec),
        "files": [t.file for t in (RAW_SAMPLE, AD_FEATURE, USER_PROFILE, BEHAVIOR_LOG)],
        "successor": {int(w.cate_ids[c]): int(w.cate_ids[w.successor[c]]) for c in range(spec.categories)},
        "order_window_start": WINDOW_START, "bias": bias, "click_rate": float(clicks.mean()),
        "interest_match_rate": float(match.mean()), "users_without_profile": int((~w.has_profile).sum()),
    }
    (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    try:
        tmp.rename(directory)
    except OSError:  # generated concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / RAW_SAMPLE.file


def _calibrate(logits: np.ndarray, base_ctr: float) -> float:
    """b with mean(sigmoid(logits + b)) = base_ctr (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logits + mid)))).mean() < base_ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _write_tables(spec: AlimamaGenerator, w: _World, directory: Path, rng: np.random.Generator) -> None:
    """``user_profile.csv`` (users with a profile, random order, empty levels) and ``ad_feature.csv``."""
    users = rng.permutation(np.flatnonzero(w.has_profile))
    columns: dict[str, Any] = {"userid": w.user_ids[users]}
    for name, (n, offset) in PROFILE_VALUES.items():
        v = w.profile[name][users]
        columns[name] = pl.select(pl.when(pl.Series(v == n)).then(None).otherwise(pl.Series(v + offset))).to_series()
    pl.DataFrame(columns).rename({"new_user_class_level": USER_PROFILE.header[-1]}).write_csv(directory / USER_PROFILE.file)
    ads = rng.permutation(spec.ads)
    brand = w.ad_values["brand"][ads]
    brand_text = pl.select(pl.when(pl.Series(brand == spec.brands)).then(pl.lit("NULL"))
                           .otherwise(pl.Series(w.brand_ids[np.minimum(brand, spec.brands - 1)]).cast(pl.String))).to_series()
    pl.DataFrame({"adgroup_id": w.ad_ids[ads], "cate_id": w.cate_ids[w.ad_values["cate_id"][ads]],
                  "campaign_id": w.ad_values["campaign_id"][ads] + 1, "customer": w.ad_values["customer"][ads] + 1,
                  "brand": brand_text, "price": pl.Series(w.price[ads]).cast(pl.String)}).write_csv(
        directory / AD_FEATURE.file)


ALIMAMA_GENERATORS = {"alimama": (AlimamaGenerator, generate_alimama)}
