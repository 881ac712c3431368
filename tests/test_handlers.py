"""The RunInference model handlers called directly, without a pipeline (as Beam tests its own handlers):
FeaturizerHandler around the packaged MiniLM text featurizer, ScoreHandler around a small trained model."""
from __future__ import annotations

import functools
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from featurizers import meta, text
from featurizers.core.contracts import PREDICTION_COLUMNS, TARGETS
from pipelines.publish import CATALOG_ROW_COLUMN, staged_prediction_schema
from pipelines.sample_catalog import generate_rows
from pipelines.score_transforms import CATALOG_SIDE, JoinedShard, ScoreHandler
from pipelines.transforms import (
    FeaturizeConfig,
    FeaturizerHandler,
    embed_captions,
    embed_frame_stacks,
    feature_specs,
    text_embedder,
)

CAPTIONS = [
    ("Cats doing backflips", ["#cats", "#fun"]),
    ("Été à Paris 🌍", ["#paris"]),
    (None, None),                      # no caption at all: zero embedding, has_text False
    ("", []),
    ("how to cook rice in 5 minutes", None),
]
HORIZON_DAYS = 7.0
RUN_ID = "handler-test"


@pytest.fixture
def no_pickling(monkeypatch):
    """pickle.dumps raises: the handlers' byte counts must not pickle the batch."""
    def refuse(*args, **kwargs):
        raise AssertionError("get_num_bytes pickled the batch")
    monkeypatch.setattr(pickle, "dumps", refuse)


# ---------------------------------------------------------------- FeaturizerHandler (text)

@pytest.fixture(scope="module")
def text_config() -> FeaturizeConfig:
    return FeaturizeConfig(modalities=("text",), text_batch=8)


@pytest.fixture(scope="module")
def text_handler(text_config) -> FeaturizerHandler:
    # Built as FeaturizeRows builds it; functools.partial stands for its picklable factory.
    return FeaturizerHandler(functools.partial(text_embedder, text_config), embed_captions,
                             max_batch_size=text_config.text_batch, name="text")


@pytest.fixture(scope="module")
def text_model(text_handler):
    return text_handler.load_model()


def test_text_handler_gives_one_feature_row_per_caption(text_handler, text_model, text_config):
    spec = feature_specs(text_config)["text"]
    results = list(text_handler.run_inference(CAPTIONS, text_model))
    assert len(results) == len(CAPTIONS)
    for caption, result in zip(CAPTIONS, results):
        assert isinstance(result, PredictionResult)
        assert result.example is caption
        row = result.inference
        assert set(row) == set(spec.shapes) | {name for name, _ in spec.scalars}
        for name, shape in spec.shapes.items():
            assert np.shape(row[name]) == shape, name
    embeddings = np.stack([r.inference["embedding"] for r in results])
    has_text = [bool(r.inference["has_text"]) for r in results]
    assert has_text == [True, True, False, False, True]
    np.testing.assert_allclose(np.linalg.norm(embeddings[has_text], axis=1), 1.0, rtol=1e-5)
    assert not embeddings[~np.array(has_text)].any()
    assert [int(r.inference["hashtag_count"]) for r in results][:2] == [2, 1]
    # Different captions, different embeddings (the featurizer is not returning one row for all).
    assert np.linalg.norm(embeddings[0] - embeddings[1]) > 0.1


def test_text_handler_batch_equals_one_by_one(text_handler, text_model):
    batched = [r.inference for r in text_handler.run_inference(CAPTIONS, text_model)]
    for caption, together in zip(CAPTIONS, batched):
        (alone,) = [r.inference for r in text_handler.run_inference([caption], text_model)]
        for name, value in together.items():
            np.testing.assert_array_equal(np.asarray(alone[name]), np.asarray(value), err_msg=name)


def test_featurizer_handler_refuses_a_short_featurizer_result(text_model):
    # Rows silently lost to zip would be neither features nor dead letters.
    handler = FeaturizerHandler(lambda: text_model, lambda batch, model: embed_captions(batch, model)[:-1],
                                max_batch_size=4, name="text")
    with pytest.raises(ValueError, match="2 rows for 3 examples"):
        handler.run_inference(CAPTIONS[:3], text_model)


def test_featurizer_handler_counts_payload_bytes_without_pickling(text_handler, no_pickling):
    # UTF-8 bytes of titles and hashtags: "Été à Paris 🌍" is 14 characters but 19 bytes.
    expected_text = (len(b"Cats doing backflips") + len(b"#cats") + len(b"#fun")
                     + 19 + len(b"#paris") + 0 + 0 + len(b"how to cook rice in 5 minutes"))
    assert len("Été à Paris 🌍".encode()) == 19
    assert text_handler.get_num_bytes(CAPTIONS) == expected_text
    frames = [np.zeros((4, 8, 8, 3), np.uint8), np.zeros((3, 8, 8, 3), np.uint8)]
    visual = FeaturizerHandler(lambda: None, embed_frame_stacks, max_batch_size=2, name="visual")
    assert visual.get_num_bytes(frames) == (4 + 3) * 8 * 8 * 3
    assert visual.get_num_bytes([]) == 0
    # The base class's count does pickle, so this fixture would catch a handler that fell back to it.
    with pytest.raises(AssertionError, match="pickled"):
        ModelHandler.get_num_bytes(text_handler, CAPTIONS)


def test_featurizer_handler_metrics_namespace_and_batching(text_handler):
    assert text_handler.get_metrics_namespace() == "popcast"
    assert text_handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 8}


# ---------------------------------------------------------------- ScoreHandler

@pytest.fixture(scope="module")
def scoring(tmp_path_factory, text_model):
    """60 generated catalog rows, their real text (MiniLM) + meta feature tables, and a tiny model
    trained on them (1 member, 2 epochs)."""
    from model.network import NetworkConfig
    from model.train import TrainingConfig, train

    root = tmp_path_factory.mktemp("handlers")
    catalog, _ = generate_rows(60, seed=5)
    catalog = catalog.sort_by("publish_time")
    tables = {
        "text": text.text_feature_table(catalog.column("video_id").to_pylist(), catalog.column("title").to_pylist(),
                                        catalog.column("hashtags").to_pylist(), text_model),
        "meta": meta.meta_features_table(catalog),
    }
    features = root / "features"
    for modality, table in tables.items():
        os.makedirs(features / modality)
        pq.write_table(table, features / modality / "part-0.parquet")
    model_dir = str(root / "model")
    train(catalog, str(features), model_dir, seed=1, threads=1, baselines_enabled=False,
          network=NetworkConfig(width=16, hidden=32),
          training=TrainingConfig(epochs=2, batch_size=32, ensemble_size=1, refit_full_train=False))
    # What the score job joins: the catalog's join columns (with each row's position) and the stored
    # feature tables as the Parquet reader returns them.
    keys = catalog.select(["video_id", "publish_time"]).append_column(
        CATALOG_ROW_COLUMN, pa.array(np.arange(catalog.num_rows), pa.int64()))
    stored = {m: pq.read_table(features / m) for m in tables}
    scored_schema = pa.schema(list(keys.schema) + [pa.field(c.name, c.type) for c in PREDICTION_COLUMNS])
    staged_schema = staged_prediction_schema(scored_schema, keys.schema)
    handler = ScoreHandler(model_dir, HORIZON_DAYS, RUN_ID, staged_schema)
    return {"keys": keys, "stored": stored, "handler": handler, "model": handler.load_model(),
            "schema": staged_schema}


def shard_of(scoring, rows: slice | None = None, drop_metadata: bool = False) -> JoinedShard:
    """A JoinedShard, assembled as the job does, of the catalog rows in `rows` and their feature rows."""
    keys = scoring["keys"]
    if rows is not None:
        keys = keys.slice(rows.start, rows.stop - rows.start)
    parts = [(CATALOG_SIDE, keys)]
    for modality, table in scoring["stored"].items():
        table = table.filter(pc.is_in(table.column("video_id"), keys.column("video_id")))
        parts.append((modality, table.replace_schema_metadata(None) if drop_metadata else table))
    shard, joined = JoinedShard.assemble((0, parts))
    assert shard == 0 and joined is not None
    return joined


def test_score_handler_scores_every_catalog_row_of_a_shard(scoring):
    handler, model, schema = scoring["handler"], scoring["model"], scoring["schema"]
    joined = shard_of(scoring)
    (result,) = list(handler.run_inference([joined], model))
    assert result.example is joined
    out = result.inference
    assert out.schema.equals(schema)
    assert out.num_rows == joined.catalog.num_rows == 60
    assert out.column("video_id").to_pylist() == joined.catalog.column("video_id").to_pylist()
    assert out.column(CATALOG_ROW_COLUMN).to_pylist() == list(range(60))
    for target in TARGETS:
        p10, pred, p90 = (out.column(f"{k}_{target}").to_numpy() for k in ("p10", "pred", "p90"))
        assert np.isfinite(p10).all() and np.isfinite(pred).all() and np.isfinite(p90).all(), target
        assert (p10 <= pred + 1e-6).all() and (pred <= p90 + 1e-6).all(), target
    assert pc.all(pc.equal(out.column("horizon_days"), HORIZON_DAYS)).as_py()
    assert set(out.column("run_id").to_pylist()) == {RUN_ID}
    assert set(out.column("model_version").to_pylist()) == {model.version}
    assert out.column("featurizer_versions")[0].as_py() == ",".join(sorted(model.featurizers.values()))
    assert out.column("scored_at").null_count == 0


def test_score_handler_shards_are_independent_and_metadata_free_tables_work(scoring):
    """Two shards in one batch give the rows of one whole shard; tables whose schema metadata a reader
    dropped are read with the model's featurizer versions."""
    handler, model = scoring["handler"], scoring["model"]
    (whole,) = [r.inference for r in handler.run_inference([shard_of(scoring)], model)]
    halves = [shard_of(scoring, slice(0, 25)), shard_of(scoring, slice(25, 60), drop_metadata=True)]
    results = list(handler.run_inference(halves, model))
    assert len(results) == 2 and all(r.example is h for r, h in zip(results, halves))
    parts = pa.concat_tables([r.inference for r in results])
    assert parts.column("video_id").equals(whole.column("video_id"))
    for column in PREDICTION_COLUMNS[:3 * len(TARGETS)]:
        np.testing.assert_allclose(parts.column(column.name).to_numpy(), whole.column(column.name).to_numpy(),
                                   rtol=1e-5, err_msg=column.name)


def test_score_handler_counts_arrow_bytes_without_pickling(scoring, no_pickling):
    handler = scoring["handler"]
    shards = [shard_of(scoring, slice(0, 25)), shard_of(scoring, slice(25, 60))]
    expected = sum(s.catalog.nbytes + s.features["text"].nbytes + s.features["meta"].nbytes for s in shards)
    assert expected > 0
    assert handler.get_num_bytes(shards) == expected
    assert handler.get_num_bytes([JoinedShard(scoring["keys"][:0])]) == scoring["keys"][:0].nbytes
    with pytest.raises(AssertionError, match="pickled"):
        ModelHandler.get_num_bytes(handler, shards)


def test_score_handler_metrics_namespace_and_batching(scoring):
    assert scoring["handler"].get_metrics_namespace() == "popcast"
    assert scoring["handler"].batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 1}
