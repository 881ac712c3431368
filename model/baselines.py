"""Baselines fitted on the network's own split: global median, creator-history mean, LightGBM.

They answer "is the network worth it?": the same train rows, the same test rows, the same tabular inputs.
"""
from __future__ import annotations

import warnings

import numpy as np
import polars as pl

from featurizers.core.contracts import TARGETS
from model.data import Batch, ModalityLayout

__all__ = ["creator_history_mean", "global_median", "lightgbm_predictions", "tabular_matrix", "nowcast_peers",
           "nowcast_matrix"]


def global_median(train_labels: np.ndarray, n_test: int) -> dict[str, np.ndarray]:
    """Training median (and p10/p90 as the interval) of each target's log1p label."""
    med = np.nanmedian(train_labels, axis=0)
    low, high = np.nanquantile(train_labels, 0.1, axis=0), np.nanquantile(train_labels, 0.9, axis=0)
    tile = lambda v: np.tile(v, (n_test, 1))   # noqa: E731
    return {"pred": tile(med), "p10": tile(low), "p90": tile(high)}


def creator_history_mean(author_id: np.ndarray, publish_s: np.ndarray, log_labels: np.ndarray,
                         history_rows: np.ndarray, query_rows: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per query row: mean log1p label of the same author's history rows published strictly earlier.

    history_rows are the labelled rows one may learn from; rows of creators without earlier videos (or
    without an author id) fall back to `fallback` (the training median). Vectorised with an as-of join.
    """
    n_t = log_labels.shape[1]
    hist = pl.DataFrame({"author": pl.Series(author_id[history_rows], dtype=pl.String),
                         "t": publish_s[history_rows],
                         **{f"y{j}": log_labels[history_rows, j] for j in range(n_t)}})
    hist = hist.filter(pl.col("author").is_not_null()).sort(["author", "t"])
    # Running sums per author, then keep one row per (author, t) holding the totals up to and including t.
    agg = hist.group_by(["author", "t"], maintain_order=True).agg(
        [pl.col(f"y{j}").fill_nan(None).sum().alias(f"s{j}") for j in range(n_t)]
        + [pl.col(f"y{j}").fill_nan(None).count().alias(f"c{j}") for j in range(n_t)])
    agg = agg.with_columns([pl.col(f"s{j}").cum_sum().over("author").alias(f"s{j}") for j in range(n_t)]
                           + [pl.col(f"c{j}").cum_sum().over("author").alias(f"c{j}") for j in range(n_t)])
    agg = agg.sort("t")
    query = pl.DataFrame({"author": pl.Series(author_id[query_rows], dtype=pl.String),
                          "t": publish_s[query_rows], "_i": np.arange(len(query_rows))}).sort("t")
    # strict "earlier": an as-of join on t - epsilon excludes videos published at the very same instant.
    query = query.with_columns((pl.col("t") - 1e-6).alias("t_before"))
    joined = query.join_asof(agg.rename({"t": "t_before"}), on="t_before", by="author",
                             strategy="backward", check_sortedness=False).sort("_i")
    out = np.empty((len(query_rows), n_t))
    for j in range(n_t):
        s = joined.get_column(f"s{j}").fill_null(0.0).to_numpy()
        c = joined.get_column(f"c{j}").fill_null(0).to_numpy()
        out[:, j] = np.where(c > 0, s / np.maximum(c, 1), fallback[j])
    return out


def tabular_matrix(batch: Batch, layouts: dict[str, ModalityLayout]) -> tuple[np.ndarray, list[str], list[int]]:
    """The scalar (tabular) inputs of every modality plus log age, NaN for missing; categorical columns.

    Vectors (embeddings) are left out: this is what a practitioner's GBDT on metadata sees.
    """
    columns, names, categorical = [], [], []
    for name, inputs in batch.modalities.items():
        numeric = inputs.numeric.numpy()
        s = len(layouts[name].numeric)
        values = numeric[:, :s].astype(np.float64).copy()
        values[numeric[:, s:2 * s] > 0] = np.nan
        values[~inputs.present.numpy()] = np.nan
        for j in range(s):
            columns.append(values[:, j])
            names.append(f"{name}.{layouts[name].numeric[j]}")
        cats = inputs.categorical.numpy()
        for j in range(cats.shape[1]):
            categorical.append(len(columns))
            col = cats[:, j].astype(np.float64)
            col[(cats[:, j] == 0) | ~inputs.present.numpy()] = np.nan
            columns.append(col)
            names.append(f"{name}.{list(layouts[name].categorical)[j]}")
    columns.append(batch.log_age.numpy().astype(np.float64))
    names.append("log_age")
    return np.stack(columns, axis=1), names, categorical


def lightgbm_predictions(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                         test_x: np.ndarray, categorical: list[int], seed: int,
                         objective: str = "regression", train_weights: np.ndarray | None = None,
                         val_weights: np.ndarray | None = None) -> np.ndarray | None:
    """One LightGBM per target (early-stopped on the validation rows); None when lightgbm is missing.
    train_weights / val_weights: a weight per row for the fit and the early stopping (None: all 1)."""
    try:
        import lightgbm as lgb
    except ImportError:
        return None
    preds = np.full((len(test_x), train_y.shape[1]), np.nan)
    params = dict(objective=objective, learning_rate=0.03, num_leaves=31, min_child_samples=20,
                  subsample=0.8, subsample_freq=1, colsample_bytree=0.8, n_estimators=2000,
                  random_state=seed, n_jobs=1, verbose=-1, deterministic=True)
    for j in range(train_y.shape[1]):
        tr, va = np.isfinite(train_y[:, j]), np.isfinite(val_y[:, j])
        if tr.sum() < 5:
            continue
        model = lgb.LGBMRegressor(**params)
        fit_kwargs = {"categorical_feature": categorical} if categorical else {}
        if train_weights is not None:
            fit_kwargs["sample_weight"] = train_weights[tr]
        if va.sum() >= 5:
            fit_kwargs.update(eval_set=[(val_x[va], val_y[va, j])],
                              callbacks=[lgb.early_stopping(100, verbose=False)])
            if val_weights is not None:
                fit_kwargs["eval_sample_weight"] = [val_weights[va]]
        with warnings.catch_warnings():   # lightgbm 4.7 renames eval_set; older 4.x lack the new names
            warnings.simplefilter("ignore")
            model.fit(train_x[tr], train_y[tr, j], **fit_kwargs)
        preds[:, j] = model.predict(test_x)
    return preds


# ------------------------------------------------------------------------------------------ nowcasting peers
def _log_age_gap(arrays: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """ln(target age / input age), ages in days: the growth variable of Szabo & Huberman (2010)."""
    return np.log(arrays["age_days"][rows]) - np.log(arrays["input_age_days"][rows])


def nowcast_peers(arrays: dict[str, np.ndarray], fit_rows: np.ndarray, test_rows: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """The simple nowcasting peers on pair samples (model.samples arrays), log1p predictions (N_test, T):

    counts_stay: the input observation's counts, as they are;
    szabo_huberman: log-linear growth, log1p(target) = log1p(input) + a_t + b_t · ln(target age / input age),
    a_t, b_t least squares on the fitting pairs (training videos only)."""
    x_fit, y_fit = arrays["input_log_labels"][fit_rows], arrays["log_labels"][fit_rows]
    x_test = arrays["input_log_labels"][test_rows]
    gap_fit, gap_test = _log_age_gap(arrays, fit_rows), _log_age_gap(arrays, test_rows)
    growth = np.full_like(x_test, np.nan)
    for j in range(x_test.shape[1]):
        ok = np.isfinite(x_fit[:, j]) & np.isfinite(y_fit[:, j]) & np.isfinite(gap_fit)
        if ok.sum() < 2:
            continue
        design = np.stack([np.ones(ok.sum()), gap_fit[ok]], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y_fit[ok, j] - x_fit[ok, j], rcond=None)
        growth[:, j] = a + b * gap_test
    return {"counts_stay": x_test.copy(), "szabo_huberman": x_test + growth}


def nowcast_matrix(batch: Batch, layouts: dict[str, ModalityLayout], arrays: dict[str, np.ndarray],
                   rows: np.ndarray) -> tuple[np.ndarray, list[str], list[int]]:
    """tabular_matrix (metadata, history, target log age) plus the input observation's log1p counts and log
    age: what a practitioner's LightGBM nowcaster sees."""
    matrix, names, categorical = tabular_matrix(batch, layouts)
    extra = np.column_stack([arrays["input_log_labels"][rows], np.log1p(arrays["input_age_days"][rows])])
    names = names + [f"input_log1p_{t}" for t in TARGETS] + ["input_log_age"]
    return np.column_stack([matrix, extra]), names, categorical
