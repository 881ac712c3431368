"""Nowcasting: training samples of an observation log, the split by video, leakage, the nowcast evaluation.

Synthetic observation logs whose counts grow log-linearly with age at a per-video rate (a Szabo–Huberman
world): real Parquet feature tables, a real (small) network, real LightGBM peers.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from featurizers.core.contracts import CATALOG_SCHEMA, TARGETS, FeatureSpec
from featurizers.core.feature_table import feature_table_to_arrow
from model.artifact import load_model
from model.data import Observed, catalog_arrays, observed_arrays
from model.network import NetworkConfig, PopularityNet, pinball_loss
from model.samples import NOWCAST_MIN_GAP_DAYS, observation_samples, split_samples, video_balanced_weights
from model.train import TrainingConfig, train

META = FeatureSpec("meta", "meta-test", "1", {}, (("quality", pa.float32()), ("hour", pa.int32())))
START = datetime(2024, 1, 1, tzinfo=timezone.utc)


def observation_log(n_videos: int = 240, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Videos published over 100 days, each observed 1–4 times at ages 0.2–12 days; log1p(views) =
    quality + rate · log(age), rate depending on quality (content), other targets a fixed offset below."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=n_videos)
    rate = 0.9 + 0.3 * np.tanh(quality)
    rows: dict[str, list] = {k: [] for k in ("video_id", "publish_time", "observed_at", "author_id", *TARGETS)}
    for v in range(n_videos):
        publish = START + timedelta(days=float(v * 100 / n_videos))
        ages = np.sort(rng.uniform(0.2, 12.0, rng.integers(1, 5)))
        for age in ages:
            level = 5 + quality[v] + rate[v] * np.log(age) + rng.normal(scale=0.05)
            rows["video_id"].append(f"v{v:04d}")
            rows["publish_time"].append(publish)
            rows["observed_at"].append(publish + timedelta(days=float(age)))
            rows["author_id"].append(f"a{v % 30}")
            for k, target in enumerate(TARGETS):
                rows[target].append(int(np.expm1(max(level - k, 0))))
    n = len(rows["video_id"])
    columns = {"video_id": pa.array(rows["video_id"]),
               "publish_time": pa.array(rows["publish_time"], CATALOG_SCHEMA.field("publish_time").type),
               "observed_at": pa.array(rows["observed_at"], CATALOG_SCHEMA.field("observed_at").type),
               "author_id": pa.array(rows["author_id"]), **{t: pa.array(rows[t], pa.int64()) for t in TARGETS}}
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in CATALOG_SCHEMA}, schema=CATALOG_SCHEMA)
    return table, quality


def write_meta(directory: str, quality: np.ndarray) -> str:
    ids = [f"v{v:04d}" for v in range(len(quality))]
    table = feature_table_to_arrow(META, ids, {}, {"quality": quality, "hour": np.arange(len(ids)) % 24})
    os.makedirs(os.path.join(directory, "meta"), exist_ok=True)
    pq.write_table(table, os.path.join(directory, "meta", "part-0.parquet"))
    return directory


# ------------------------------------------------------------------------------------------- samples
def test_single_observation_catalog_gives_its_rows_as_cold_samples():
    table, _ = observation_log(50)
    first = table.take(pa.array(np.unique(table.column("video_id").to_numpy(zero_copy_only=False),
                                          return_index=True)[1]))
    samples = observation_samples(catalog_arrays(first))
    assert len(samples) == first.num_rows and samples.n_pairs == 0 and samples.cold.all()
    np.testing.assert_array_equal(samples.arrays["target_row"], np.arange(first.num_rows))


def test_pairs_run_from_earlier_to_later_observations_of_the_same_video():
    table, _ = observation_log()
    arrays = catalog_arrays(table)
    samples = observation_samples(arrays)
    a = samples.arrays
    pairs = ~samples.cold
    assert samples.n_pairs > 0
    source, target = a["input_row"][pairs], a["target_row"][pairs]
    # Same video, strictly earlier input: a prediction never starts from a later observation.
    np.testing.assert_array_equal(arrays["video_id"][source], arrays["video_id"][target])
    assert (arrays["observed_s"][source] < arrays["observed_s"][target]).all()
    np.testing.assert_array_equal(a["input_observed_s"][pairs], arrays["observed_s"][source])
    # Every video with k observations gives k(k-1)/2 pairs (k ≤ 4 here) and at most one first-to-last pair.
    ids, counts = np.unique(arrays["video_id"].astype(str), return_counts=True)
    assert samples.n_pairs == int((counts * (counts - 1) // 2).sum())
    evaluated = a["video_id"][samples.first_to_last].astype(str)
    assert len(evaluated) == len(set(evaluated))
    gap = a["observed_s"][samples.first_to_last] - a["input_observed_s"][samples.first_to_last]
    assert (gap >= NOWCAST_MIN_GAP_DAYS * 86_400).all()


def test_split_keeps_every_observation_of_a_test_video_out_of_training():
    table, _ = observation_log()
    samples = observation_samples(catalog_arrays(table))
    split = split_samples(samples, 0.8)
    videos = samples.arrays["video_id"].astype(str)
    fit = set(videos[np.concatenate([split.train, split.validation])])
    test = set(videos[split.test])
    assert test and not fit & test
    # Inputs of training pairs are observations of training videos only.
    fit_inputs = samples.arrays["input_row"][np.concatenate([split.train, split.validation])]
    assert not set(catalog_arrays(table)["video_id"][fit_inputs[fit_inputs >= 0]].astype(str)) & test
    # The cut is over distinct videos: about a fifth of them are test, however often each was observed.
    assert abs(len(test) / len(set(videos)) - 0.2) < 0.03


def test_each_video_pairs_weigh_one_in_all_and_cold_samples_one_each():
    table, _ = observation_log()
    samples = observation_samples(catalog_arrays(table))
    split = split_samples(samples, 0.8)
    rows = split.train
    weights = video_balanced_weights(samples, rows)
    cold, videos = samples.cold[rows], samples.arrays["video_id"][rows].astype(str)
    assert weights.shape == rows.shape and np.all(weights[cold] == 1.0)
    # Per video, its pairs' weights sum to the same total (a video seen 4 times, 6 pairs, = one seen twice).
    totals = {v: weights[~cold & (videos == v)].sum() for v in set(videos[~cold])}
    per_video = np.array(list(totals.values()))
    pair_counts = np.array([(~cold & (videos == v)).sum() for v in totals])
    assert len(set(pair_counts)) > 1   # the log mixes videos with 1, 3 and 6 pairs
    np.testing.assert_allclose(per_video, per_video[0])
    # The pairs keep their total weight (the group's share of the loss is unchanged).
    assert np.isclose(weights[~cold].sum(), (~cold).sum())
    # No pairs among the rows: no weights (every row counts once).
    assert video_balanced_weights(samples, rows[cold]) is None


def test_weighted_pinball_loss_is_the_weighted_mean_of_rows():
    rng = np.random.default_rng(0)
    pred = torch.tensor(rng.normal(size=(6, len(TARGETS), 3)), dtype=torch.float32)
    labels = torch.tensor(rng.normal(size=(6, len(TARGETS))), dtype=torch.float32)
    mask = torch.ones(6, len(TARGETS), dtype=torch.bool)
    per_row = torch.stack([pinball_loss(pred[i:i + 1], labels[i:i + 1], mask[i:i + 1]) for i in range(6)])
    weights = torch.tensor([3.0, 1.0, 0.5, 0.5, 0.0, 1.0])
    expected = (per_row * weights).sum() / weights.sum()
    torch.testing.assert_close(pinball_loss(pred, labels, mask, weights), expected)
    torch.testing.assert_close(pinball_loss(pred, labels, mask, torch.ones(6)), pinball_loss(pred, labels, mask))


# ------------------------------------------------------------------------------------------- network
def _nowcast_net(layouts) -> PopularityNet:
    torch.manual_seed(0)
    return PopularityNet(layouts, NetworkConfig(width=8, hidden=16, nowcast=True)).eval()


def test_a_row_prediction_depends_only_on_its_own_observation(tmp_path):
    table, quality = observation_log(40)
    features = write_meta(str(tmp_path / "features"), quality)
    from model.data import fit_layout, make_batch, read_features
    tables = read_features(features)
    layout = {"meta": fit_layout(tables["meta"], np.arange(len(tables["meta"])))}
    arrays = catalog_arrays(table)
    net = _nowcast_net(layout)
    ids = arrays["video_id"][:6]
    ages = np.log1p(np.full(6, 20.0))
    labels = arrays["log_labels"][:6].copy()
    observed = observed_arrays(labels, np.full(6, 2.0), np.zeros(4), np.ones(4))
    base = net(make_batch(layout, tables, ids, ages, observed=observed)).detach()
    changed = labels.copy()
    changed[3:] += 2.0   # other rows' (later) counts change
    after = net(make_batch(layout, tables, ids, ages,
                           observed=observed_arrays(changed, np.full(6, 2.0), np.zeros(4), np.ones(4)))).detach()
    torch.testing.assert_close(after[:3], base[:3])
    assert not torch.allclose(after[3:], base[3:])
    # No observation at all is the cold-start path, whatever the counts slots hold.
    cold = net(make_batch(layout, tables, ids, ages)).detach()
    masked = Observed(torch.full((6, 4), 9.0), torch.zeros((6, 4), dtype=torch.bool), torch.zeros(6))
    batch = make_batch(layout, tables, ids, ages)
    batch.observed = masked
    torch.testing.assert_close(net(batch).detach(), cold)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def nowcast_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("nowcast")
    table, quality = observation_log()
    features = write_meta(str(root / "features"), quality)
    model_dir = str(root / "model")
    metrics = train(table, features, model_dir, seed=1, threads=1,
                    network=NetworkConfig(width=16, hidden=32, dropout=0.05),
                    training=TrainingConfig(epochs=25, batch_size=64, patience=6, ensemble_size=1,
                                            refit_full_train=False, learning_rate=3e-3))
    return {"table": table, "model_dir": model_dir, "metrics": metrics}


def test_train_writes_nowcasts_and_beats_counts_staying_as_they_are(nowcast_model):
    now = nowcast_model["metrics"]["test"]["nowcast"]
    nowcasts = pq.read_table(os.path.join(nowcast_model["model_dir"], "test_nowcasts.parquet"))
    assert nowcasts.column_names[:3] == ["video_id", "input_observed_at", "target_observed_at"]
    assert {f"pred_{t}" for t in TARGETS} <= set(nowcasts.column_names)
    assert nowcasts.num_rows == now["n_videos"] > 5
    assert pc.all(pc.less(nowcasts.column("input_observed_at"),
                                          nowcasts.column("target_observed_at"))).as_py()
    for peer in ("counts_stay", "szabo_huberman", "lightgbm", "lightgbm_l1_balanced"):
        assert peer in now
    for target in TARGETS:
        assert now["model"][target]["mae_log1p"] < now["counts_stay"][target]["mae_log1p"]
    assert now["by_gap"] and now["by_input_age"]
    assert load_model(nowcast_model["model_dir"]).nowcasts


def test_scoring_starts_from_the_latest_observation_and_says_which(nowcast_model, tmp_path):
    model = load_model(nowcast_model["model_dir"])
    table = nowcast_model["table"]
    from model.data import read_features
    tables = read_features(os.path.join(os.path.dirname(nowcast_model["model_dir"]), "features"))
    rows = table.slice(0, 20)
    out = model.predict(rows, tables, 30.0)
    observed = rows.column("observed_at").cast(pa.int64()).to_numpy()
    np.testing.assert_array_equal(out["input_observed_at"].astype(np.int64), observed)
    assert (out["horizon_days"] == 30.0).all()
    # Without counts the same rows are cold starts.
    cold_rows = rows
    for target in TARGETS:
        cold_rows = cold_rows.set_column(cold_rows.schema.get_field_index(target), target,
                                         pa.nulls(rows.num_rows, pa.int64()))
    cold = model.predict(cold_rows, tables, 30.0)
    assert np.isnat(cold["input_observed_at"]).all()
    assert not np.allclose(cold["pred_views"], out["pred_views"])


# ------------------------------------------------------------------------------------------- one row per video
def test_featurize_reads_earliest_and_score_latest_observation_never_a_later_one():
    from featurizers.core.observations import earliest_observations, latest_observations
    table, _ = observation_log(30)
    observed = table.column("observed_at").to_numpy(zero_copy_only=False)
    ids = table.column("video_id").to_numpy(zero_copy_only=False)
    first = earliest_observations(table)
    assert first.num_rows == len(set(ids))
    for row in first.to_pylist():
        assert np.datetime64(row["observed_at"].replace(tzinfo=None), "us") == observed[ids == row["video_id"]].min()
    as_of = START + timedelta(days=40)
    latest = latest_observations(table, as_of)
    assert latest.num_rows == len(set(ids))
    cutoff = np.datetime64(as_of.replace(tzinfo=None), "us")
    for row in latest.to_pylist():
        mine = observed[ids == row["video_id"]]
        if (mine <= cutoff).any():
            assert np.datetime64(row["observed_at"].replace(tzinfo=None), "us") == mine[mine <= cutoff].max()
        else:   # only observed later than the reference time: a cold start, no count peeked at
            assert all(row[t] is None for t in TARGETS)
    assert any(all(r[t] is None for t in TARGETS) for r in latest.to_pylist())


def test_score_job_nowcasts_from_the_latest_observation_as_of(nowcast_model, tmp_path):
    from pipelines.score import run as score
    table = nowcast_model["table"]
    catalog = str(tmp_path / "log.parquet")
    pq.write_table(table, catalog)
    features = os.path.join(os.path.dirname(nowcast_model["model_dir"]), "features")
    as_of = START + timedelta(days=50)
    summary = score(["--catalog", catalog, "--features", features, "--model", nowcast_model["model_dir"],
                     "--output", str(tmp_path / "scored"), "--start", "2024-01-01", "--end", "2024-02-15",
                     "--as-of", as_of.isoformat(), "--runner", "DirectRunner", "--direct_running_mode", "in_memory"])
    assert summary.rows_unaccounted == 0
    scored = pq.read_table(tmp_path / "scored").to_pylist()
    videos = {r["video_id"] for r in table.to_pylist() if r["publish_time"].date() <= as_of.date()
              and r["publish_time"] < START + timedelta(days=46)}
    assert {r["video_id"] for r in scored} == videos and len(scored) == len(videos)
    for row in scored:
        if row["input_observed_at"] is None:
            assert row["views"] is None   # cold start: nothing observed by the reference time
        else:
            assert row["input_observed_at"] == row["observed_at"] <= as_of
            assert row["horizon_days"] >= 7.0
    assert any(r["input_observed_at"] is None for r in scored) and any(r["input_observed_at"] for r in scored)


def test_a_share_of_each_video_weight_can_go_to_the_pair_the_evaluation_scores():
    table, _ = observation_log()
    samples = observation_samples(catalog_arrays(table))
    rows = split_samples(samples, 0.8).train
    weights = video_balanced_weights(samples, rows, first_to_last_share=0.5)
    even = video_balanced_weights(samples, rows)
    pairs = ~samples.cold[rows]
    videos = samples.arrays["video_id"][rows].astype(str)
    evaluated = samples.first_to_last[rows]
    several = [v for v in set(videos[pairs]) if (pairs & (videos == v)).sum() > 1 and (evaluated & (videos == v)).any()]
    assert several
    for v in several[:20]:
        mine = pairs & (videos == v)
        # Same total per video as the even split; its first-to-last pair holds half of it plus its even part.
        assert np.isclose(weights[mine].sum(), even[mine].sum())
        share = weights[mine & evaluated].sum() / weights[mine].sum()
        assert np.isclose(share, 0.5 + 0.5 / mine.sum())
    assert np.isclose(weights[pairs].sum(), pairs.sum()) and np.all(weights[~pairs] == 1.0)
