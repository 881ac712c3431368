"""Videos younger than the trained ages (model.young_age): the growth law, its fit, its parsing, and that a
loaded model applies it where it should and nowhere else. Pure numpy plus one small trained model."""
from __future__ import annotations

import math

import numpy as np
import pytest

from featurizers.core.contracts import TARGETS
from model.artifact import load_model
from model.data import read_features
from model.young_age import (DEFAULT_EXPONENT_RANGE, DEFAULT_EXPONENTS, GROWTH_DAYS, MIN_FIT_PAIRS,
                             apply_young_age_growth, fit_growth_exponents, parse_young_age_growth, young_age_factors)

BETA = {"views": 0.5, "likes": 0.4, "comments": 0.3, "shares": 0.0}


def test_counts_younger_than_the_trained_ages_shrink_by_the_power_law_within_the_first_week():
    ages = np.array([0.5, 1.0, 3.5, GROWTH_DAYS, 20.0, 47.0, 300.0])
    factors = young_age_factors(ages, min_trained_age_days=47.0, exponents=BETA)
    # Below a week: (age / one week) ** beta; from a week on (and above the trained ages) the flat extrapolation.
    expected = np.minimum(ages / GROWTH_DAYS, 1.0)[:, None] ** np.array([BETA[t] for t in TARGETS])
    np.testing.assert_allclose(factors, expected)
    assert (factors[3:] == 1.0).all()
    assert (np.diff(factors[:, 0]) >= 0).all()          # older is never predicted lower
    # A model that trained on videos from 2 days on scales from 2 days, not from a week.
    young_model = young_age_factors(np.array([1.0, 2.0, 5.0]), 2.0, BETA)
    np.testing.assert_allclose(young_model[:, 0], [0.5 ** 0.5, 1.0, 1.0])
    # A model trained with another bound keeps it (the config's growth_days, not today's default).
    bounded_at_3 = young_age_factors(np.array([1.0, 3.0, 5.0]), 47.0, BETA, growth_days=3.0)
    np.testing.assert_allclose(bounded_at_3[:, 0], [(1 / 3) ** 0.5, 1.0, 1.0])


def test_apply_scales_every_quantile_count_and_leaves_observed_targets_alone():
    rng = np.random.default_rng(0)
    q = np.sort(rng.uniform(2, 12, size=(3, len(TARGETS), 3)), axis=2).astype(np.float32)
    ages = np.array([1.0, 2.0, 100.0])
    observed = np.zeros((3, len(TARGETS)), dtype=bool)
    observed[0, 1] = True
    out = apply_young_age_growth(q, np.log1p(ages), math.log1p(30.0), BETA, observed)
    factors = young_age_factors(ages, 30.0, BETA)
    factors[0, 1] = 1.0
    np.testing.assert_allclose(np.expm1(out.astype(np.float64)), np.expm1(q.astype(np.float64)) * factors[:, :, None],
                               rtol=1e-5)
    assert (np.diff(out, axis=2) >= 0).all()             # p10 <= p50 <= p90 still
    np.testing.assert_array_equal(out[2], q[2])          # older than the trained ages: unchanged
    assert apply_young_age_growth(q, np.log1p(ages), math.log1p(30.0), None) is q   # off


def test_the_interval_widens_with_the_slow_and_fast_growth_the_further_a_row_is_extrapolated():
    rng = np.random.default_rng(2)
    q = np.sort(rng.uniform(4, 12, size=(4, len(TARGETS), 3)), axis=2).astype(np.float32)
    ages = np.array([0.5, 2.0, 6.0, 40.0])
    spread = {t: (0.5 * BETA[t], 2 * BETA[t] + 0.1) for t in TARGETS}
    out = apply_young_age_growth(q, np.log1p(ages), math.log1p(30.0), BETA, exponent_range=spread)
    slow = young_age_factors(ages, 30.0, {t: spread[t][0] for t in TARGETS})
    fast = young_age_factors(ages, 30.0, {t: spread[t][1] for t in TARGETS})
    counts = np.expm1(q.astype(np.float64))
    np.testing.assert_allclose(np.expm1(out[..., 0].astype(np.float64)), counts[..., 0] * fast, rtol=1e-5)
    np.testing.assert_allclose(np.expm1(out[..., 2].astype(np.float64)), counts[..., 2] * slow, rtol=1e-5)
    np.testing.assert_allclose(out[..., 1], apply_young_age_growth(q, np.log1p(ages), math.log1p(30.0), BETA)[..., 1])
    width, before = out[..., 2] - out[..., 0], q[..., 2] - q[..., 0]
    assert (np.diff(out, axis=2) >= 0).all()
    assert (width[:3, :3] > before[:3, :3]).all()                 # wider for young rows (not shares: β 0, range)
    assert (np.diff((width - before)[:3, 0]) < 0).all()           # the more so the younger (in log units)
    np.testing.assert_array_equal(out[3], q[3])                   # beyond the first week: unchanged
    # The shipped range brackets the shipped median.
    assert all(lo < DEFAULT_EXPONENTS[t] < hi for t, (lo, hi) in DEFAULT_EXPONENT_RANGE.items())


def test_growth_exponents_are_recovered_from_young_pairs_and_need_enough_of_them():
    rng = np.random.default_rng(1)
    n = 2000
    a0 = rng.uniform(0.2, 3.0, n)
    a1 = a0 * rng.uniform(1.5, 4.0, n)
    level = rng.normal(9, 1, n)
    slopes = np.array([BETA[t] for t in TARGETS]) + 0.1   # the fit floors at 0, so keep them positive
    noise = lambda: rng.normal(0, 0.05, (n, len(TARGETS)))   # noqa: E731
    early = level[:, None] - np.arange(len(TARGETS)) + noise()
    late = early + slopes[None, :] * np.log(a1 / a0)[:, None] + noise()
    fitted = fit_growth_exponents(a0, a1, early, late)
    np.testing.assert_allclose([fitted[t] for t in TARGETS], slopes, atol=0.02)
    # With slopes spread uniformly ±0.2 around them, the 10th / 90th percentiles are ±0.16.
    varied = early + (slopes[None, :] + 0.2 + rng.uniform(-0.2, 0.2, (n, 1))) * np.log(a1 / a0)[:, None]
    for level, shift in ((0.1, -0.16), (0.5, 0.0), (0.9, 0.16)):
        fitted = fit_growth_exponents(a0, a1, early, varied, level=level)
        np.testing.assert_allclose([fitted[t] for t in TARGETS], slopes + 0.2 + shift, atol=0.03)
    # Old inputs (beyond the first week) and near-equal ages teach nothing about early growth.
    assert fit_growth_exponents(a0 + 30, a1 + 30, early, late) is None
    few = slice(0, MIN_FIT_PAIRS - 1)
    assert fit_growth_exponents(a0[few], a1[few], early[few], late[few]) is None


@pytest.mark.parametrize("text, expected", [
    ("off", "off"), (" prior", "prior"),
    ("views=0.5,likes=0.4,comments=0.3,shares=0", BETA),
])
def test_the_flag_reads_off_prior_or_one_exponent_per_target(text, expected):
    assert parse_young_age_growth(text) == expected


@pytest.mark.parametrize("text, message", [
    ("views=0.5", "no exponent for likes, comments, shares"),
    ("views=abc,likes=1,comments=1,shares=1", "views: 'abc' is not a number"),
    ("views=-1,likes=1,comments=1,shares=1", "must lie in [0, 3]"),
    ("fast", "expected off, prior or"),
])
def test_a_bad_flag_value_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_young_age_growth(text)


def test_the_prior_is_what_its_docstring_says():
    assert set(DEFAULT_EXPONENTS) == set(TARGETS)
    assert all(0 < v < 1 for v in DEFAULT_EXPONENTS.values())


def test_a_loaded_model_grows_young_horizons_and_leaves_trained_ages_alone(tmp_path):
    from tests.test_model import FAST, SMALL, synthetic_catalog, write_features
    from model.train import TrainingConfig, train
    import dataclasses
    catalog, signal = synthetic_catalog(seed=5)
    features = write_features(str(tmp_path / "features"), catalog, signal)
    training = dataclasses.replace(FAST, young_age_growth="prior", epochs=2)
    train(catalog, features, str(tmp_path / "model"), seed=0, network=SMALL, training=training, threads=1,
          baselines_enabled=False)
    model = load_model(str(tmp_path / "model"))
    growth = model.config["young_age_growth"]
    # A single crawl has no pairs: the shipped prior, and config.json says so.
    assert growth["exponents"] == DEFAULT_EXPONENTS and growth["source"].startswith("prior")
    tables = read_features(features)
    rows = catalog.slice(0, 40)
    min_age = math.expm1(model.config["network"]["log_age_min"])
    young = min(min_age, GROWTH_DAYS) / 4
    with_law = model.predict(rows, tables, horizon_days=young)
    model.config["young_age_growth"] = None
    flat = model.predict(rows, tables, horizon_days=young)
    assert growth["exponent_range"] == {t: list(DEFAULT_EXPONENT_RANGE[t]) for t in TARGETS}
    for t in TARGETS:
        expected = flat[f"pred_{t}"] * 0.25 ** DEFAULT_EXPONENTS[t]
        np.testing.assert_allclose(with_law[f"pred_{t}"], expected, rtol=1e-4, atol=1e-3)
        # The interval: p10 grows with the fast end of the range, p90 with the slow end.
        slow, fast = DEFAULT_EXPONENT_RANGE[t]
        np.testing.assert_allclose(with_law[f"p10_{t}"], flat[f"p10_{t}"] * 0.25 ** fast, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(with_law[f"p90_{t}"], flat[f"p90_{t}"] * 0.25 ** slow, rtol=1e-4, atol=1e-3)
    # Scoring reads the bound the model was trained with: one at the horizon itself leaves it flat.
    model.config["young_age_growth"] = dict(growth, growth_days=young)
    np.testing.assert_array_equal(model.predict(rows, tables, horizon_days=young)["pred_views"], flat["pred_views"])
    model.config["young_age_growth"] = growth
    at_trained = model.predict(rows, tables, horizon_days=min_age + 1)
    model.config["young_age_growth"] = None
    np.testing.assert_array_equal(at_trained["pred_views"], model.predict(rows, tables, horizon_days=min_age + 1)["pred_views"])


def test_an_observation_log_fits_its_own_exponents_from_its_training_pairs():
    from tests.test_nowcast import observation_log
    from model.data import catalog_arrays
    from model.samples import observation_samples, split_samples
    from model.train import _young_age_growth
    samples = observation_samples(catalog_arrays(observation_log(n_videos=600)[0]))
    split = split_samples(samples, 0.8)
    fit_rows = np.sort(np.concatenate([split.train, split.validation]))
    growth = _young_age_growth(samples, fit_rows, "prior")
    assert growth["source"].startswith("the catalog's training pairs")
    assert set(growth["exponents"]) == set(TARGETS) and all(v >= 0 for v in growth["exponents"].values())
    assert all(slow <= growth["exponents"][t] <= fast for t, (slow, fast) in growth["exponent_range"].items())
    assert _young_age_growth(samples, fit_rows, "off") is None
    assert _young_age_growth(samples, fit_rows, BETA)["exponents"] == BETA
    # Only the given rows' pairs count: too few of them, the shipped prior.
    assert _young_age_growth(samples, fit_rows[:MIN_FIT_PAIRS // 2], "prior")["source"].startswith("prior")
