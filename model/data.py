"""Compact training/scoring tensors from a catalog plus per-modality feature tables, joined on video_id.

Everything is column-major numpy/torch (no per-row Python objects). Normalisation statistics are fitted
on training rows only and travel in the model config, so scoring reproduces exactly the same inputs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch

from featurizers.core import storage
from featurizers.core.contracts import MIN_AGE_DAYS, MODALITIES, TARGETS
from featurizers.core.feature_table import FeatureTable, read_feature_table

__all__ = ["DEFAULT_VALIDATION_FRACTION", "Batch", "FeatureVersionError", "ModalityInputs", "ModalityLayout",
           "ModelDataError", "Split", "catalog_arrays", "check_featurizers", "fit_layout", "join_rows", "log_age",
           "make_batch", "read_features", "time_split", "training_fingerprint"]

SECONDS_PER_DAY = 86_400.0
# The latest share of the training rows that early stopping watches (TrainingConfig's default too).
DEFAULT_VALIDATION_FRACTION = 0.15
# Scalar columns treated as categoricals (embedded) rather than as numbers. A featurizer can also list
# its own in its FeatureSpec config under "categorical".
KNOWN_CATEGORICAL_SCALARS = frozenset({"hour", "weekday", "month", "language_bucket", "language"})
MAX_CATEGORY_VOCAB = 64
# Normalised numerics are clipped: a handful of extreme rows must not dominate a small network.
NUMERIC_CLIP = 6.0


class FeatureVersionError(ValueError):
    """Feature tables were made by a featurizer version other than the one a model was trained on."""


class ModelDataError(ValueError):
    """The catalog or features cannot be turned into model inputs (missing columns, no labels, ...)."""


# ----------------------------------------------------------------------------------------- layout
@dataclass
class ModalityLayout:
    """What the model reads from one modality table; JSON-able, stored in config.json.

    sequences: 2-D vector columns (K, D), encoded by the temporal CNN+GRU branch.
    vectors: 1-D vector columns and their widths. numeric / categorical: scalar columns.
    The normalisation statistics (fitted on training rows) are part of the layout.
    """
    name: str
    featurizer: str
    sequences: dict[str, list[int]] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)
    numeric: list[str] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)   # column -> vocabulary (index+1)
    numeric_log: list[bool] = field(default_factory=list)
    numeric_mean: list[float] = field(default_factory=list)
    numeric_std: list[float] = field(default_factory=list)
    vector_mean: dict[str, list[float]] = field(default_factory=dict)
    vector_std: dict[str, list[float]] = field(default_factory=dict)

    @property
    def vector_width(self) -> int:
        return sum(self.vectors.values())

    @property
    def numeric_width(self) -> int:
        # Each numeric column comes with a "missing" indicator; each vector column with one too.
        return 2 * len(self.numeric) + len(self.vectors)

    @property
    def category_sizes(self) -> list[int]:
        return [len(v) + 1 for v in self.categorical.values()]   # index 0 = unknown / missing

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_json(data: dict) -> "ModalityLayout":
        layout = ModalityLayout(**data)
        layout.sequences = {k: list(v) for k, v in layout.sequences.items()}
        return layout


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
    layout = ModalityLayout(name=table.modality, featurizer=table.featurizer)
    for name, array in sorted(table.vectors.items()):
        if array.ndim == 3:
            layout.sequences[name] = list(array.shape[1:])
        elif array.ndim == 2:
            layout.vectors[name] = int(array.shape[1])
        else:
            raise ModelDataError(f"{table.modality}.{name}: unsupported vector shape {array.shape[1:]}")
        train = (array[train_rows] if len(train_rows) else array[:0, ...]).reshape(-1, array.shape[-1])
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(train, axis=0, dtype=np.float64)) if len(train) else 0.0
            std = np.nan_to_num(np.nanstd(train, axis=0, dtype=np.float64)) if len(train) else 1.0
        mean = np.broadcast_to(mean, (array.shape[-1],))
        std = np.broadcast_to(std, (array.shape[-1],))
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
class Batch:
    """Model inputs for N rows: per-modality inputs plus log age, and labels when known."""
    modalities: dict[str, ModalityInputs]
    log_age: torch.Tensor                       # (N,) float32, log1p(age in days)
    labels: torch.Tensor | None = None          # (N, T) float32 log1p(count), NaN-free
    label_mask: torch.Tensor | None = None      # (N, T) bool: label known

    def __len__(self) -> int:
        return len(self.log_age)

    def index(self, rows: torch.Tensor) -> "Batch":
        return Batch({k: v.index(rows) for k, v in self.modalities.items()}, self.log_age[rows],
                     None if self.labels is None else self.labels[rows],
                     None if self.label_mask is None else self.label_mask[rows])

    def to(self, device: str | torch.device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.modalities.items()}, self.log_age.to(device),
                     None if self.labels is None else self.labels.to(device),
                     None if self.label_mask is None else self.label_mask.to(device))


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


def time_split(publish_s: np.ndarray, labelled: np.ndarray, quantile: float,
               validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> Split:
    """Time-ordered split of labelled rows: publish_time ≥ q-quantile → test; latest part of train → val."""
    if not 0.0 < quantile < 1.0:
        raise ModelDataError(f"split quantile must be in (0, 1), got {quantile}")
    rows = np.flatnonzero(labelled & np.isfinite(publish_s))
    if len(rows) < 10:
        raise ModelDataError(f"only {len(rows)} labelled rows: too few to train and evaluate")
    cutoff = float(np.quantile(publish_s[rows], quantile, method="lower"))
    test = rows[publish_s[rows] >= cutoff]
    train_all = rows[publish_s[rows] < cutoff]
    if len(train_all) < 5 or len(test) == 0:
        raise ModelDataError(f"split at quantile {quantile} leaves {len(train_all)} train / {len(test)} test rows")
    val_cut = float(np.quantile(publish_s[train_all], 1.0 - validation_fraction, method="lower"))
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
    tables = {}
    for modality in (modalities or MODALITIES):
        fs, root = storage.filesystem_and_path(storage.join(features_dir, modality))
        info = fs.get_file_info(root)
        if info.type.name == "NotFound":
            continue
        tables[modality] = read_feature_table(features_dir, modality)
    return tables


def make_batch(layouts: dict[str, ModalityLayout], tables: dict[str, FeatureTable], video_ids: np.ndarray,
               log_ages: np.ndarray, log_labels: np.ndarray | None = None) -> Batch:
    """Model inputs for the given catalog rows (already subset), labels optional."""
    modalities = {name: build_modality_inputs(layout, tables.get(name), video_ids)
                  for name, layout in layouts.items()}
    labels = mask = None
    if log_labels is not None:
        mask_np = np.isfinite(log_labels)
        labels = torch.from_numpy(np.where(mask_np, log_labels, 0.0).astype(np.float32))
        mask = torch.from_numpy(mask_np)
    return Batch(modalities, torch.from_numpy(np.asarray(log_ages, dtype=np.float32)), labels, mask)


def check_featurizers(layouts: dict[str, ModalityLayout], tables: dict[str, FeatureTable]) -> None:
    """Refuse feature tables whose featurizer version differs from the model's (clear message)."""
    for name, layout in layouts.items():
        table = tables.get(name)
        if table is not None and len(table) and table.featurizer != layout.featurizer:
            raise FeatureVersionError(
                f"modality '{name}': features were made by '{table.featurizer}' but the model was trained on "
                f"'{layout.featurizer}'; re-featurize with '{layout.featurizer}' or retrain the model")
