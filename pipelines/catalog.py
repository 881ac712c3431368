"""Catalog reader: Parquet (file, directory or glob), CSV and JSON Lines, local or gs://, Beam-free.

Every reader returns a table in contracts.CATALOG_SCHEMA (extra columns pass through after it) or
raises CatalogError listing each problem with its column, its row (video_id or line) and what is wrong.
"""
from __future__ import annotations

import fnmatch
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from featurizers.core import storage
from featurizers.core.contracts import (
    CATALOG_COLUMNS,
    CATALOG_SCHEMA,
    OBSERVATION_KEY,
    REQUIRED_COLUMNS,
    STATIC_COLUMNS,
    SUPPORTED_URI_SCHEMES,
    TARGETS,
    UTC_TIMESTAMP,
)

__all__ = ["CatalogProblem", "CatalogError", "read_raw", "conform", "check", "read_catalog", "write_catalog",
           "summarize", "static_conflicts"]

MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True)
class CatalogProblem:
    column: str
    row: str        # "video_id=..." or "line N" ("-" for whole-table problems)
    problem: str

    def __str__(self) -> str:
        return f"{self.column}: {self.row}: {self.problem}"


class CatalogError(ValueError):
    """A catalog that breaks the contract; `.problems` lists every problem found."""

    def __init__(self, source: str, problems: list[CatalogProblem]):
        self.source = source
        self.problems = problems
        shown = [f"  - {p}" for p in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown.append(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        super().__init__(f"invalid catalog {source}: {len(problems)} problem(s)\n" + "\n".join(shown))


# ---------------------------------------------------------------- reading raw tables

def _format_of(path: str) -> str:
    lower = path.lower().rstrip("/")
    if lower.endswith((".csv", ".csv.gz")):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json", ".jsonl.gz")):
        return "jsonl"
    return "parquet"


def _expand(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """Files named by a path: a file, a directory (Parquet files inside) or a glob."""
    fs, root = storage.filesystem_and_path(path)
    if any(ch in root for ch in "*?["):
        base = root[: min(root.index(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, root))
        if not files:
            raise FileNotFoundError(f"no catalog files match {path}")
        return fs, files
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"catalog not found: {path}")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and not i.base_name.startswith(("_", ".")))
        return fs, files
    return fs, [root]


def _read_text_table(fs: pafs.FileSystem, files: list[str], fmt: str) -> pa.Table:
    tables = []
    for file in files:
        with fs.open_input_stream(file) as stream:
            data = stream.read()
        if file.endswith(".gz"):
            import gzip
            data = gzip.decompress(data)
        if fmt == "csv":
            # Read every column as text: coercion (and its error messages) is ours, not the CSV sniffer's.
            header = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(skip_rows_after_names=10**9))
            types = {name: pa.string() for name in header.column_names}
            tables.append(pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=True)))
        else:
            rows = []
            for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise CatalogError(file, [CatalogProblem("-", f"line {number}", f"not valid JSON: {err}")])
            tables.append(_rows_to_text_table(rows))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _rows_to_text_table(rows: list[dict]) -> pa.Table:
    """JSON rows as a table; scalars become text so coercion is uniform, lists stay lists."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if any(isinstance(v, list) for v in values):
            columns[name] = pa.array([None if v is None else (v if isinstance(v, list) else str(v))
                                      for v in values], pa.list_(pa.string())) \
                if all(v is None or isinstance(v, list) for v in values) else \
                pa.array([None if v is None else ("|".join(map(str, v)) if isinstance(v, list) else str(v))
                          for v in values], pa.string())
        else:
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns) if columns else pa.table({})


def read_raw(path: str) -> pa.Table:
    """The table as stored, before coercion."""
    fs, files = _expand(path)
    fmt = _format_of(files[0] if files else path)
    if not files:
        raise FileNotFoundError(f"no catalog files in {path}")
    if fmt == "parquet":
        return ds.dataset(files, filesystem=fs, format="parquet").to_table()
    return _read_text_table(fs, files, fmt)


# ---------------------------------------------------------------- coercion and checks

class _RowLabels:
    """How problems name a row ("video_id=…", or "line N" where the id is missing), built on demand: a
    valid million-row catalog names no row, so it should not pay for a million label strings."""

    def __init__(self, table: pa.Table):
        self._ids = (table.column("video_id").cast(pa.string()).combine_chunks()
                     if "video_id" in table.column_names else None)

    def __getitem__(self, i: int) -> str:
        value = self._ids[int(i)].as_py() if self._ids is not None else None
        return f"video_id={value}" if value is not None else f"line {i + 1}"


def _parse_timestamp(value: str) -> datetime:
    text = value.strip().replace(" ", "T", 1) if "T" not in value else value.strip()
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def _split_hashtags(value: str) -> list[str]:
    separator = "|" if "|" in value else ","
    return [tag.strip().lstrip("#") for tag in value.split(separator) if tag.strip().lstrip("#")]


def _coerce_column(name: str, target: pa.DataType, column: pa.ChunkedArray, labels: _RowLabels,
                   problems: list[CatalogProblem]) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.type == target:
        return column
    if pa.types.is_timestamp(target):
        if pa.types.is_timestamp(column.type):
            if column.type.tz is None:  # naive timestamps are read as UTC
                column = pc.assume_timezone(column, "UTC")
            return column.cast(UTC_TIMESTAMP)
        values = column.cast(pa.string()).to_pylist()
        parsed = []
        for i, value in enumerate(values):
            if value is None or value == "":
                parsed.append(None)
                continue
            try:
                parsed.append(_parse_timestamp(value))
            except ValueError:
                problems.append(CatalogProblem(name, labels[i], f"unparseable timestamp {value!r}"))
                parsed.append(None)
        return pa.array(parsed, UTC_TIMESTAMP)
    if pa.types.is_list(target):
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            return column.cast(target)
        return pa.array([None if v is None else _split_hashtags(v)
                         for v in column.cast(pa.string()).to_pylist()], target)
    if pa.types.is_string(target):
        return column.cast(pa.string())
    # numbers: a failed cast names the offending rows
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out = []
    for i, value in enumerate(column.cast(pa.string()).to_pylist()):
        if value is None or value.strip() == "":
            out.append(None)
            continue
        try:
            number = float(value)
            if pa.types.is_integer(target):
                if not number.is_integer():
                    raise ValueError
                number = int(number)
            out.append(number)
        except ValueError:
            problems.append(CatalogProblem(name, labels[i], f"unparseable {target} value {value!r}"))
            out.append(None)
    return pa.array(out, target)


def conform(table: pa.Table, source: str = "catalog") -> tuple[pa.Table, list[CatalogProblem]]:
    """Coerce a raw table to the contract and collect every problem (the table is None-safe to use
    only when the problem list is empty)."""
    problems: list[CatalogProblem] = []
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            problems.append(CatalogProblem(name, "-", "missing required column"))
    if problems:
        return table, problems
    labels = _RowLabels(table)
    columns = []
    for col in CATALOG_COLUMNS:
        if col.name in table.column_names:
            columns.append(_coerce_column(col.name, col.type, table.column(col.name), labels, problems))
        else:
            columns.append(pa.nulls(table.num_rows, col.type))
    extras = [n for n in table.column_names if n not in CATALOG_SCHEMA.names]
    out = pa.Table.from_arrays(columns + [table.column(n) for n in extras],
                               schema=pa.schema(list(CATALOG_SCHEMA) + [table.schema.field(n) for n in extras]))
    problems += check(out, labels)
    return out, problems


def check(table: pa.Table, labels: _RowLabels | None = None) -> list[CatalogProblem]:
    """Contract rules on a conformed table: required values, unique ids, label sanity, URI schemes."""
    labels = labels or _RowLabels(table)
    problems: list[CatalogProblem] = []
    for name in REQUIRED_COLUMNS:
        nulls = np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))
        problems += [CatalogProblem(name, labels[i], "required value is null") for i in nulls]
    problems += _observation_problems(table)
    before = pc.fill_null(pc.less(table.column("observed_at"), table.column("publish_time")), False)
    for i in np.flatnonzero(before.to_numpy(zero_copy_only=False)):
        problems.append(CatalogProblem("observed_at", labels[i], "observed_at is before publish_time"))
    for target in TARGETS:
        negative = pc.fill_null(pc.less(table.column(target), 0), False)
        for i in np.flatnonzero(negative.to_numpy(zero_copy_only=False)):
            problems.append(CatalogProblem(target, labels[i],
                                           f"negative count {table.column(target)[int(i)].as_py()}"))
    uris = table.column("video_uri")
    # Only rows whose URI starts like "scheme:" can have an unsupported scheme; storage.scheme_of decides.
    candidates = pc.fill_null(pc.match_substring_regex(uris, r"^[A-Za-z][A-Za-z0-9+.\-]+:"), False)
    for i in np.flatnonzero(candidates.to_numpy(zero_copy_only=False)):
        uri = uris[int(i)].as_py()
        if storage.scheme_of(uri) not in SUPPORTED_URI_SCHEMES:
            problems.append(CatalogProblem("video_uri", labels[i],
                                           f"unsupported URI scheme {storage.scheme_of(uri)!r} in {uri!r} "
                                           "(use a local path, file:// or gs://)"))
    return problems


def _observation_frame(table: pa.Table):
    """video_id, observed_at and the STATIC_COLUMNS (lists joined to text) as a polars frame, null ids out."""
    columns = {"video_id": table.column("video_id"), "observed_at": table.column("observed_at")}
    for name in STATIC_COLUMNS:
        if name in table.column_names:
            column = table.column(name)
            if pa.types.is_list(column.type):   # compare lists by value: joined text, null stays null
                column = pc.binary_join(column, "\x1f")
            columns[name] = column
    return pl.from_arrow(pa.table(columns)).filter(pl.col("video_id").is_not_null())


def _observation_problems(table: pa.Table) -> list[CatalogProblem]:
    """The observation-log rule: (video_id, observed_at) is unique (vectorised: a million rows in a second)."""
    # Arrow's own hash aggregation on the two key columns: no copy of the catalog's text columns.
    keys = table.select(list(OBSERVATION_KEY)).filter(pc.is_valid(table.column("video_id")))
    counts = keys.group_by(list(OBSERVATION_KEY)).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts.column("count_all"), 1)).sort_by("video_id")
    return [CatalogProblem("observed_at", f"video_id={video}",
                           f"duplicate observation (video_id, observed_at={observed}): {n} rows")
            for video, observed, n in zip(*(dupes.column(c).to_pylist()
                                            for c in (*OBSERVATION_KEY, "count_all")))]


def static_conflicts(table: pa.Table) -> list[CatalogProblem]:
    """Videos whose observations disagree on a STATIC_COLUMNS value (reported by `popcast validate`, not
    refused: real logs have edited captions and the odd re-dated video; each video's EARLIEST observation is
    what featurize reads and what the model's split and ages use)."""
    frame = _observation_frame(table)
    problems = []
    statics = [n for n in STATIC_COLUMNS if n in frame.columns]
    several = frame.filter(pl.len().over("video_id") > 1)
    if several.height and statics:
        distinct = several.group_by("video_id").agg([pl.col(n).n_unique().alias(n) for n in statics]).sort("video_id")
        for name in statics:
            for video in distinct.filter(pl.col(name) > 1).get_column("video_id").to_list():
                problems.append(CatalogProblem(name, f"video_id={video}",
                                               "conflicting values across the video's observations (a static field)"))
    return problems


def read_catalog(path: str) -> pa.Table:
    """Read and validate a catalog; raises CatalogError listing every problem."""
    table, problems = conform(read_raw(path), path)
    if problems:
        raise CatalogError(path, problems)
    return table


def write_catalog(table: pa.Table, path: str) -> None:
    """Write a catalog as one Parquet file (local or gs://)."""
    import pyarrow.parquet as pq
    fs, target = storage.filesystem_and_path(path)
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, target, filesystem=fs)


def summarize(table: pa.Table) -> dict:
    """Short facts for `popcast validate`: rows, time range, label and media coverage."""
    n = table.num_rows
    publish = table.column("publish_time")
    coverage = {t: round(1 - table.column(t).null_count / n, 4) if n else 0.0 for t in TARGETS}
    return {
        "rows": n,
        "publish_time_min": str(pc.min(publish).as_py()) if n else None,
        "publish_time_max": str(pc.max(publish).as_py()) if n else None,
        "label_coverage": coverage,
        "media_coverage": round(1 - table.column("video_uri").null_count / n, 4) if n else 0.0,
        "authors": pc.count_distinct(table.column("author_id")).as_py(),
        "videos": pc.count_distinct(table.column("video_id")).as_py(),
        "videos_observed_twice_or_more": _videos_observed_twice(table),
    }


def _videos_observed_twice(table: pa.Table) -> int:
    counts = pc.value_counts(table.column("video_id").drop_null())
    return int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0) if len(counts) else 0
