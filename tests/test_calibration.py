"""model/calibration.py: split-conformal p10–p90 offsets reach the nominal coverage on fresh rows; and the
metrics that report which way the intervals miss."""
from __future__ import annotations

import numpy as np
import pytest

from featurizers.core.contracts import TARGETS
from model.calibration import NOMINAL_COVERAGE, apply_offsets, interval_offsets
from model.metrics import target_metrics


def _draw(rng: np.random.Generator, n: int, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of a model whose intervals are `width` wide around a median, and labels with unit noise."""
    median = rng.normal(size=(n, len(TARGETS)))
    labels = median + rng.normal(size=(n, len(TARGETS)))
    q = np.stack([median - width / 2, median, median + width / 2], axis=-1).astype(np.float32)
    return q, labels


def _coverage(q: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return ((labels >= q[..., 0]) & (labels <= q[..., 2])).mean(axis=0)


def test_too_narrow_and_too_wide_intervals_are_brought_to_the_nominal_coverage() -> None:
    rng = np.random.default_rng(0)
    for width in (1.0, 5.0):   # true 80% interval of unit noise: 2.56 wide
        q_val, y_val = _draw(rng, 4000, width)
        none = np.zeros(len(q_val), dtype=bool)
        calibration = interval_offsets(q_val, y_val, none)
        q_test, y_test = _draw(rng, 20000, width)
        before = _coverage(q_test, y_test)
        after = _coverage(apply_offsets(q_test, calibration, np.zeros(len(q_test), dtype=bool)), y_test)
        assert np.all(np.abs(before - NOMINAL_COVERAGE) > 0.15)
        assert np.all(np.abs(after - NOMINAL_COVERAGE) < 0.02), after
        assert calibration["nowcast"] == [0.0] * len(TARGETS)   # no nowcast rows: no offset


def test_offsets_never_cross_the_median_and_unknown_labels_are_ignored() -> None:
    rng = np.random.default_rng(1)
    q, y = _draw(rng, 500, 8.0)
    y[::2, 0] = np.nan
    calibration = interval_offsets(q, y, np.zeros(len(q), dtype=bool))
    out = apply_offsets(q, calibration, np.zeros(len(q), dtype=bool))
    assert np.all(out[..., 0] <= out[..., 1]) and np.all(out[..., 1] <= out[..., 2])
    assert np.array_equal(out[..., 1], q[..., 1])
    assert apply_offsets(q, None, np.zeros(len(q), dtype=bool)) is q


def test_weighted_offsets_reach_the_nominal_coverage_of_the_weighted_population() -> None:
    """Rows of one kind weigh 0.1 each (as a video's many pairs do): the offset is set for the weighted mix,
    where the unweighted one would follow the heavily repeated rows."""
    rng = np.random.default_rng(2)
    q_val, y_val = _draw(rng, 6000, 2.56)
    repeated = np.arange(len(q_val)) < 5000            # 5000 rows worth 500: their noise is 3× smaller
    y_val[repeated] = q_val[repeated, :, 1] + (y_val[repeated] - q_val[repeated, :, 1]) / 3
    weights = np.where(repeated, 0.1, 1.0)
    nowcast = np.ones(len(q_val), dtype=bool)
    weighted = interval_offsets(q_val, y_val, nowcast, weights)
    plain = interval_offsets(q_val, y_val, nowcast)
    inside = (y_val >= q_val[..., 0] - np.array(weighted["nowcast"])) & (y_val <= q_val[..., 2] + np.array(weighted["nowcast"]))
    coverage = (inside * weights[:, None]).sum(axis=0) / weights.sum()
    assert np.all(np.abs(coverage - NOMINAL_COVERAGE) < 0.02), coverage
    assert np.all(np.array(weighted["nowcast"]) > np.array(plain["nowcast"]) + 0.2)


def test_metrics_say_which_way_a_model_misses() -> None:
    truth = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    pred = np.array([1.5, 2.5, 3.5, 3.0, 9.0])      # over-predicts by 0.5 on three rows of four
    low, high = pred - 0.6, pred + 0.6               # the last known row (4.0) lies above its p90 (3.6)
    m = target_metrics(truth, pred, low, high)
    assert m["n"] == 4 and m["bias_log1p"] == pytest.approx((0.5 + 0.5 + 0.5 - 1.0) / 4)
    assert m["coverage_p10_p90"] == 0.75 and m["below_p10"] == 0.0 and m["above_p90"] == 0.25
    shifted = target_metrics(truth, pred + 1.0, low + 1.0, high + 1.0)   # now too high
    assert shifted["bias_log1p"] > 0.5 and shifted["below_p10"] == 0.75 and shifted["above_p90"] == 0.0
    assert target_metrics(truth, pred)["below_p10"] is None   # no interval, no tail shares
