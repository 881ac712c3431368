"""The featurize job's retrieval stage: caption-neighbour features (featurizers.retrieval) for every catalog
video, from the caption embeddings already published in the features directory.

It runs on the driver after the Beam graph, because every video's neighbours may be any earlier video of the
catalog: one pass of blocked matrix products (linear in the catalog thanks to the candidate window) rather
than an all-pairs shuffle. Like creator history it depends on other videos' labels, so it is recomputed for
every video on each run and published with replace.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurizers.core import storage
from featurizers.core.contracts import TARGETS, FeatureSpec
from featurizers.core.feature_table import featurized_ids, modality_path, read_columns
from featurizers.history import curve_from_spec_config
from featurizers.retrieval import label_residuals, neighbour_features, retrieval_spec
from pipelines import publish
from pipelines.history_transforms import age_curve_before

__all__ = ["caption_vectors", "check_caption_source", "retrieval_table", "stage_retrieval"]

log = logging.getLogger(__name__)
US_PER_DAY = 86_400 * 1_000_000


def check_caption_source(features_dir: str, text_spec: FeatureSpec, text_in_this_run: bool) -> None:
    """Before any work: the retrieval modality needs caption embeddings, from this run or stored ones."""
    if text_in_this_run:
        return
    if not len(featurized_ids(features_dir, {"text": text_spec})["text"]):
        raise ValueError(f"no caption embeddings by {text_spec.featurizer_id} under {features_dir}/text: the "
                         "retrieval modality needs the text modality (add text to --modalities, same --text-model)")


def caption_vectors(features_dir: str, text_featurizer: str, video_ids: pa.Array) -> np.ndarray:
    """(N, D) float32 caption embeddings of `video_ids` (in that order) written by `text_featurizer`; NaN rows
    for videos without one."""
    stored = read_columns(modality_path(features_dir, "text"), ["video_id", "featurizer", "embedding"])
    if stored is not None:
        stored = stored.filter(pc.equal(stored.column("featurizer"), text_featurizer))
    if stored is None or stored.num_rows == 0:
        raise ValueError(f"no caption embeddings by {text_featurizer} under {features_dir}/text: the retrieval "
                         "modality needs the text modality (add text to --modalities, same --text-model)")
    embedding = stored.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    matrix = embedding.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    position = pc.index_in(video_ids, value_set=stored.column("video_id").combine_chunks())
    found = pc.is_valid(position).to_numpy(zero_copy_only=False)
    out = np.full((len(video_ids), dim), np.nan, dtype=np.float32)
    out[found] = matrix[position.to_numpy(zero_copy_only=False)[found].astype(np.int64)]
    return out


def _publish_us(catalog: pa.Table, name: str) -> np.ndarray:
    values = pc.cast(catalog.column(name).cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return values.to_numpy(zero_copy_only=False).astype(np.float64)


def retrieval_table(catalog: pa.Table, vectors: np.ndarray, spec: FeatureSpec) -> pa.Table:
    """Retrieval features of every catalog row (one per video: the catalog's earliest observations), in
    spec.schema(). The catalog's own labelled rows are the sources."""
    curve = curve_from_spec_config(spec.config)
    publish_us = _publish_us(catalog, "publish_time")
    observed_us = _publish_us(catalog, "observed_at") if "observed_at" in catalog.column_names \
        else np.full(catalog.num_rows, np.nan)
    log_labels = np.column_stack([np.log1p(pc.cast(catalog.column(t), pa.float64())
                                           .to_numpy(zero_copy_only=False)) for t in TARGETS])
    residuals = label_residuals(log_labels, (observed_us - publish_us) / US_PER_DAY, curve)
    publish_int = publish_us.astype(np.int64)
    features = neighbour_features(publish_int, vectors, publish_int, vectors, residuals,
                                  k=spec.config["k"], max_candidates=spec.config["max_candidates"])
    columns = {"video_id": catalog.column("video_id"),
               "featurizer": pa.array([spec.featurizer_id] * catalog.num_rows, pa.string()), **features}
    schema = spec.schema()
    return pa.table([pa.array(np.asarray(columns[f.name]), f.type) if f.name in features
                     else columns[f.name] for f in schema], schema=schema)


def stage_retrieval(catalog: pa.Table, features_dir: str, staging: str, text_featurizer: str, run_id: str,
                    curve_before: datetime | None = None) -> FeatureSpec:
    """Compute the retrieval features of every catalog video and stage them under STAGING/retrieval/ (the job
    publishes them with the other modalities). The age curve is fitted as creator history's."""
    start = time.time()
    spec = retrieval_spec(age_curve_before(catalog, curve_before), text_featurizer)
    vectors = caption_vectors(features_dir, text_featurizer, catalog.column("video_id").combine_chunks())
    table = retrieval_table(catalog, vectors, spec)
    publish.write_table(table, storage.join(staging, "retrieval", f"part-{run_id}.parquet"))
    log.info("retrieval: %d videos, %d with earlier neighbours, %.1f s", table.num_rows,
             int(np.count_nonzero(table.column("has_neighbours").to_numpy())), time.time() - start)
    return spec
