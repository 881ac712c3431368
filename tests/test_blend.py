"""model.blend on synthetic matrices: what the nowcast trees predict and how rows without counts are served."""
import numpy as np
import pytest

from featurizers.core.contracts import TARGETS
from model.blend import TreeBlend, fit_tree_blend

pytest.importorskip("lightgbm")

T = len(TARGETS)


def _nowcast_rows(rng, n, count_shift=0.0):
    """blend_matrix's layout: [a tabular column, target log age, T input log1p counts, input log age]; the
    label grows from the input count by 0.8 per unit of log-age gap, plus noise."""
    feature = rng.normal(size=n)
    input_age = rng.uniform(0.1, 1.0, n)
    target_age = input_age + rng.uniform(0.2, 1.5, n)
    counts = rng.uniform(5, 10, (n, T)) + count_shift
    matrix = np.column_stack([feature, target_age, counts, input_age])
    labels = counts + 0.8 * (target_age - input_age)[:, None] + rng.normal(0, 0.05, (n, T))
    return matrix, labels


@pytest.fixture(scope="module")
def fitted():
    """(blend, report): one fit serves every test (a few seconds of LightGBM)."""
    rng = np.random.default_rng(0)
    train_x, train_y = _nowcast_rows(rng, 1500)
    val_x, val_y = _nowcast_rows(rng, 400)
    weak_network = np.full_like(val_y, float(np.median(val_y)))   # a network that knows nothing
    blend, report = fit_tree_blend(train_x, train_y, np.ones(1500, bool), val_x, val_y, np.ones(400, bool),
                                   weak_network, seed=0)
    return blend, report


def test_nowcast_trees_predict_growth_so_counts_beyond_training_are_served(fitted):
    rng = np.random.default_rng(10)
    blend, _ = fitted
    assert set(blend.groups) == {"nowcast"}   # no cold rows: no cold trees
    for target in TARGETS:
        assert blend.groups["nowcast"][target]["predicts"] == "growth"
        assert blend.groups["nowcast"][target]["weight"] == 0.0   # the trees win against a constant
    # Videos far bigger than any training video: growth trees carry the input count along; a tree on
    # levels would stop at the largest training label (~11).
    test_x, test_y = _nowcast_rows(rng, 300, count_shift=6.0)
    q = np.zeros((300, T, 3), np.float32)
    out = blend.apply(q, test_x, np.ones(300, bool))
    assert np.mean(np.abs(out[..., 1] - test_y)) < 0.15
    # The interval moves with the median, its width kept.
    np.testing.assert_allclose(out[..., 2] - out[..., 0], 0.0, atol=1e-5)


def test_a_row_without_its_input_count_keeps_the_network_median(fitted):
    rng = np.random.default_rng(11)
    blend, _ = fitted
    test_x, _ = _nowcast_rows(rng, 50)
    test_x[:, 2] = np.nan   # the input observation has no view count
    q = np.full((50, T, 3), 3.0, np.float32)
    out = blend.apply(q, test_x, np.ones(50, bool))
    np.testing.assert_array_equal(out[:, 0, :], 3.0)
    assert np.all(np.abs(out[:, 1:, 1] - 3.0) > 1.0)   # the other targets are blended


def test_a_blend_file_from_before_growth_trees_reads_as_level_trees(fitted):
    rng = np.random.default_rng(12)
    blend, _ = fitted
    old = TreeBlend.from_bytes(blend.to_bytes())
    for spec in old.groups["nowcast"].values():
        del spec["predicts"]
    test_x, _ = _nowcast_rows(rng, 20)
    q = np.zeros((20, T, 3), np.float32)
    growth, level = blend.apply(q, test_x, np.ones(20, bool)), old.apply(q, test_x, np.ones(20, bool))
    np.testing.assert_allclose(growth[..., 1] - level[..., 1], test_x[:, 2:2 + T], rtol=1e-5, atol=1e-4)


def test_categorical_columns_are_split_as_categories():
    """A category id whose effect has no order (ids 1..40, each its own random shift): trees told it is
    categorical group the ids by effect and beat trees that must cut the ids as numbers."""
    rng = np.random.default_rng(13)
    effect = rng.normal(0, 1.5, 41)

    def cold_rows(n):
        category = rng.integers(1, 41, n).astype(np.float64)
        matrix = np.column_stack([category, rng.uniform(0, 3, n), np.full((n, T + 1), np.nan)])
        return matrix, effect[category.astype(int)][:, None] + rng.normal(0, 0.1, (n, T))

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = cold_rows(600), cold_rows(300), cold_rows(400)
    network = np.zeros_like(val_y)
    errors = {}
    for label, categorical in (("ordered", ()), ("categorical", (0,))):
        blend, _ = fit_tree_blend(train_x, train_y, np.zeros(600, bool), val_x, val_y, np.zeros(300, bool),
                                  network, seed=0, categorical=categorical)
        out = blend.apply(np.zeros((400, T, 3), np.float32), test_x, np.zeros(400, bool))
        errors[label] = float(np.mean(np.abs(out[..., 1] - test_y)))
        assert ("[categorical_feature: 0]" in blend.groups["cold"]["views"]["trees"]) == bool(categorical)
    assert errors["categorical"] < 0.9 * errors["ordered"], errors
