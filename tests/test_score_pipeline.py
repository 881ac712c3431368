"""The score job: idempotent date partitions, backfills, on-the-fly featurization, dead letters, sinks; the
scored table root holds only the table (polars, pyarrow, DuckDB read it as it is), records live beside it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA, PREDICTION_COLUMNS
from pipelines.catalog import read_catalog
from pipelines.publish import remove_stale_staging
from pipelines.sample_catalog import generate_rows
from pipelines.score import run as score

DIRECT = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """60 synthetic catalog rows (no media); 50 featurized (text+meta) and used for a small model."""
    from model.train import TrainingConfig, train
    from pipelines.featurize import run as featurize

    root = tmp_path_factory.mktemp("score")
    catalog, _ = generate_rows(60, seed=3)
    catalog = catalog.sort_by("publish_time")
    pq.write_table(catalog, root / "catalog.parquet")
    pq.write_table(catalog.slice(0, 50), root / "featured.parquet")
    features = str(root / "features")
    featurize(["--catalog", str(root / "featured.parquet"), "--output", features, "--modalities", "text,meta",
               *DIRECT])
    model = str(root / "model")
    train(read_catalog(str(root / "featured.parquet")), features, model, training=TrainingConfig(epochs=3, ensemble_size=1),
          baselines_enabled=False)
    return root, features, model


def busiest_date(catalog_path: Path) -> str:
    days = pc.cast(pq.read_table(catalog_path).column("publish_time"), pa.date32())
    counts = pc.value_counts(days).to_pylist()
    return str(max(counts, key=lambda c: c["counts"])["values"])


def partition(table_root: Path, day: str) -> pa.Table:
    return pq.read_table(table_root / f"dt={day}")


def test_scoring_a_date_twice_gives_identical_rows(trained, tmp_path):
    root, features, model = trained
    day = busiest_date(root / "featured.parquet")
    out = tmp_path / "scored"
    args = ["--catalog", str(root / "featured.parquet"), "--features", features, "--model", model,
            "--output", str(out), "--date", day, *DIRECT]
    first = score(args)
    rows_first = partition(out, day)
    second = score(args)
    rows_second = partition(out, day)
    assert first.rows_unaccounted == 0 and first.rows_scored == rows_first.num_rows > 0
    assert [p.name for p in out.iterdir() if p.name.startswith("dt=")] == [f"dt={day}"]
    assert len(list((out / f"dt={day}").iterdir())) == 1  # replaced, not appended
    ids = rows_second.column("video_id").to_pylist()
    assert len(ids) == len(set(ids))
    keep = [c for c in rows_first.column_names if c not in ("scored_at", "run_id")]
    assert rows_first.select(keep).equals(rows_second.select(keep))
    assert rows_second.column("run_id")[0].as_py() == second.run_id
    for column in PREDICTION_COLUMNS:
        if column.name != "input_observed_at":   # null = cold start, as for every row of this (non-nowcasting) model
            assert rows_second.column(column.name).null_count == 0, column.name
    assert rows_second.column("input_observed_at").null_count == rows_second.num_rows
    # every input column survives, predictions are ordered intervals
    assert rows_second.schema.names[: len(CATALOG_SCHEMA)] == CATALOG_SCHEMA.names
    p10, pred, p90 = (rows_second.column(f"{k}_views").to_numpy() for k in ("p10", "pred", "p90"))
    assert (p10 <= pred + 1e-6).all() and (pred <= p90 + 1e-6).all()


def test_backfill_writes_each_day_and_featurizes_unfeatured_rows(trained, tmp_path):
    root, features, model = trained
    catalog = pq.read_table(root / "catalog.parquet")
    days = pc.cast(catalog.column("publish_time"), pa.date32())
    start, end = str(pc.min(days).as_py()), str(pc.max(days).as_py())
    out = tmp_path / "scored"
    summary = score(["--catalog", str(root / "catalog.parquet"), "--features", features, "--model", model,
                     "--output", str(out), "--start", start, "--end", end, *DIRECT])
    assert summary.rows_unaccounted == 0
    assert summary.rows_featurized_on_the_fly == 10  # the 10 rows never featurized
    assert summary.rows_scored == 60
    written = sorted(p.name for p in out.iterdir() if p.name.startswith("dt="))
    n_days = (np.datetime64(end) - np.datetime64(start)).astype(int) + 1
    assert len(written) == n_days  # days without videos get an empty partition too
    scored = pq.read_table(out, partitioning="hive")
    assert sorted(scored.column("video_id").to_pylist()) == sorted(catalog.column("video_id").to_pylist())


def test_invalid_feature_rows_become_dead_letters(trained, tmp_path):
    root, features, model = trained
    text = pq.read_table(Path(features) / "text")
    victim = text.column("video_id")[0].as_py()
    embedding = text.column("embedding")
    values = pc.list_flatten(embedding).to_numpy().copy().reshape(text.num_rows, -1)
    values[0, 0] = np.inf
    poisoned = text.set_column(text.schema.get_field_index("embedding"), "embedding",
                               pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
    bad_features = tmp_path / "features"
    import shutil
    shutil.copytree(features, bad_features)
    shutil.rmtree(bad_features / "text")
    (bad_features / "text").mkdir()
    pq.write_table(poisoned, bad_features / "text" / "poisoned.parquet")
    out = tmp_path / "scored"
    summary = score(["--catalog", str(root / "featured.parquet"), "--features", str(bad_features),
                     "--model", model, "--output", str(out), *DIRECT])
    assert summary.rows_unaccounted == 0
    errors = pq.read_table(Path(f"{out}.popcast") / "errors").to_pylist()   # beside the table, not in it
    assert [(e["video_id"], e["stage"]) for e in errors] == [(victim, "validate")]
    assert "infinite" in errors[0]["message"]
    assert summary.rows_scored == 49


def test_multi_processing_runner_matches_direct(trained, tmp_path):
    root, features, model = trained
    day = busiest_date(root / "featured.parquet")
    base = ["--catalog", str(root / "featured.parquet"), "--features", features, "--model", model, "--date", day]
    score([*base, "--output", str(tmp_path / "a"), *DIRECT])
    score([*base, "--output", str(tmp_path / "b"), "--runner", "DirectRunner",
           "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    a, b = partition(tmp_path / "a", day), partition(tmp_path / "b", day)
    assert a.column("video_id").to_pylist() == b.column("video_id").to_pylist()
    np.testing.assert_allclose(a.column("pred_views").to_numpy(), b.column("pred_views").to_numpy(), rtol=1e-5)


def test_gcs_output_on_the_emulator(trained, gcs_bucket):
    from featurizers.core.feature_table import read_columns
    root, features, model = trained
    day = busiest_date(root / "featured.parquet")
    out = f"{gcs_bucket}/scored"
    args = ["--catalog", str(root / "featured.parquet"), "--features", features, "--model", model,
            "--output", out, "--date", day, *DIRECT]
    score(args)
    first = read_columns(f"{out}/dt={day}", ["video_id"])
    score(args)
    second = read_columns(f"{out}/dt={day}", ["video_id"])
    assert first.num_rows == second.num_rows > 0
    assert sorted(second.column("video_id").to_pylist()) == sorted(set(second.column("video_id").to_pylist()))


def test_iceberg_partition_overwrite(trained, tmp_path):
    pytest.importorskip("pyiceberg")
    from pipelines.iceberg_sink import open_catalog
    root, features, model = trained
    day = busiest_date(root / "featured.parquet")
    target = f"sqlite:///{tmp_path}/iceberg.db#popcast.scored"
    args = ["--catalog", str(root / "featured.parquet"), "--features", features, "--model", model,
            "--output", str(tmp_path / "scored"), "--iceberg", target, *DIRECT]
    score([*args, "--date", day])
    score([*args, "--date", day])
    table = open_catalog(f"sqlite:///{tmp_path}/iceberg.db").load_table("popcast.scored").scan().to_arrow()
    expected = partition(tmp_path / "scored", day)
    assert sorted(table.column("video_id").to_pylist()) == sorted(expected.column("video_id").to_pylist())


def test_a_horizon_outside_the_trained_ages_is_flagged(trained):
    from model.artifact import load_model
    from pipelines.score import horizon_warnings

    _, _, model = trained
    low, high = load_model(model).trained_age_days
    assert 0 < low < high
    assert horizon_warnings((low + high) / 2, (low, high)) == []
    (warning,) = horizon_warnings(low / 2, (low, high))
    assert "outside the ages the model was trained on" in warning and f"{low:.1f} days" in warning
    assert horizon_warnings(high * 2, (low, high)) and horizon_warnings(5.0, None) == []


# ---------------------------------------------------------------- the scored table as readers see it
@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    root, features, model = trained
    table = tmp_path_factory.mktemp("scored") / "table"
    days = sorted({busiest_date(root / "catalog.parquet")})
    summary = score(["--catalog", str(root / "catalog.parquet"), "--features", features, "--model", model,
                     "--output", str(table), "--start", days[0], "--end", days[0], *DIRECT])
    assert summary.rows_scored > 0
    return table, summary


def test_the_table_root_holds_only_partitions(scored):
    table, _ = scored
    entries = {p.relative_to(table).as_posix() for p in table.rglob("*")}
    assert entries and all(e.startswith("dt=") for e in entries), sorted(entries)
    assert all(e.endswith(".parquet") for e in entries if "/" in e)


def test_polars_pyarrow_and_duckdb_read_every_scored_row_once(scored):
    import duckdb
    import polars as pl

    table, summary = scored
    frame = pl.scan_parquet(str(table), hive_partitioning=True).collect()
    assert frame.height == summary.rows_scored and frame["video_id"].n_unique() == frame.height
    assert frame.schema["dt"] == pl.Date
    arrow = ds.dataset(str(table), format="parquet", partitioning="hive").to_table()
    assert arrow.num_rows == summary.rows_scored
    rows, kind = duckdb.sql(f"SELECT count(*), any_value(typeof(dt)) FROM read_parquet('{table}/**/*.parquet', "
                            "hive_partitioning=true)").fetchall()[0]
    assert rows == summary.rows_scored and kind == "DATE"


def test_the_run_record_says_what_ran(scored):
    table, summary = scored
    record = json.loads((Path(f"{table}.popcast") / "runs" / f"{summary.run_id}.json").read_text())
    assert record["command"][:2] == ["popcast", "score"] and "--catalog" in record["command"]
    assert record["runner"] == "DirectRunner (in_memory)"
    assert record["versions"]["apache-beam"] and record["versions"]["popcast"]
    assert record["started_at"] <= record["finished_at"]
    assert record["outputs"]["table"] == str(table) and record["inputs"]["model"]
    assert record["rows_scored"] == summary.rows_scored


def test_abandoned_staging_folders_are_removed_live_ones_kept(tmp_path):
    staging = tmp_path / "staging"
    for name, age_hours in (("crashed", 30), ("running", 0)):
        folder = staging / name / "scored"
        folder.mkdir(parents=True)
        part = folder / "part.parquet"
        part.write_bytes(b"x")
        past = time.time() - age_hours * 3600
        os.utime(part, (past, past))
    assert remove_stale_staging(str(staging), older_than_hours=12) == ["crashed"]
    assert sorted(p.name for p in staging.iterdir()) == ["running"]
