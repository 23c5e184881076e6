"""Synthetic click data written in the real Criteo and Avazu formats, from a known click model.

``generator.kind: criteo`` writes a Kaggle-format ``train.txt`` (tab-separated, 40 columns);
``generator.kind: avazu`` writes ``train.csv`` with the Avazu header. Both go through the real loaders.

The click model, over the ``n_fields`` *active* fields (a seeded choice among the format's raw fields; the
others hold one constant value, or are empty in Criteo's format):

    logit(x) = b + sum_{f informative} w_f[x_f] + sum_{(f, g) planted} s / sqrt(r) * <A_fg[x_f], B_fg[x_g]>
    click    ~ Bernoulli(sigmoid(logit(x)))

- Each field f has a cardinality K_f drawn log-uniformly in ``[cardinality_min, cardinality_max]`` (capped at
  ``max_int_cardinality`` for Criteo's integer fields, whose categories are log buckets), values drawn with
  Zipf frequencies ``p(rank k) ∝ (k+1)^-zipf`` over a seeded permutation of the categories, and an empty
  ("missing") value with probability ``missing_rate`` (category K_f).
- ``n_informative`` of the active fields carry first-order weights w_f ~ N(0, linear_std^2); the rest are pure
  noise. ``n_pairs`` planted pairs of informative fields interact through rank-``pair_rank`` factors A, B ~
  N(0, 1), centred under the field's value distribution so that a planted pair has no first-order (marginal)
  effect: it is only learnable through a feature interaction. ``pair_strength`` s scales them.
- b is set (on a separate calibration sample) so that the mean click probability is ``base_ctr``.
- ``linear_std = pair_strength = 0`` gives a file without signal (AUC 0.5 for any model).

Raw values: a Criteo C field's category is a distinct random 8-hex string; an I field's category is either
one of the small values {0, 1, 2} (I2 also -1, -2, -3, as in the real data) or a log bucket ``floor(ln(v)^2)``,
written as a random integer v inside the bucket, so the loader's transform maps it back to the category.
Avazu's integer columns get distinct random integers (C20 includes -1), its id columns 8-hex strings; ``id``
is a random decimal of up to 20 digits; ``hour`` runs in time order over ``days`` days from 2014-10-21
(the hour fields carry no effect). Rows are written in chunks, so any size fits in memory.

Saved beside the file: ``truth.json`` (options, active / informative / noise fields, planted pairs, bias,
achieved click rate) and ``truth.npz`` (per field: ``tokens_<f>`` the loader's token of each category as a
string, ``linear_<f>`` the weights with the missing category last; per pair ``pairA_<f>__<g>`` and
``pairB_<f>__<g>``; ``p_click`` per row).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from autorecbench.errors import UserError
from autorecbench.data.atomic import remove_orphans, temp_folder

GENERATOR_VERSION = 1
CHUNK_ROWS = 250_000
CALIBRATION_ROWS = 200_000
AVAZU_START = np.datetime64("2014-10-21T00")


@dataclass(frozen=True)
class CTRGenerator:
    seed: int = 0
    rows: int = 100_000
    n_fields: int | None = None  # active fields; None: all raw fields of the format (39 Criteo, 21 Avazu)
    n_informative: int = 8
    n_pairs: int = 4
    cardinality_min: int = 5
    cardinality_max: int = 200
    max_int_cardinality: int = 400
    zipf: float = 1.1
    missing_rate: float = 0.02
    base_ctr: float = 0.25
    linear_std: float = 0.3
    pair_strength: float = 1.2
    pair_rank: int = 2
    days: int = 10

    def __post_init__(self) -> None:
        if self.rows < 10:
            raise UserError(f"data.generator.rows must be >= 10, got {self.rows}")
        if self.n_fields is not None and self.n_fields < 2:
            raise UserError("data.generator.n_fields must be >= 2")
        if not 0 <= self.n_informative or (self.n_fields is not None and self.n_informative > self.n_fields):
            raise UserError("data.generator.n_informative must be between 0 and n_fields")
        if self.n_pairs < 0 or self.n_pairs > self.n_informative * (self.n_informative - 1) // 2:
            raise UserError(f"data.generator.n_pairs={self.n_pairs}: at most n_informative*(n_informative-1)/2 pairs")
        if not 2 <= self.cardinality_min <= self.cardinality_max:
            raise UserError("data.generator: need 2 <= cardinality_min <= cardinality_max")
        if not 0 < self.base_ctr < 1 or not 0 <= self.missing_rate < 1:
            raise UserError("data.generator: base_ctr must be in (0, 1) and missing_rate in [0, 1)")
        if self.linear_std < 0 or self.pair_strength < 0 or self.pair_rank < 1 or self.zipf < 0 or self.days < 1:
            raise UserError("data.generator: linear_std, pair_strength, zipf >= 0; pair_rank, days >= 1")
        if not 4 <= self.max_int_cardinality <= 1500:
            raise UserError("data.generator.max_int_cardinality must be in [4, 1500] (log buckets of int64)")

    def key(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- raw values per category

def _log_bucket(v: np.ndarray) -> np.ndarray:
    return np.floor(np.log(v.astype(np.float64)) ** 2).astype(np.int64)


def _bucket_ranges(n_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest integer v > 2 with floor(ln(v)^2) == b, for b = 1 .. n_buckets (same float maths
    as the loader)."""
    lows = []
    for b in range(1, n_buckets + 2):
        v = max(3, int(np.ceil(np.exp(np.sqrt(b)))) - 2)
        while _log_bucket(np.array([v]))[0] < b:
            v += 1
        lows.append(v)
    lo = np.array(lows[:-1], dtype=np.int64)
    hi = np.array(lows[1:], dtype=np.int64) - 1
    assert (_log_bucket(lo) == np.arange(1, n_buckets + 1)).all() and (_log_bucket(hi) == np.arange(1, n_buckets + 1)).all()
    return lo, hi


@dataclass
class FieldModel:
    """One active field: how its categories are drawn and written, and what they do to the click."""

    name: str
    kind: str  # "int" (Criteo I: small values + log buckets), "hex", "avazu_int", "string"
    cardinality: int
    ranking: np.ndarray  # category of each Zipf rank
    probabilities: np.ndarray  # Zipf probability of each rank
    low: np.ndarray | None = None  # "int": integer range of each category
    high: np.ndarray | None = None
    tokens: pl.Series | None = None  # the raw string of each category (hex / avazu columns)
    loader_tokens: list[str] | None = None
    linear: np.ndarray | None = None  # weights of the K categories + missing (last)

    def category_frequencies(self, missing_rate: float) -> np.ndarray:
        freq = np.zeros(self.cardinality + 1)
        freq[self.ranking] = self.probabilities * (1 - missing_rate)
        freq[-1] = missing_rate
        return freq


def _int_field(name: str, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    small = [-3, -2, -1, 0, 1, 2] if name == "I2" else [0, 1, 2]  # the real data has negatives in I2 only
    small = small[:k]
    lo_b, hi_b = _bucket_ranges(max(k - len(small), 0))
    low = np.concatenate([np.array(small, dtype=np.int64), lo_b])
    high = np.concatenate([np.array(small, dtype=np.int64), hi_b])
    tokens = [str(v) for v in small] + [str(b + 2) for b in range(1, k - len(small) + 1)]  # ctr.int_token
    return low, high, tokens


def _distinct_ints(rng: np.random.Generator, k: int, upper: int) -> np.ndarray:
    return rng.choice(upper, size=k, replace=False).astype(np.int64)


def _build_fields(spec: CTRGenerator, kind: str, rng: np.random.Generator) -> tuple[list[str], list[FieldModel]]:
    from autorecbench.data import avazu, criteo

    raw = criteo.INT_FIELDS + criteo.CAT_FIELDS if kind == "criteo" else avazu.RAW_FIELDS
    n_active = len(raw) if spec.n_fields is None else spec.n_fields
    if n_active > len(raw):
        raise UserError(f"data.generator.n_fields={n_active}: the {kind} format has only {len(raw)} raw fields")
    if spec.n_informative > n_active:
        raise UserError("data.generator.n_informative must be <= n_fields")
    active = sorted(rng.choice(len(raw), size=n_active, replace=False).tolist())
    log_lo, log_hi = np.log(spec.cardinality_min), np.log(spec.cardinality_max)
    models = []
    for index in active:
        name = raw[index]
        k = int(round(np.exp(rng.uniform(log_lo, log_hi))))
        weights = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** spec.zipf
        if kind == "criteo" and name in criteo.INT_FIELDS:
            k = min(k, spec.max_int_cardinality)
            weights = weights[:k]
            low, high, loader_tokens = _int_field(name, k, rng)
            model = FieldModel(name, "int", k, rng.permutation(k), weights / weights.sum(), low=low, high=high,
                               loader_tokens=loader_tokens)
        elif kind == "criteo":
            values = _distinct_ints(rng, k, 2**32)
            model = FieldModel(name, "hex", k, rng.permutation(k), weights / weights.sum(),
                               tokens=pl.Series([f"{v:08x}" for v in values]), loader_tokens=[str(v) for v in values])
        elif name in avazu.INT_COLUMNS:
            values = _distinct_ints(rng, k, 100_000)
            if name == "C20":
                values[0] = -1  # C20 uses -1
            model = FieldModel(name, "avazu_int", k, rng.permutation(k), weights / weights.sum(),
                               tokens=pl.Series([str(v) for v in values]), loader_tokens=[str(v) for v in values])
        else:
            values = _distinct_ints(rng, k, 2**32)
            strings = [f"{v:08x}" for v in values]
            model = FieldModel(name, "string", k, rng.permutation(k), weights / weights.sum(),
                               tokens=pl.Series(strings), loader_tokens=strings)
        models.append(model)
    return raw, models


@dataclass
class ClickModel:
    fields: list[FieldModel]
    informative: list[int]  # indices into fields
    pairs: list[tuple[int, int]]
    factors: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    scale: float
    bias: float = 0.0

    def logits(self, categories: np.ndarray) -> np.ndarray:
        """``categories``: [rows, fields] category index (K_f = missing). Logit without ``bias``."""
        out = np.zeros(categories.shape[0])
        for i in self.informative:
            out += self.fields[i].linear[categories[:, i]]  # type: ignore[index]
        for (i, j), (a, b) in self.factors.items():
            out += self.scale * np.einsum("nr,nr->n", a[categories[:, i]], b[categories[:, j]])
        return out


def _draw_categories(fields: list[FieldModel], n: int, missing_rate: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, len(fields)), dtype=np.int64)
    for i, f in enumerate(fields):
        ranks = rng.choice(f.cardinality, size=n, p=f.probabilities)
        cats = f.ranking[ranks]
        cats[rng.random(n) < missing_rate] = f.cardinality
        out[:, i] = cats
    return out


def _click_model(spec: CTRGenerator, fields: list[FieldModel], rng: np.random.Generator) -> ClickModel:
    informative = sorted(rng.choice(len(fields), size=spec.n_informative, replace=False).tolist())
    all_pairs = [(a, b) for x, a in enumerate(informative) for b in informative[x + 1:]]
    chosen = rng.choice(len(all_pairs), size=spec.n_pairs, replace=False) if spec.n_pairs else []
    pairs = sorted(all_pairs[c] for c in chosen)
    for f in fields:
        f.linear = np.zeros(f.cardinality + 1)
    for i in informative:
        fields[i].linear = rng.normal(0.0, spec.linear_std, size=fields[i].cardinality + 1)
    factors = {}
    for i, j in pairs:
        a = rng.normal(size=(fields[i].cardinality + 1, spec.pair_rank))
        b = rng.normal(size=(fields[j].cardinality + 1, spec.pair_rank))
        # Centre under the value distribution: no first-order effect, only the interaction.
        a -= fields[i].category_frequencies(spec.missing_rate) @ a
        b -= fields[j].category_frequencies(spec.missing_rate) @ b
        factors[(i, j)] = (a, b)
    return ClickModel(fields, informative, pairs, factors, spec.pair_strength / np.sqrt(spec.pair_rank))


def _calibrate_bias(model: ClickModel, spec: CTRGenerator, seed: int) -> float:
    """b with mean(sigmoid(logit + b)) = base_ctr on a calibration sample (bisection)."""
    rng = np.random.default_rng([seed, 7])
    logits = model.logits(_draw_categories(model.fields, CALIBRATION_ROWS, spec.missing_rate, rng))
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(logits + mid)))).mean() < spec.base_ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------- writing the formats

def _raw_column(f: FieldModel, cats: np.ndarray, rng: np.random.Generator) -> pl.Series:
    missing = cats == f.cardinality
    safe = np.where(missing, 0, cats)
    if f.kind == "int":
        values = f.low[safe] + np.floor(rng.random(cats.size) * (f.high[safe] - f.low[safe] + 1)).astype(np.int64)  # type: ignore[index]
        series = pl.Series(f.name, values).cast(pl.String)
    else:
        series = f.tokens.gather(safe).alias(f.name)  # type: ignore[union-attr]
    return pl.select(pl.when(pl.Series(missing)).then(None).otherwise(series).alias(f.name)).to_series()


def _criteo_chunk(raw: list[str], fields: list[FieldModel], cats: np.ndarray, clicks: np.ndarray,
                  rng: np.random.Generator, start: int) -> pl.DataFrame:
    columns = {f.name: _raw_column(f, cats[:, i], rng) for i, f in enumerate(fields)}
    n = cats.shape[0]
    empty = pl.Series([None] * n, dtype=pl.String)
    return pl.DataFrame([pl.Series("label", clicks).cast(pl.String),
                         *[columns.get(name, empty.alias(name)) for name in raw]])


def _avazu_chunk(raw: list[str], fields: list[FieldModel], cats: np.ndarray, clicks: np.ndarray,
                 rng: np.random.Generator, start: int, total: int, days: int) -> pl.DataFrame:
    from autorecbench.data import avazu

    n = cats.shape[0]
    columns = {f.name: _raw_column(f, cats[:, i], rng) for i, f in enumerate(fields)}
    hours = (np.arange(start, start + n, dtype=np.int64) * days * 24) // total
    stamps = (AVAZU_START + hours.astype("timedelta64[h]")).astype("datetime64[h]")
    text = np.datetime_as_string(stamps, unit="h")  # 2014-10-21T05
    hour = pl.Series(text).str.replace_all(r"[-T]", "").str.slice(2, 8)  # YYMMDDHH
    ids = pl.Series(rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)).cast(pl.String)
    constant = {name: pl.Series(name, ["1005" if name in avazu.INT_COLUMNS else "85f751fd"] * n) for name in raw}
    return pl.DataFrame([ids.alias("id"), pl.Series("click", clicks).cast(pl.String), hour.alias("hour"),
                         *[columns.get(name, constant[name]) for name in raw]])


def planted_model(kind: str, spec: CTRGenerator) -> tuple[list[str], ClickModel]:
    """The format's raw field names and the seeded click model (fields, informative fields, planted pairs,
    calibrated bias) that :func:`generate_ctr` writes rows from."""
    rng = np.random.default_rng(spec.seed)
    raw, fields = _build_fields(spec, kind, rng)
    model = _click_model(spec, fields, rng)
    model.bias = _calibrate_bias(model, spec, spec.seed)
    return raw, model


@dataclass
class PlantedClicks:
    """Rows drawn from a click model in memory, without writing a file: ``categories`` ``[rows, fields]`` holds
    each active field's category index (``cardinality`` = the missing value, so a field has ``cardinality + 1``
    codes), ``clicks`` the 0/1 labels drawn from ``p_click``."""

    model: ClickModel
    categories: np.ndarray
    clicks: np.ndarray
    p_click: np.ndarray

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.model.fields]

    @property
    def codes(self) -> list[int]:
        """Codes per field (its categories and the missing value)."""
        return [f.cardinality + 1 for f in self.model.fields]


def draw_clicks(kind: str, spec: CTRGenerator) -> PlantedClicks:
    """``spec.rows`` rows of the click model :func:`generate_ctr` would write for ``spec`` (the same fields, truth
    and row draws), kept as category indices in memory: planted-truth checks that need no file."""
    _, model = planted_model(kind, spec)
    chunks = [(cats, clicks, p) for _, _, cats, p, clicks in _row_chunks(model, spec)]
    return PlantedClicks(model, *(np.concatenate(parts) for parts in zip(*chunks)))


def _row_chunks(model: ClickModel, spec: CTRGenerator
                ) -> Iterator[tuple[int, np.random.Generator, np.ndarray, np.ndarray, np.ndarray]]:
    """The rows chunk by chunk: (start, the chunk's generator, categories, click probabilities, clicks)."""
    for chunk, start in enumerate(range(0, spec.rows, CHUNK_ROWS)):
        n = min(CHUNK_ROWS, spec.rows - start)
        crng = np.random.default_rng([spec.seed, 1, chunk])
        cats = _draw_categories(model.fields, n, spec.missing_rate, crng)
        p = 1 / (1 + np.exp(-(model.logits(cats) + model.bias)))
        yield start, crng, cats, p.astype(np.float32), (crng.random(n) < p).astype(np.int8)


def generate_ctr(kind: str, spec: CTRGenerator, directory: Path) -> Path:
    """Write the raw file (``train.txt`` for Criteo, ``train.csv`` for Avazu) and the planted truth."""
    raw, model = planted_model(kind, spec)
    fields = model.fields
    filename = "train.txt" if kind == "criteo" else "train.csv"
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(directory)  # what a killed generation left
    tmp = temp_folder(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    p_click = np.empty(spec.rows, dtype=np.float32)
    clicks_total = 0
    with (tmp / filename).open("wb") as out:
        if kind == "avazu":
            from autorecbench.data.avazu import HEADER

            out.write((",".join(HEADER) + "\n").encode())
        for start, crng, cats, p, clicks in _row_chunks(model, spec):
            p_click[start:start + len(p)] = p
            clicks_total += int(clicks.sum())
            if kind == "criteo":
                frame = _criteo_chunk(raw, fields, cats, clicks, crng, start)
                frame.write_csv(out, separator="\t", include_header=False, null_value="", quote_style="never")
            else:
                frame = _avazu_chunk(raw, fields, cats, clicks, crng, start, spec.rows, spec.days)
                frame.write_csv(out, separator=",", include_header=False, null_value="", quote_style="never")
    names = [f.name for f in fields]
    arrays: dict[str, Any] = {"p_click": p_click}
    for f in fields:
        arrays[f"tokens_{f.name}"] = np.array(f.loader_tokens, dtype=str)
        arrays[f"linear_{f.name}"] = f.linear
    for (i, j), (a, b) in model.factors.items():
        arrays[f"pairA_{names[i]}__{names[j]}"] = a
        arrays[f"pairB_{names[i]}__{names[j]}"] = b
    np.savez_compressed(tmp / "truth.npz", **arrays)
    truth = {
        "generator": kind,
        **asdict(spec),
        "file": filename,
        "active_fields": names,
        "cardinalities": {f.name: f.cardinality for f in fields},
        "informative_fields": [names[i] for i in model.informative],
        "noise_fields": [names[i] for i in range(len(fields)) if i not in model.informative],
        "planted_pairs": [[names[i], names[j]] for i, j in model.pairs],
        "bias": model.bias,
        "click_rate": clicks_total / spec.rows,
        "pair_scale": model.scale,
    }
    (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    try:
        tmp.rename(directory)
    except OSError:  # generated concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / filename


def _criteo(spec: CTRGenerator, directory: Path) -> Path:
    return generate_ctr("criteo", spec, directory)


def _avazu(spec: CTRGenerator, directory: Path) -> Path:
    return generate_ctr("avazu", spec, directory)


CTR_GENERATORS = {"criteo": (CTRGenerator, _criteo), "avazu": (CTRGenerator, _avazu)}
