"""Compact training/scoring tensors from a catalog plus per-modality feature tables, joined on video_id.

Everything is column-major numpy/torch (no per-row Python objects). Normalisation statistics are fitted
on training rows only and travel in the model config, so scoring reproduces exactly the same inputs.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from featurizers.core import storage
from featurizers.core.contracts import MIN_AGE_DAYS, MODALITIES, TARGETS
from model.card import ModalityLayout
from featurizers.core.feature_table import (
    FeatureTable,
    feature_table_from_arrow,
    modality_path,
    present_modalities,
    read_feature_table,
)

log = logging.getLogger("popcast.train")

__all__ = ["DEFAULT_VALIDATION_FRACTION", "SECONDS_PER_DAY", "Batch", "Observed", "observed_arrays",
           "FeatureVersionError", "ModalityInputs", "ModalityLayout", "ModelDataError", "RowFile", "Split", "StoredFeatures", "StoredInputs", "build_inputs", "catalog_arrays",
           "check_featurizers", "fit_layout", "fit_stored_layout", "join_rows", "log_age", "make_batch",
           "modality_inputs", "read_features", "usable_modalities", "stream_feature_table", "stream_features",
           "time_split", "training_fingerprint"]

SECONDS_PER_DAY = 86_400.0
# The latest share of the training rows that early stopping watches (TrainingConfig's default too).
DEFAULT_VALIDATION_FRACTION = 0.15
# Scalar columns treated as categoricals (embedded) rather than as numbers. A featurizer can also list
# its own in its FeatureSpec config under "categorical" (meta's publish_hour and publish_weekday are left
# numeric on purpose: featurizers/meta.py says why).
KNOWN_CATEGORICAL_SCALARS = frozenset({"hour", "weekday", "month", "language_bucket", "language"})
MAX_CATEGORY_VOCAB = 64
# Normalised numerics are clipped: a handful of extreme rows must not dominate a small network.
NUMERIC_CLIP = 6.0


class FeatureVersionError(ValueError):
    """Feature tables were made by a featurizer version other than the one a model was trained on."""


class ModelDataError(ValueError):
    """The catalog or features cannot be turned into model inputs (missing columns, no labels, ...)."""


def _categorical_columns(table: FeatureTable) -> set[str]:
    declared = set(table.config.get("categorical", []) or [])
    cats = set()
    for name, values in table.scalars.items():
        if name in declared or name in KNOWN_CATEGORICAL_SCALARS or values.dtype.kind in "OUS":
            cats.add(name)
    return cats


def _category_keys(values: np.ndarray) -> np.ndarray:
    """Category values as strings ("" = missing); integer-valued floats print without ".0"."""
    if values.dtype.kind == "f":
        out = np.full(values.shape, "", dtype=object)
        ok = ~np.isnan(values)
        out[ok] = values[ok].astype(np.int64).astype(str)
        return out
    if values.dtype.kind == "O":
        # Object arrays (strings with None) go through Arrow, which knows how to read them.
        return pa.array(values, from_pandas=True).cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)
    return values.astype(str)


def fit_layout(table: FeatureTable, train_rows: np.ndarray) -> ModalityLayout:
    """Decide columns and fit normalisation on the given rows of `table` (indices into it)."""
    vectors = {name: (array.shape[1:], _chunks_of(array, train_rows)) for name, array in table.vectors.items()}
    return _fit_layout(table, train_rows, vectors)


def _chunks_of(array: np.ndarray, rows: np.ndarray):
    """A callable yielding array[rows] in consecutive pieces (in the order of `rows`)."""
    def chunks():
        step = _stat_chunk_rows(array.shape[1:])
        for start in range(0, len(rows), step):
            yield array[rows[start:start + step]]
    return chunks


# Values per piece when fitting vector statistics (4M: ~32 MB as float64); the result does not depend on it.
STAT_CHUNK_VALUES = 4 << 20


def _stat_chunk_rows(shape: tuple[int, ...]) -> int:
    return max(1, STAT_CHUNK_VALUES // max(1, int(np.prod(shape))))


def _nan_mean_std(chunks, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """np.nanmean / np.nanstd(axis=0, dtype=float64) of the rows the chunks yield, stacked, as two passes
    over pieces; bit-identical to the one-shot numpy calls (same float32 deviations, same sequential
    float64 sums), so a model fitted from disk-backed features has exactly the statistics of one fitted in
    memory. None when there are no rows."""
    total = np.zeros(width, dtype=np.float64)
    count = np.zeros(width, dtype=np.intp)
    seen = 0
    for piece in chunks():
        piece = piece.reshape(-1, width)
        seen += len(piece)
        missing = np.isnan(piece)
        clean = np.where(missing, np.float32(0), piece).astype(np.float64)
        # numpy reduces axis 0 row after row: continuing from the running total keeps its exact order.
        total = np.add.reduce(np.concatenate([total[None], clean]), axis=0)
        count += (~missing).sum(axis=0)
    if not seen:
        return None
    with np.errstate(all="ignore"):
        mean = total / count
        squares = np.zeros(width, dtype=np.float64)
        for piece in chunks():
            piece = piece.reshape(-1, width)
            missing = np.isnan(piece)
            deviation = np.where(missing, np.float32(0), piece)
            np.subtract(deviation, mean, out=deviation, casting="unsafe")   # float32, as np.nanvar does
            deviation[missing] = 0
            np.multiply(deviation, deviation, out=deviation)
            squares = np.add.reduce(np.concatenate([squares[None], deviation.astype(np.float64)]), axis=0)
        std = np.sqrt(squares / count)
    return np.nan_to_num(mean), np.nan_to_num(std)


def _fit_layout(table: FeatureTable, train_rows: np.ndarray, vectors: dict) -> ModalityLayout:
    """fit_layout over vectors given as {name: (per-row shape, callable yielding the training rows' values in
    pieces)}; scalars are read from table.scalars[name][train_rows]."""
    layout = ModalityLayout(name=table.modality, featurizer=table.featurizer)
    for name, (shape, chunks) in sorted(vectors.items()):
        if len(shape) == 2:
            layout.sequences[name] = list(shape)
        elif len(shape) == 1:
            layout.vectors[name] = int(shape[0])
        else:
            raise ModelDataError(f"{table.modality}.{name}: unsupported vector shape {tuple(shape)}")
        stats = _nan_mean_std(chunks, int(shape[-1]))
        mean, std = stats if stats is not None else (0.0, 1.0)
        mean = np.broadcast_to(mean, (shape[-1],))
        std = np.broadcast_to(std, (shape[-1],))
        layout.vector_mean[name] = [float(x) for x in mean]
        layout.vector_std[name] = [float(max(x, 1e-6)) for x in std]
    categorical = _categorical_columns(table)
    for name in sorted(table.scalars):
        values = table.scalars[name]
        if name in categorical:
            keys = _category_keys(values[train_rows])
            counts = pl.Series(keys[keys != ""]).value_counts(sort=True)
            vocab = counts.head(MAX_CATEGORY_VOCAB).get_column(counts.columns[0]).to_list() if len(counts) else []
            layout.categorical[name] = sorted(str(v) for v in vocab)
            continue
        if values.dtype.kind not in "fiub":
            continue
        train = values[train_rows].astype(np.float64)
        finite = train[np.isfinite(train)]
        # Heavy-tailed non-negative counts (followers, characters) are modelled on a log scale.
        use_log = bool(len(finite) and finite.min() >= 0 and finite.max() > 1000)
        if use_log:
            finite = np.log1p(finite)
        layout.numeric.append(name)
        layout.numeric_log.append(use_log)
        layout.numeric_mean.append(float(finite.mean()) if len(finite) else 0.0)
        layout.numeric_std.append(float(max(finite.std(), 1e-6)) if len(finite) else 1.0)
    return layout


# ----------------------------------------------------------------------------------------- tensors
@dataclass
class ModalityInputs:
    """One modality's model inputs for N rows (all float32/int64/bool tensors, NaN-free)."""
    present: torch.Tensor                     # (N,) bool: the row has this modality at all
    sequences: dict[str, torch.Tensor]        # name -> (N, K, D) float32
    sequence_masks: dict[str, torch.Tensor]   # name -> (N, K) bool: frame present
    vectors: torch.Tensor                     # (N, sum D) float32
    numeric: torch.Tensor                     # (N, 2*S + V) float32: values, missing flags
    categorical: torch.Tensor                 # (N, C) int64, 0 = unknown

    def index(self, rows: torch.Tensor) -> "ModalityInputs":
        return ModalityInputs(self.present[rows], {k: v[rows] for k, v in self.sequences.items()},
                              {k: v[rows] for k, v in self.sequence_masks.items()},
                              self.vectors[rows], self.numeric[rows], self.categorical[rows])

    def to(self, device: str | torch.device) -> "ModalityInputs":
        return ModalityInputs(self.present.to(device), {k: v.to(device) for k, v in self.sequences.items()},
                              {k: v.to(device) for k, v in self.sequence_masks.items()},
                              self.vectors.to(device), self.numeric.to(device),
                              self.categorical.to(device))


@dataclass
class Observed:
    """The counts a video already has, as model inputs (nowcasting): its input observation's normalised log1p
    counts (0 where unknown), which of them are known, and log1p of the age they were read at (0 = none)."""
    counts: torch.Tensor      # (N, T) float32, in the labels' normalised units
    mask: torch.Tensor        # (N, T) bool
    log_age: torch.Tensor     # (N,) float32

    def index(self, rows: torch.Tensor) -> "Observed":
        return Observed(self.counts[rows], self.mask[rows], self.log_age[rows])

    def to(self, device: str | torch.device) -> "Observed":
        return Observed(self.counts.to(device), self.mask.to(device), self.log_age.to(device))


def observed_arrays(input_log_labels: np.ndarray, input_age_days: np.ndarray, center: np.ndarray,
                    scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, mask, log_age) numpy arrays of Observed from log1p input counts (NaN = unknown or no input) and
    input ages (NaN = no input), normalised like the labels (center, scale per target)."""
    mask = np.isfinite(input_log_labels) & np.isfinite(input_age_days)[:, None]
    counts = np.where(mask, (np.nan_to_num(input_log_labels) - center) / scale, 0.0).astype(np.float32)
    ages = np.where(np.isfinite(input_age_days), log_age(np.nan_to_num(input_age_days, nan=MIN_AGE_DAYS)), 0.0)
    return counts, mask, ages.astype(np.float32)


def _observed_tensors(arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> Observed | None:
    return None if arrays is None else Observed(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


@dataclass
class Batch:
    """Model inputs for N rows: per-modality inputs plus log age, and labels when known.

    `observed` (nowcasting models only): the counts each row's video already has; None = none for any row."""
    modalities: dict[str, ModalityInputs]
    log_age: torch.Tensor                       # (N,) float32, log1p(age in days)
    labels: torch.Tensor | None = None          # (N, T) float32 log1p(count), NaN-free
    label_mask: torch.Tensor | None = None      # (N, T) bool: label known
    observed: Observed | None = None

    def __len__(self) -> int:
        return len(self.log_age)

    def index(self, rows: torch.Tensor) -> "Batch":
        return Batch({k: v.index(rows) for k, v in self.modalities.items()}, self.log_age[rows],
                     None if self.labels is None else self.labels[rows],
                     None if self.label_mask is None else self.label_mask[rows],
                     None if self.observed is None else self.observed.index(rows))

    def to(self, device: str | torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.modalities.items()}, self.log_age.to(device),
                     None if self.labels is None else self.labels.to(device),
                     None if self.label_mask is None else self.label_mask.to(device),
                     None if self.observed is None else self.observed.to(device))


def join_rows(video_ids: np.ndarray, table: FeatureTable) -> np.ndarray:
    """For each catalog video id, its row in `table`, or -1 (vectorised polars join)."""
    if len(table) == 0:
        return np.full(len(video_ids), -1, dtype=np.int64)
    catalog = pl.DataFrame({"video_id": pl.Series(video_ids, dtype=pl.String)})
    features = pl.DataFrame({"video_id": pl.Series(table.video_ids, dtype=pl.String),
                             "_row": np.arange(len(table), dtype=np.int64)})
    # Keep the last row of a duplicated id: a re-run appends newer features after older ones.
    features = features.unique(subset="video_id", keep="last", maintain_order=True)
    joined = catalog.join(features, on="video_id", how="left", maintain_order="left")
    return joined.get_column("_row").fill_null(-1).to_numpy().astype(np.int64)


def _gather(array: np.ndarray, rows: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """array[rows] with -1 rows filled; skips the copy when rows are the identity."""
    if len(rows) == len(array) and np.array_equal(rows, np.arange(len(array))):
        return array
    out = array[np.maximum(rows, 0)]
    out[rows < 0] = fill
    return out


def build_modality_inputs(layout: ModalityLayout, table: FeatureTable | None, video_ids: np.ndarray
                          ) -> ModalityInputs:
    """Normalised, NaN-free inputs of one modality for the given catalog rows (absent → masked)."""
    n = len(video_ids)
    rows = join_rows(video_ids, table) if table is not None else np.full(n, -1, dtype=np.int64)
    return modality_inputs(layout, table, rows)


def modality_inputs(layout: ModalityLayout, table: FeatureTable | None, rows: np.ndarray) -> ModalityInputs:
    """Normalised, NaN-free inputs of one modality for the given rows of `table` (-1 = absent → masked).

    Every step is per row: the inputs of a row do not depend on which other rows are built with it."""
    n = len(rows)
    present = rows >= 0
    sequences, sequence_masks = {}, {}
    for name, shape in layout.sequences.items():
        if table is not None and name in table.vectors:
            seq = _gather(table.vectors[name], rows).astype(np.float32, copy=True)
        else:
            seq = np.full((n, *shape), np.nan, dtype=np.float32)
        frame_ok = np.isfinite(seq).all(axis=2)
        seq -= np.asarray(layout.vector_mean[name], dtype=np.float32)
        seq /= np.asarray(layout.vector_std[name], dtype=np.float32)
        np.clip(seq, -NUMERIC_CLIP, NUMERIC_CLIP, out=seq)
        seq[~frame_ok] = 0.0
        sequences[name] = torch.from_numpy(seq)
        sequence_masks[name] = torch.from_numpy(frame_ok)
        present &= frame_ok.any(axis=1)
    vectors = np.zeros((n, layout.vector_width), dtype=np.float32)
    vector_missing = np.ones((n, len(layout.vectors)), dtype=np.float32)
    start = 0
    for j, (name, width) in enumerate(layout.vectors.items()):
        block = vectors[:, start:start + width]
        if table is not None and name in table.vectors:
            source = table.vectors[name]
            # In place on the output block: 1M rows × 900 floats must not be copied several times.
            np.take(source, np.maximum(rows, 0), axis=0, out=block)
            block[rows < 0] = np.nan
            ok = np.isfinite(block).all(axis=1)
            block -= np.asarray(layout.vector_mean[name], dtype=np.float32)
            block /= np.asarray(layout.vector_std[name], dtype=np.float32)
            np.clip(block, -NUMERIC_CLIP, NUMERIC_CLIP, out=block)
            block[~ok] = 0.0
            vector_missing[:, j] = (~ok).astype(np.float32)
        start += width
    s = len(layout.numeric)
    numeric = np.zeros((n, 2 * s + len(layout.vectors)), dtype=np.float32)
    for j, name in enumerate(layout.numeric):
        if table is not None and name in table.scalars:
            values = _gather(table.scalars[name].astype(np.float64), rows)
        else:
            values = np.full(n, np.nan)
        if layout.numeric_log[j]:
            with np.errstate(invalid="ignore"):
                values = np.log1p(np.maximum(values, 0.0))
        missing = ~np.isfinite(values)
        z = (values - layout.numeric_mean[j]) / layout.numeric_std[j]
        numeric[:, j] = np.where(missing, 0.0, np.clip(z, -NUMERIC_CLIP, NUMERIC_CLIP))
        numeric[:, s + j] = missing
    numeric[:, 2 * s:] = vector_missing
    categorical = np.zeros((n, len(layout.categorical)), dtype=np.int64)
    for j, (name, vocab) in enumerate(layout.categorical.items()):
        if table is None or name not in table.scalars:
            continue
        keys = _category_keys(_gather(table.scalars[name], rows, fill=np.nan)
                              if table.scalars[name].dtype.kind == "f"
                              else _gather_object(table.scalars[name], rows))
        lookup = pl.DataFrame({"key": vocab, "code": np.arange(1, len(vocab) + 1, dtype=np.int64)})
        codes = (pl.DataFrame({"key": pl.Series(keys, dtype=pl.String)})
                 .join(lookup, on="key", how="left", maintain_order="left").get_column("code"))
        categorical[:, j] = codes.fill_null(0).to_numpy()
    return ModalityInputs(torch.from_numpy(present), sequences, sequence_masks, torch.from_numpy(vectors),
                          torch.from_numpy(numeric), torch.from_numpy(categorical))


def _gather_object(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = values[np.maximum(rows, 0)].astype(object)
    out[rows < 0] = None
    return out


# ----------------------------------------------------------------------------------------- catalog
def _timestamps_seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Epoch seconds as float64 (NaN for nulls)."""
    as_us = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())
    return as_us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6 \
        if as_us.null_count == 0 else \
        np.where(as_us.is_valid().to_numpy(zero_copy_only=False),
                 as_us.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64) / 1e6, np.nan)


def catalog_arrays(catalog: pa.Table) -> dict[str, np.ndarray]:
    """video_id, publish/observed epoch seconds, age in days and log1p labels (NaN = unknown)."""
    missing = [c for c in ("video_id", "publish_time") if c not in catalog.column_names]
    if missing:
        raise ModelDataError(f"catalog lacks required columns {missing}")
    out: dict[str, np.ndarray] = {
        "video_id": catalog.column("video_id").to_numpy(zero_copy_only=False).astype(object),
        "publish_s": _timestamps_seconds(catalog.column("publish_time")),
    }
    if "observed_at" in catalog.column_names:
        out["observed_s"] = _timestamps_seconds(catalog.column("observed_at"))
    else:
        out["observed_s"] = np.full(catalog.num_rows, np.nan)
    out["age_days"] = np.maximum((out["observed_s"] - out["publish_s"]) / SECONDS_PER_DAY, MIN_AGE_DAYS)
    labels = np.full((catalog.num_rows, len(TARGETS)), np.nan, dtype=np.float64)
    for j, target in enumerate(TARGETS):
        if target in catalog.column_names:
            col = pc.cast(catalog.column(target), pa.float64())
            values = col.to_numpy(zero_copy_only=False)
            # Negative counts are corrupt, not small: treat them as unknown.
            labels[:, j] = np.where(values >= 0, np.log1p(np.maximum(values, 0)), np.nan)
    # An unknown observation time makes every count uninterpretable (no age to condition on).
    labels[~np.isfinite(out["observed_s"])] = np.nan
    out["log_labels"] = labels
    out["author_id"] = (catalog.column("author_id").to_numpy(zero_copy_only=False).astype(object)
                        if "author_id" in catalog.column_names else np.full(catalog.num_rows, None, object))
    out["has_media"] = (pc.is_valid(catalog.column("video_uri")).to_numpy(zero_copy_only=False)
                        if "video_uri" in catalog.column_names else np.zeros(catalog.num_rows, bool))
    return out


def log_age(age_days: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(age_days, dtype=np.float64), MIN_AGE_DAYS))


@dataclass
class Split:
    """Row indices (into the catalog) of train / validation / test, and the publish-time cut."""
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    cutoff_s: float
    validation_cutoff_s: float

    def to_json(self) -> dict:
        iso = lambda s: np.datetime64(int(s * 1e6), "us").astype(str) + "Z"   # noqa: E731
        return {"n_train": int(len(self.train)), "n_validation": int(len(self.validation)),
                "n_test": int(len(self.test)), "test_from_publish_time": iso(self.cutoff_s),
                "validation_from_publish_time": iso(self.validation_cutoff_s)}


def _per_video(rows: np.ndarray, video_ids: np.ndarray | None) -> np.ndarray:
    """`rows` with one row per video id (its first); all of them when there are no ids."""
    if video_ids is None or not len(rows):
        return rows
    first = (pl.DataFrame({"video": pl.Series(video_ids[rows].astype(str), dtype=pl.String)})
             .with_row_index("i").unique(subset="video", keep="first", maintain_order=True).get_column("i"))
    return rows[first.to_numpy()]


def time_split(publish_s: np.ndarray, labelled: np.ndarray, quantile: float,
               validation_fraction: float = DEFAULT_VALIDATION_FRACTION, video_ids: np.ndarray | None = None
               ) -> Split:
    """Time-ordered split of labelled rows: publish_time ≥ q-quantile → test; latest part of train → val.

    With video_ids (rows of one video share its publish_time), the quantiles are over distinct videos, so a
    video observed nine times weighs as much as one observed once; with unique ids it is the same split."""
    if not 0.0 < quantile < 1.0:
        raise ModelDataError(f"split quantile must be in (0, 1), got {quantile}")
    rows = np.flatnonzero(labelled & np.isfinite(publish_s))
    if len(rows) < 10:
        raise ModelDataError(f"only {len(rows)} labelled rows: too few to train and evaluate")
    cutoff = float(np.quantile(publish_s[_per_video(rows, video_ids)], quantile, method="lower"))
    test = rows[publish_s[rows] >= cutoff]
    train_all = rows[publish_s[rows] < cutoff]
    if len(train_all) < 5 or len(test) == 0:
        raise ModelDataError(f"split at quantile {quantile} leaves {len(train_all)} train / {len(test)} test rows")
    val_cut = float(np.quantile(publish_s[_per_video(train_all, video_ids)], 1.0 - validation_fraction,
                                method="lower"))
    validation = train_all[publish_s[train_all] >= val_cut]
    train = train_all[publish_s[train_all] < val_cut]
    if len(train) == 0 or len(validation) == 0:   # ties in publish time: fall back to a count split
        order = train_all[np.argsort(publish_s[train_all], kind="stable")]
        k = max(1, int(round(len(order) * (1 - validation_fraction))))
        train, validation = np.sort(order[:k]), np.sort(order[k:])
        val_cut = float(publish_s[validation].min()) if len(validation) else cutoff
    return Split(np.sort(train), np.sort(validation), np.sort(test), cutoff, val_cut)


def training_fingerprint(arrays: dict[str, np.ndarray], rows: np.ndarray, featurizers: list[str]) -> str:
    """sha256 over the training rows' ids, times, labels and the featurizer versions."""
    digest = hashlib.sha256()
    order = rows[np.argsort(arrays["video_id"][rows].astype(str), kind="stable")]
    digest.update("\n".join(arrays["video_id"][order].astype(str)).encode())
    digest.update(np.ascontiguousarray(arrays["publish_s"][order]).tobytes())
    digest.update(np.ascontiguousarray(arrays["observed_s"][order]).tobytes())
    digest.update(np.ascontiguousarray(np.nan_to_num(arrays["log_labels"][order], nan=-1.0)).tobytes())
    digest.update(",".join(sorted(featurizers)).encode())
    return digest.hexdigest()


def read_features(features_dir: str, modalities: tuple[str, ...] | list[str] | None = None
                  ) -> dict[str, FeatureTable]:
    """Every modality table present under features_dir (missing modalities are simply absent)."""
    return {modality: read_feature_table(features_dir, modality)
            for modality in usable_modalities(features_dir, modalities)}


def usable_modalities(features_dir: str, requested: tuple[str, ...] | list[str] | None) -> list[str]:
    """The modalities to use: by default every one with features under features_dir (said in the log);
    a requested modality without any is an error naming it."""
    if not requested:
        present = present_modalities(features_dir, MODALITIES)
        log.info("using the modalities with features under %s: %s", features_dir, ", ".join(present) or "none")
        return present
    missing = [m for m in requested if m not in present_modalities(features_dir, requested)]
    if missing:
        raise ModelDataError(f"no {', '.join(missing)} features under {features_dir} (asked for by --modalities)")
    return list(requested)


def make_batch(layouts: dict[str, ModalityLayout], tables: dict[str, FeatureTable], video_ids: np.ndarray,
               log_ages: np.ndarray, log_labels: np.ndarray | None = None,
               observed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Batch:
    """Model inputs for the given catalog rows (already subset), labels optional; observed: observed_arrays
    of the same rows (nowcasting models)."""
    modalities = {name: build_modality_inputs(layout, tables.get(name), video_ids)
                  for name, layout in layouts.items()}
    labels = mask = None
    if log_labels is not None:
        mask_np = np.isfinite(log_labels)
        labels = torch.from_numpy(np.where(mask_np, log_labels, 0.0).astype(np.float32))
        mask = torch.from_numpy(mask_np)
    return Batch(modalities, torch.from_numpy(np.asarray(log_ages, dtype=np.float32)), labels, mask,
                 _observed_tensors(observed))


def check_featurizers(layouts: dict[str, ModalityLayout], tables: dict[str, FeatureTable]) -> None:
    """Refuse feature tables whose featurizer version differs from the model's (clear message)."""
    for name, layout in layouts.items():
        table = tables.get(name)
        if table is not None and len(table) and table.featurizer != layout.featurizer:
            raise FeatureVersionError(
                f"modality '{name}': features were made by '{table.featurizer}' but the model was trained on "
                f"'{layout.featurizer}'; re-featurize with '{layout.featurizer}' or retrain the model")


# ----------------------------------------------------------------------------------------- bounded memory
# Training at catalog scale never holds a modality's vectors in memory: each vector column is streamed from
# its Parquet files into a disk-backed float32 matrix (one row per catalog row of the run), the model inputs
# are built from it in bounded chunks into another one, and minibatches are read back with explicit
# positional reads. Not np.memmap: the pages of a mapping that are touched count in the process RSS, the OS
# page cache behind explicit reads does not.
STREAM_BATCH_ROWS = 16_384     # rows per Parquet batch while streaming a feature table to disk
INPUT_CHUNK_ROWS = 16_384      # rows per chunk while building model inputs
_READ_BUFFER_BYTES = 8 << 20   # buffered-stream size of the Parquet reader (large row groups stay bounded)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of `rows` over which the values go up by exactly one."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return list(zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()))


def _pread_into(fd: int, buffer: np.ndarray, offset: int) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:   # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(view) - done, offset + done)
            view[done:done + len(data)] = data
            got = len(data)
        if got <= 0:
            raise OSError(f"short read at byte {offset + done}")
        done += got


def _pwrite_all(fd: int, buffer: np.ndarray, offset: int) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        wrote = os.pwrite(fd, view[done:], offset + done)
        if wrote <= 0:
            raise OSError(f"short write at byte {offset + done}")
        done += wrote


class RowFile:
    """A disk-backed (n_rows, width) float32 matrix written and read with explicit pwrite/pread calls.

    Rows never written read as zeros (the file starts sparse). Reading k rows costs one (k, width) buffer
    and one read per run of consecutive rows, whatever the size of the file."""

    def __init__(self, path: str, n_rows: int, width: int):
        self.path, self.n_rows, self.width = path, int(n_rows), int(width)
        self._row_bytes = 4 * self.width
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.n_rows * self._row_bytes)

    def __len__(self) -> int:
        return self.n_rows

    def _check(self, rows: np.ndarray) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows outside [0, {self.n_rows}) of {self.path}")

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """values[i] → row rows[i]; a row given twice keeps its last value."""
        rows = np.asarray(rows, dtype=np.int64)
        self._check(rows)
        if not len(rows):
            return
        values = np.asarray(values, dtype=np.float32).reshape(len(rows), self.width)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        last = np.append(ordered[1:] != ordered[:-1], True)
        order, ordered = order[last], ordered[last]
        block = values[order] if not np.array_equal(order, np.arange(len(rows))) else np.ascontiguousarray(values)
        for lo, hi in _runs(ordered):
            _pwrite_all(self._fd, block[lo:hi], int(ordered[lo]) * self._row_bytes)

    def write_range(self, start: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, self.width)
        self._check(np.array([start, start + len(values) - 1]) if len(values) else np.zeros(0, np.int64))
        if len(values):
            _pwrite_all(self._fd, values, start * self._row_bytes)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), width) float32: the given rows in the given order (one read per consecutive run)."""
        rows = np.asarray(rows, dtype=np.int64)
        self._check(rows)
        out = np.empty((len(rows), self.width), dtype=np.float32)
        if self.width:
            for lo, hi in _runs(rows):
                _pread_into(self._fd, out[lo:hi], int(rows[lo]) * self._row_bytes)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self.read(np.arange(start, stop, dtype=np.int64))

    def close(self) -> None:
        """Close and delete the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass
class StoredFeatures:
    """One modality's features for a fixed list of video ids (the "slots": one per catalog row of a run),
    in bounded memory: ids and scalar columns of the table rows that match a slot stay in memory (`table`,
    without vectors), each vector column lives in a RowFile whose row i is slot i's vector (zeros where the
    slot has no row). Duck-types as a FeatureTable for check_featurizers (featurizer, len)."""
    table: FeatureTable
    shapes: dict[str, tuple[int, ...]]
    files: dict[str, RowFile]
    rows: np.ndarray            # (n_slots,) each slot's row in `table`, -1 = none (as join_rows)
    n_table_rows: int           # rows of the whole stored table, matching a slot or not

    @property
    def modality(self) -> str:
        return self.table.modality

    @property
    def featurizer(self) -> str:
        return self.table.featurizer

    def __len__(self) -> int:
        return self.n_table_rows

    def vector_chunks(self, name: str, slots: np.ndarray):
        """A callable yielding the vectors of `slots` (in that order) in pieces of bounded size."""
        shape = self.shapes[name]

        def chunks():
            step = _stat_chunk_rows(shape)
            for start in range(0, len(slots), step):
                part = slots[start:start + step]
                yield self.files[name].read(part).reshape(len(part), *shape)
        return chunks

    def chunk(self, start: int, stop: int) -> tuple[FeatureTable | None, np.ndarray]:
        """(a FeatureTable of slots [start, stop), its row per slot or -1): what modality_inputs takes.
        None when no slot of the range has a row (the same inputs as a table without those ids)."""
        rows = self.rows[start:stop]
        present = rows >= 0
        if not present.any():
            return None, np.full(len(rows), -1, dtype=np.int64)
        take = np.maximum(rows, 0)
        vectors = {name: self.files[name].read_range(start, stop).reshape(stop - start, *shape)
                   for name, shape in self.shapes.items()}
        table = FeatureTable(self.table.modality, self.table.featurizer, self.table.video_ids[take], vectors,
                             {name: values[take] for name, values in self.table.scalars.items()}, self.table.config)
        return table, np.where(present, np.arange(len(rows), dtype=np.int64), -1)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def fit_stored_layout(stored: StoredFeatures, slots: np.ndarray) -> ModalityLayout:
    """fit_layout on the rows of the given slots (in their order; slots without a row are skipped):
    the same layout, to the bit, as fit_layout on the in-memory table and the same rows."""
    slots = np.asarray(slots, dtype=np.int64)
    slots = slots[stored.rows[slots] >= 0]
    vectors = {name: (shape, stored.vector_chunks(name, slots)) for name, shape in stored.shapes.items()}
    return _fit_layout(stored.table, stored.rows[slots], vectors)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def stream_feature_table(features_dir: str, modality: str, video_ids: np.ndarray, directory: str,
                         batch_rows: int | None = None) -> StoredFeatures:
    """Stream DIR/<modality>/ (every Parquet file under it, recursively) into a StoredFeatures for the slots
    `video_ids`, about batch_rows (default STREAM_BATCH_ROWS) rows at a time. Like join_rows, a duplicated
    id keeps its last row."""
    batch_rows = batch_rows or STREAM_BATCH_ROWS
    fs, root = storage.filesystem_and_path(modality_path(features_dir, modality))
    dataset = ds.dataset(root, filesystem=fs, format="parquet", exclude_invalid_files=True,
                         ignore_prefixes=["_", "."])
    if not dataset.files:
        raise FileNotFoundError(f"no {modality} features under {features_dir}")
    metadata = dataset.schema.metadata
    empty = feature_table_from_arrow(dataset.schema.empty_table(), modality, metadata)
    shapes = {name: tuple(array.shape[1:]) for name, array in empty.vectors.items()}
    n_slots = len(video_ids)
    files = {name: RowFile(os.path.join(directory, f"{modality}.{name}.raw"), n_slots, int(np.prod(shape)))
             for name, shape in shapes.items()}
    slots = pl.DataFrame({"video_id": pl.Series(video_ids, dtype=pl.String),
                          "_slot": np.arange(n_slots, dtype=np.int64)})
    ids, scalars = [empty.video_ids], {name: [values] for name, values in empty.scalars.items()}
    featurizer, n_rows = empty.featurizer, 0
    options = ds.ParquetFragmentScanOptions(use_buffered_stream=True, buffer_size=_READ_BUFFER_BYTES,
                                            pre_buffer=False)

    def add(batches: list[pa.RecordBatch]) -> None:
        nonlocal featurizer, n_rows
        part = feature_table_from_arrow(pa.Table.from_batches(batches), modality, metadata)
        featurizer = featurizer or part.featurizer
        n_rows += len(part)
        matches = (pl.DataFrame({"video_id": pl.Series(part.video_ids, dtype=pl.String),
                                 "_row": np.arange(len(part), dtype=np.int64)})
                   .join(slots, on="video_id", how="inner", maintain_order="left"))
        if not len(matches):
            return
        row = matches.get_column("_row").to_numpy()
        slot = matches.get_column("_slot").to_numpy()
        for name, f in files.items():
            f.write(slot, part.vectors[name][row])
        keep = np.unique(row)
        ids.append(part.video_ids[keep])
        for name in scalars:
            scalars[name].append(part.scalars[name][keep])

    try:
        pending: list[pa.RecordBatch] = []
        # Small row groups give small batches: gather them up to batch_rows before each join and write.
        for batch in dataset.to_batches(batch_size=batch_rows, use_threads=False, batch_readahead=0,
                                        fragment_readahead=0, fragment_scan_options=options):
            if batch.num_rows:
                pending.append(batch)
            if sum(b.num_rows for b in pending) >= batch_rows:
                add(pending)
                pending = []
        if pending:
            add(pending)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    table = FeatureTable(modality, featurizer, _concat(ids), {}, {k: _concat(v) for k, v in scalars.items()},
                         empty.config)
    return StoredFeatures(table, shapes, files, join_rows(video_ids, table), n_rows)


def stream_features(features_dir: str, modalities: tuple[str, ...] | list[str] | None, video_ids: np.ndarray,
                    directory: str) -> dict[str, StoredFeatures]:
    """read_features in bounded memory, for the slots `video_ids` (missing modalities are simply absent)."""
    stored: dict[str, StoredFeatures] = {}
    try:
        for modality in usable_modalities(features_dir, modalities):
            stored[modality] = stream_feature_table(features_dir, modality, video_ids, directory)
    except BaseException:
        for s in stored.values():
            s.close()
        raise
    return stored


@dataclass
class _StoredModalityInputs:
    """One modality's ModalityInputs for every slot: wide tensors in RowFiles, narrow ones in memory."""
    present: np.ndarray                                    # (N,) bool
    sequences: dict[str, tuple[RowFile, tuple[int, ...]]]  # name -> file of flat (K*D) rows, (K, D)
    sequence_masks: dict[str, np.ndarray]                  # name -> (N, K) bool
    vectors: RowFile | None                                # (N, sum D); None when there is no vector
    numeric: np.ndarray                                    # (N, 2*S + V) float32
    categorical: np.ndarray                                # (N, C) int64

    @classmethod
    def allocate(cls, layout: ModalityLayout, n: int, directory: str) -> "_StoredModalityInputs":
        sequences = {name: (RowFile(os.path.join(directory, f"{layout.name}.{name}.inputs"), n, int(np.prod(shape))),
                            tuple(shape)) for name, shape in layout.sequences.items()}
        vectors = (RowFile(os.path.join(directory, f"{layout.name}.vectors.inputs"), n, layout.vector_width)
                   if layout.vector_width else None)
        return cls(np.zeros(n, dtype=bool), sequences,
                   {name: np.zeros((n, shape[0]), dtype=bool) for name, shape in layout.sequences.items()},
                   vectors, np.zeros((n, layout.numeric_width), dtype=np.float32),
                   np.zeros((n, len(layout.categorical)), dtype=np.int64))

    def put(self, start: int, inputs: ModalityInputs) -> None:
        stop = start + len(inputs.present)
        self.present[start:stop] = inputs.present.numpy()
        for name, (f, _) in self.sequences.items():
            f.write_range(start, inputs.sequences[name].numpy().reshape(stop - start, -1))
            self.sequence_masks[name][start:stop] = inputs.sequence_masks[name].numpy()
        if self.vectors is not None:
            self.vectors.write_range(start, inputs.vectors.numpy())
        self.numeric[start:stop] = inputs.numeric.numpy()
        self.categorical[start:stop] = inputs.categorical.numpy()

    def read(self, slots: np.ndarray, wide: bool = True) -> ModalityInputs:
        n = len(slots)
        sequences, masks = {}, {}
        if wide:
            sequences = {name: torch.from_numpy(f.read(slots).reshape(n, *shape))
                         for name, (f, shape) in self.sequences.items()}
            masks = {name: torch.from_numpy(m[slots]) for name, m in self.sequence_masks.items()}
        vectors = (self.vectors.read(slots) if wide and self.vectors is not None
                   else np.zeros((n, 0), dtype=np.float32))
        return ModalityInputs(torch.from_numpy(self.present[slots]), sequences, masks, torch.from_numpy(vectors),
                              torch.from_numpy(self.numeric[slots]), torch.from_numpy(self.categorical[slots]))

    def close(self) -> None:
        for f, _ in self.sequences.values():
            f.close()
        if self.vectors is not None:
            self.vectors.close()


@dataclass
class StoredInputs:
    """Model inputs of a fixed list of catalog rows (slots), built once in bounded chunks: `index(rows)`
    reads the Batch that make_batch would build for those rows, value for value. `view(rows)` is a subset
    with the same interface (rows of a view are positions in it)."""
    modalities: dict[str, _StoredModalityInputs]
    log_age: np.ndarray                  # (N,) float32
    labels: np.ndarray | None = None     # (N, T) float32, 0 where unknown
    label_mask: np.ndarray | None = None  # (N, T) bool
    slots: np.ndarray | None = None      # this view's slots (None: all of them, in order)
    observed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # observed_arrays of every slot

    def __len__(self) -> int:
        return len(self.log_age) if self.slots is None else len(self.slots)

    def _slots(self, rows) -> np.ndarray:
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        rows = rows.astype(np.int64, copy=False)
        return rows if self.slots is None else self.slots[rows]

    def view(self, rows) -> "StoredInputs":
        return StoredInputs(self.modalities, self.log_age, self.labels, self.label_mask, self._slots(rows),
                            self.observed)

    def _batch(self, rows, wide: bool) -> Batch:
        slots = self._slots(rows)
        labels = None if self.labels is None else torch.from_numpy(self.labels[slots])
        mask = None if self.label_mask is None else torch.from_numpy(self.label_mask[slots])
        observed = None if self.observed is None else tuple(a[slots] for a in self.observed)
        return Batch({name: m.read(slots, wide) for name, m in self.modalities.items()},
                     torch.from_numpy(self.log_age[slots]), labels, mask, _observed_tensors(observed))

    def index(self, rows) -> Batch:
        """The Batch of the given rows (positions in this view), read from disk."""
        return self._batch(rows, wide=True)

    def tabular(self, rows) -> Batch:
        """The Batch of the given rows without vectors and sequences (what baselines.tabular_matrix reads)."""
        return self._batch(rows, wide=False)

    def close(self) -> None:
        for m in self.modalities.values():
            m.close()


def build_inputs(layouts: dict[str, ModalityLayout], features: dict[str, StoredFeatures], log_ages: np.ndarray,
                 log_labels: np.ndarray | None, directory: str, chunk_rows: int | None = None,
                 release: bool = False, observed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                 ) -> StoredInputs:
    """make_batch for every slot of `features`, chunk_rows (default INPUT_CHUNK_ROWS) rows at a time, into
    StoredInputs (release: close each modality's StoredFeatures once its inputs are built, to free its
    disk space early)."""
    n = len(log_ages)
    chunk_rows = chunk_rows or INPUT_CHUNK_ROWS
    modalities: dict[str, _StoredModalityInputs] = {}
    try:
        for name, layout in layouts.items():
            stored = features.get(name)
            m = modalities[name] = _StoredModalityInputs.allocate(layout, n, directory)
            for start in range(0, n, chunk_rows):
                stop = min(n, start + chunk_rows)
                table, rows = stored.chunk(start, stop) if stored is not None else (None, np.full(stop - start, -1))
                m.put(start, modality_inputs(layout, table, rows))
            if release and stored is not None:
                stored.close()
    except BaseException:
        for m in modalities.values():
            m.close()
        raise
    labels = mask = None
    if log_labels is not None:
        mask = np.isfinite(log_labels)
        labels = np.where(mask, log_labels, 0.0).astype(np.float32)
    return StoredInputs(modalities, np.asarray(log_ages, dtype=np.float32), labels, mask, observed=observed)
