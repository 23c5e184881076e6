"""Raw files -> validated, time-ordered, id-encoded Parquet cache under ``data/processed/``.

The cache folder is ``<processed_dir>/<dataset>-<fingerprint[:16]>/`` and holds ``interactions.parquet``
(user, item: contiguous int32 codes; rating: float32; timestamp: int64), ``users.parquet`` and
``items.parquet`` (code -> raw id) and ``schema.json``. The fingerprint covers the cache format version,
the raw file (name, format, size, modification time) and every preprocessing option, so preparing twice
reuses the cache and changing any option builds a new one. Folders are written under a temporary name
and renamed when complete: a failed preparation leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from autorecbench.data import synthetic
from autorecbench.data.movielens import READERS
from autorecbench.data.schema import FieldSpec, Schema
from autorecbench.errors import MissingDataError, UserError

CACHE_VERSION = 1


@dataclass(frozen=True)
class SourceSpec:
    file: str
    format: str


@dataclass
class DatasetConfig:
    """The ``data`` config group, typed. See ``conf/data/*.yaml``."""

    name: str
    path: str
    sources: list[SourceSpec]
    processed_dir: str
    family: str = "movielens"
    description: str = ""
    url: str | None = None
    license: str | None = None
    download: str | None = None
    expected: dict[str, int] | None = None
    min_user_count: int = 1
    min_item_count: int = 1
    generator: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_mapping(raw: Any) -> DatasetConfig:
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
        assert isinstance(data, dict)
        known = {f for f in DatasetConfig.__dataclass_fields__}
        extra = {k: v for k, v in data.items() if k not in known}
        data = {k: v for k, v in data.items() if k in known}
        try:
            data["sources"] = [SourceSpec(**s) for s in data.get("sources", [])]
            cfg = DatasetConfig(**data, extra=extra)
        except TypeError as exc:
            raise UserError(f"bad data config: {exc}") from None
        for s in cfg.sources:
            if s.format not in READERS:
                raise UserError(f"data.sources: unknown format {s.format!r}; known: {', '.join(READERS)}")
        if not cfg.sources:
            raise UserError(f"data config {cfg.name!r} lists no sources")
        if cfg.min_user_count < 1 or cfg.min_item_count < 1:
            raise UserError("data.min_user_count and data.min_item_count must be >= 1")
        return cfg

    def options(self) -> dict[str, Any]:
        """Every preprocessing option, as it enters the fingerprint."""
        return {
            "min_user_count": self.min_user_count,
            "min_item_count": self.min_item_count,
            "generator": self.generator,
        }

    def raw_dir(self) -> Path:
        base = Path(self.path)
        if self.generator is not None:
            return synthetic.ensure_generated(base, self.generator)
        return base


@dataclass
class PreparedData:
    schema: Schema
    directory: Path
    reused: bool

    @property
    def interactions_path(self) -> Path:
        return self.directory / "interactions.parquet"


def locate_source(cfg: DatasetConfig, raw_dir: Path | None = None) -> tuple[Path, SourceSpec] | None:
    """The first configured source present in the raw folder (plain or ``.gz``), or None."""
    raw_dir = raw_dir if raw_dir is not None else Path(cfg.path)
    for source in cfg.sources:
        for candidate in (raw_dir / source.file, raw_dir / f"{source.file}.gz"):
            if candidate.is_file():
                return candidate, source
    return None


def missing_message(cfg: DatasetConfig) -> str:
    files = " or ".join(s.file for s in cfg.sources)
    where = f"{files} not found in {cfg.path}"
    how = f"; {cfg.download}" if cfg.download else (f"; download {cfg.url}" if cfg.url else "")
    return f"dataset {cfg.name!r}: {where}{how} (or point data.path=... at the folder)"


def _fingerprint(cfg: DatasetConfig, path: Path, source: SourceSpec) -> str:
    stat = path.stat()
    payload = {
        "cache_version": CACHE_VERSION,
        "dataset": cfg.name,
        "file": path.name,
        "format": source.format,
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "options": cfg.options(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _filter_counts(frame: pl.DataFrame, min_user: int, min_item: int) -> pl.DataFrame:
    """One pass each (users, then items): drop entities with fewer interactions than the minimum."""
    if min_user > 1:
        frame = frame.filter(pl.len().over("user_raw") >= min_user)
    if min_item > 1:
        frame = frame.filter(pl.len().over("item_raw") >= min_item)
    return frame


def _build(cfg: DatasetConfig, path: Path, source: SourceSpec, fingerprint: str, out: Path) -> Schema:
    raw = READERS[source.format](path)
    rows_in_file = raw.height
    frame = _filter_counts(raw, cfg.min_user_count, cfg.min_item_count)
    if frame.height == 0:
        raise UserError(f"{path}: no interactions left after min_user_count/min_item_count filtering")
    # Stream order: by timestamp, stable on ties (file order among equal timestamps).
    frame = frame.sort("timestamp", maintain_order=True)
    frame = frame.with_columns(
        (pl.col("user_raw").rank("dense") - 1).cast(pl.Int32).alias("user"),
        (pl.col("item_raw").rank("dense") - 1).cast(pl.Int32).alias("item"),
    )
    frame.select("user", "item", pl.col("rating").cast(pl.Float32), "timestamp").write_parquet(
        out / "interactions.parquet"
    )
    users = frame.select("user", "user_raw").unique("user").sort("user")
    items = frame.select("item", "item_raw").unique("item").sort("item")
    users.write_parquet(out / "users.parquet")
    items.write_parquet(out / "items.parquet")
    stat = path.stat()
    schema = Schema(
        dataset=cfg.name,
        family=cfg.family,
        fingerprint=fingerprint,
        fields=[FieldSpec("user", users.height), FieldSpec("item", items.height)],
        n_rows=frame.height,
        time_min=int(frame["timestamp"].min()),  # type: ignore[arg-type]
        time_max=int(frame["timestamp"].max()),  # type: ignore[arg-type]
        rating_values=sorted(float(v) for v in frame["rating"].unique().to_list()),
        source={
            "path": str(path.resolve()),
            "format": source.format,
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": _sha256(path),
        },
        options=cfg.options(),
        rows_in_file=rows_in_file,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cache_version=CACHE_VERSION,
        expected=cfg.expected,
    )
    schema.save(out / "schema.json")
    return schema


def prepare(cfg: DatasetConfig, *, force: bool = False) -> PreparedData:
    """Validate and cache the dataset; reuse an existing cache with the same fingerprint."""
    raw_dir = cfg.raw_dir()
    found = locate_source(cfg, raw_dir)
    if found is None:
        raise MissingDataError(missing_message(cfg))
    path, source = found
    fingerprint = _fingerprint(cfg, path, source)
    processed = Path(cfg.processed_dir)
    final = processed / f"{cfg.name}-{fingerprint[:16]}"
    if (final / "schema.json").is_file() and not force:
        return PreparedData(Schema.load(final / "schema.json"), final, reused=True)
    processed.mkdir(parents=True, exist_ok=True)
    tmp = processed / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        schema = _build(cfg, path, source, fingerprint, tmp)
        if final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "schema.json").is_file():  # not a concurrent twin: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(schema, final, reused=False)


def cached(cfg: DatasetConfig) -> PreparedData | None:
    """The existing cache for the current raw file and options, without building or generating anything."""
    raw_dir = synthetic.generated_dir(Path(cfg.path), cfg.generator) if cfg.generator else Path(cfg.path)
    found = locate_source(cfg, raw_dir)
    if found is None:
        return None
    path, source = found
    final = Path(cfg.processed_dir) / f"{cfg.name}-{_fingerprint(cfg, path, source)[:16]}"
    if (final / "schema.json").is_file():
        return PreparedData(Schema.load(final / "schema.json"), final, reused=True)
    return None
