"""The catalog contract: round trips per format and location, every rejection with its message."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from featurizers.core import storage
from featurizers.core.contracts import CATALOG_SCHEMA
from pipelines.catalog import CatalogError, read_catalog, static_conflicts, summarize, write_catalog
from tests.conftest import REAL_CATALOGS

UTC = timezone.utc


def small_catalog() -> pa.Table:
    rows = [
        dict(video_id="v1", publish_time=datetime(2025, 1, 1, 10, tzinfo=UTC), video_uri="/tmp/v1.mp4",
             title="beach sunset", hashtags=["travel", "beach"], duration_s=12.5, author_id="a1",
             author_followers=1200, music_id="m1", language="en",
             observed_at=datetime(2025, 1, 5, tzinfo=UTC), views=1000, likes=100, comments=10, shares=None),
        dict(video_id="v2", publish_time=datetime(2025, 1, 2, 18, 30, tzinfo=UTC), video_uri=None,
             title="khách sạn đẹp", hashtags=[], duration_s=None, author_id="a2", author_followers=None,
             music_id=None, language="vi", observed_at=None, views=None, likes=None, comments=None, shares=None),
    ]
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)


def as_text_rows(table: pa.Table) -> list[dict]:
    rows = []
    for row in table.to_pylist():
        row = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
        row["hashtags"] = "|".join(row["hashtags"] or []) if row["hashtags"] is not None else None
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    names = list(rows[0])
    table = pa.table({n: pa.array([None if r[n] is None else str(r[n]) for r in rows], pa.string()) for n in names})
    pacsv.write_csv(table, path)


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def assert_same_catalog(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.schema.equals(CATALOG_SCHEMA)
    # empty hashtag lists may come back as null from text formats; everything else is exact
    a, e = actual.to_pylist(), expected.to_pylist()
    for ra, re_ in zip(a, e):
        ra["hashtags"] = ra["hashtags"] or []
        re_["hashtags"] = re_["hashtags"] or []
    assert a == e


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_round_trip_local(tmp_path, fmt):
    expected = small_catalog()
    path = str(tmp_path / f"catalog.{fmt}")
    if fmt == "parquet":
        pq.write_table(expected, path)
    elif fmt == "csv":
        write_csv(as_text_rows(expected), path)
    else:
        write_jsonl(as_text_rows(expected), path)
    assert_same_catalog(read_catalog(path), expected)


def test_parquet_directory_and_glob(tmp_path):
    expected = small_catalog()
    (tmp_path / "cat").mkdir()
    pq.write_table(expected.slice(0, 1), tmp_path / "cat" / "part-0.parquet")
    pq.write_table(expected.slice(1, 1), tmp_path / "cat" / "part-1.parquet")
    (tmp_path / "cat" / "_SUCCESS").write_text("")
    assert_same_catalog(read_catalog(str(tmp_path / "cat")), expected)
    assert_same_catalog(read_catalog(str(tmp_path / "cat" / "part-*.parquet")), expected)


def test_coercion_of_compatible_types(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl([{"video_id": 123, "publish_time": "2025-03-01T07:00:00+07:00", "hashtags": "#a, b ,c",
                  "views": "42", "author_followers": 7.0, "duration_s": "9"}], str(path))
    table = read_catalog(str(path))
    row = table.to_pylist()[0]
    assert row["video_id"] == "123"
    assert row["publish_time"] == datetime(2025, 3, 1, 0, 0, tzinfo=UTC)
    assert row["hashtags"] == ["a", "b", "c"]
    assert row["views"] == 42 and row["author_followers"] == 7 and row["duration_s"] == 9.0


def test_naive_timestamps_are_utc(tmp_path):
    table = small_catalog().set_column(1, "publish_time", pa.array(
        [datetime(2025, 1, 1, 10), datetime(2025, 1, 2)], pa.timestamp("ms")))
    pq.write_table(table, tmp_path / "c.parquet")
    got = read_catalog(str(tmp_path / "c.parquet"))
    assert got.column("publish_time")[0].as_py() == datetime(2025, 1, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_gcs(gcs_bucket, tmp_path, fmt):
    expected = small_catalog()
    uri = f"{gcs_bucket}/catalogs/catalog.{fmt}"
    if fmt == "parquet":
        write_catalog(expected, uri)
    else:
        local = tmp_path / "c.csv"
        write_csv(as_text_rows(expected), str(local))
        storage.write_bytes(uri, local.read_bytes())
    assert_same_catalog(read_catalog(uri), expected)


def rejection(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "bad.jsonl"
    write_jsonl(rows, str(path))
    with pytest.raises(CatalogError) as info:
        read_catalog(str(path))
    return str(info.value)


GOOD = {"video_id": "ok", "publish_time": "2025-01-01T00:00:00Z"}


@pytest.mark.parametrize("rows, expected", [
    ([{"publish_time": "2025-01-01T00:00:00Z"}], "video_id: -: missing required column"),
    ([{"video_id": "x"}], "publish_time: -: missing required column"),
    ([GOOD, {"video_id": "bad-ts", "publish_time": "yesterday"}],
     "publish_time: video_id=bad-ts: unparseable timestamp 'yesterday'"),
    ([GOOD, {"video_id": "dup", "publish_time": "2025-01-01T00:00:00Z"},
      {"video_id": "dup", "publish_time": "2025-01-02T00:00:00Z"}], "observed_at: video_id=dup: duplicate observation"),
    ([{**GOOD, "observed_at": "2024-12-31T00:00:00Z"}],
     "observed_at: video_id=ok: observed_at is before publish_time"),
    ([{**GOOD, "likes": -3}], "likes: video_id=ok: negative count -3"),
    ([{**GOOD, "views": "many"}], "views: video_id=ok: unparseable int64 value 'many'"),
    ([{**GOOD, "video_uri": "s3://bucket/v.mp4"}], "video_uri: video_id=ok: unsupported URI scheme 's3'"),
    ([GOOD, {"publish_time": "2025-01-01T00:00:00Z"}], "video_id: line 2: required value is null"),
])
def test_rejections_name_column_row_and_problem(tmp_path, rows, expected):
    assert expected in rejection(tmp_path, rows)


def test_every_problem_is_listed(tmp_path):
    message = rejection(tmp_path, [{**GOOD, "views": -1, "shares": -2}, {**GOOD}])
    assert "views: video_id=ok: negative count -1" in message
    assert "shares: video_id=ok: negative count -2" in message
    assert "duplicate observation" in message


@pytest.mark.parametrize("path", REAL_CATALOGS, ids=lambda p: p.parent.name)
def test_real_catalogs_load_unchanged(path):
    raw = pq.read_table(path)
    table = read_catalog(str(path))
    assert table.num_rows == raw.num_rows
    assert table.column("video_id").to_pylist() == raw.column("video_id").to_pylist()
    for name in ("views", "likes", "comments", "shares", "author_followers"):
        assert table.column(name).to_pylist() == raw.column(name).to_pylist()
    assert table.column("publish_time").cast(pa.int64()).equals(raw.column("publish_time").cast(pa.int64()))
    summary = summarize(table)
    assert summary["rows"] == raw.num_rows and summary["media_coverage"] == 0.0


# ------------------------------------------------------------------------------------------- observation logs
def test_conflicting_static_field_across_observations_is_reported_not_refused(tmp_path):
    rows = [{**GOOD, "title": "first", "observed_at": "2025-01-02T00:00:00Z", "views": 5},
            {**GOOD, "title": "edited", "observed_at": "2025-01-03T00:00:00Z", "views": 9}]
    path = tmp_path / "log.jsonl"
    write_jsonl(rows, str(path))
    table = read_catalog(str(path))   # real logs have edited captions: reported, not refused
    assert table.num_rows == 2
    assert [str(p) for p in static_conflicts(table)] == [
        "title: video_id=ok: conflicting values across the video's observations (a static field)"]


def test_daily_partitions_read_together_form_an_observation_log(tmp_path):
    base = small_catalog()
    for day, views in ((6, 1500), (7, 2500)):
        part = base.set_column(base.schema.get_field_index("observed_at"), "observed_at",
                               pa.array([datetime(2025, 1, day, tzinfo=UTC)] * 2, CATALOG_SCHEMA.field("observed_at").type))
        part = part.set_column(part.schema.get_field_index("views"), "views", pa.array([views, None], pa.int64()))
        (tmp_path / f"dt=2025-01-0{day}").mkdir()
        pq.write_table(part, tmp_path / f"dt=2025-01-0{day}" / "part-0.parquet")
    table = read_catalog(str(tmp_path))
    assert table.num_rows == 4
    facts = summarize(table)
    assert facts["videos"] == 2 and facts["videos_observed_twice_or_more"] == 2
    # The same observation twice (a day's partition written twice) is refused.
    (tmp_path / "dt=2025-01-08").mkdir()
    pq.write_table(pq.read_table(tmp_path / "dt=2025-01-07" / "part-0.parquet"),
                   tmp_path / "dt=2025-01-08" / "part-0.parquet")
    with pytest.raises(CatalogError, match="duplicate observation"):
        read_catalog(str(tmp_path))
