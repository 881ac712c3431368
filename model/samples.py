"""What the model learns from when a catalog is an observation log (several rows per video).

A sample is (input observation or none → target observation) of one video:
- cold: no input; the target is one observation (what a video without counts yet is scored from);
- pair: the input is an EARLIER observation of the same video, the target a later one (nowcasting).

A single-observation catalog gives exactly its rows as cold samples, in catalog order, so models trained on
one are unchanged. Splits are by video (publish_time): every sample of a video falls on one side.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featurizers.core.contracts import MIN_AGE_DAYS, TARGETS
from model.data import DEFAULT_VALIDATION_FRACTION, SECONDS_PER_DAY, Split, time_split

__all__ = ["MAX_INPUTS_PER_TARGET", "NOWCAST_MIN_GAP_DAYS", "INPUT_FIELDS", "Samples", "observation_samples",
           "split_samples", "input_arrays", "video_balanced_weights"]

# A target observation learns from at most this many earlier ones: the video's first and the most recent
# others. A video seen daily for a year would otherwise give 66k pairs.
MAX_INPUTS_PER_TARGET = 8
# The nowcast evaluation predicts a test video's latest observation from its earliest one at least this long
# before (a smaller gap mostly measures "counts stay as they are").
NOWCAST_MIN_GAP_DAYS = 0.5
# Per-sample arrays describing the input observation (NaN / -1 for cold samples).
INPUT_FIELDS = ("input_row", "input_observed_s", "input_age_days", "input_log_labels")


@dataclass
class Samples:
    """Per-sample arrays: every catalog_arrays key (taken at the TARGET row) plus `target_row` and the
    INPUT_FIELDS; `cold` marks samples without input, `first_to_last` the nowcast evaluation pairs."""
    arrays: dict[str, np.ndarray]
    cold: np.ndarray
    first_to_last: np.ndarray

    def __len__(self) -> int:
        return len(self.cold)

    @property
    def n_pairs(self) -> int:
        return int((~self.cold).sum())


def input_arrays(log_labels: np.ndarray, age_days: np.ndarray, observed_s: np.ndarray) -> dict[str, np.ndarray]:
    """The INPUT_FIELDS of rows that are their own input (scoring: a video's latest observation); rows without
    any known count or without an observation time are cold (NaN)."""
    usable = np.isfinite(log_labels).any(axis=1) & np.isfinite(observed_s)
    n = len(usable)
    return {"input_row": np.where(usable, np.arange(n), -1),
            "input_observed_s": np.where(usable, observed_s, np.nan),
            "input_age_days": np.where(usable, np.maximum(age_days, MIN_AGE_DAYS), np.nan),
            "input_log_labels": np.where(usable[:, None], log_labels, np.nan)}


def _cold(n: int) -> dict[str, np.ndarray]:
    return {"input_row": np.full(n, -1, dtype=np.int64), "input_observed_s": np.full(n, np.nan),
            "input_age_days": np.full(n, np.nan), "input_log_labels": np.full((n, len(TARGETS)), np.nan)}


def _pairs(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input rows, target rows, first_to_last) of every (earlier → later) pair kept, vectorised."""
    observed = arrays["observed_s"]
    rows = np.flatnonzero(np.isfinite(observed))
    empty = np.zeros(0, dtype=np.int64)
    if not len(rows):
        return empty, empty, np.zeros(0, dtype=bool)
    frame = (pl.DataFrame({"video": pl.Series(arrays["video_id"][rows].astype(str), dtype=pl.String),
                           "t": observed[rows], "row": rows})
             .filter(pl.len().over("video") > 1)
             .sort(["video", "t", "row"])
             .with_columns(rank=pl.int_range(pl.len()).over("video"), count=pl.len().over("video")))
    if not frame.height:
        return empty, empty, np.zeros(0, dtype=bool)
    row, rank, count = (frame.get_column(c).to_numpy() for c in ("row", "rank", "count"))
    times = frame.get_column("t").to_numpy()
    position = np.arange(frame.height)
    inputs, targets = [], []
    # The k-th previous observation (k < MAX_INPUTS_PER_TARGET), then the first one when it is further back.
    for k in range(1, MAX_INPUTS_PER_TARGET):
        ok = rank >= k
        inputs.append(position[ok] - k)
        targets.append(position[ok])
    far = rank >= MAX_INPUTS_PER_TARGET
    inputs.append(position[far] - rank[far])
    targets.append(position[far])
    source, target = np.concatenate(inputs), np.concatenate(targets)
    later = times[target] > times[source]
    source, target = source[later], target[later]
    labels = arrays["log_labels"]
    usable = np.isfinite(labels[row[source]]).any(axis=1) & np.isfinite(labels[row[target]]).any(axis=1)
    source, target = source[usable], target[usable]
    first_to_last = ((rank[source] == 0) & (rank[target] == count[target] - 1)
                     & (times[target] - times[source] >= NOWCAST_MIN_GAP_DAYS * SECONDS_PER_DAY))
    return row[source].astype(np.int64), row[target].astype(np.int64), first_to_last


def _publish_time_of_earliest_observation(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every row of a video with the publish time of its earliest observation (a real log has the odd video
    re-dated between crawls; a video must fall on one side of the split), ages recomputed from it."""
    frame = pl.DataFrame({"video": pl.Series(arrays["video_id"].astype(str), dtype=pl.String),
                          "t": arrays["observed_s"], "p": arrays["publish_s"]})
    canonical = (frame.with_columns(pl.col("p").sort_by(pl.col("t").fill_nan(None), nulls_last=True)
                                    .first().over("video")).get_column("p").to_numpy())
    if np.array_equal(canonical, arrays["publish_s"], equal_nan=True):
        return arrays
    out = dict(arrays)
    out["publish_s"] = canonical
    out["age_days"] = np.maximum((arrays["observed_s"] - canonical) / SECONDS_PER_DAY, MIN_AGE_DAYS)
    return out


def observation_samples(arrays: dict[str, np.ndarray]) -> Samples:
    """Cold samples (every catalog row, in order) followed by the (earlier → later) pairs of each video."""
    n = len(arrays["video_id"])
    arrays = _publish_time_of_earliest_observation(arrays)
    source, target, first_to_last = _pairs(arrays)
    out = {key: np.concatenate([value, value[target]]) for key, value in arrays.items()}
    out["target_row"] = np.concatenate([np.arange(n, dtype=np.int64), target])
    cold = _cold(n)
    pair_inputs = {"input_row": source, "input_observed_s": arrays["observed_s"][source],
                   "input_age_days": np.maximum(arrays["age_days"][source], MIN_AGE_DAYS),
                   "input_log_labels": arrays["log_labels"][source]}
    for key in INPUT_FIELDS:
        out[key] = np.concatenate([cold[key], pair_inputs[key]])
    is_cold = np.concatenate([np.ones(n, dtype=bool), np.zeros(len(target), dtype=bool)])
    return Samples(out, is_cold, np.concatenate([np.zeros(n, dtype=bool), first_to_last]))


def video_balanced_weights(samples: Samples, rows: np.ndarray, first_to_last_share: float = 0.0
                           ) -> np.ndarray | None:
    """(len(rows),) training weights: 1 for cold samples; a pair sample 1 / (its video's pairs among `rows`),
    scaled so the pairs' weights still sum to their number. None when `rows` hold no pairs (all weights 1).

    Why: a video seen 9 times gives up to 36 pairs, one seen twice gives 1, yet each video is predicted once
    (a night's scoring, the nowcast evaluation). Unweighted, the long-lived videos that stay on a list for
    days dominate what growth is learned; on bilibili-popular-2023 weighting each video once cut the nowcast
    trees' views MAE from 0.174 to 0.162 (README "Nowcasting"). Cold samples are scored per catalog row,
    so they keep weight 1.

    first_to_last_share: of each video's weight, the share its first-to-last pair (Samples.first_to_last: the
    longest growth it shows, as a night's scoring asks from its latest count to a horizon) holds on top of its
    even part; a video without such a pair keeps the even split. 0.5 (TrainingConfig's default) cut popcast's
    nowcast MAE on bilibili-popular-2023 on all four targets in both seeds measured (views 0.1572 → 0.1533,
    0.1573 → 0.1545)."""
    pairs = ~samples.cold[rows]
    if not pairs.any():
        return None
    videos = samples.arrays["video_id"][rows[pairs]].astype(str)
    _, inverse, counts = np.unique(videos, return_inverse=True, return_counts=True)
    per_pair = 1.0 / counts[inverse]
    if first_to_last_share > 0.0:
        evaluated = samples.first_to_last[rows[pairs]]
        has_one = np.bincount(inverse, weights=evaluated.astype(np.float64), minlength=len(counts))[inverse] > 0
        per_pair = np.where(has_one, (1.0 - first_to_last_share) * per_pair + first_to_last_share * evaluated,
                            per_pair)
    weights = np.ones(len(rows))
    weights[pairs] = per_pair * (len(per_pair) / per_pair.sum())
    return weights


def split_samples(samples: Samples, quantile: float,
                  validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> Split:
    """time_split by video: the latest (1 − quantile) of distinct labelled videos by publish_time are test.
    Every sample of a test video is test (train and validation never see its observations); the test rows are
    its cold samples and its first-to-last nowcast pair (other pairs of test videos are not evaluated)."""
    arrays = samples.arrays
    labelled = np.isfinite(arrays["log_labels"]).any(axis=1)
    split = time_split(arrays["publish_s"], labelled, quantile, validation_fraction, video_ids=arrays["video_id"])
    test = split.test[samples.cold[split.test] | samples.first_to_last[split.test]]
    return Split(split.train, split.validation, test, split.cutoff_s, split.validation_cutoff_s)
