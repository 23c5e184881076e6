"""Raw files -> validated, encoded Parquet cache under ``data/processed/``, one builder per dataset family.

The cache folder is ``<processed_dir>/<dataset>-<fingerprint[:16]>/`` with ``schema.json`` and:
- family ``movielens`` (ratings): ``interactions.parquet`` (user, item: contiguous int32 codes; rating:
  float32; timestamp: int64) in time order, ``users.parquet`` and ``items.parquet`` (code -> raw id);
- families ``criteo`` and ``avazu`` (CTR, ``ctr.py``): ``part-00000.parquet``, ... (one int32 code column per
  field, ``label`` and ``split`` int8) and ``vocab/<field>.parquet``;
- family ``alimama`` (four files, ``alimama.py``): the same, plus the behaviour histories as int32 columns
  ``hist_cate_0 .. hist_cate_{T-1}``, ``hist_brand_0 ..`` (post-padded with 0) and ``hist_len``; the schema lists
  them as ``sequence_fields``.
The fingerprint covers the cache format version, the raw files (name, format, size, modification time) and
every preprocessing option of the family, so preparing twice reuses the cache and changing any option builds
a new one. Folders are written under a temporary name and renamed when complete (``atomic.py``): a failed
preparation leaves nothing behind, one killed outright leaves a temporary folder that the next preparation
of that cache (or ``autorecbench clean --stale``) removes, and a cache being replaced is renamed aside, never
deleted while a run may read it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from autorecbench.data import synthetic
from autorecbench.data.atomic import remove_orphans, swap_in, temp_folder
from autorecbench.data.movielens import READERS
from autorecbench.data.schema import FieldSpec, Schema
from autorecbench.errors import MissingDataError, UserError, quoted
from autorecbench.plugins import DATASETS_GROUP, load_entry_points
from autorecbench.typed import check_dataclass

log = logging.getLogger("autorecbench")
# 2: schema.json gained label, splits and user_field; CTR families.
CACHE_VERSION = 2


@dataclass(frozen=True)
class SourceSpec:
    """One way a dataset's raw files may be present: ``file`` (a ``{day}`` pattern stands for one file per
    ``data.days``) and, for a multi-file format, the ``companions`` that must sit beside it (Alimama's four)."""

    file: str
    format: str
    companions: tuple[str, ...] = ()


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
    # Offline protocol: how rows are split into train / valid / test (``splits.py``). CTR families split
    # while preparing (vocabularies are fitted on the training rows), MovieLens when a run loads the cache.
    split: str = "random"
    split_seed: int = 2018
    split_ratio: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # CTR families (``ctr.CTROptions`` documents them).
    min_count: int | None = 1  # None: the family's preset decides (Alimama)
    int_transform: str = "log_square"
    int_missing: str = "own"
    skip_bad_rows: bool = False
    fields: list[str] | None = None
    user_field: str | None = None
    days: list[int] | None = None
    chunk_bytes: int = 64 << 20
    negative_keep_rate: float = 1.0
    negative_seed: int = 0
    int_buckets: int = 1000
    time_fields: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_mapping(raw: Any) -> DatasetConfig:
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
        assert isinstance(data, dict)
        known = {f for f in DatasetConfig.__dataclass_fields__}
        extra = {k: v for k, v in data.items() if k not in known}
        data = {k: v for k, v in data.items() if k in known}
        check_dataclass(DatasetConfig, data, "data")
        try:
            data["sources"] = [SourceSpec(**{**s, "companions": tuple(s.get("companions") or ())})
                               for s in data.get("sources", [])]
            cfg = DatasetConfig(**data, extra=extra)
        except TypeError as exc:
            raise UserError(f"bad data config: {exc}") from None
        family = cfg.family_spec()
        formats = family.formats()
        for s in cfg.sources:
            if s.format not in formats:
                raise UserError(f"data.sources: unknown format {s.format!r} for family {cfg.family!r}; "
                                f"known: {', '.join(formats)}")
            if "{day}" in s.file and not cfg.days:
                raise UserError(f"data.days must list the days to read ({s.file}), e.g. data.days=[0,1]")
        if not cfg.sources:
            raise UserError(f"data config {cfg.name!r} lists no sources")
        if cfg.min_user_count < 1 or cfg.min_item_count < 1:
            raise UserError("data.min_user_count and data.min_item_count must be >= 1")
        from autorecbench.data.splits import check_rule

        check_rule(cfg.split, cfg.split_ratio)
        family.options(cfg)  # validates the family's own options
        return cfg

    def family_spec(self) -> Family:
        load_entry_points(DATASETS_GROUP)  # plugins add their raw-format readers when imported
        if self.family not in FAMILIES:
            raise UserError(f"data.family: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        return FAMILIES[self.family]

    @property
    def kind(self) -> str:
        """``ratings`` (user-item ratings, streamable) or ``ctr`` (many categorical fields and a click label)."""
        return self.family_spec().kind

    def options(self) -> dict[str, Any]:
        """Every preprocessing option, as it enters the fingerprint."""
        return self.family_spec().options(self)

    def ctr_options(self) -> Any:
        """The CTR preprocessing options, typed (``ctr.CTROptions``)."""
        from autorecbench.data.ctr import CTROptions

        return CTROptions(
            split=self.split, split_seed=self.split_seed, split_ratio=tuple(self.split_ratio),
            min_count=1 if self.min_count is None else self.min_count, int_transform=self.int_transform, int_missing=self.int_missing,
            skip_bad_rows=self.skip_bad_rows, fields=tuple(self.fields) if self.fields is not None else None,
            user_field=self.user_field, days=tuple(self.days) if self.days is not None else None,
            chunk_bytes=self.chunk_bytes, negative_keep_rate=float(self.negative_keep_rate),
            negative_seed=int(self.negative_seed), int_buckets=int(self.int_buckets),
            time_fields=tuple(self.time_fields) if self.time_fields is not None else None,
        )

    def alimama_options(self) -> Any:
        """The Alimama family's options, typed and resolved against the preset (``alimama.AlimamaOptions``)."""
        from autorecbench.data.alimama import AlimamaOptions

        return AlimamaOptions.from_mapping({**self.extra, "min_count": self.min_count,
                                            "skip_bad_rows": self.skip_bad_rows, "chunk_bytes": self.chunk_bytes})

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

    def raw_ids(self, entity: str) -> list[Any]:
        """The raw-file id of each code of ``entity`` (``user`` or ``item``), indexed by code."""
        frame = pl.read_parquet(self.directory / f"{entity}s.parquet").sort(entity)
        return frame[f"{entity}_raw"].to_list()


def source_names(cfg: DatasetConfig, source: SourceSpec) -> list[str]:
    """The file names a source stands for: one (and its companions), or one per selected day for a ``{day}``
    pattern."""
    if "{day}" in source.file:
        return [source.file.format(day=d) for d in cfg.days or []]
    return [source.file, *source.companions]


def locate_sources(cfg: DatasetConfig, raw_dir: Path | None = None) -> tuple[list[Path], SourceSpec] | None:
    """The files of the first configured source whose files are all present (each plain or ``.gz``)."""
    raw_dir = raw_dir if raw_dir is not None else Path(cfg.path)
    for source in cfg.sources:
        found = []
        for name in source_names(cfg, source):
            hit = next((c for c in (raw_dir / name, raw_dir / f"{name}.gz") if c.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            if found:
                return found, source
    return None


def locate_source(cfg: DatasetConfig, raw_dir: Path | None = None) -> tuple[Path, SourceSpec] | None:
    """The (first) file of the first configured source present in the raw folder, or None."""
    found = locate_sources(cfg, raw_dir)
    return (found[0][0], found[1]) if found else None


def missing_message(cfg: DatasetConfig) -> str:
    raw = Path(cfg.path)
    files = " or ".join(", ".join(source_names(cfg, s)) for s in cfg.sources)
    where = f"{files} not found in {cfg.path}"
    for s in cfg.sources:  # some files of a multi-file source present: name the missing ones
        names = source_names(cfg, s)
        absent = [n for n in names if not (raw / n).is_file() and not (raw / f"{n}.gz").is_file()]
        if len(names) > 1 and 0 < len(absent) < len(names):
            where = f"{', '.join(absent)} not found in {cfg.path} (beside {', '.join(n for n in names if n not in absent)})"
    how = f"; {cfg.download}" if cfg.download else (f"; download {cfg.url}" if cfg.url else "")
    return f"dataset {cfg.name!r}: {where}{how} (or point data.path=... at the folder)"


def _fingerprint(cfg: DatasetConfig, paths: list[Path], source: SourceSpec) -> str:
    files = []
    for path in paths:
        stat = path.stat()
        files.append({"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    payload = {
        "cache_version": CACHE_VERSION,
        "dataset": cfg.name,
        "family": cfg.family,
        "files": files,
        "format": source.format,
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


def _build_movielens(cfg: DatasetConfig, paths: list[Path], source: SourceSpec, fingerprint: str, out: Path) -> Schema:
    if cfg.skip_bad_rows:
        raise UserError("data.skip_bad_rows is not supported for the movielens family: fix or remove the bad rows")
    (path,) = paths
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
        label="rating",
        user_field="user",
    )
    schema.save(out / "schema.json")
    return schema


def _movielens_options(cfg: DatasetConfig) -> dict[str, Any]:
    return {
        "min_user_count": cfg.min_user_count,
        "min_item_count": cfg.min_item_count,
        "generator": cfg.generator,
    }


def _ctr_options(cfg: DatasetConfig) -> dict[str, Any]:
    return {**cfg.ctr_options().fingerprint_options(), "generator": cfg.generator}


def _ctr_formats() -> Collection[str]:
    from autorecbench.data.formats import ctr_formats

    return ctr_formats()


def _click_schema(cfg: DatasetConfig, paths: list[Path], digests: list[str], source: SourceSpec, fingerprint: str,
                  built: Any, *, options: dict[str, Any], user_field: str | None, expected: dict[str, int] | None,
                  sequence_fields: list[FieldSpec] | None = None, extra: dict[str, Any] | None = None) -> Schema:
    """The schema of a click dataset from its build record (``ctr.CTRBuild``, ``alimama.AlimamaBuild``)."""
    files = []
    for path, digest in zip(paths, digests):
        stat = path.stat()
        files.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    day_seconds = 86_400
    span = built.day_span
    dropped = int(getattr(built, "negatives_dropped", 0))  # negative down-sampling (CTR formats only)
    return Schema(
        dataset=cfg.name,
        family=cfg.family,
        fingerprint=fingerprint,
        fields=[FieldSpec(name, cardinality) for name, cardinality in built.fields],
        n_rows=built.n_rows,
        time_min=span[0] * day_seconds if span else 0,
        time_max=(span[1] + 1) * day_seconds - 1 if span else 0,
        rating_values=[],
        source={**{k: v for k, v in files[0].items()}, "format": source.format, "files": files},
        options=options,
        rows_in_file=built.n_rows + built.skipped_rows + dropped,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        cache_version=CACHE_VERSION,
        expected=expected,
        extra={
            "split": built.split_rule,
            "positives": built.positives,
            "skipped_rows": built.skipped_rows,
            "first_skipped": built.first_skipped,
            "vocab_kept": built.vocab_kept,
            "negatives_dropped": dropped,
            **(extra or {}),
        },
        label="click",
        splits=built.splits,
        user_field=user_field,
        sequence_fields=sequence_fields or [],
    )


def _build_ctr(cfg: DatasetConfig, paths: list[Path], source: SourceSpec, fingerprint: str, out: Path) -> Schema:
    from autorecbench.data.ctr import build_ctr
    from autorecbench.data.formats import ctr_formats

    fmt = ctr_formats()[source.format](cfg.ctr_options())
    built = build_ctr(fmt, paths, out)
    schema = _click_schema(cfg, paths, built.sha256, source, fingerprint, built, user_field=cfg.user_field,
                           options={**cfg.ctr_options().recorded_options(), "generator": cfg.generator},
                           expected=cfg.expected)
    schema.save(out / "schema.json")
    return schema


def _alimama_options(cfg: DatasetConfig) -> dict[str, Any]:
    return {**cfg.alimama_options().fingerprint_options(), "generator": cfg.generator}


def _build_alimama(cfg: DatasetConfig, paths: list[Path], source: SourceSpec, fingerprint: str, out: Path) -> Schema:
    from autorecbench.data.alimama import LENGTH_COLUMN, PRESET_EXPECTED, build_alimama

    options = cfg.alimama_options()
    built = build_alimama(options, {p.name.removesuffix(".gz"): p for p in paths}, out, log.debug)
    sequences = [FieldSpec(name, cardinality=dict(built.fields)[shared], kind="sequence", shares_table_with=shared,
                           length=length) for name, shared, length in built.sequences]
    schema = _click_schema(cfg, paths, [built.sha256[p.name.removesuffix(".gz")] for p in paths], source, fingerprint,
                           built, options=cfg.options(), user_field="userid", sequence_fields=sequences,
                           expected=cfg.expected if cfg.expected is not None else PRESET_EXPECTED[options.preset],
                           extra={"preset": options.preset, "length_column": LENGTH_COLUMN, **built.counts})
    schema.save(out / "schema.json")
    return schema


@dataclass(frozen=True)
class Family:
    """How a dataset family is read: its kind, raw formats, cache builder and fingerprinted options."""

    kind: str
    formats: Callable[[], Collection[str]]
    build: Callable[[DatasetConfig, list[Path], SourceSpec, str, Path], Schema]
    options: Callable[[DatasetConfig], dict[str, Any]]


FAMILIES: dict[str, Family] = {
    "movielens": Family("ratings", lambda: READERS, _build_movielens, _movielens_options),
    "criteo": Family("ctr", _ctr_formats, _build_ctr, _ctr_options),
    "avazu": Family("ctr", _ctr_formats, _build_ctr, _ctr_options),
    "alimama": Family("ctr", lambda: ("alimama_csv",), _build_alimama, _alimama_options),
}


def prepare(cfg: DatasetConfig, *, force: bool = False) -> PreparedData:
    """Validate and cache the dataset; reuse an existing cache with the same fingerprint."""
    raw_dir = cfg.raw_dir()
    found = locate_sources(cfg, raw_dir)
    if found is None:
        raise MissingDataError(missing_message(cfg))
    paths, source = found
    fingerprint = _fingerprint(cfg, paths, source)
    processed = Path(cfg.processed_dir)
    final = processed / f"{cfg.name}-{fingerprint[:16]}"
    if (final / "schema.json").is_file() and not force:
        return PreparedData(Schema.load(final / "schema.json"), final, reused=True)
    try:
        processed.mkdir(parents=True, exist_ok=True)
        remove_orphans(final)  # what a killed preparation of this cache left
        tmp = temp_folder(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cache folder {quoted(processed)} is not writable ({exc.strerror or exc})") from None
    try:
        schema = cfg.family_spec().build(cfg, paths, source, fingerprint, tmp)
        skipped = schema.extra.get("skipped_rows", 0)
        if skipped:
            log.warning("%s: skipped %d malformed row(s) (data.skip_bad_rows); first: %s", cfg.name, skipped,
                        schema.extra.get("first_skipped"))
        swap_in(tmp, final)  # a cache being replaced is renamed aside, never deleted under a reader
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(schema, final, reused=False)


def cached(cfg: DatasetConfig) -> PreparedData | None:
    """The existing cache for the current raw file and options, without building or generating anything."""
    raw_dir = synthetic.generated_dir(Path(cfg.path), cfg.generator) if cfg.generator else Path(cfg.path)
    found = locate_sources(cfg, raw_dir)
    if found is None:
        return None
    paths, source = found
    final = Path(cfg.processed_dir) / f"{cfg.name}-{_fingerprint(cfg, paths, source)[:16]}"
    if (final / "schema.json").is_file():
        return PreparedData(Schema.load(final / "schema.json"), final, reused=True)
    return None
