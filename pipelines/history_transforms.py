"""Beam side of creator-history features: catalog rows keyed by author_id → GroupByKey → per-author
computation (featurizers.history) → feature rows; plus where featurize keeps the age curve for scoring.

The age curve is fitted in the driver (a few numbers) and travels as a parameter, so every worker
normalises ages identically; the per-author step is the vectorised featurizer run on one author's rows.
"""
from __future__ import annotations

import json
import zlib
from datetime import datetime
from typing import Iterable, Mapping

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurizers.core import storage
from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import parquet_files
from featurizers.history import (
    QUERY_COLUMNS,
    SOURCE_COLUMNS,
    AgeCurve,
    author_history_rows,
    combine_sources,
    curve_from_spec_config,
    fit_age_curve,
    history_spec,
    no_history_row,
)
from pipelines import publish
from pipelines.catalog import read_catalog
from pipelines.transforms import CountAndLog

__all__ = ["author_bucket", "CreatorHistory", "curves_dir", "prepare_history", "find_history_spec",
           "stage_history_inputs"]

QUERY, SOURCE, BOTH = "q", "s", "qs"


def _slim(row: Mapping, columns: tuple[str, ...]) -> dict:
    """Only the columns history needs cross the shuffle (captions and hashtags would only cost bytes)."""
    return {c: row.get(c) for c in columns}


def author_bucket(author_id: str, buckets: int) -> int:
    """A stable bucket per author (crc32: Python's hash() differs between worker processes)."""
    return zlib.crc32(author_id.encode()) % buckets


def _tag(row: Mapping, tag: str, buckets: int):
    columns = QUERY_COLUMNS if tag == QUERY else SOURCE_COLUMNS
    author = row.get("author_id")
    return (None if author is None else author_bucket(author, buckets)), (tag, _slim(row, columns))


def _bucket_rows(keyed: tuple[int, Iterable[tuple[str, dict]]], curve_json: dict):
    """One bucket's tagged rows (every row of each of its authors) → the feature rows of its query rows."""
    _bucket, tagged = keyed
    query, source = [], []
    for tag, row in tagged:
        if tag in (QUERY, BOTH):
            query.append(row)
        if tag in (SOURCE, BOTH):
            source.append(row)
    if query:
        yield from author_history_rows(query, source, AgeCurve.from_json(curve_json))


class CreatorHistory(beam.PTransform):
    """Catalog row dicts → history feature row dicts (one per query row), grouped by author_id.

    Apply to one PCollection (each row is both a query and part of the history source: featurize) or to
    {"query": rows_to_score, "source": history_rows} (score). Source video_ids must be unique
    (featurizers.history.combine_sources). Query rows without author_id get the explicit no-history row.

    The GroupByKey is on a stable bucket of author_id (crc32 mod `buckets`), so every row of an author meets
    in one group and each group is computed by the vectorised featurizer: grouping by the bare author id
    would cost one small-table computation (~10 ms) per author, hours for a million creators.
    """

    def __init__(self, curve: AgeCurve, expected_rows: int = 0, buckets: int = 256):
        super().__init__()
        self._curve_json = curve.to_json()   # plain JSON travels to workers without pickling surprises
        self._expected = expected_rows       # for progress logs only
        self._buckets = buckets

    def expand(self, rows):
        buckets = self._buckets
        if isinstance(rows, Mapping):
            tagged = ((rows["query"] | "TagQuery" >> beam.Map(_tag, QUERY, buckets),
                       rows["source"] | "TagSource" >> beam.Map(_tag, SOURCE, buckets))
                      | "AllTagged" >> beam.Flatten())
        else:
            tagged = rows | "TagRows" >> beam.Map(_tag, BOTH, buckets)
        curve_json = self._curve_json
        # Built once here: the row of "no history" differs between videos only in video_id.
        no_history = no_history_row("", AgeCurve.from_json(curve_json))
        with_author = tagged | "WithAuthor" >> beam.Filter(lambda kv: kv[0] is not None)
        without_author = (tagged
                          | "WithoutAuthor" >> beam.Filter(lambda kv: kv[0] is None and kv[1][0] != SOURCE)
                          | "NoHistory" >> beam.Map(lambda kv: {**no_history, "video_id": kv[1][1]["video_id"]}))
        per_author = (with_author
                      | "GroupByAuthorBucket" >> beam.GroupByKey()
                      | "PerAuthorHistory" >> beam.FlatMap(_bucket_rows, curve_json))
        return ((per_author, without_author)
                | "HistoryRows" >> beam.Flatten()
                | "CountHistory" >> beam.ParDo(CountAndLog("history", self._expected)))


# ---------------------------------------------------------------- the curve, driver side

def curves_dir(features_dir: str) -> str:
    # "_" keeps it out of the feature readers (they skip _ and . names).
    return storage.join(features_dir, "history", "_curves")


def age_curve_before(catalog: pa.Table, curve_before: datetime | None = None) -> AgeCurve:
    """The age curve fitted on the catalog's labelled rows published before curve_before (all when None)."""
    source = catalog
    if curve_before is not None:
        source = catalog.filter(pc.less(catalog.column("publish_time"),
                                        pa.scalar(curve_before, catalog.schema.field("publish_time").type)))
    return fit_age_curve(source)


def prepare_history(catalog: pa.Table, features_dir: str, curve_before: datetime | None = None) -> FeatureSpec:
    """Fit the age curve on the catalog's labelled rows, keep it beside the features, return the spec.

    curve_before: fit only on rows published before this instant. For an evaluation, pass the start of
    the test period, so that the curve (part of every row's features) has not seen the test labels.
    The curve is kept as DIR/history/_curves/<featurizer id>.json: scoring needs the very curve a model
    was trained with, even after a later featurize run refitted it on more labels.
    """
    spec = history_spec(age_curve_before(catalog, curve_before))
    storage.write_bytes(storage.join(curves_dir(features_dir), f"{spec.featurizer_id}.json"),
                        json.dumps(spec.config, indent=1, sort_keys=True).encode())
    return spec


def find_history_spec(features_dir: str, featurizer_id: str) -> FeatureSpec:
    """The history spec (with its age curve) of the given featurizer version, from the features dir."""
    path = storage.join(curves_dir(features_dir), f"{featurizer_id}.json")
    fs, root = storage.filesystem_and_path(path)
    config = None
    if fs.get_file_info(root).type.name == "File":
        with fs.open_input_stream(root) as handle:
            config = json.loads(handle.read())
    else:   # older layouts: the curve is also in each history file's schema metadata
        for file in parquet_files(storage.join(features_dir, "history")):
            metadata = pq.read_schema(file, filesystem=fs).metadata or {}
            if metadata.get(b"popcast.featurizer", b"").decode() == featurizer_id:
                config = json.loads(metadata[b"popcast.config"])
                break
    if config is None:
        raise FileNotFoundError(f"the model uses history features '{featurizer_id}' but their age curve is not "
                                f"under {features_dir}/history (run `popcast featurize --modalities ...,history` "
                                "on the training catalog into that features directory)")
    spec = history_spec(curve_from_spec_config(config))
    if spec.featurizer_id != featurizer_id:
        raise ValueError(f"age curve at {path} hashes to '{spec.featurizer_id}', not '{featurizer_id}'")
    return spec


# ---------------------------------------------------------------- scoring

def stage_history_inputs(catalog: pa.Table, todo: pa.Table, history_path: str | None, features_dir: str,
                         featurizer_id: str, staging: str) -> tuple[str, str, FeatureSpec]:
    """Write the score job's history query rows (the rows being scored) and history source rows (the whole
    catalog being scored, plus --history: an earlier catalog or scored table) under staging/_input/.

    Returns (query path, source path, the model's history spec with its age curve). The same strictly-
    earlier rule applies as in featurize, relative to each scored video's publish time.
    """

    spec = find_history_spec(features_dir, featurizer_id)
    sources = [catalog]
    if history_path:
        sources.append(read_catalog(history_path))   # a scored table is a catalog plus prediction columns
    query_path = storage.join(staging, "_input", "history_query.parquet")
    source_path = storage.join(staging, "_input", "history_source.parquet")
    publish.write_table(todo.select(list(QUERY_COLUMNS)), query_path)
    publish.write_table(combine_sources(*sources), source_path)
    return query_path, source_path, spec
