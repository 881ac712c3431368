"""A catalog as an observation log (several rows per video, contracts.OBSERVATION_KEY): one row per video.

Featurize reads each video's EARLIEST observation (content features are computed once per video, from what
was known first); score reads each video's LATEST observation at or before its reference time, and never one
after it. Vectorised with polars; pyarrow in, pyarrow out, row order by video_id.
"""
from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from featurizers.core.contracts import LABEL_COLUMNS

__all__ = ["earliest_observations", "latest_observations"]


def _one_per_video(table: pa.Table, observed_at: pa.Array, latest: bool) -> pa.Table:
    """The row of each video with the smallest (or largest) `observed_at`; nulls count as "never observed":
    last in both orders. Single-observation catalogs come back unchanged (same rows, same order)."""
    ids = table.column("video_id")
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    micros = pc.cast(pc.cast(observed_at, pa.timestamp("us", tz="UTC")), pa.int64())
    frame = pl.DataFrame({"video_id": pl.from_arrow(ids), "t": pl.from_arrow(micros),
                          "_row": np.arange(table.num_rows, dtype=np.int64)})
    chosen = (frame.sort(["video_id", "t", "_row"], descending=[False, latest, False], nulls_last=True)
              .unique(subset="video_id", keep="first", maintain_order=True)
              .sort("_row").get_column("_row").to_numpy())
    return table.take(pa.array(chosen))


def earliest_observations(table: pa.Table) -> pa.Table:
    """One row per video: its earliest observation (rows without observed_at only when it has no other)."""
    return _one_per_video(table, table.column("observed_at"), latest=False)


def latest_observations(table: pa.Table, as_of: datetime | None = None) -> pa.Table:
    """One row per video: its latest observation with observed_at <= as_of (any, when as_of is None).

    A video observed only after `as_of` keeps one row with observed_at and every count set to null: a cold
    start, as nothing known later than the reference time may be used."""
    observed = table.column("observed_at")
    if as_of is None:
        return _one_per_video(table, observed, latest=True)
    later = pc.fill_null(pc.greater(observed, pa.scalar(as_of, pa.timestamp("us", tz="UTC"))), False)
    usable = pc.if_else(later, pa.nulls(table.num_rows, observed.type), observed)
    chosen = _one_per_video(table, usable, latest=True)
    hide = pc.fill_null(pc.greater(chosen.column("observed_at"), pa.scalar(as_of, pa.timestamp("us", tz="UTC"))),
                        False)
    if not pc.any(hide).as_py():
        return chosen
    for name in LABEL_COLUMNS:
        index = chosen.schema.get_field_index(name)
        column = chosen.column(name)
        chosen = chosen.set_column(index, chosen.schema.field(name),
                                   pc.if_else(hide, pa.nulls(chosen.num_rows, column.type), column))
    return chosen
