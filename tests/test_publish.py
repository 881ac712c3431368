"""pipelines.publish on a local directory and on a real GCS emulator (an object store: no rename, so
files are copied then deleted): concurrent feature runs never publish an id twice, and publishing a
date partition again replaces it whole."""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from featurizers.core import storage
from featurizers.core.contracts import ERRORS_SCHEMA, PREDICTION_COLUMNS
from featurizers.core.feature_table import parquet_files
from pipelines.publish import (
    CATALOG_ROW_COLUMN,
    partition_id_array,
    publish_features,
    publish_partitions,
    staged_prediction_schema,
    write_table,
)
from pipelines.sample_catalog import generate_rows

FEATURE_SCHEMA = pa.schema([("video_id", pa.string()), ("featurizer", pa.string()), ("written_by", pa.string())])


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path) -> str:
    """A table root on the local filesystem or in a fresh bucket of the GCS emulator."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_bucket")


def read_dir(uri: str) -> pa.Table:
    """Every published Parquet file under `uri`, as a reader sees them."""
    fs, _ = storage.filesystem_and_path(uri)
    return ds.dataset(parquet_files(uri), filesystem=fs, format="parquet").to_table()


def file_names(uri: str) -> list[str]:
    return sorted(path.rsplit("/", 1)[1] for path in parquet_files(uri))


def feature_rows(ids: list[str], run: str, featurizer: str = "text_test@1") -> pa.Table:
    return pa.table({"video_id": ids, "featurizer": [featurizer] * len(ids), "written_by": [run] * len(ids)},
                    schema=FEATURE_SCHEMA)


def rows_by_id(table: pa.Table) -> dict[str, str]:
    ids = table.column("video_id").to_pylist()
    assert len(ids) == len(set(ids)), f"an id appears twice: {sorted(ids)}"
    return dict(zip(ids, table.column("written_by").to_pylist()))


@pytest.fixture
def concurrent_runs(root):
    """Run A has published v1, v2; run B finished meanwhile with v2, v3 staged (plus an empty shard, as
    Beam writes for a modality without rows, and a dead letter)."""
    output, staging = storage.join(root, "features"), storage.join(root, "_staging", "run-b")
    write_table(feature_rows(["v1", "v2"], "run-a"), storage.join(output, "text", "run-a-00000.parquet"))
    write_table(feature_rows(["v2", "v3"], "run-b"), storage.join(staging, "text", "part-00000.parquet"))
    write_table(feature_rows([], "run-b"), storage.join(staging, "text", "part-00001.parquet"))
    error = {"video_id": "v4", "stage": "decode", "error_class": "DecodeError", "message": "bad", "run_id": "run-b"}
    write_table(pa.Table.from_pylist([error], ERRORS_SCHEMA), storage.join(staging, "_errors", "part-00000.parquet"))
    return output, staging


def test_publish_features_keeps_rows_published_meanwhile(concurrent_runs):
    output, staging = concurrent_runs
    published = publish_features(staging, output, ["text", "audio"], "run-b")
    assert published["text"].column("video_id").to_pylist() == ["v3"]
    assert published["audio"].num_rows == 0  # nothing staged for it
    assert published["_errors"].column("video_id").to_pylist() == ["v4"]
    # v2 stays run A's row, once; only run B's new id joins it.
    assert rows_by_id(read_dir(storage.join(output, "text"))) == {"v1": "run-a", "v2": "run-a", "v3": "run-b"}
    assert file_names(storage.join(output, "text")) == ["run-a-00000.parquet", "run-b-00000.parquet"]
    assert read_dir(storage.join(output, "_errors")).column("video_id").to_pylist() == ["v4"]
    assert parquet_files(storage.join(staging, "text")) == []  # moved, not copied


def test_publish_features_supersedes_rows_of_another_featurizer_version(root):
    """An upgraded featurizer's run recomputes rows of the old version: its rows replace them (without
    --force), while rows it did not touch stay as they were."""
    output, staging = storage.join(root, "features"), storage.join(root, "_staging", "run-b")
    write_table(feature_rows(["v1", "v2", "v3"], "run-a", "text_test@1"), storage.join(output, "text", "run-a-00000.parquet"))
    write_table(feature_rows(["v2", "v3"], "run-b", "text_test@2"), storage.join(staging, "text", "part-00000.parquet"))
    published = publish_features(staging, output, ["text"], "run-b")
    assert sorted(published["text"].column("video_id").to_pylist()) == ["v2", "v3"]
    table = read_dir(storage.join(output, "text"))
    assert rows_by_id(table) == {"v1": "run-a", "v2": "run-b", "v3": "run-b"}
    assert dict(zip(table.column("video_id").to_pylist(), table.column("featurizer").to_pylist())) == {
        "v1": "text_test@1", "v2": "text_test@2", "v3": "text_test@2"}


def test_publish_features_with_replace_removes_published_rows_first(concurrent_runs):
    output, staging = concurrent_runs
    published = publish_features(staging, output, ["text"], "run-b", replace=True)
    assert sorted(published["text"].column("video_id").to_pylist()) == ["v2", "v3"]
    assert rows_by_id(read_dir(storage.join(output, "text"))) == {"v1": "run-a", "v2": "run-b", "v3": "run-b"}
    # Run A's file was rewritten in place without v2: no rewrite copy is left beside it.
    assert file_names(storage.join(output, "text")) == ["run-a-00000.parquet", "run-b-00000.parquet"]
    fs, text_dir = storage.filesystem_and_path(storage.join(output, "text"))
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(text_dir))
            if i.base_name.startswith("_")] == []


# ---------------------------------------------------------------- date partitions

@pytest.fixture(scope="module")
def catalog() -> pa.Table:
    table, _ = generate_rows(40, seed=11)
    return table  # not in day order: publishing gathers the rows


def busiest_day(catalog: pa.Table):
    days = pc.value_counts(pc.cast(catalog.column("publish_time"), pa.date32())).to_pylist()
    return max(days, key=lambda d: d["counts"])["values"]


def scored_schema(catalog: pa.Table) -> pa.Schema:
    return pa.schema(list(catalog.schema) + [pa.field(c.name, c.type) for c in PREDICTION_COLUMNS])


def stage_predictions(staged_dir: str, catalog: pa.Table, rows: np.ndarray, run_id: str, value: float) -> None:
    """What a score run stages for the catalog rows at positions `rows`: ids, positions, predictions."""
    schema = staged_prediction_schema(scored_schema(catalog), catalog.schema)
    n = len(rows)
    columns = {"video_id": catalog.column("video_id").take(rows), CATALOG_ROW_COLUMN: pa.array(rows, pa.int64())}
    for f in schema:
        if f.name in columns:
            continue
        if pa.types.is_floating(f.type):
            columns[f.name] = pa.array(np.full(n, value), f.type)
        elif pa.types.is_timestamp(f.type):
            columns[f.name] = pa.array([catalog.column("publish_time")[0].as_py() + timedelta(days=1)] * n, f.type)
        else:
            columns[f.name] = pa.array([run_id] * n, f.type)
    write_table(pa.table(columns, schema=schema), storage.join(staged_dir, f"part-{run_id}-00000.parquet"))


def test_publishing_a_partition_twice_leaves_exactly_the_second_runs_rows(root, catalog):
    day = busiest_day(catalog)
    empty_day = day + timedelta(days=400)  # owned by the run, no rows: an empty partition
    of_day = np.flatnonzero(pc.equal(pc.cast(catalog.column("publish_time"), pa.date32()), day).to_numpy(
        zero_copy_only=False))
    assert len(of_day) >= 2
    output, schema = storage.join(root, "scored"), scored_schema(catalog)

    first = storage.join(root, "_staging", "run-1", "scored")
    stage_predictions(first, catalog, np.arange(catalog.num_rows), "run-1", 1.0)
    assert publish_partitions(first, output, [day], "run-1", schema, catalog) == {day: len(of_day)}
    assert set(read_dir(storage.join(output, f"dt={day}")).column("run_id").to_pylist()) == {"run-1"}

    # The second run scores all but one of the day's rows (the other became a dead letter).
    second = storage.join(root, "_staging", "run-2", "scored")
    stage_predictions(second, catalog, of_day[1:], "run-2", 2.0)
    counts = publish_partitions(second, output, [day, empty_day], "run-2", schema, catalog)
    assert counts == {day: len(of_day) - 1, empty_day: 0}

    partition = read_dir(storage.join(output, f"dt={day}"))
    assert file_names(storage.join(output, f"dt={day}")) == ["part-run-2.parquet"]
    assert partition.schema.equals(schema)
    assert partition.column("video_id").to_pylist() == catalog.column("video_id").take(of_day[1:]).to_pylist()
    assert set(partition.column("run_id").to_pylist()) == {"run-2"}
    assert pc.all(pc.equal(partition.column("pred_views"), 2.0)).as_py()
    # Catalog columns are attached to each prediction from its own catalog row.
    assert partition.column("title").equals(catalog.column("title").take(of_day[1:]))
    assert read_dir(storage.join(output, f"dt={empty_day}")).num_rows == 0
    assert sorted(partition_id_array(output, [day, empty_day]).to_pylist()) == sorted(
        partition.column("video_id").to_pylist())
    # Nothing retired is left; only the run's staging (removed by the job afterwards) holds other paths.
    fs, path = storage.filesystem_and_path(output)
    everything = [i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    assert sorted(p for p in everything if not p.startswith("_staging")) == sorted(
        [f"dt={day}", f"dt={day}/part-run-2.parquet", f"dt={empty_day}", f"dt={empty_day}/part-run-2.parquet"])
    _, ready = storage.filesystem_and_path(storage.join(output, "_staging", "run-2", "partitions", f"dt={day}"))
    assert fs.get_file_info(ready).type == pafs.FileType.NotFound
