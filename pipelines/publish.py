"""Staging and publishing of job outputs, Beam-free: a run writes under its own prefix and only a finished
run moves its files into the published datasets, so a crashed run publishes nothing and no id appears twice.
"""
from __future__ import annotations

import json
import logging
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from featurizers.core import storage
from featurizers.core.contracts import ERRORS_SCHEMA
from featurizers.core.feature_table import FEATURE_ROW_GROUP_ROWS, parquet_files, write_sorted

__all__ = ["CATALOG_ROW_COLUMN", "dictionary_columns", "write_table", "read_table", "publish_features", "write_run_summary",
           "remove_staging", "staged_prediction_schema", "publish_partitions", "partition_id_array",
           "publish_errors"]

_EPOCH_DAY = date(1970, 1, 1)
# Staged score rows carry their row number in the scored catalog, so publishing attaches the catalog
# columns by position (a gather) rather than by a hash join on video_id.
CATALOG_ROW_COLUMN = "_catalog_row"


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding in Parquet: strings (ids, versions repeat). Dictionary encoding
    on float columns makes writes ~10x slower for almost no size gain (see RESEARCH.md)."""
    return [f.name for f in schema
            if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
            or (pa.types.is_list(f.type) and pa.types.is_string(f.type.value_type))]


def write_table(table: pa.Table, uri: str) -> None:
    fs, path = storage.filesystem_and_path(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, use_dictionary=dictionary_columns(table.schema))


def read_table(uri: str) -> pa.Table:
    """A table written by write_table, as it was written (local or gs://)."""
    fs, path = storage.filesystem_and_path(uri)
    return pq.read_table(path, filesystem=fs)


def _move(fs: pafs.FileSystem, source: str, target: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(source, target)  # atomic rename on one local filesystem
    else:  # object stores: copy then delete; readers list only *.parquet, so a copy is whole or absent
        fs.copy_file(source, target)
        fs.delete_file(source)


def publish_features(staging: str, output: str, modalities: list[str], run_id: str,
                     replace: bool = False) -> dict[str, pa.Table]:
    """Move a finished run's staged files into OUTPUT/<modality>/ and OUTPUT/_errors/.

    Without `replace`, staged rows whose video_id got published meanwhile (by a concurrent run) by the same
    featurizer version are dropped, while published rows of another version (an upgraded featurizer's run)
    are superseded by the staged ones; with `replace` (--force), published rows for the staged ids are
    removed first. Returns,
    per modality, the published rows' video_ids (and the dead letters under "_errors").
    """
    fs, _ = storage.filesystem_and_path(output)
    published: dict[str, pa.Table] = {}
    for modality in [*modalities, "_errors"]:
        staged_files = parquet_files(storage.join(staging, modality))
        dest = storage.join(output, modality)
        _, dest_path = storage.filesystem_and_path(dest)
        fs.create_dir(dest_path, recursive=True)
        if not staged_files:
            published[modality] = pa.table({"video_id": pa.array([], pa.string())}) \
                if modality != "_errors" else ERRORS_SCHEMA.empty_table()
            continue
        staged = ds.dataset(staged_files, filesystem=fs, format="parquet")
        staged_ids = staged.to_table(columns=["video_id"]).column("video_id")
        if modality == "_errors":
            published[modality] = staged.to_table()
        else:
            existing_files = parquet_files(dest)
            if existing_files:
                existing = ds.dataset(existing_files, filesystem=fs, format="parquet")
                if replace:
                    _drop_ids(fs, existing_files, staged_ids)
                else:
                    current_ids = _superseded_dropped(fs, existing, existing_files, staged, staged_ids)
                    clash = pc.is_in(staged_ids, current_ids)
                    if pc.any(clash).as_py():
                        logging.warning("%s: %d staged rows were published meanwhile; keeping the published ones",
                                        modality, pc.sum(clash).as_py())
                        kept = staged.to_table().filter(pc.invert(clash))
                        for f in staged_files:
                            fs.delete_file(f)
                        staged_files = [f"{staged_files[0].rsplit('/', 1)[0]}/dedup-{run_id}.parquet"]
                        pq.write_table(kept, staged_files[0], filesystem=fs)
                        staged_ids = kept.column("video_id")
            published[modality] = pa.table({"video_id": staged_ids})
        if modality == "_errors":
            for i, source in enumerate(staged_files):
                if pq.ParquetFile(source, filesystem=fs).metadata.num_rows == 0:
                    continue  # Beam writes an empty shard when a modality had no rows
                _move(fs, source, f"{dest_path}/{run_id}-{i:05d}.parquet")
        else:   # one file per run and modality, sorted by video_id (feature_table.write_sorted)
            write_sorted(staged_files, f"{dest_path}/{run_id}-00000.parquet", fs)
            for source in staged_files:
                fs.delete_file(source)
    return published


def _superseded_dropped(fs: pafs.FileSystem, existing: ds.Dataset, existing_files: list[str],
                        staged: ds.Dataset, staged_ids: pa.ChunkedArray) -> pa.ChunkedArray:
    """Drop the published rows of the staged ids that another featurizer version wrote (the run recomputed
    them because their version is out of date) and return the ids published by the staged version(s)."""
    if "featurizer" not in existing.schema.names or "featurizer" not in staged.schema.names:
        return existing.to_table(columns=["video_id"]).column("video_id")
    published = existing.to_table(columns=["video_id", "featurizer"])
    versions = pc.unique(staged.to_table(columns=["featurizer"]).column("featurizer").combine_chunks())
    same_version = pc.is_in(published.column("featurizer"), versions)
    superseded = published.filter(pc.invert(same_version)).column("video_id")
    if len(superseded):
        _drop_ids(fs, existing_files, pc.filter(staged_ids, pc.is_in(staged_ids, superseded)))
    return published.filter(same_version).column("video_id")


def _drop_ids(fs: pafs.FileSystem, files: list[str], ids: pa.ChunkedArray | pa.Array) -> None:
    """Rewrite published files without the given ids (the old file is replaced, never left beside)."""
    for path in files:
        table = pq.read_table(path, filesystem=fs)
        keep = pc.invert(pc.is_in(table.column("video_id"), ids))
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)   # filtering keeps the video_id order
        tmp = f"{path.rsplit('/', 1)[0]}/_rewrite-{path.rsplit('/', 1)[1]}"
        pq.write_table(kept, tmp, filesystem=fs, row_group_size=FEATURE_ROW_GROUP_ROWS)
        if kept.num_rows:
            _move(fs, tmp, path)
        else:
            fs.delete_file(tmp)
            fs.delete_file(path)


def write_run_summary(runs_dir: str, run_id: str, summary: dict) -> None:
    storage.write_bytes(storage.join(runs_dir, f"{run_id}.json"), json.dumps(summary, indent=2, default=str).encode())


def remove_stale_staging(staging_root: str, older_than_hours: float) -> list[str]:
    """Delete the staging folders of runs that crashed: every folder under `staging_root` whose newest file
    is older than `older_than_hours` (a live run keeps writing, so its folder stays young). Returns them."""
    fs, root = storage.filesystem_and_path(staging_root)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    cutoff = datetime.now(timezone.utc) - timedelta(hours=older_than_hours)
    removed = []
    for folder in fs.get_file_info(pafs.FileSelector(root)):
        if folder.type != pafs.FileType.Directory:
            continue
        # Files only: creating a sub-folder is not work in progress, and folder times move with it.
        times = [i.mtime for i in fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
                 if i.type == pafs.FileType.File and i.mtime is not None] or [folder.mtime]
        times = [t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times if t is not None]
        newest = max(times) if times else None
        if newest is not None and newest < cutoff:
            fs.delete_dir(folder.path)
            removed.append(folder.base_name)
    if removed:
        logging.info("removed the staging folders of %d abandoned runs under %s: %s", len(removed), staging_root,
                     ", ".join(removed))
    return removed


def remove_staging(staging: str) -> None:
    fs, path = storage.filesystem_and_path(staging)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def _partition_dir(output: str, day) -> str:
    return storage.join(output, f"dt={day}")


def staged_prediction_schema(schema: pa.Schema, catalog_schema: pa.Schema) -> pa.Schema:
    """What a scoring job stages: video_id, CATALOG_ROW_COLUMN and the columns of the scored `schema`
    that the catalog lacks (the predictions)."""
    return pa.schema([schema.field("video_id"), pa.field(CATALOG_ROW_COLUMN, pa.int64())]
                     + [f for f in schema if f.name not in catalog_schema.names])


def publish_partitions(staged_dir: str, output: str, dates: list, run_id: str, schema: pa.Schema,
                       catalog: pa.Table, work_dir: str | None = None) -> dict:
    """Replace TABLE/dt=D/ for every date this run owns with the run's rows of that date.

    The staged files hold staged_prediction_schema rows; each is attached here to its catalog row (by
    CATALOG_ROW_COLUMN, its position in `catalog`), so the catalog columns never travel through the
    job, and rows keep the catalog's order. Identical inputs give identical files.

    Each partition is written complete under TABLE/_staging first and then swapped in by renames, so a
    reader sees the old partition or the new one, never a half-written one or both (on object stores,
    which have no rename, files are copied and the old ones deleted: see README).
    """
    fs, _ = storage.filesystem_and_path(output)
    files = parquet_files(staged_dir)
    staged_schema = staged_prediction_schema(schema, catalog.schema)
    staged = (ds.dataset(files, filesystem=fs, format="parquet", schema=staged_schema).to_table()
              if files else staged_schema.empty_table())
    scored, days = _catalog_rows_by_day(staged, catalog, schema)
    dictionary = dictionary_columns(schema)
    ordinals = np.array([(day - _EPOCH_DAY).days for day in dates], dtype=days.dtype)
    starts, stops = np.searchsorted(days, ordinals, "left"), np.searchsorted(days, ordinals, "right")
    counts = {}
    for day, lo, hi in zip(dates, starts.tolist(), stops.tolist()):
        rows = scored.slice(lo, hi - lo)
        ready_uri = storage.join(work_dir or storage.join(output, "_staging", run_id), "partitions", f"dt={day}")
        _, ready = storage.filesystem_and_path(ready_uri)
        fs.create_dir(ready, recursive=True)
        pq.write_table(rows, f"{ready}/part-{run_id}.parquet", filesystem=fs, use_dictionary=dictionary)
        _swap_directory(fs, ready, storage.filesystem_and_path(_partition_dir(output, day))[1], run_id)
        counts[day] = rows.num_rows
    return counts


def _days(timestamps: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """UTC publish days as int32 days since 1970."""
    return pc.cast(pc.cast(timestamps, pa.date32()), pa.int32()).to_numpy(zero_copy_only=False)


def _catalog_rows_by_day(staged: pa.Table, catalog: pa.Table, schema: pa.Schema) -> tuple[pa.Table, np.ndarray]:
    """Catalog rows with their staged predictions attached, in `schema`, ordered by (publish day,
    catalog order), and each row's day. Each source table is gathered once, in the final order."""
    positions = staged.column(CATALOG_ROW_COLUMN).to_numpy()
    if len(positions) and (positions.min() < 0 or positions.max() >= catalog.num_rows
                           or not pc.all(pc.equal(catalog.column("video_id").take(positions),
                                                  staged.column("video_id"))).as_py()):
        raise ValueError(f"staged predictions do not line up with the scored catalog ({CATALOG_ROW_COLUMN})")
    days = _days(catalog.column("publish_time"))[positions]
    order = np.lexsort((positions, days))  # by day, then catalog order
    rows = positions[order]
    # A catalog already in day order, fully scored, needs no gather at all (the usual nightly run).
    catalog_part = catalog if np.array_equal(rows, np.arange(catalog.num_rows)) else catalog.take(rows)
    staged_part = staged.take(order)
    columns = [catalog_part.column(f.name) if f.name in catalog.column_names else staged_part.column(f.name)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema), days[order]


def _swap_directory(fs: pafs.FileSystem, ready: str, target: str, run_id: str) -> None:
    exists = fs.get_file_info(target).type == pafs.FileType.Directory
    if isinstance(fs, pafs.LocalFileSystem):
        import os
        import shutil
        if exists:   # retired beside the ready folder: readers of the table never see it
            retired = f"{ready.rsplit('/', 1)[0]}/_retired-{run_id}-{target.rsplit('/', 1)[1]}"
            os.rename(target, retired)
            os.rename(ready, target)
            shutil.rmtree(retired)
        else:
            os.rename(ready, target)
        return
    old = [i.path for i in fs.get_file_info(pafs.FileSelector(target))] if exists else []
    fs.create_dir(target, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(ready)):
        fs.copy_file(info.path, f"{target}/{info.base_name}")
    for path in old:
        if not path.endswith(f"-{run_id}.parquet"):
            fs.delete_file(path)
    fs.delete_dir(ready)


def partition_id_array(output: str, dates: list) -> pa.Array:
    """The video_ids now published in the given dates' partitions, as one Arrow array."""
    files = [f for day in dates for f in parquet_files(_partition_dir(output, day))]
    if not files:
        return pa.array([], pa.string())
    fs, _ = storage.filesystem_and_path(output)
    table = ds.dataset(files, filesystem=fs, format="parquet").to_table(columns=["video_id"])
    return table.column("video_id").combine_chunks()


def publish_errors(staging: str, errors_dir: str, run_id: str) -> pa.Table:
    """Move the run's dead letters into ERRORS_DIR/<run_id>.parquet and return them."""
    fs, _ = storage.filesystem_and_path(errors_dir)
    files = parquet_files(storage.join(staging, "_errors"))
    if not files:
        return ERRORS_SCHEMA.empty_table()
    errors = ds.dataset(files, filesystem=fs, format="parquet").to_table()
    if errors.num_rows:
        write_table(errors, storage.join(errors_dir, f"{run_id}.parquet"))
    return errors
