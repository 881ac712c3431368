"""Beam pieces of the score job: shards read straight from Parquet sorted by video_id, per-row validation, and
the RunInference handler that runs the fusion model on a whole shard at once (one model per worker process).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from featurizers.core import storage
from featurizers.core.contracts import DEFAULT_FEATURIZE_MODALITIES
from featurizers.core.feature_table import feature_table_from_arrow, id_range_filter
from featurizers.text import TEXT_MODEL_OF_FEATURIZER
from pipelines.memory import bound_process_memory, release_memory
from pipelines.transforms import ERRORS_TAG, NAMESPACE, FeaturizeConfig, error_row, feature_specs

if TYPE_CHECKING:   # the driver never imports it: model.artifact brings torch
    from model.artifact import LoadedModel

__all__ = [
    "CATALOG_SIDE",
    "JoinedShard",
    "ShardSources",
    "ReadShard",
    "ScoreHandler",
    "ValidateShard",
    "on_the_fly_config",
]

CATALOG_SIDE = "catalog"


@dataclass
class JoinedShard:
    """One shard's catalog rows and, per modality, the feature rows that share its video_ids."""
    catalog: pa.Table
    features: dict[str, pa.Table] = field(default_factory=dict)

    @staticmethod
    def assemble(keyed: tuple[int, Iterable[tuple[str, pa.Table]]]) -> tuple[int, "JoinedShard | None"]:
        shard, parts = keyed
        by_side: dict[str, list[pa.Table]] = {}
        for side, table in parts:
            by_side.setdefault(side, []).append(table)
        catalogs = by_side.pop(CATALOG_SIDE, [])
        catalog = pa.concat_tables(catalogs, promote_options="permissive") if catalogs else None
        features = {m: pa.concat_tables(ts, promote_options="permissive") for m, ts in by_side.items()}
        return shard, (JoinedShard(catalog, features) if catalog is not None else None)


@dataclass(frozen=True)
class ShardSources:
    """Where a shard's rows come from: the staged rows to score and, per modality, the Parquet files of its
    features (stored, and made by this run) with the featurizer version the model needs. The files are
    sorted by video_id (feature_table.write_sorted), so a shard reads only the row groups of its ids."""
    rows: str
    features: dict[str, tuple[list[str], str]]   # modality -> (files, name@version)


class ReadShard(beam.DoFn):
    """A video_id range [low, high) → (low, JoinedShard) of its rows to score and their feature rows.

    Only the ranges travel through the runner; each worker reads its rows straight from Parquet (row groups
    outside the range are skipped by their statistics), so no feature vector is ever shuffled and an
    element holds one shard's rows at most.
    """

    def __init__(self, sources: ShardSources):
        self._sources = sources
        self._datasets: dict[str, ds.Dataset] = {}

    def setup(self):
        bound_process_memory()   # a worker reads shard after shard: freed memory must go back
        # Built once per worker: opening the datasets reads every file's footer.
        self._rows = _dataset([self._sources.rows])
        self._datasets = {m: _dataset(files) for m, (files, _) in self._sources.features.items() if files}
        self._shards_read = Metrics.counter(NAMESPACE, "shards_read")

    def process(self, id_range: tuple[str | None, str | None]) -> Iterable[tuple[str, JoinedShard]]:
        in_range = id_range_filter(*id_range)
        rows = self._rows.to_table(filter=in_range)
        if rows.num_rows == 0:
            return
        features = {}
        for modality, dataset in self._datasets.items():
            same_version = pc.field("featurizer") == self._sources.features[modality][1]
            features[modality] = dataset.to_table(filter=same_version if in_range is None else in_range & same_version)
        self._shards_read.inc()
        yield id_range[0] or "", JoinedShard(rows, features)


def _dataset(uris: list[str]) -> ds.Dataset:
    filesystem, _ = storage.filesystem_and_path(uris[0])
    return ds.dataset([storage.filesystem_and_path(u)[1] for u in uris], filesystem=filesystem, format="parquet")


class ValidateShard(beam.DoFn):
    """Per-row checks before the model: one bad row becomes a dead letter, not a failed batch."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, keyed):
        shard, joined = keyed
        if joined is None:  # a shard holding only feature rows of other dates
            return
        bad = np.zeros(joined.catalog.num_rows, dtype=bool)
        reasons: dict[int, str] = {}
        ids = joined.catalog.column("video_id")
        for name in ("video_id", "publish_time"):
            for i in np.flatnonzero(joined.catalog.column(name).is_null().to_numpy(zero_copy_only=False)):
                bad[i] = True
                reasons[int(i)] = f"{name} is null"
        for modality, table in joined.features.items():
            for column in table.column_names:
                col = table.column(column)
                if not pa.types.is_fixed_size_list(col.type) or table.num_rows == 0:
                    continue
                flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size) \
                    if col.null_count == 0 else None
                if flat is None:
                    continue
                infinite = np.isinf(flat).any(axis=1)
                if infinite.any():
                    bad_ids = pc.is_in(ids, table.column("video_id").filter(pa.array(infinite)))
                    for i in np.flatnonzero(bad_ids.to_numpy(zero_copy_only=False)):
                        bad[i] = True
                        reasons[int(i)] = f"{modality}.{column} has infinite values"
        for i in np.flatnonzero(bad):
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(ids[int(i)].as_py(), "validate", "InvalidRow",
                                                                 reasons[int(i)], self._run_id))
        if bad.any():
            joined = JoinedShard(joined.catalog.filter(pa.array(~bad)), joined.features)
        if joined.catalog.num_rows:
            yield shard, joined


class ScoreHandler(ModelHandler[JoinedShard, PredictionResult, "LoadedModel"]):
    """RunInference handler: a JoinedShard in, a PredictionResult out whose `inference` is the shard's
    rows with predictions attached (an Arrow table in `scored_schema`).

    Args:
      model_dir: a model directory written by `popcast train` (local or gs://).
      horizon_days: the video age at which counts are predicted.
      run_id: written in every output row.
      scored_schema: the output table's schema; each column comes from the shard's catalog (same name),
        from the predictions, or is one of the per-run columns (horizon_days, model_version,
        featurizer_versions, scored_at, run_id). The score job passes its staged prediction schema.
      device: torch device of the model.
    """

    def __init__(self, model_dir: str, horizon_days: float, run_id: str, scored_schema: pa.Schema,
                 device: str = "cpu"):
        super().__init__()
        self._model_dir = model_dir
        self._horizon_days = horizon_days
        self._run_id = run_id
        self._schema = scored_schema
        self._device = device

    def load_model(self) -> LoadedModel:
        # Imported here, in the worker that scores: model.artifact brings torch, which the driver lacks.
        from model.artifact import load_model
        return load_model(self._model_dir, device=self._device)

    def run_inference(self, batch: Sequence[JoinedShard], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        """One PredictionResult per shard, each shard predicted as one model batch (see _predict).

        Args:
          batch: joined shards (one per call: batch_elements_kwargs).
          model: the model built by load_model.
          inference_args: unused; the horizon is fixed per job.
        """
        for joined in batch:
            tables = {}
            for modality, layout in model.layouts.items():
                table = joined.features.get(modality)
                if table is None or table.num_rows == 0:
                    continue
                metadata = dict(table.schema.metadata or {})
                # Sequence shapes come from the model when a reader dropped the schema metadata.
                if b"popcast.shapes" not in metadata and layout.sequences:
                    import json
                    metadata[b"popcast.shapes"] = json.dumps(layout.sequences).encode()
                metadata.setdefault(b"popcast.featurizer", layout.featurizer.encode())
                tables[modality] = feature_table_from_arrow(table, modality, metadata)
            # The Arrow feature rows are copied into `tables` by now: let them go before the model runs.
            joined.features.clear()
            table = None
            scored = self._attach(joined.catalog, self._predict(joined.catalog, tables, model), model)
            del tables
            release_memory()   # the shard's feature matrices and activations are garbage now
            yield PredictionResult(joined, scored)

    def _predict(self, catalog: pa.Table, tables: dict, model) -> dict[str, np.ndarray]:
        """model.predict with the whole shard as one batch: smaller batches would each re-join the
        shard's feature tables (a polars hash join per batch) and run smaller GEMMs."""
        return model.predict(catalog, tables, float(self._horizon_days), batch_size=catalog.num_rows)

    def _attach(self, catalog: pa.Table, predictions: dict[str, np.ndarray], model) -> pa.Table:
        n = catalog.num_rows
        columns = {name: catalog.column(name) for name in catalog.column_names}
        for f in self._schema:
            if f.name in columns:
                continue
            if f.name in predictions:
                columns[f.name] = pa.array(predictions[f.name], f.type)
        # A nowcasting model says per row which observation it started from and at what age it predicts.
        columns["horizon_days"] = pa.array(predictions["horizon_days"] if "horizon_days" in predictions
                                           else np.full(n, self._horizon_days, dtype=np.float64), pa.float64())
        if "input_observed_at" not in predictions:
            columns["input_observed_at"] = pa.nulls(n, pa.timestamp("us", tz="UTC"))
        # Constant columns are built by Arrow (pa.repeat), not from n-element Python lists.
        columns["model_version"] = pa.repeat(pa.scalar(model.version, pa.string()), n)
        columns["featurizer_versions"] = pa.repeat(
            pa.scalar(",".join(sorted(model.featurizers.values())), pa.string()), n)
        columns["scored_at"] = pa.repeat(pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC")), n)
        columns["run_id"] = pa.repeat(pa.scalar(self._run_id, pa.string()), n)
        return pa.Table.from_pydict({f.name: columns[f.name] for f in self._schema}, schema=self._schema)

    def get_num_bytes(self, batch: Sequence[JoinedShard]) -> int:
        """Arrow buffer bytes of the shards' catalog and feature tables.

        Overridden because the base class pickles every batch a second time just to measure it, and a
        shard holds thousands of rows of every modality.
        """
        return sum(joined.catalog.nbytes + sum(table.nbytes for table in joined.features.values())
                   for joined in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}  # a shard is already a batch of rows


def on_the_fly_config(model, run_id: str, device: str, media_roots: tuple[str, ...] = ()
                      ) -> tuple[FeaturizeConfig, dict]:
    """The featurize config that reproduces the model's featurizers (checked against their versions)."""
    modalities = tuple(m for m in DEFAULT_FEATURIZE_MODALITIES if m in model.layouts)
    frames = 16
    if "visual" in model.layouts and model.layouts["visual"].sequences:
        frames = int(next(iter(model.layouts["visual"].sequences.values()))[0])
    text_name = model.featurizers.get("text", "").split("@")[0]
    config = FeaturizeConfig(modalities=modalities, frames=frames, device=device, run_id=run_id,
                             text_model=TEXT_MODEL_OF_FEATURIZER.get(text_name), media_roots=media_roots)
    return config, feature_specs(config)
