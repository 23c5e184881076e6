"""Deterministic synthetic data written in the real raw formats, so it goes through the real loaders.

MovieLens-format generator (``generator.kind: movielens``): users and items are drawn with Zipf
frequencies (p(rank k) ∝ (k+1)^-s over a seeded random permutation of ids, so popular ids are scattered),
and each rating comes from a known model:

    score(u, i) = mu + b_u + b_i + <p_u, q_i> + eps,   eps ~ N(0, noise^2)
    rating      = clip(round(2 * score) / 2, 0.5, 5.0)            (half stars, like ml-20m)

with p_u, q_i ~ N(0, factor_scale^2 / latent_dim) in R^latent_dim. Timestamps increase along the draw order;
the file is written sorted by user then item (as ml-latest-small is), so the loader's time sort matters.
The planted parameters are saved beside the file in ``truth.npz`` (and the options in ``truth.json``).

Planted embedding sizes (``dims_by_frequency: true``, off by default): frequent users and items need more
latent dimensions than rare ones. An entity keeps only the first d_e coordinates of its factor vector (the
rest are zero), with d_e rising log-linearly with its Zipf weight w_e from ``min_latent_dim`` (the rarest)
to ``latent_dim`` (the most popular):

    d_e = round(min_latent_dim * (latent_dim / min_latent_dim) ** (log(w_e / w_min) / log(w_max / w_min)))

so <p_u, q_i> only involves the first min(d_u, d_i) dimensions. ``truth.npz`` then also holds ``user_dims``
and ``item_dims``. With the option off, the draws and the files are exactly those of earlier versions.
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

from autorecbench.errors import UserError

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class MovieLensGenerator:
    seed: int = 0
    n_users: int = 2000
    n_items: int = 1000
    n_interactions: int = 100_000
    user_zipf: float = 1.0
    item_zipf: float = 1.0
    latent_dim: int = 8
    factor_scale: float = 1.0
    mu: float = 3.5
    user_bias_std: float = 0.3
    item_bias_std: float = 0.5
    noise: float = 0.5
    start_time: int = 1_262_304_000  # 2010-01-01 UTC
    seconds_per_interaction: int = 30
    dims_by_frequency: bool = False
    min_latent_dim: int = 1

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_interactions", "latent_dim", "seconds_per_interaction"):
            if getattr(self, name) < 1:
                raise UserError(f"data.generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.user_zipf < 0 or self.item_zipf < 0 or self.noise < 0:
            raise UserError("data.generator: zipf exponents and noise must be >= 0")
        if not 1 <= self.min_latent_dim <= self.latent_dim:
            raise UserError(f"data.generator.min_latent_dim must be in [1, latent_dim], got {self.min_latent_dim}")

    def key(self) -> str:
        options = asdict(self)
        for name, default in PLANTED_DEFAULTS.items():  # options added later keep older keys when unused
            if options[name] == default:
                del options[name]
        payload = json.dumps({"version": GENERATOR_VERSION, **options}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


PLANTED_DEFAULTS = {"dims_by_frequency": False, "min_latent_dim": 1}


def _zipf_weights(n_ids: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, n_ids + 1, dtype=np.float64) ** exponent


def _zipf_draw(rng: np.random.Generator, n_ids: int, exponent: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws of ids, and each rank's id (rank 0 the most popular)."""
    weights = _zipf_weights(n_ids, exponent)
    ids_by_rank = rng.permutation(n_ids)
    ranks = rng.choice(n_ids, size=size, p=weights / weights.sum())
    return ids_by_rank[ranks], ids_by_rank


def planted_dims(ids_by_rank: np.ndarray, exponent: float, low: int, high: int) -> np.ndarray:
    """Active latent dimensions per id: log-linear in the id's Zipf weight, ``low`` (rarest) to ``high``."""
    n = ids_by_rank.size
    log_w = np.log(_zipf_weights(n, exponent))
    span = log_w[0] - log_w[-1]
    frac = (log_w - log_w[-1]) / span if span > 0 else np.ones(n)
    dims_by_rank = np.rint(low * (high / low) ** frac).astype(np.int64)
    dims = np.empty(n, dtype=np.int64)
    dims[ids_by_rank] = dims_by_rank
    return dims


def generate_movielens(spec: MovieLensGenerator, directory: Path) -> Path:
    """Write ``ratings.csv`` (ml-20m format) and the planted truth into ``directory``; return the csv path."""
    rng = np.random.default_rng(spec.seed)
    users, users_by_rank = _zipf_draw(rng, spec.n_users, spec.user_zipf, spec.n_interactions)
    items, items_by_rank = _zipf_draw(rng, spec.n_items, spec.item_zipf, spec.n_interactions)
    scale = spec.factor_scale / np.sqrt(spec.latent_dim)
    p = rng.normal(0.0, scale, size=(spec.n_users, spec.latent_dim))
    q = rng.normal(0.0, scale, size=(spec.n_items, spec.latent_dim))
    planted: dict[str, np.ndarray] = {}
    if spec.dims_by_frequency:
        for name, factors, by_rank, exponent in (("user_dims", p, users_by_rank, spec.user_zipf),
                                                 ("item_dims", q, items_by_rank, spec.item_zipf)):
            dims = planted_dims(by_rank, exponent, spec.min_latent_dim, spec.latent_dim)
            factors[np.arange(spec.latent_dim)[None, :] >= dims[:, None]] = 0.0
            planted[name] = dims
    b_u = rng.normal(0.0, spec.user_bias_std, size=spec.n_users)
    b_i = rng.normal(0.0, spec.item_bias_std, size=spec.n_items)
    score = spec.mu + b_u[users] + b_i[items] + np.einsum("nd,nd->n", p[users], q[items])
    score += rng.normal(0.0, spec.noise, size=spec.n_interactions)
    rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
    timestamp = spec.start_time + np.arange(spec.n_interactions, dtype=np.int64) * spec.seconds_per_interaction

    # MovieLens ids start at 1.
    frame = pl.DataFrame(
        {"userId": users + 1, "movieId": items + 1, "rating": rating, "timestamp": timestamp}
    ).sort(["userId", "movieId", "timestamp"])
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    frame.write_csv(tmp / "ratings.csv", float_precision=1)
    np.savez_compressed(tmp / "truth.npz", user_factors=p, item_factors=q, user_bias=b_u, item_bias=b_i, **planted)
    (tmp / "truth.json").write_text(json.dumps({"generator": "movielens", **asdict(spec)}, indent=2) + "\n")
    try:
        tmp.rename(directory)
    except OSError:  # generated concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / "ratings.csv"


GENERATORS = {"movielens": (MovieLensGenerator, generate_movielens)}


def _generators() -> dict[str, Any]:
    """Every generator kind: MovieLens here, the CTR formats in ``synthetic_ctr``, Alimama in
    ``synthetic_alimama``."""
    from autorecbench.data.synthetic_alimama import ALIMAMA_GENERATORS
    from autorecbench.data.synthetic_ctr import CTR_GENERATORS

    return {**GENERATORS, **CTR_GENERATORS, **ALIMAMA_GENERATORS}


def _spec(options: dict[str, Any]) -> tuple[str, Any]:
    options = dict(options)
    kind = options.pop("kind", "movielens")
    generators = _generators()
    if kind not in generators:
        raise UserError(f"unknown synthetic generator kind {kind!r}; known: {', '.join(generators)}")
    spec_cls, _ = generators[kind]
    try:
        return kind, spec_cls(**options)
    except TypeError as exc:
        raise UserError(f"bad data.generator options: {exc}") from None


def generated_dir(base: Path, options: dict[str, Any]) -> Path:
    """Where the generator with these options writes (``base/<kind>-<key>/``), without generating."""
    kind, spec = _spec(options)
    return base / f"{kind}-{spec.key()}"


def ensure_generated(base: Path, options: dict[str, Any]) -> Path:
    """Generate the raw files for ``options`` unless already there; return their folder."""
    kind, spec = _spec(options)
    directory = generated_dir(base, options)
    if not (directory / "truth.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        _generators()[kind][1](spec, directory)
    return directory
