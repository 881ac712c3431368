"""Shards of the score join, Beam-free: a stable hash of video_id cuts every side of the join into the
same shards, so one shard's catalog rows and feature rows meet in one GroupByKey group.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["SHARD_SEED", "SHARD_ROWS", "SHARD_BYTES", "default_shards", "shard_of", "split_into_shards",
           "keep_featurizer"]

SHARD_SEED = 20261128
SHARD_ROWS = 20_000
# Feature bytes per joined shard, at most. A shard is one Beam element: on the multi_processing
# DirectRunner, 20k-row text+meta shards (~72 MB pickled) were silently dropped (0 rows scored, no
# error), while ~15 MB shards went through; 8 MB leaves a margin.
SHARD_BYTES = 8 << 20


def default_shards(rows: int, model) -> int:
    """Join shards for `rows` rows: at most SHARD_ROWS rows and about SHARD_BYTES of features each."""
    floats = sum(layout.vector_width + sum(int(np.prod(shape)) for shape in layout.sequences.values())
                 + len(layout.numeric) + len(layout.categorical) for layout in model.layouts.values())
    rows_per_shard = max(1, min(SHARD_ROWS, SHARD_BYTES // (4 * floats + 100)))
    return max(1, -(-rows // rows_per_shard))


def shard_of(video_ids: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """Stable shard per video_id (same on both sides of the join, in every worker)."""
    series = pl.Series(pa.array(video_ids) if not isinstance(video_ids, pa.ChunkedArray) else video_ids)
    return (series.cast(pl.String).hash(seed=SHARD_SEED) % shards).to_numpy().astype(np.int64)


def split_into_shards(table: pa.Table, shards: int, side: str) -> Iterable[tuple[int, tuple[str, pa.Table]]]:
    """(shard, (side, rows of that shard)) for each shard `table` has rows in."""
    if table.num_rows == 0:
        return
    keys = shard_of(table.column("video_id"), shards)
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    bounds = np.flatnonzero(np.diff(keys_sorted)) + 1
    for chunk in np.split(order, bounds):
        yield int(keys[chunk[0]]), (side, table.take(pa.array(chunk)))


def keep_featurizer(table: pa.Table, featurizer: str) -> pa.Table:
    """Only rows made by the model's featurizer version join (others would be refused by the model)."""
    return table.filter(pc.equal(table.column("featurizer"), featurizer))
