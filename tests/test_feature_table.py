"""The feature-table format: files sorted by video_id in small row groups, read by video_id range."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from featurizers.core import feature_table
from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import (FEATURE_ROW_GROUP_ROWS, feature_table_to_arrow, id_range_filter,
                                            id_ranges, is_sorted_by_id, read_feature_table, sort_feature_files,
                                            write_sorted)

SPEC = FeatureSpec(modality="text", name="text_test", version="1", shapes={"embedding": (8,)},
                   scalars=(("n_words", pa.int32()),))


def shuffled_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"v{i:06d}" for i in rng.permutation(n)]
    return feature_table_to_arrow(SPEC, ids, {"embedding": rng.standard_normal((n, 8)).astype(np.float32)},
                                  {"n_words": rng.integers(0, 30, n)})


@pytest.fixture
def staged(tmp_path) -> list[str]:
    """Three unsorted staged shards (as Beam leaves them), 10k rows in all."""
    table = shuffled_table(10_000)
    paths = []
    for i, start in enumerate(range(0, 10_000, 4_000)):
        path = str(tmp_path / f"part-{i}.parquet")
        pq.write_table(table.slice(start, 4_000), path)
        paths.append(path)
    return paths


def rows_of(paths: list[str]) -> pa.Table:
    return ds.dataset(paths, format="parquet").to_table().sort_by("video_id")


@pytest.mark.parametrize("in_memory_bytes", [feature_table.IN_MEMORY_SORT_BYTES, 50_000])
def test_write_sorted_keeps_every_row_sorted_in_small_row_groups(staged, tmp_path, monkeypatch, in_memory_bytes):
    # 50 kB forces the bounded-memory path: split by id range into temporary files, sort each, append.
    monkeypatch.setattr(feature_table, "IN_MEMORY_SORT_BYTES", in_memory_bytes)
    out = str(tmp_path / "out" / "run-1.parquet")
    (tmp_path / "out").mkdir()
    assert write_sorted(staged, out, pafs.LocalFileSystem()) == 10_000
    written = pq.read_table(out)
    ids = written.column("video_id").to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 10_000
    assert written.sort_by("video_id").equals(rows_of(staged).cast(written.schema))
    metadata = pq.ParquetFile(out).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert max(sizes) <= FEATURE_ROW_GROUP_ROWS and sum(sizes) == 10_000
    assert is_sorted_by_id(pq.read_schema(out))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run-1.parquet"]  # no temporary left
    # The spec's metadata (featurizer id, shapes) survives: readers still see the vectors' shapes.
    assert read_feature_table(str(tmp_path), "out").vectors["embedding"].shape == (10_000, 8)


def test_a_range_read_touches_only_its_row_groups(staged, tmp_path):
    out = str(tmp_path / "sorted.parquet")
    write_sorted(staged, out, pafs.LocalFileSystem())
    fragment = next(iter(ds.dataset(out, format="parquet").get_fragments()))
    ranges = id_ranges(pa.array([f"v{i:06d}" for i in range(10_000)]), 1_000)
    assert len(ranges) == 10 and ranges[0][0] is None and ranges[-1][1] is None
    seen = []
    for low, high in ranges:
        wanted = id_range_filter(low, high)
        groups = fragment.split_by_row_group(filter=wanted)
        assert len(groups) <= 2, f"range {low}..{high} read {len(groups)} of 5 row groups"
        seen += ds.dataset(out, format="parquet").to_table(filter=wanted).column("video_id").to_pylist()
    assert seen == sorted(seen) and len(seen) == 10_000   # the ranges cover every id exactly once


def test_id_ranges_cover_ids_with_nulls_and_duplicates():
    ranges = id_ranges(pa.chunked_array([["b", "a", None], ["c", "a", "d"]]), 2)
    assert ranges == [(None, "c"), ("c", None)]
    assert id_ranges(pa.array([], pa.string()), 5) == [(None, None)]


def test_old_unsorted_files_are_sorted_once_in_place(tmp_path):
    features = tmp_path / "features"
    (features / "text").mkdir(parents=True)
    pq.write_table(shuffled_table(3_000, seed=1), features / "text" / "old-00000.parquet")
    before = read_feature_table(str(features), "text")
    assert sort_feature_files(str(features)) == {"text": 1}
    assert sort_feature_files(str(features)) == {}          # idempotent
    path = features / "text" / "old-00000.parquet"
    assert is_sorted_by_id(pq.read_schema(path))
    after = read_feature_table(str(features), "text")
    order = np.argsort(before.video_ids)
    assert after.video_ids.tolist() == before.video_ids[order].tolist()
    np.testing.assert_array_equal(after.vectors["embedding"], before.vectors["embedding"][order])
    assert sorted(p.name for p in (features / "text").iterdir()) == ["old-00000.parquet"]
