"""Caption-neighbour (retrieval) features: exact against a brute force, strictly as of publish time, and
computed by the featurize job for every video, then read by train and score."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import TARGETS
from featurizers.retrieval import RETRIEVAL_FEATURE_NAMES, neighbour_features

T = len(TARGETS)


def _data(seed: int, n: int = 60, dim: int = 8):
    rng = np.random.default_rng(seed)
    publish = rng.integers(0, 20, n).astype(np.int64) * 1_000_000   # many videos share an instant
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors[rng.random(n) < 0.1] = np.nan                            # no caption embedding
    residuals = rng.normal(size=(n, T))
    residuals[rng.random((n, T)) < 0.2] = np.nan                     # unknown labels
    return publish, vectors, residuals


def _brute_force(publish, vectors, residuals, k, max_candidates):
    """One query at a time, straight from the definition."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    usable = np.isfinite(unit).all(axis=1)
    out = {name: np.full(len(publish), np.nan) for name in RETRIEVAL_FEATURE_NAMES}
    out["has_neighbours"] = np.zeros(len(publish))
    out["n_neighbours"] = np.zeros(len(publish))
    earlier_order = np.argsort(publish, kind="stable")
    for q in range(len(publish)):
        if not usable[q]:
            continue
        sources = [s for s in earlier_order if usable[s] and publish[s] < publish[q]][-max_candidates:]
        if not sources:
            continue
        sims = np.array([float(unit[q] @ unit[s]) for s in sources])
        top = np.argsort(-sims, kind="stable")[:k]
        chosen, top_sims = np.array(sources)[top], sims[top]
        weights = np.maximum(top_sims, 0) + 1e-6
        out["has_neighbours"][q], out["n_neighbours"][q] = 1, len(top)
        out["similarity_max"][q], out["similarity_mean"][q] = top_sims.max(), top_sims.mean()
        for j, target in enumerate(TARGETS):
            ok = np.isfinite(residuals[chosen, j])
            if ok.any():
                out[f"{target}_neighbour_resid"][q] = np.sum(weights[ok] * residuals[chosen[ok], j]) / weights[ok].sum()
    return out


@pytest.mark.parametrize("block", [1, 7, 256])
def test_blocked_features_equal_the_brute_force(block):
    publish, vectors, residuals = _data(0)
    got = neighbour_features(publish, vectors, publish, vectors, residuals, k=5, max_candidates=15, block=block)
    expected = _brute_force(publish, vectors, residuals, k=5, max_candidates=15)
    for name in RETRIEVAL_FEATURE_NAMES:
        np.testing.assert_allclose(got[name].astype(float), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_nothing_published_at_or_after_a_video_reaches_its_features():
    publish, vectors, residuals = _data(1)
    before = neighbour_features(publish, vectors, publish, vectors, residuals, k=5)
    cutoff = np.sort(np.unique(publish))[10]
    later = publish >= cutoff
    rng = np.random.default_rng(2)
    changed_vectors, changed_residuals = vectors.copy(), residuals.copy()
    changed_vectors[later] = rng.normal(size=(later.sum(), vectors.shape[1]))
    changed_residuals[later] = 50.0
    after = neighbour_features(publish, changed_vectors, publish, changed_vectors, changed_residuals, k=5)
    for name in RETRIEVAL_FEATURE_NAMES:
        np.testing.assert_array_equal(before[name][~later], after[name][~later], err_msg=name)
    # The first instant has nothing earlier, so no neighbours, even for identical captions at that instant.
    first = publish == publish.min()
    assert not before["has_neighbours"][first].any()


def test_featurize_computes_retrieval_for_every_video_and_train_and_score_read_it(tmp_path):
    from model.train import TrainingConfig, train
    from pipelines.catalog import read_catalog
    from pipelines.featurize import run as featurize
    from pipelines.sample_catalog import generate_rows
    from pipelines.score import run as score

    direct = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
    catalog, _ = generate_rows(60, seed=5)
    catalog = catalog.sort_by("publish_time")
    path = str(tmp_path / "catalog.parquet")
    pq.write_table(catalog, path)
    features, model = str(tmp_path / "features"), str(tmp_path / "model")
    summary = featurize(["--catalog", path, "--output", features, "--modalities", "text,meta,retrieval", *direct])
    assert summary.ok["retrieval"] == 60 and summary.rows_unaccounted == 0
    table = pq.read_table(tmp_path / "features" / "retrieval")
    assert sorted(table.column("video_id").to_pylist()) == sorted(catalog.column("video_id").to_pylist())
    assert 0 < sum(table.column("has_neighbours").to_pylist()) < 60   # the earliest video has none
    # Retrieval alone on the stored captions gives the same rows (recomputed, replaced, never duplicated).
    again = featurize(["--catalog", path, "--output", features, "--modalities", "retrieval", *direct])
    assert again.ok["retrieval"] == 60
    assert pq.read_table(tmp_path / "features" / "retrieval").num_rows == 60
    train(read_catalog(path), features, model, modalities=("meta", "retrieval"),
          training=TrainingConfig(epochs=2, ensemble_size=1), baselines_enabled=False)
    start, end = (str(catalog.column("publish_time")[i].as_py().date()) for i in (0, -1))
    scored = score(["--catalog", path, "--features", features, "--model", model, "--output",
                    str(tmp_path / "scored"), "--start", start, "--end", end, *direct])
    assert scored.rows_unaccounted == 0 and pq.read_table(tmp_path / "scored").num_rows == 60


def test_retrieval_without_caption_embeddings_is_one_clear_error(tmp_path):
    from pipelines.featurize import run as featurize
    from pipelines.sample_catalog import generate_rows

    catalog, _ = generate_rows(10, seed=6)
    path = str(tmp_path / "catalog.parquet")
    pq.write_table(catalog, path)
    with pytest.raises(ValueError, match="needs the text modality"):
        featurize(["--catalog", path, "--output", str(tmp_path / "f"), "--modalities", "meta,retrieval",
                   "--runner", "DirectRunner"])
