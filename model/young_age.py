"""Videos younger than any the model trained on: counts that grow with age instead of a flat extrapolation.

Why: the network clamps its age input to the trained range and trees split on age, so both predict a video
younger than every training video as if it were the youngest trained age. A single crawl (tiktok-travel-vn-
2025) holds only old videos in its training split (47 days and more after the refit on train + validation)
while its test videos are 1–59 days old: a 2-day-old video got the counts of a 47-day-old one, and the 178 test
videos under 7 days were over-predicted by 1.0–1.8 log units on every target, by every model.

Counts are cumulative and start at zero, and early growth is log-linear in age (Szabo & Huberman, 2010):
log count(a) − log count(a0) ≈ β · (ln a − ln a0). With `--young-age-growth prior`, below the youngest
trained age a_min the predicted counts are multiplied by (min(a, D) / min(a_min, D))^β per target (the median
with the median slope β, p10 with the fast end of the slopes and p90 with the slow end: a growth extrapolated
further is less certain), where D = GROWTH_DAYS bounds the law to the first week, the span an observation log
here measures it on (bilibili-popular-2023: first sightings at a median 0.95 days, last ones by 7–9 days); older
than D a video keeps the flat extrapolation, as tiktok-travel's validation period supports (no bias between 47
and 102 days from networks trained on 102 days and older). β comes from the catalog's own (earlier → later)
pairs when it is an observation log with enough young pairs (fit_growth_exponents), else the shipped prior
DEFAULT_EXPONENTS: what fit_growth_exponents gives on bilibili-popular-2023's training videos. A target a row
predicts from an observed count (nowcasting) is left alone: its growth is learned from the pairs.

Off by default, because whether it holds depends on how the catalog was sampled, which a single crawl
cannot show: on a crawl of a hashtag (tiktok-travel-vn-2025, every video whatever its counts) it cut the
test MAE by 2–4% on every target over five seeds; on a trending list (tiktok-trending-2020, where the young
videos are there because they already have many views) it raised it by 4–7% and took Spearman to about 0
(README "Results").
"""
from __future__ import annotations

import math

import numpy as np

from featurizers.core.contracts import MIN_AGE_DAYS, TARGETS
from model.calibration import weighted_quantile

__all__ = ["DEFAULT_EXPONENTS", "DEFAULT_EXPONENT_RANGE", "EXPONENT_RANGE_LEVELS", "GROWTH_DAYS", "MIN_FIT_PAIRS",
           "apply_young_age_growth", "fit_growth_exponents", "parse_young_age_growth", "young_age_factors"]

GROWTH_DAYS = 7.0
# Median log-log growth of bilibili-popular-2023's training videos between their first and last sighting in
# the first week (fit_growth_exponents on the split 0.8's training and validation pairs).
DEFAULT_EXPONENTS = {"views": 0.546, "likes": 0.453, "comments": 0.321, "shares": 0.464}
# The 10th and 90th percentiles of the same slopes: how much faster or slower a video may grow. The p90 of a
# young row's count grows with the slow end, its p10 with the fast end (EXPONENT_RANGE_LEVELS), so its
# interval widens with the distance it is extrapolated (on tiktok-travel, five seeds, the test videos under a
# week inside p10–p90: 63 / 74 / 69 / 70% → 79 / 84 / 74 / 75%).
EXPONENT_RANGE_LEVELS = (0.1, 0.9)
DEFAULT_EXPONENT_RANGE = {"views": (0.32, 1.03), "likes": (0.24, 0.934), "comments": (0.146, 0.712),
                          "shares": (0.238, 0.934)}
# Fewer usable young pairs in a catalog than this: the shipped prior instead of the catalog's own fit.
MIN_FIT_PAIRS = 200
# A pair whose ages differ by less than this ratio divides a count's noise by a tiny log-age step.
MIN_AGE_RATIO = 1.25


def fit_growth_exponents(input_age_days: np.ndarray, target_age_days: np.ndarray, input_log_counts: np.ndarray,
                         target_log_counts: np.ndarray, weights: np.ndarray | None = None, level: float = 0.5
                         ) -> dict | None:
    """{target: β} from (earlier → later) pairs of the same videos: the weighted `level` quantile (the median
    by default) over pairs of Δ log1p(count) / Δ ln(age), using pairs whose earlier observation is younger than
    GROWTH_DAYS and whose ages differ by at least MIN_AGE_RATIO; None when fewer than MIN_FIT_PAIRS such pairs
    know a target."""
    a0 = np.maximum(np.asarray(input_age_days, dtype=np.float64), MIN_AGE_DAYS)
    a1 = np.maximum(np.asarray(target_age_days, dtype=np.float64), MIN_AGE_DAYS)
    usable = (a0 < GROWTH_DAYS) & (a1 >= MIN_AGE_RATIO * a0)
    w = np.ones(len(a0)) if weights is None else np.asarray(weights, dtype=np.float64)
    out = {}
    for j, target in enumerate(TARGETS):
        rise = target_log_counts[:, j] - input_log_counts[:, j]
        ok = usable & np.isfinite(rise)
        if ok.sum() < MIN_FIT_PAIRS:
            return None
        slope = weighted_quantile(rise[ok] / np.log(a1[ok] / a0[ok]), level, w[ok])
        out[target] = round(float(max(slope, 0.0)), 3)   # counts never shrink with age
    return out


def young_age_factors(age_days: np.ndarray, min_trained_age_days: float, exponents: dict,
                      growth_days: float = GROWTH_DAYS) -> np.ndarray:
    """(N, T) multipliers (≤ 1) of the predicted counts of rows of the given ages (module docstring)."""
    age = np.maximum(np.asarray(age_days, dtype=np.float64), MIN_AGE_DAYS)
    reference = min(min_trained_age_days, growth_days)
    ratio = np.minimum(np.minimum(age, growth_days) / reference, 1.0)
    beta = np.array([exponents[t] for t in TARGETS], dtype=np.float64)
    return ratio[:, None] ** beta[None, :]


def apply_young_age_growth(q: np.ndarray, log1p_age: np.ndarray, min_trained_log1p_age: float | None,
                           exponents: dict | None, observed: np.ndarray | None = None,
                           growth_days: float = GROWTH_DAYS, exponent_range: dict | None = None) -> np.ndarray:
    """q (N, T, 3) log1p quantiles at ages log1p_age (N,) → a copy whose counts of rows younger than the
    trained range are scaled by young_age_factors; targets marked in observed (N, T) bool are unchanged.
    exponent_range {target: (slow, fast)}: p90 grows with the slow exponent and p10 with the fast one (None:
    all three with `exponents`). growth_days: the bound the model was trained with (its config), so a later
    default cannot alter it."""
    if exponents is None or min_trained_log1p_age is None:
        return q
    age, reference = np.expm1(np.asarray(log1p_age, dtype=np.float64)), math.expm1(min_trained_log1p_age)
    per_quantile = [exponents, exponents, exponents]
    if exponent_range is not None:
        per_quantile[0] = {t: exponent_range[t][1] for t in TARGETS}
        per_quantile[2] = {t: exponent_range[t][0] for t in TARGETS}
    factors = np.stack([young_age_factors(age, reference, e, growth_days) for e in per_quantile], axis=2)
    if observed is not None:
        factors = np.where(observed[:, :, None], 1.0, factors)
    if (factors >= 1.0).all():
        return q
    counts = np.expm1(np.asarray(q, dtype=np.float64))
    return np.log1p(np.maximum(counts, 0.0) * factors).astype(q.dtype)


def parse_young_age_growth(text: str) -> str | dict:
    """The --young-age-growth value (TrainingConfig.young_age_growth): "off" (the flat extrapolation), "prior"
    (the catalog's own young pairs when it has enough, else DEFAULT_EXPONENTS), or exponents for every target,
    "views=0.5,likes=0.45,comments=0.3,shares=0.45". Raises ValueError with a one-line reason."""
    text = text.strip()
    if text in ("off", "prior"):
        return text
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TARGETS:
            raise ValueError(f"expected off, prior or {','.join(t + '=EXPONENT' for t in TARGETS)}; got {part!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{name}: {value.strip()!r} is not a number") from None
        if not 0.0 <= out[name] <= 3.0:
            raise ValueError(f"{name}: the exponent must lie in [0, 3], got {out[name]:g}")
    missing = [t for t in TARGETS if t not in out]
    if missing:
        raise ValueError(f"no exponent for {', '.join(missing)}")
    return out
