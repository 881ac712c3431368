"""The fusion model on small synthetic catalogs + feature tables: shapes, masks, determinism, artifacts.

Feature tables are real Parquet files in the FeatureSpec layout (written with feature_store), so the
whole path catalog → features → tensors → network → MODEL_DIR is exercised without media.
"""
from __future__ import annotations

import dataclasses
import json
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
from model.artifact import ModelIntegrityError, load_model
from model.data import FeatureVersionError, catalog_arrays, fit_layout, make_batch, read_features, time_split
from model.network import NetworkConfig, PopularityNet, pinball_loss
from model.train import TrainingConfig, train

N_ROWS = 400
FRAMES, FRAME_DIM = 4, 6
SPECS = {
    "visual": FeatureSpec("visual", "visual-test", "1", {"frames": (FRAMES, FRAME_DIM)},
                          (("n_frames", pa.int32()),)),
    "audio": FeatureSpec("audio", "audio-test", "1", {"logmel": (5,)}, (("has_audio", pa.float32()),)),
    "text": FeatureSpec("text", "text-test", "1", {"embedding": (8,)}, (("caption_chars", pa.float32()),)),
    "meta": FeatureSpec("meta", "meta-test", "1", {},
                        (("log_followers", pa.float32()), ("hour", pa.int32()), ("weekday", pa.int32()))),
}
FAST = TrainingConfig(epochs=12, batch_size=64, patience=4, ensemble_size=1, refit_full_train=False,
                      learning_rate=3e-3)
SMALL = NetworkConfig(width=16, hidden=32, dropout=0.05)


def synthetic_catalog(n: int = N_ROWS, seed: int = 0) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """A catalog whose log1p(counts) follow text embedding[0], followers and age (+ noise); some nulls."""
    rng = np.random.default_rng(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    publish = [start + timedelta(days=float(d)) for d in np.sort(rng.uniform(0, 300, n))]
    # Ages vary independently of publish time, so the test rows' ages lie inside the training range.
    ages = rng.uniform(1, 200, n)
    observed = [p + timedelta(days=float(a)) for p, a in zip(publish, ages)]
    text0 = rng.normal(size=n)
    followers = rng.normal(size=n)
    base = 6 + 1.5 * text0 + 1.0 * followers + 0.8 * np.log1p(ages) + rng.normal(scale=0.3, size=n)
    counts = {t: np.round(np.expm1(np.maximum(base - k, 0))).astype(np.int64) for k, t in enumerate(TARGETS)}
    labels = {t: pa.array(v, pa.int64(), mask=rng.random(n) < 0.05) for t, v in counts.items()}
    columns = {"video_id": pa.array([f"v{i:05d}" for i in range(n)]),
               "publish_time": pa.array(publish, CATALOG_SCHEMA.field("publish_time").type),
               "observed_at": pa.array(observed, CATALOG_SCHEMA.field("observed_at").type),
               "author_id": pa.array([f"a{i % 50}" if i < 0.9 * n else f"new{i}" for i in range(n)]), **labels}
    table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in CATALOG_SCHEMA},
                     schema=CATALOG_SCHEMA)
    return table, {"text0": text0, "followers": followers}


def write_features(directory: str, catalog: pa.Table, signal: dict[str, np.ndarray], seed: int = 0,
                   text_version: str = "1") -> str:
    """Write all four modalities; visual only for half the rows, audio for three quarters."""
    rng = np.random.default_rng(seed + 1)
    ids = catalog.column("video_id").to_pylist()
    n = len(ids)
    text = np.concatenate([signal["text0"][:, None], rng.normal(size=(n, 7))], axis=1)
    tables = {
        "visual": feature_table_to_arrow(SPECS["visual"], ids[::2], {"frames": rng.normal(size=(len(ids[::2]), FRAMES, FRAME_DIM))},
                                         {"n_frames": [FRAMES] * len(ids[::2])}),
        "audio": feature_table_to_arrow(SPECS["audio"], ids[: 3 * n // 4], {"logmel": rng.normal(size=(3 * n // 4, 5))},
                                        {"has_audio": np.ones(3 * n // 4)}),
        "text": feature_table_to_arrow(FeatureSpec("text", "text-test", text_version, {"embedding": (8,)},
                                                   (("caption_chars", pa.float32()),)),
                                       ids, {"embedding": text}, {"caption_chars": rng.integers(0, 3000, n)}),
        "meta": feature_table_to_arrow(SPECS["meta"], ids, {},
                                       {"log_followers": signal["followers"], "hour": rng.integers(0, 24, n),
                                        "weekday": rng.integers(0, 7, n)}),
    }
    for modality, table in tables.items():
        os.makedirs(os.path.join(directory, modality), exist_ok=True)
        pq.write_table(table, os.path.join(directory, modality, "part-0.parquet"))
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    catalog, signal = synthetic_catalog()
    features = write_features(str(root / "features"), catalog, signal)
    model_dir = str(root / "model_a")
    metrics = train(catalog, features, model_dir, seed=3, network=SMALL, training=FAST, threads=1)
    return {"root": root, "catalog": catalog, "signal": signal, "features": features, "model_dir": model_dir,
            "metrics": metrics}


def _layouts_and_batch(workspace, rows=slice(0, 32)):
    tables = read_features(workspace["features"])
    arrays = catalog_arrays(workspace["catalog"])
    layouts = {k: fit_layout(t, np.arange(len(t))) for k, t in tables.items()}
    ids = arrays["video_id"][rows]
    return layouts, tables, make_batch(layouts, tables, ids, np.log1p(arrays["age_days"][rows]),
                                       arrays["log_labels"][rows])


def test_network_shapes_and_monotone_quantiles(workspace):
    layouts, _, batch = _layouts_and_batch(workspace)
    assert batch.modalities["visual"].sequences["frames"].shape == (32, FRAMES, FRAME_DIM)
    assert batch.modalities["meta"].categorical.shape == (32, 2)        # hour, weekday embedded
    assert batch.modalities["visual"].present.tolist() == [i % 2 == 0 for i in range(32)]
    net = PopularityNet(layouts, SMALL).eval()
    out = net(batch)
    assert out.shape == (32, len(TARGETS), 3)
    assert torch.all(out[..., 0] < out[..., 1]) and torch.all(out[..., 1] < out[..., 2])
    # text + meta only (the real catalogs have no media) works, and so does no modality at all.
    text_meta = PopularityNet({k: layouts[k] for k in ("text", "meta")}, SMALL).eval()
    assert torch.isfinite(text_meta(batch)).all()
    assert torch.isfinite(net(batch, drop_modalities=tuple(layouts))).all()


def test_missing_modality_ignores_whatever_is_in_its_tensor(workspace):
    layouts, _, batch = _layouts_and_batch(workspace)
    net = PopularityNet(layouts, SMALL).eval()
    row = 1                                               # odd rows have no visual features
    assert not batch.modalities["visual"].present[row]
    before = net(batch)[row]
    visual = batch.modalities["visual"]
    visual.sequences["frames"][row] = torch.randn(FRAMES, FRAME_DIM) * 1e3
    visual.sequences["frames"][row, 0, 0] = float("nan")
    visual.sequence_masks["frames"][row] = True
    after = net(batch)[row]
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    # ... whereas a present modality does move the output (the mask is not just ignoring everything).
    present_row = 0
    before0 = net(batch)[present_row]
    visual.sequences["frames"][present_row] += 3.0
    assert not torch.equal(before0, net(batch)[present_row])


def test_null_labels_are_skipped_not_zero():
    pred = torch.randn(5, 4, 3).sort(dim=-1).values.requires_grad_(True)
    labels = torch.randn(5, 4)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[2, 1] = mask[4, 3] = False
    loss = pinball_loss(pred, labels, mask)
    loss.backward()
    grad = pred.grad.clone()
    pred.grad = None
    garbage = labels.clone()
    garbage[2, 1], garbage[4, 3] = 1e6, float("nan")
    loss2 = pinball_loss(pred, garbage, mask)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(grad, pred.grad)
    assert torch.all(grad[2, 1] == 0) and torch.all(grad[4, 3] == 0)
    # A zero label would be a real value: a different loss.
    zeros = labels.clone()
    zeros[2, 1] = 0.0
    assert pinball_loss(pred, zeros, torch.ones_like(mask)) != loss
    assert pinball_loss(pred, labels, torch.zeros_like(mask)).item() == 0.0


def test_catalog_null_counts_become_unknown_labels(workspace):
    arrays = catalog_arrays(workspace["catalog"])
    views = workspace["catalog"].column("views")
    assert np.array_equal(np.isnan(arrays["log_labels"][:, 0]), views.is_null().to_numpy(zero_copy_only=False))


def test_time_split_puts_latest_rows_in_test(workspace):
    arrays = catalog_arrays(workspace["catalog"])
    split = time_split(arrays["publish_s"], np.ones(N_ROWS, bool), 0.8)
    assert arrays["publish_s"][split.train].max() < arrays["publish_s"][split.validation].min()
    assert arrays["publish_s"][split.validation].max() < arrays["publish_s"][split.test].min()
    assert len(split.test) == pytest.approx(0.2 * N_ROWS, abs=2)


def test_training_learns_planted_signal_and_writes_artifacts(workspace):
    model_dir, metrics = workspace["model_dir"], workspace["metrics"]["test"]
    assert sorted(os.listdir(model_dir)) == ["blend.json", "config.json", "metrics.json", "model.safetensors",
                                             "test_predictions.parquet"]
    for target in TARGETS:
        assert metrics["model"][target]["mae_log1p"] < 0.8 * metrics["global_median"][target]["mae_log1p"]
        assert metrics["model"][target]["spearman"] > 0.6
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["featurizers"] == {m: s.featurizer_id for m, s in SPECS.items()}
    assert config["seed"] == 3 and len(config["fingerprint"]) == 64 and config["split"]["quantile"] == 0.8
    assert config["layouts"]["meta"]["categorical"]["weekday"] == [str(d) for d in range(7)]
    preds = pq.read_table(os.path.join(model_dir, "test_predictions.parquet"))
    assert preds.num_rows == config["split"]["n_test"]
    assert {f"{p}_{t}" for p in ("pred", "p10", "p90") for t in TARGETS} <= set(preds.column_names)
    # Recompute MAE(log1p) from the written predictions and the catalog labels: same number as metrics.json.
    joined = preds.join(workspace["catalog"].select(["video_id", "views"]), "video_id")
    truth = np.log1p(joined.column("views").to_numpy(zero_copy_only=False).astype(float))
    pred = np.log1p(joined.column("pred_views").to_numpy())
    ok = np.isfinite(truth)
    assert np.mean(np.abs(truth[ok] - pred[ok])) == pytest.approx(metrics["model"]["views"]["mae_log1p"], abs=1e-4)


def test_load_round_trip_gives_identical_predictions(workspace):
    model = load_model(workspace["model_dir"])
    tables = read_features(workspace["features"])
    preds = pq.read_table(os.path.join(workspace["model_dir"], "test_predictions.parquet"))
    catalog = workspace["catalog"]
    wanted = np.isin(catalog.column("video_id").to_numpy(zero_copy_only=False),
                     preds.column("video_id").to_numpy(zero_copy_only=False))
    rows = catalog.filter(pa.array(wanted)).sort_by("video_id")
    out = model.predict(rows, tables, horizon_days=None)
    expected = preds.sort_by("video_id")
    for key in ("pred_views", "p10_shares", "p90_likes"):
        np.testing.assert_allclose(out[key], expected.column(key).to_numpy(), rtol=1e-5)
    later = model.predict(rows, tables, horizon_days=365.0)
    assert later["pred_views"].shape == (rows.num_rows,)


def test_same_seed_gives_identical_weights_and_predictions(workspace, tmp_path):
    again = str(tmp_path / "model_b")
    train(workspace["catalog"], workspace["features"], again, seed=3, network=SMALL, training=FAST, threads=1,
          baselines_enabled=False)
    a, b = load_model(workspace["model_dir"]), load_model(again)
    for (name, pa_), (_, pb) in zip(a.networks[0].state_dict().items(), b.networks[0].state_dict().items()):
        assert torch.equal(pa_, pb), name
    first = pq.read_table(os.path.join(workspace["model_dir"], "test_predictions.parquet"))
    second = pq.read_table(os.path.join(again, "test_predictions.parquet"))
    assert first.equals(second)


def test_refuses_features_from_another_featurizer_version(workspace, tmp_path):
    features = write_features(str(tmp_path / "features_v2"), workspace["catalog"], workspace["signal"],
                              text_version="2")
    model = load_model(workspace["model_dir"])
    with pytest.raises(FeatureVersionError, match="text-test@2.*text-test@1"):
        model.predict(workspace["catalog"].slice(0, 5), read_features(features), horizon_days=7.0)


def test_warm_start_freezes_requested_branches(workspace, tmp_path):
    catalog, signal = synthetic_catalog(n=200, seed=5)
    features = write_features(str(tmp_path / "features_new"), catalog, signal, seed=5)
    out = str(tmp_path / "warm")
    train(catalog, features, out, seed=1, init_from=workspace["model_dir"], freeze=("text", "meta"),
          training=TrainingConfig(epochs=3, batch_size=64, ensemble_size=1, refit_full_train=False),
          threads=1, baselines_enabled=False)
    source, warm = load_model(workspace["model_dir"]), load_model(out)
    src, new = source.networks[0].state_dict(), warm.networks[0].state_dict()
    frozen = [k for k in src if k.startswith(("encoders.text.", "encoders.meta."))]
    trained = [k for k in src if k.startswith("trunk.")]
    assert frozen and all(torch.equal(src[k], new[k]) for k in frozen)
    assert any(not torch.equal(src[k], new[k]) for k in trained)
    assert warm.config["init_from"] == workspace["model_dir"]
    assert warm.config["layouts"] == source.config["layouts"]      # same inputs, same normalisation


def test_evaluation_report_is_self_contained(workspace, tmp_path):
    from model.report import evaluate
    report = evaluate(workspace["catalog"], workspace["features"], workspace["model_dir"], str(tmp_path / "r"))
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "http" not in page.split("<body>")[1]
    assert set(report["ablation"]) == {f"without {m}" for m in SPECS}
    assert {"new creators", "known creators", "without media"} <= set(report["slices"])
    # Same split, same predictions: the report's test MAE is the one recorded at training time.
    assert report["test"]["views"]["mae_log1p"] == pytest.approx(
        workspace["metrics"]["test"]["model"]["views"]["mae_log1p"], abs=1e-5)
    # Dropping the text branch (where the planted signal is) must hurt.
    assert report["ablation"]["without text"]["views"]["mae_log1p"] > report["test"]["views"]["mae_log1p"]
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["model_version"] == report["model_version"]


def test_tree_blend_weights_come_from_validation_and_the_file_is_checked(workspace, tmp_path):
    config = json.load(open(os.path.join(workspace["model_dir"], "config.json")))
    blend = config["blend"]
    for target, report in blend["validation"]["cold"].items():
        maes = report["validation_mae"]
        # The grid holds both ends, so the chosen blend is never worse than either part on validation.
        assert maes["blend"] <= min(maes["network"], maes["trees"]) + 1e-12
        assert blend["weights"]["cold"][target] == report["weight_network"]
    metrics = workspace["metrics"]["test"]
    assert set(metrics["network"]) == set(TARGETS)   # the network alone, reported beside the blend
    # Test labels never reach the weights: retraining with every test label changed picks the same ones.
    catalog = workspace["catalog"]
    test_ids = pq.read_table(os.path.join(workspace["model_dir"], "test_predictions.parquet")).column("video_id")
    in_test = pc.is_in(catalog.column("video_id"), test_ids)
    scrambled = catalog.set_column(catalog.schema.get_field_index("views"), "views",
                                   pc.if_else(in_test, pa.scalar(7, catalog.schema.field("views").type),
                                              catalog.column("views")))
    again = str(tmp_path / "scrambled")
    train(scrambled, workspace["features"], again, seed=3, network=SMALL, training=FAST, threads=1,
          baselines_enabled=False)
    assert json.load(open(os.path.join(again, "config.json")))["blend"]["weights"] == blend["weights"]
    # An edited blend file is refused, like edited weights.
    with open(os.path.join(again, "blend.json"), "r+b") as f:
        f.seek(50)
        f.write(b"0")
    with pytest.raises(ModelIntegrityError, match="blend.json"):
        load_model(again)


def test_without_trees_the_model_is_the_network_alone(workspace, tmp_path):
    out = str(tmp_path / "no_blend")
    train(workspace["catalog"], workspace["features"], out, seed=3, network=SMALL,
          training=dataclasses.replace(FAST, blend_trees=False), threads=1, baselines_enabled=False)
    assert "blend.json" not in os.listdir(out) and "blend" not in json.load(open(os.path.join(out, "config.json")))
    assert load_model(out).blend is None

