"""Training in bounded memory: the disk-backed path (features streamed to RowFiles, inputs built in chunks,
minibatches read back) gives exactly what building every tensor in memory gives.

Chunk sizes are set tiny here so that every chunk boundary is crossed on a few hundred rows.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from featurizers.core.feature_table import feature_table_to_arrow
from model import data as model_data
from model import train as model_train
from model.artifact import build_networks, load_model
from model.data import (
    RowFile,
    build_inputs,
    catalog_arrays,
    fit_layout,
    fit_stored_layout,
    join_rows,
    log_age,
    make_batch,
    read_features,
    stream_features,
    time_split,
)
from model.network import NetworkConfig
from model.train import TrainingConfig, deterministic, fit_network, train
from tests.test_model import SPECS, SMALL, synthetic_catalog, write_features

TINY = TrainingConfig(epochs=3, batch_size=32, patience=4, ensemble_size=1, refit_full_train=False,
                      learning_rate=3e-3)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunk sizes small enough that a 300-row catalog crosses many chunk and batch boundaries."""
    monkeypatch.setattr(model_data, "STREAM_BATCH_ROWS", 37)
    monkeypatch.setattr(model_data, "INPUT_CHUNK_ROWS", 29)
    monkeypatch.setattr(model_data, "STAT_CHUNK_VALUES", 50)


def _messy_features(directory: str, catalog: pa.Table, signal: dict) -> str:
    """The fixture's features, plus: text split over files in nested directories, an id published twice
    (the later row wins), rows of videos not in the catalog, and catalog rows without meta."""
    write_features(directory, catalog, signal)
    ids = catalog.column("video_id").to_pylist()
    rng = np.random.default_rng(11)
    text_spec = SPECS["text"]
    text = pq.read_table(os.path.join(directory, "text", "part-0.parquet"))
    os.remove(os.path.join(directory, "text", "part-0.parquet"))
    os.makedirs(os.path.join(directory, "text", "run=1", "deep"))
    pq.write_table(text.slice(0, 120), os.path.join(directory, "text", "run=1", "a.parquet"), row_group_size=16)
    pq.write_table(text.slice(120), os.path.join(directory, "text", "run=1", "deep", "b.parquet"), row_group_size=50)
    again = ids[5:9] + ["not-in-catalog-1", "not-in-catalog-2"]
    newer = feature_table_to_arrow(text_spec, again, {"embedding": rng.normal(size=(len(again), 8)) * 9},
                                   {"caption_chars": rng.integers(0, 3000, len(again))})
    pq.write_table(newer, os.path.join(directory, "text", "run=1", "deep", "c.parquet"))
    meta = pq.read_table(os.path.join(directory, "meta", "part-0.parquet"))
    pq.write_table(meta.slice(10), os.path.join(directory, "meta", "part-0.parquet"))
    return directory


def test_row_file_returns_exactly_the_rows_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    reference = np.zeros((500, 7), dtype=np.float32)
    f = RowFile(str(tmp_path / "m.bin"), 500, 7)
    f.write_range(100, rng.normal(size=(50, 7)))
    reference[100:150] = f.read_range(100, 150)
    rows = rng.permutation(500)[:200]
    rows = np.concatenate([rows, rows[:10]])            # given twice: the last value stays
    values = rng.normal(size=(len(rows), 7)).astype(np.float32)
    f.write(rows, values)
    for r, v in zip(rows, values):
        reference[r] = v
    for ask in (np.arange(500), rng.permutation(500)[:77], np.array([3, 4, 5, 5, 4, 499, 0, 1, 2]),
                np.array([], dtype=np.int64), np.arange(120, 260)):
        got = f.read(ask)
        assert got.shape == (len(ask), 7) and got.dtype == np.float32
        np.testing.assert_array_equal(got, reference[ask])
    with pytest.raises(IndexError):
        f.read(np.array([500]))
    f.close()
    assert not os.path.exists(tmp_path / "m.bin")


@pytest.mark.parametrize("n, width", [(1, 3), (1000, 5), (333, 2)])
def test_chunked_statistics_are_numpys_to_the_bit(monkeypatch, n, width):
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, width)) * 7 + 3).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[:, 0] = np.nan                                  # a column with no value at all
    monkeypatch.setattr(model_data, "STAT_CHUNK_VALUES", 17)
    mean, std = model_data._nan_mean_std(model_data._chunks_of(x, np.arange(n)), width)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected_mean = np.nan_to_num(np.nanmean(x, axis=0, dtype=np.float64))
        expected_std = np.nan_to_num(np.nanstd(x, axis=0, dtype=np.float64))
    assert mean.tobytes() == expected_mean.tobytes() and std.tobytes() == expected_std.tobytes()


def test_streamed_inputs_equal_in_memory_batches(tmp_path, tiny_chunks):
    catalog, signal = synthetic_catalog(n=300, seed=2)
    features = _messy_features(str(tmp_path / "features"), catalog, signal)
    arrays = catalog_arrays(catalog)
    split = time_split(arrays["publish_s"], np.isfinite(arrays["log_labels"]).any(axis=1), 0.8)
    slots = np.sort(np.concatenate([split.train, split.validation, split.test]))
    tables = read_features(features)
    stored = stream_features(features, None, arrays["video_id"][slots], str(tmp_path))
    assert sorted(stored) == sorted(tables)
    assert len(os.listdir(tmp_path)) > 1                 # the raw vector files
    train_slots = np.searchsorted(slots, split.train)
    layouts = {}
    for name, table in tables.items():
        rows = join_rows(arrays["video_id"][split.train], table)
        layouts[name] = fit_layout(table, rows[rows >= 0])
        assert fit_stored_layout(stored[name], train_slots).to_json() == layouts[name].to_json(), name
        assert stored[name].featurizer == table.featurizer and len(stored[name]) == len(table)
    # Rows published twice keep their later values, in both paths.
    text = tables["text"]
    assert np.abs(text.vectors["embedding"][join_rows(arrays["video_id"][5:9], text)]).max() > 5
    labels = np.where(np.isfinite(arrays["log_labels"]), arrays["log_labels"] * 0.5 - 1, np.nan)
    ages = log_age(arrays["age_days"])
    inputs = build_inputs(layouts, stored, ages[slots], labels[slots], str(tmp_path), release=True)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".raw")]     # released
    rng = np.random.default_rng(0)
    for rows in (np.arange(len(slots)), rng.permutation(len(slots))[:50], np.array([7])):
        got = inputs.index(torch.from_numpy(rows))
        want = make_batch(layouts, tables, arrays["video_id"][slots[rows]], ages[slots[rows]], labels[slots[rows]])
        _assert_batches_equal(got, want)
    view = inputs.view(np.searchsorted(slots, split.test))
    _assert_batches_equal(view.index(np.arange(len(view))),
                          make_batch(layouts, tables, arrays["video_id"][split.test], ages[split.test],
                                     labels[split.test]))
    tabular = inputs.tabular(np.arange(10))
    plain = make_batch(layouts, tables, arrays["video_id"][slots[:10]], ages[slots[:10]])
    for name, m in tabular.modalities.items():
        assert m.vectors.shape == (10, 0) and not m.sequences
        for field in ("present", "numeric", "categorical"):
            assert torch.equal(getattr(m, field), getattr(plain.modalities[name], field)), (name, field)
    assert torch.equal(tabular.log_age, plain.log_age)
    inputs.close()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".inputs")]


def _assert_batches_equal(got, want):
    assert set(got.modalities) == set(want.modalities)
    for name, a in got.modalities.items():
        b = want.modalities[name]
        for field in ("present", "vectors", "numeric", "categorical"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, field)
        assert a.sequences.keys() == b.sequences.keys()
        for key in a.sequences:
            assert torch.equal(a.sequences[key], b.sequences[key]) and torch.equal(a.sequence_masks[key],
                                                                                    b.sequence_masks[key])
    assert torch.equal(got.log_age, want.log_age)
    assert torch.equal(got.labels, want.labels) and torch.equal(got.label_mask, want.label_mask)


def test_bounded_training_matches_in_memory_training(tmp_path, tiny_chunks):
    """train() (disk-backed, tiny chunks) against the same steps run on in-memory tensors: same layouts,
    same weights to the bit, same test predictions."""
    catalog, signal = synthetic_catalog(n=300, seed=4)
    features = _messy_features(str(tmp_path / "features"), catalog, signal)
    out = str(tmp_path / "model")
    seed = 2
    result = train(catalog, features, out, seed=seed, network=copy.deepcopy(SMALL), training=copy.deepcopy(TINY),
                   threads=1, baselines_enabled=False)
    model = load_model(out)
    config = json.load(open(os.path.join(out, "config.json")))

    # The in-memory computation, step by step as train() did before it read rows from disk.
    arrays = catalog_arrays(catalog)
    split = time_split(arrays["publish_s"], np.isfinite(arrays["log_labels"]).any(axis=1), 0.8)
    tables = read_features(features)
    layouts = {}
    for name in sorted(tables):
        rows = join_rows(arrays["video_id"][split.train], tables[name])
        layouts[name] = fit_layout(tables[name], rows[rows >= 0])
    assert config["layouts"] == json.loads(json.dumps({k: v.to_json() for k, v in layouts.items()}))
    center, scale = np.asarray(config["target_center"]), np.asarray(config["target_scale"])
    ages = log_age(arrays["age_days"])

    def batch(rows):
        return make_batch(layouts, tables, arrays["video_id"][rows], ages[rows],
                          (arrays["log_labels"][rows] - center) / scale)
    with deterministic(seed, 1):
        member_seed = seed * 1000
        torch.manual_seed(member_seed)
        net = build_networks({**config, "ensemble_size": 1})[0]
        net, history = fit_network(net, batch(split.train), batch(split.validation), TINY, member_seed, "cpu")
    assert history == result["history"][0]["early_stopping"]
    for (name, a), (_, b) in zip(net.state_dict().items(), model.networks[0].state_dict().items()):
        assert torch.equal(a, b), name
    expected = model.predict_log(catalog.take(pa.array(split.test)), tables, ages[split.test])
    written = pq.read_table(os.path.join(out, "test_predictions.parquet"))
    assert written.column("video_id").to_pylist() == arrays["video_id"][split.test].tolist()
    counts = np.maximum(np.expm1(expected[:, 0, 1].astype(np.float64)), 0.0)
    np.testing.assert_array_equal(written.column("pred_views").to_numpy(), counts)


def test_training_leaves_no_temporary_files_and_caps_the_lightgbm_rows(tmp_path, monkeypatch):
    catalog, signal = synthetic_catalog(n=200, seed=6)
    features = write_features(str(tmp_path / "features"), catalog, signal)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)      # re-read TMPDIR
    monkeypatch.setattr(model_train, "BASELINE_MAX_TRAIN_ROWS", 60)
    seen = []
    original = model_data.RowFile.__init__

    def spy(self, path, n_rows, width):
        seen.append(path)
        original(self, path, n_rows, width)
    monkeypatch.setattr(model_data.RowFile, "__init__", spy)
    result = train(catalog, features, str(tmp_path / "model"), seed=0, network=NetworkConfig(width=8, hidden=16),
                   training=TrainingConfig(epochs=1, batch_size=64, ensemble_size=1), threads=1)
    assert seen and all(p.startswith(str(scratch)) for p in seen)
    assert list(scratch.iterdir()) == []
    lightgbm = result["test"]["lightgbm"]
    assert lightgbm["sampled"]["train_rows"] == 60 and lightgbm["sampled"]["of_train_rows"] > 60
    assert lightgbm["sampled"]["validation_rows"] == min(15, result["split"]["n_validation"])
    assert "sampled" not in result["test"]["global_median"] and np.isfinite(lightgbm["views"]["mae_log1p"])
