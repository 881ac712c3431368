"""Featurize and score on real engines — a Spark standalone cluster (master + 2 workers on 127.0.0.1,
Beam's portable Spark runner) and Beam's Flink job server (embedded Flink) — compared with the DirectRunner.

Slow (JVMs on a 2-core box): `make test-cluster`. Needs Java 17, pyspark==3.5.9 and the Beam runner jars
(`python -m runners.clusters.local fetch`, from Maven Central, cached under ~/.cache/popcast/jars).
Each engine runs on its own free ports and state directory, so a `make cluster-up` cluster is left alone.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA, PREDICTION_COLUMNS
from featurizers.core.feature_table import read_feature_table
from pipelines.catalog import read_catalog
from runners.clusters import local as clusters
from tests.media_helpers import write_clip

pytestmark = pytest.mark.slow

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
DIRECT = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
SMALL = ["--frames", "4", "--frame-size", "96"]
RTOL = 1e-4
MODALITIES = ("visual", "audio", "text", "meta")
TIMINGS: dict[str, float] = {}


def _timed(name: str, fn, *args):
    start = time.time()
    result = fn(*args)
    TIMINGS[name] = round(time.time() - start, 1)
    return result


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A featurize catalog (3 tiny real MP4 clips + 3 rows without media) and a small trained model
    with the text+meta features and catalog it was trained on (for scoring)."""
    from model.train import TrainingConfig, train
    from pipelines.featurize import run as featurize
    from pipelines.sample_catalog import generate_rows

    root = tmp_path_factory.mktemp("cluster")
    media = root / "media"
    media.mkdir()
    clips = {"vertical": write_clip(media / "v.mp4", width=96, height=160, seconds=1.0, gop=10),
             "square": write_clip(media / "s.mp4", width=96, height=96, seconds=1.0, gop=5),
             "silent": write_clip(media / "q.mp4", width=160, height=96, seconds=1.0, audio=False)}
    rows = [dict(video_id=name, publish_time=T0 + timedelta(hours=i), video_uri=str(path),
                 title=f"clip {name} #cluster", hashtags=["cluster"], author_id="a")
            for i, (name, path) in enumerate(clips.items())]
    rows += [dict(video_id=f"no-media-{i}", publish_time=T0, video_uri=None, title=title, hashtags=[])
             for i, title in enumerate(["khách sạn đẹp", "street food tour", None])]
    catalog = root / "featurize_catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), catalog)

    scoring, _ = generate_rows(40, seed=5)
    scoring = scoring.sort_by("publish_time")
    pq.write_table(scoring, root / "score_catalog.parquet")
    features = str(root / "score_features")
    featurize(["--catalog", str(root / "score_catalog.parquet"), "--output", features,
               "--modalities", "text,meta", *DIRECT])
    model = str(root / "model")
    train(read_catalog(str(root / "score_catalog.parquet")), features, model,
          training=TrainingConfig(epochs=3, ensemble_size=1), baselines_enabled=False)
    days = pc.cast(scoring.column("publish_time"), pa.date32())
    busiest = max(pc.value_counts(days).to_pylist(), key=lambda c: c["counts"])["values"]
    return dict(root=root, catalog=str(catalog), score_catalog=str(root / "score_catalog.parquet"),
                features=features, model=model, date=str(busiest))


def _featurize(inputs, out: Path, engine_args: list[str]):
    from pipelines.featurize import run as featurize
    return featurize(["--catalog", inputs["catalog"], "--output", str(out), *SMALL, *engine_args])


def _score(inputs, out: Path, engine_args: list[str]):
    from pipelines.score import run as score
    return score(["--catalog", inputs["score_catalog"], "--features", inputs["features"], "--model",
                  inputs["model"], "--output", str(out), "--date", inputs["date"], *engine_args])


@pytest.fixture(scope="module")
def direct_outputs(inputs):
    root = inputs["root"]
    featurized = _timed("direct featurize", _featurize, inputs, root / "direct_features", DIRECT)
    scored = _timed("direct score", _score, inputs, root / "direct_scored", DIRECT)
    assert featurized.rows_unaccounted == 0 and scored.rows_unaccounted == 0
    return root / "direct_features", root / "direct_scored"


def assert_same_features(expected_dir: Path, got_dir: Path) -> None:
    for modality in MODALITIES:
        expected, got = read_feature_table(str(expected_dir), modality), read_feature_table(str(got_dir), modality)
        assert sorted(got.video_ids.tolist()) == sorted(expected.video_ids.tolist()), modality
        assert len(set(got.video_ids.tolist())) == len(got.video_ids), f"{modality}: duplicate rows"
        order_e, order_g = expected.video_ids.argsort(), got.video_ids.argsort()
        assert set(got.vectors) == set(expected.vectors) and set(got.scalars) == set(expected.scalars)
        for name in expected.vectors:
            np.testing.assert_allclose(got.vectors[name][order_g], expected.vectors[name][order_e],
                                       rtol=RTOL, atol=1e-6, err_msg=f"{modality}.{name}")
        for name in expected.scalars:
            np.testing.assert_allclose(got.scalars[name][order_g].astype(float),
                                       expected.scalars[name][order_e].astype(float),
                                       rtol=RTOL, atol=1e-6, equal_nan=True, err_msg=f"{modality}.{name}")


def assert_same_scores(expected_root: Path, got_root: Path, day: str) -> None:
    expected = pq.read_table(expected_root / f"dt={day}").sort_by("video_id")
    got = pq.read_table(got_root / f"dt={day}").sort_by("video_id")
    assert got.num_rows == expected.num_rows > 0
    assert got.column("video_id").to_pylist() == expected.column("video_id").to_pylist()
    predictions = {c.name for c in PREDICTION_COLUMNS}
    for name in expected.column_names:
        if name in ("scored_at", "run_id"):
            continue
        if name in predictions and pa.types.is_floating(expected.schema.field(name).type):
            np.testing.assert_allclose(got.column(name).to_numpy(), expected.column(name).to_numpy(),
                                       rtol=RTOL, atol=1e-6, err_msg=name)
        else:
            assert got.column(name).equals(expected.column(name)), name


@pytest.fixture(scope="module")
def spark_cluster(tmp_path_factory):
    ports = {"spark_master": clusters.free_port(), "spark_master_ui": clusters.free_port(),
             "spark_worker_ui": 0, "spark_job": clusters.free_port()}
    state = tmp_path_factory.mktemp("spark_state")
    try:
        info = _timed("spark cluster up", lambda: clusters.spark_up(state, ports=ports))
    except clusters.ClusterError:
        clusters.down("spark", state)
        raise
    yield info
    clusters.down("spark", state)


@pytest.fixture(scope="module")
def flink_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("flink_state")
    try:
        info = _timed("flink job server up", lambda: clusters.flink_up(state, job_port=clusters.free_port()))
    except clusters.ClusterError:
        clusters.down("flink", state)
        raise
    yield info
    clusters.down("flink", state)


def test_spark_cluster_is_a_real_standalone_cluster(spark_cluster):
    state = Path(spark_cluster.state_dir)
    master_log = (state / "master.log").read_text()
    assert master_log.count("Registering worker 127.0.0.1") == 2
    assert spark_cluster.job_server["source"] in ("official", "assembled")
    # A supported pair: the job server at the Python SDK's Beam version.
    assert spark_cluster.job_server["version"] == spark_cluster.job_server["sdk_version"] == \
        clusters.beam_python_version()


def test_featurize_and_score_on_spark_equal_the_direct_runner(inputs, direct_outputs, spark_cluster, tmp_path):
    engine = ["--profile", "spark", f"--job_endpoint={spark_cluster.job_endpoint}"]
    featurized = _timed("spark featurize", _featurize, inputs, tmp_path / "features", engine)
    assert featurized.rows_unaccounted == 0
    assert featurized.ok == {"visual": 3, "audio": 3, "text": 6, "meta": 6}
    assert_same_features(direct_outputs[0], tmp_path / "features")
    scored = _timed("spark score", _score, inputs, tmp_path / "scored", engine)
    assert scored.rows_unaccounted == 0 and scored.rows_scored > 0
    assert_same_scores(direct_outputs[1], tmp_path / "scored", inputs["date"])
    # The work ran in executors on the two workers, not in a local Spark.
    state = Path(spark_cluster.state_dir)
    assert list(state.glob("worker1/app-*")) and list(state.glob("worker2/app-*"))


def test_featurize_and_score_on_flink_equal_the_direct_runner(inputs, direct_outputs, flink_server, tmp_path):
    assert flink_server.job_server["version"] == clusters.beam_python_version()
    engine = ["--profile", "flink", f"--job_endpoint={flink_server.job_endpoint}"]
    featurized = _timed("flink featurize", _featurize, inputs, tmp_path / "features", engine)
    assert featurized.rows_unaccounted == 0
    assert_same_features(direct_outputs[0], tmp_path / "features")
    scored = _timed("flink score", _score, inputs, tmp_path / "scored", engine)
    assert scored.rows_unaccounted == 0
    assert_same_scores(direct_outputs[1], tmp_path / "scored", inputs["date"])


def test_report_wall_times():
    """Prints the wall times measured above (run with -s to see them)."""
    print("\ncluster wall times (s): " + json.dumps(TIMINGS))
    assert TIMINGS
