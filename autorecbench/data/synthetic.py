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

Rich and flat entities (the streams of ``autorecbench validate`` for the embedding-size searches):
- ``rich``: whose ratings go through the interaction <p_u, q_i>. ``all`` (the model above); ``none`` (every
  rating from the biases only: p and q are drawn, then zeroed, so every other draw stays the same);
  ``pair_first`` (with ``item_pairs``: the first item of each pair keeps q_i, the second gets q_i = 0; users
  keep p_u).
- ``item_pairs``: items come in pairs of equal Zipf weight, (k/2 + 1)^-s for item rank k, so the two items of a
  pair are equally frequent in expectation and differ only in whether they are rich.
- ``rating_seed``: a second seed for everything drawn after the user and item sequences (factors, biases,
  noise). Streams with the same ``seed`` and ``rating_seed`` hold the same users and items in the same order
  with the same biases and noise, whatever ``rich`` says; a different ``rating_seed`` redraws the ratings of the
  same sequence. None: one seed for all, as before.
When any of these three differs from its default, ``truth.npz`` also holds ``user_rich`` and ``item_rich``
(bool per id) and, with ``item_pairs``, ``item_pair`` (the pair index) and ``item_member`` (0: first, 1: second).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from autorecbench.errors import UserError
from autorecbench.data.atomic import remove_orphans, temp_folder

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
    rich: str = "all"
    item_pairs: bool = False
    rating_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_interactions", "latent_dim", "seconds_per_interaction"):
            if getattr(self, name) < 1:
                raise UserError(f"data.generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.user_zipf < 0 or self.item_zipf < 0 or self.noise < 0:
            raise UserError("data.generator: zipf exponents and noise must be >= 0")
        if not 1 <= self.min_latent_dim <= self.latent_dim:
            raise UserError(f"data.generator.min_latent_dim must be in [1, latent_dim], got {self.min_latent_dim}")
        if self.rich not in RICH:
            raise UserError(f"data.generator.rich must be one of {', '.join(RICH)}, got {self.rich!r}")
        if self.rich == "pair_first" and not self.item_pairs:
            raise UserError("data.generator.rich=pair_first needs data.generator.item_pairs=true")
        if self.item_pairs and self.n_items % 2:
            raise UserError(f"data.generator.item_pairs needs an even n_items, got {self.n_items}")

    def key(self) -> str:
        options = asdict(self)
        for name, default in {**PLANTED_DEFAULTS, **STRUCTURE_DEFAULTS}.items():  # options added later keep older keys when unused
            if options[name] == default:
                del options[name]
        payload = json.dumps({"version": GENERATOR_VERSION, **options}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


PLANTED_DEFAULTS = {"dims_by_frequency": False, "min_latent_dim": 1}
STRUCTURE_DEFAULTS = {"rich": "all", "item_pairs": False, "rating_seed": None}
RICH = ("all", "none", "pair_first")


def _zipf_weights(n_ids: int, exponent: float, pairs: bool = False) -> np.ndarray:
    """Weight per rank; with ``pairs`` ranks 2j and 2j+1 share the weight of rank j."""
    ranks = np.arange(n_ids, dtype=np.float64)
    return 1.0 / ((ranks // 2 if pairs else ranks) + 1) ** exponent


def _zipf_draw(rng: np.random.Generator, n_ids: int, exponent: float, size: int,
               pairs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Draws of ids, and each rank's id (rank 0 the most popular)."""
    weights = _zipf_weights(n_ids, exponent, pairs)
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
    items, items_by_rank = _zipf_draw(rng, spec.n_items, spec.item_zipf, spec.n_interactions, spec.item_pairs)
    if spec.rating_seed is not None:
        rng = np.random.default_rng([spec.rating_seed, 1])  # its own stream: the ratings of the same sequence
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
    if any(getattr(spec, name) != default for name, default in STRUCTURE_DEFAULTS.items()):
        planted.update(_rich_entities(spec, p, q, items_by_rank))
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
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(directory)  # what a killed generation left
    tmp = temp_folder(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    frame.write_csv(tmp / "ratings.csv", float_precision=1)
    np.savez_compressed(tmp / "truth.npz", user_factors=p, item_factors=q, user_bias=b_u, item_bias=b_i, **planted)
    (tmp / "truth.json").write_text(json.dumps({"generator": "movielens", **asdict(spec)}, indent=2) + "\n")
    try:
        tmp.rename(directory)
    except OSError:  # generated concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return directory / "ratings.csv"


def _rich_entities(spec: MovieLensGenerator, p: np.ndarray, q: np.ndarray,
                   items_by_rank: np.ndarray) -> dict[str, np.ndarray]:
    """Zero the factors of the flat entities (in place) and return the truth arrays naming them."""
    user_rich = np.full(spec.n_users, spec.rich != "none")
    item_rich = np.full(spec.n_items, spec.rich == "all")
    out = {}
    if spec.item_pairs:
        rank = np.empty(spec.n_items, dtype=np.int64)
        rank[items_by_rank] = np.arange(spec.n_items)
        out["item_pair"], out["item_member"] = rank // 2, rank % 2
        if spec.rich == "pair_first":
            item_rich = out["item_member"] == 0
    p[~user_rich] = 0.0
    q[~item_rich] = 0.0
    return {"user_rich": user_rich, "item_rich": item_rich, **out}


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
