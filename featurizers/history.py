"""Creator-history features as of publish time: how the same author's earlier videos did.

For each query video, only the author's source videos published STRICTLY before it count (a video never
sees itself, a video published at the same instant, or anything later). Beam-free and vectorised
(polars sort + cumulative sums + strict as-of joins): ~1M rows in seconds.

Age normalisation: a label is a count observed at some age (observed_at − publish_time), and older videos
have had more time to collect views. Each source label is therefore turned into the residual of a global
age curve, log1p(count) − f_t(log1p(age_days)), f_t a quadratic fitted per target on the history source's
labelled rows (`fit_age_curve`). 0 means "a typical video at that age". Projecting counts to a common
horizon H with the same curve, log1p(count) + f_t(log1p(H)) − f_t(log1p(age)), is the residual plus a
constant, so means, medians and trends carry the same information; residuals are kept because they need
no arbitrary horizon and read directly as "above / below typical". The curve's coefficients are part of the
featurizer config and of its version (`history_spec`), so a model refuses features made with another curve.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from featurizers.core.contracts import CATALOG_SCHEMA, MIN_AGE_DAYS, TARGETS, FeatureSpec
from featurizers.core.feature_table import rows_to_table

__all__ = ["TREND_K", "QUERY_COLUMNS", "SOURCE_COLUMNS", "HISTORY_FEATURE_NAMES", "AgeCurve", "fit_age_curve",
           "history_spec", "curve_from_spec_config", "combine_sources", "history_features", "author_history_rows",
           "no_history_row"]

HISTORY_NAME, HISTORY_VERSION = "creator_history", "2"
TREND_K = 3                       # trend = mean of the last K earlier labels − mean of those before them
CURVE_DEGREE = 2
CURVE_DIGITS = 6                  # coefficients are rounded so the version hash is stable across machines
US_PER_DAY = 86_400 * 1_000_000

# Catalog columns the featurizer reads: query rows need the first three, source rows all of them.
QUERY_COLUMNS: tuple[str, ...] = ("video_id", "author_id", "publish_time")
SOURCE_COLUMNS: tuple[str, ...] = QUERY_COLUMNS + ("observed_at",) + TARGETS

PER_TARGET_STATS: tuple[str, ...] = ("resid_mean", "resid_median", "resid_last", "resid_trend", "resid_std",
                                     "resid_max", "zero_share")
HISTORY_SCALARS: tuple[tuple[str, pa.DataType], ...] = (
    ("has_history", pa.int8()),                  # 1 = at least one earlier labelled video of the author
    ("n_earlier_videos", pa.int32()),            # earlier source videos (labelled or not)
    ("n_earlier_labelled", pa.int32()),          # earlier source videos with at least one label
    ("days_since_prev_video", pa.float64()),     # NaN = no earlier video
    ("days_since_prev_labelled", pa.float64()),  # NaN = no earlier labelled video
) + tuple((f"{t}_{s}", pa.float64()) for t in TARGETS for s in PER_TARGET_STATS)  # NaN = no history for t
HISTORY_FEATURE_NAMES: tuple[str, ...] = tuple(n for n, _ in HISTORY_SCALARS)


# ------------------------------------------------------------------------------------------ age curve
@dataclass(frozen=True)
class AgeCurve:
    """Per target, log1p(count) ≈ c0 + c1·x + c2·x², x = log1p(age_days) clipped to the fitted range."""
    coefficients: Mapping[str, tuple[float, ...]]
    x_min: float
    x_max: float
    n_rows: Mapping[str, int] = field(default_factory=dict)

    def predict(self, target: str, age_days: np.ndarray) -> np.ndarray:
        x = np.clip(np.log1p(np.maximum(np.asarray(age_days, dtype=np.float64), MIN_AGE_DAYS)),
                    self.x_min, self.x_max)
        coef = self.coefficients[target]
        return sum(c * x ** k for k, c in enumerate(coef))

    def to_json(self) -> dict:
        return {"form": "log1p(count) ~ poly(log1p(age_days))", "coefficients":
                {t: list(c) for t, c in self.coefficients.items()}, "x_min": self.x_min, "x_max": self.x_max,
                "n_rows": dict(self.n_rows)}

    @staticmethod
    def from_json(data: Mapping) -> "AgeCurve":
        return AgeCurve({t: tuple(float(v) for v in c) for t, c in data["coefficients"].items()},
                        float(data["x_min"]), float(data["x_max"]),
                        {t: int(n) for t, n in data.get("n_rows", {}).items()})

    @property
    def fingerprint(self) -> str:
        """Hash of what changes features (coefficients and range), not of the row counts."""
        body = json.dumps({"c": {t: list(c) for t, c in sorted(self.coefficients.items())},
                           "x": [self.x_min, self.x_max]}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:10]


def _round(value: float) -> float:
    return float(f"{value:.{CURVE_DIGITS}g}")


def fit_age_curve(source: pa.Table, degree: int = CURVE_DEGREE) -> AgeCurve:
    """Least-squares age curve per target on the source's labelled rows (labels with a known age).

    A target with fewer than 3·(degree+1) labels, or no spread in age, falls back to a constant (or to 0
    with no labels at all), so tiny catalogs still get a curve.
    """
    frame = _source_frame(source, curve=None)
    x = np.log1p(frame.get_column("_age_days").to_numpy())
    known_age = np.isfinite(x)
    x_min = _round(float(x[known_age].min())) if known_age.any() else 0.0
    x_max = _round(float(x[known_age].max())) if known_age.any() else 0.0
    coefficients, n_rows = {}, {}
    for target in TARGETS:
        y = frame.get_column(f"_log_{target}").to_numpy()
        ok = known_age & np.isfinite(y)
        n_rows[target] = int(ok.sum())
        terms = degree + 1 if ok.sum() >= 3 * (degree + 1) and x[ok].std() > 1e-9 else 1
        coef = np.zeros(degree + 1)
        if ok.any():
            design = np.stack([x[ok] ** k for k in range(terms)], axis=1)
            coef[:terms] = np.linalg.lstsq(design, y[ok], rcond=None)[0]
        coefficients[target] = tuple(_round(c) for c in coef)
    return AgeCurve(coefficients, x_min, x_max, n_rows)


def history_spec(curve: AgeCurve) -> FeatureSpec:
    """The history FeatureSpec; its version carries the curve's fingerprint."""
    return FeatureSpec(modality="history", name=HISTORY_NAME, version=f"{HISTORY_VERSION}.{curve.fingerprint}",
                       shapes={}, scalars=HISTORY_SCALARS,
                       config={"age_curve": curve.to_json(), "age_normalisation": "residual of age curve",
                               "trend_k": TREND_K, "as_of": "strictly earlier publish_time, same author_id"})


def curve_from_spec_config(config: Mapping) -> AgeCurve:
    return AgeCurve.from_json(config["age_curve"])


# ------------------------------------------------------------------------------------------ frames
def _epoch_us(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A timestamp column as int64 microseconds since the epoch (null stays null)."""
    dtype = frame.schema[name]
    if isinstance(dtype, pl.Datetime):
        return pl.col(name).dt.cast_time_unit("us").dt.epoch("us")
    return pl.col(name).cast(pl.Int64)


def _to_polars(table: pa.Table, columns: tuple[str, ...]) -> pl.DataFrame:
    """The given columns (absent ones all-null) as a polars frame with plain types."""
    present = [c for c in columns if c in table.column_names]
    frame = pl.from_arrow(table.select(present)) if present else pl.DataFrame()
    if isinstance(frame, pl.Series):   # a one-column table comes back as a Series
        frame = frame.to_frame()
    n = table.num_rows
    for name in columns:
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None).alias(name)) if frame.width else \
                pl.DataFrame({name: pl.Series([None] * n)})
    return frame


def _source_frame(source: pa.Table, curve: AgeCurve | None) -> pl.DataFrame:
    """Source rows with author and time: t (µs), age, log labels and (with a curve) residuals per target."""
    frame = _to_polars(source, SOURCE_COLUMNS)
    frame = frame.select(
        pl.col("video_id").cast(pl.String), pl.col("author_id").cast(pl.String).alias("author"),
        _epoch_us(frame, "publish_time").alias("t"), _epoch_us(frame, "observed_at").alias("_obs"),
        *[pl.col(t).cast(pl.Float64) for t in TARGETS])
    frame = frame.filter(pl.col("author").is_not_null() & pl.col("t").is_not_null())
    age = ((pl.col("_obs") - pl.col("t")).cast(pl.Float64) / US_PER_DAY).clip(lower_bound=MIN_AGE_DAYS)
    frame = frame.with_columns(age.alias("_age_days"))
    # Negative counts are corrupt, not small; an unknown observation time leaves no age: both are unknown.
    frame = frame.with_columns([
        pl.when(pl.col(t).is_not_null() & (pl.col(t) >= 0) & pl.col("_obs").is_not_null())
        .then(pl.col(t).log1p()).otherwise(None).alias(f"_log_{t}") for t in TARGETS])
    if curve is not None:
        age_days = frame.get_column("_age_days").fill_null(MIN_AGE_DAYS).to_numpy()
        frame = frame.with_columns([
            (pl.col(f"_log_{t}") - pl.Series(curve.predict(t, age_days))).alias(f"_r_{t}") for t in TARGETS])
        frame = frame.with_columns(pl.any_horizontal([pl.col(f"_r_{t}").is_not_null() for t in TARGETS])
                                   .alias("_labelled"))
    return frame


def combine_sources(*tables: pa.Table) -> pa.Table:
    """Several history sources (catalogs, earlier scored tables) as one, one row per video_id.

    history_features expects unique video_ids in its source (a catalog has them); where sources overlap,
    the freshest observation (latest observed_at) wins, a rule that does not depend on input order.
    """
    parts = [_to_polars(t, SOURCE_COLUMNS).select(
        pl.col("video_id").cast(pl.String), pl.col("author_id").cast(pl.String),
        pl.col("publish_time").cast(pl.Datetime("us", "UTC")), pl.col("observed_at").cast(pl.Datetime("us", "UTC")),
        *[pl.col(t).cast(pl.Int64) for t in TARGETS]) for t in tables]
    frame = pl.concat(parts) if parts else pl.DataFrame()
    frame = (frame.sort(["video_id", "observed_at"], descending=[False, True], nulls_last=True)
             .unique(subset="video_id", keep="first", maintain_order=True))
    return frame.to_arrow()


FIXED_POINT = 1e9   # residual sums in int64 nano-units: exact, so sums never depend on how rows are grouped
FIXED_POINT_SQUARES = 1e8   # squares (< ~400 each) in 1e-8 units: 1e8 rows still fit in int64


@dataclass
class _Stream:
    """Source rows of one kind (all / labelled / labelled for a target), sorted by (author, t, video_id)."""
    keys: np.ndarray          # (M,) int64 author_code * span + t_rank
    author: np.ndarray        # (M,) int64 author code
    start: np.ndarray         # (M,) int64 index of the author's first row in this stream
    t_us: np.ndarray          # (M,) int64 publish time

    def strictly_before(self, query_keys: np.ndarray, query_author: np.ndarray) -> np.ndarray:
        """Index of the last row of the same author published strictly before each query (-1 = none).

        Rows at the query's own instant share its key and sort after `searchsorted(..., 'left') - 1`, so
        a video never sees itself nor any video published at the same instant.
        """
        if len(self.keys) == 0:
            return np.full(len(query_keys), -1, dtype=np.int64)
        idx = np.searchsorted(self.keys, query_keys, side="left") - 1
        ok = (idx >= 0) & (query_author >= 0)
        ok[ok] &= self.author[idx[ok]] == query_author[ok]
        return np.where(ok, idx, -1)


def _stream(mask: np.ndarray, keys: np.ndarray, author: np.ndarray, t_us: np.ndarray) -> _Stream:
    keys, author, t_us = keys[mask], author[mask], t_us[mask]
    first = np.ones(len(author), dtype=bool)
    first[1:] = author[1:] != author[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(len(author)), 0)) if len(author) else \
        np.zeros(0, dtype=np.int64)
    return _Stream(keys, author, start.astype(np.int64), t_us)


def _take(values: np.ndarray, idx: np.ndarray, fill: float = np.nan) -> np.ndarray:
    out = values[np.maximum(idx, 0)].astype(np.float64) if len(values) else np.full(len(idx), fill)
    out[idx < 0] = fill
    return out


def _own_cumsum(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at each author's first row (int64 in, exact)."""
    cum = np.cumsum(values)
    return cum - np.where(start > 0, cum[np.maximum(start - 1, 0)], 0)


def _target_stats(stream: _Stream, residuals: np.ndarray, zero: np.ndarray, idx: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Statistics of the residuals up to each idx (NaN where idx = -1); `zero` flags counts of 0."""
    if len(residuals) == 0:
        return {name: np.full(len(idx), np.nan) for name in PER_TARGET_STATS}
    rows = np.arange(len(residuals))
    own_cum = _own_cumsum(np.rint(residuals * FIXED_POINT).astype(np.int64), stream.start)
    own_sq = _own_cumsum(np.rint(residuals ** 2 * FIXED_POINT_SQUARES).astype(np.int64), stream.start)
    own_zero = _own_cumsum(zero.astype(np.int64), stream.start)
    count = rows - stream.start + 1
    lag = rows - TREND_K
    lag_cum = np.where(lag >= stream.start, own_cum[np.maximum(lag, 0)], 0)
    window = int(np.bincount(stream.author - stream.author.min()).max())
    frame = pl.DataFrame({"a": stream.author, "r": residuals})
    # An expanding median: a rolling window as long as the longest author history is exact.
    expanding = frame.select(pl.col("r").rolling_median(window_size=window, min_samples=1).over("a").alias("med"),
                             pl.col("r").cum_max().over("a").alias("max"))
    c = _take(count, idx)
    s = _take(own_cum, idx) / FIXED_POINT
    last_k = _take(own_cum - lag_cum, idx) / FIXED_POINT
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / c
        variance = np.maximum(_take(own_sq, idx) / FIXED_POINT_SQUARES / c - mean ** 2, 0.0)
        return {"resid_mean": mean, "resid_median": _take(expanding.get_column("med").to_numpy(), idx),
                "resid_last": _take(residuals, idx),
                "resid_trend": np.where(c > TREND_K, last_k / TREND_K - (s - last_k) / (c - TREND_K), np.nan),
                "resid_std": np.where(c > 1, np.sqrt(variance), np.nan),
                "resid_max": _take(expanding.get_column("max").to_numpy(), idx),
                "zero_share": _take(own_zero, idx) / c}


# ------------------------------------------------------------------------------------------ features
def history_features(query: pa.Table, source: pa.Table, curve: AgeCurve) -> pa.Table:
    """History features of each query row (in query order) from the source rows, in history_spec's schema.

    query: video_id, author_id, publish_time. source: those plus observed_at and the label columns;
    rows of the source may or may not be labelled (an unlabelled video still counts for recency), and
    the query rows may be part of the source (a video never sees itself: strictly earlier only).
    """
    spec = history_spec(curve)
    q = _to_polars(query, QUERY_COLUMNS)
    q = q.select(pl.col("video_id").cast(pl.String), pl.col("author_id").cast(pl.String).alias("author"),
                 _epoch_us(q, "publish_time").alias("t"))
    src = _source_frame(source, curve)
    n_q = q.height
    # One coding of authors and instants for both sides; key = author * span + instant rank, so one sorted
    # int64 array answers "same author, strictly earlier" with a binary search.
    author_code = (pl.concat([q.get_column("author"), src.get_column("author")]).cast(pl.Categorical)
                   .to_physical().cast(pl.Int64).fill_null(-1).to_numpy())
    times = np.concatenate([q.get_column("t").fill_null(0).to_numpy(), src.get_column("t").to_numpy()])
    instants, t_rank = np.unique(times, return_inverse=True)
    keys = author_code * (len(instants) + 1) + t_rank.astype(np.int64)
    q_keys = keys[:n_q]
    q_author = np.where(q.get_column("t").is_null().to_numpy(), -1, author_code[:n_q])
    # Source order: (author, instant, video_id): ties at one instant are ordered by id, never by input order.
    order = np.asarray(pl.DataFrame({"_k": keys[n_q:], "video_id": src.get_column("video_id")})
                       .with_row_index("_row").sort(["_k", "video_id"]).get_column("_row").to_numpy(),
                       dtype=np.int64)
    s_keys, s_author = keys[n_q:][order], author_code[n_q:][order]
    s_t = src.get_column("t").to_numpy()[order]
    # Binary searches are several times faster for sorted queries (cache locality): search in key order.
    q_order = np.argsort(q_keys, kind="stable")
    q_rank = np.empty_like(q_order)
    q_rank[q_order] = np.arange(n_q)

    def before(stream: "_Stream") -> np.ndarray:
        return stream.strictly_before(q_keys[q_order], q_author[q_order])[q_rank]

    everything = _stream(np.ones(src.height, dtype=bool), s_keys, s_author, s_t)
    labelled = _stream(src.get_column("_labelled").to_numpy()[order], s_keys, s_author, s_t)
    idx_all, idx_lab = before(everything), before(labelled)
    q_t = q.get_column("t").fill_null(0).to_numpy().astype(np.float64)
    columns: dict[str, np.ndarray] = {
        "n_earlier_videos": np.where(idx_all >= 0, idx_all - _take(everything.start, idx_all, 0), -1) + 1,
        "n_earlier_labelled": np.where(idx_lab >= 0, idx_lab - _take(labelled.start, idx_lab, 0), -1) + 1,
        "days_since_prev_video": (q_t - _take(everything.t_us, idx_all)) / US_PER_DAY,
        "days_since_prev_labelled": (q_t - _take(labelled.t_us, idx_lab)) / US_PER_DAY,
    }
    columns["has_history"] = (columns["n_earlier_labelled"] > 0).astype(np.int8)
    for target in TARGETS:
        residual = src.get_column(f"_r_{target}").to_numpy()[order]
        known = np.isfinite(residual)
        stream = _stream(known, s_keys, s_author, s_t)
        # Statistics without history stay NaN (never 0): the model turns NaN into a "missing" flag.
        zero = src.get_column(f"_log_{target}").to_numpy()[order][known] == 0.0
        stats = _target_stats(stream, residual[known], zero, before(stream))
        columns.update({f"{target}_{name}": values for name, values in stats.items()})
    out = {"video_id": q.get_column("video_id").to_arrow().cast(pa.string()),
           "featurizer": pa.array([spec.featurizer_id] * n_q, pa.string())}
    for name, dtype in HISTORY_SCALARS:
        values = np.asarray(columns[name])
        out[name] = pa.array(values if pa.types.is_floating(dtype) else values.astype(np.int64), dtype)
    return pa.Table.from_pydict(out, schema=spec.schema())


# ------------------------------------------------------------------------------------------ per author
def _catalog_rows_to_table(rows: Iterable[Mapping], columns: tuple[str, ...]) -> pa.Table:
    return rows_to_table(list(rows), pa.schema([CATALOG_SCHEMA.field(c) for c in columns]))


def author_history_rows(query_rows: Iterable[Mapping], source_rows: Iterable[Mapping],
                        curve: AgeCurve) -> list[dict]:
    """Feature rows (dicts) from catalog rows (dicts) of one author, or of a group of authors holding every
    row of each of its authors: the step after a GroupByKey on author (or on a bucket of authors).

    Computes exactly what history_features computes on the whole table (rows are sorted inside, so the
    order in which a runner delivers a group does not matter).
    """
    query = _catalog_rows_to_table(query_rows, QUERY_COLUMNS)
    source = _catalog_rows_to_table(source_rows, SOURCE_COLUMNS)
    return history_features(query, source, curve).to_pylist()


def no_history_row(video_id: str, curve: AgeCurve) -> dict:
    """The feature row of a video without an author id (or no earlier videos): explicit 'no history'."""
    spec = history_spec(curve)
    row: dict = {"video_id": video_id, "featurizer": spec.featurizer_id}
    for name, dtype in HISTORY_SCALARS:
        row[name] = float("nan") if dtype == pa.float64() else 0
    return row
