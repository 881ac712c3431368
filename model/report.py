"""The evaluation report: one self-contained index.html (PNG plots embedded as base64) + metrics.json.

It re-scores the model's own test split (same split as training, recorded in config.json), so the numbers
can be recomputed from the catalog, the features and MODEL_DIR alone.
"""
from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pyarrow as pa

from featurizers.core import storage
from featurizers.core.contracts import TARGETS
from model.artifact import load_model
from model.baselines import creator_history_mean
from model.data import catalog_arrays, log_age, read_features, time_split
from model.metrics import all_target_metrics, mean_mae

AGE_BUCKETS_DAYS = (0, 7, 30, 90, 365, float("inf"))


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(rows: list[list], header: list[str]) -> str:
    fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))  # noqa
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + body + "</table>"


def _metric_rows(named: dict[str, dict]) -> list[list]:
    rows = []
    for name, metrics in named.items():
        if not isinstance(metrics, dict) or "views" not in metrics:
            continue
        row = [name]
        for t in TARGETS:
            m = metrics[t]
            row += [m.get("mae_log1p"), m.get("spearman"), m.get("nmse"), m.get("coverage_p10_p90")]
        rows.append(row)
    return rows


METRIC_HEADER = ["model"] + [f"{t} {m}" for t in TARGETS for m in ("MAE", "Spearman", "nMSE", "cov")]


def evaluate(catalog: pa.Table, features_dir: str, model_dir: str, report_dir: str) -> dict:
    """Write report_dir/index.html and report_dir/metrics.json; returns the metrics. `catalog` is the
    conformed catalog table the model was trained on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = catalog
    model = load_model(model_dir)
    tables = read_features(features_dir, tuple(model.layouts))
    arrays = catalog_arrays(table)
    labelled = np.isfinite(arrays["log_labels"]).any(axis=1)
    split_cfg = model.config["split"]
    split = time_split(arrays["publish_s"], labelled, split_cfg["quantile"],
                       model.config["training"]["validation_fraction"])
    rows = split.test
    rows_table = table.take(pa.array(rows))
    ages = log_age(arrays["age_days"][rows])
    truth = arrays["log_labels"][rows]
    q = model.predict_log(rows_table, tables, ages)
    overall = all_target_metrics(truth, q[..., 1], q[..., 0], q[..., 2])

    # Slices: new vs known creators (any labelled video published earlier), age buckets, media.
    train_all = np.concatenate([split.train, split.validation])
    seen = creator_history_mean(arrays["author_id"], arrays["publish_s"], arrays["log_labels"],
                                np.flatnonzero(labelled), rows, np.full(len(TARGETS), np.nan))
    known_creator = np.isfinite(seen[:, 0])
    slices: dict[str, np.ndarray] = {"new creators": ~known_creator, "known creators": known_creator,
                                     "with media": arrays["has_media"][rows],
                                     "without media": ~arrays["has_media"][rows]}
    age_days = arrays["age_days"][rows]
    for lo, hi in zip(AGE_BUCKETS_DAYS[:-1], AGE_BUCKETS_DAYS[1:]):
        slices[f"age {lo:g}–{hi:g} d"] = (age_days >= lo) & (age_days < hi)
    slice_metrics = {name: {"n": int(mask.sum()), **all_target_metrics(truth[mask], q[mask, :, 1],
                                                                        q[mask, :, 0], q[mask, :, 2])}
                     for name, mask in slices.items() if mask.sum() > 0}

    # Ablation: drop one modality at a time through the masks (as if the featurizer had failed for all).
    ablation = {}
    for name in model.layouts:
        qa = model.predict_log(rows_table, tables, ages, drop_modalities=(name,))
        ablation[f"without {name}"] = all_target_metrics(truth, qa[..., 1], qa[..., 0], qa[..., 2])

    trained = model.config.get("metrics", {}).get("test", {})
    baselines = {k: v for k, v in trained.items() if k != "model"}
    report = {"model_version": model.version, "split": split_cfg, "featurizers": model.featurizers,
              "test": overall, "baselines": baselines, "slices": slice_metrics, "ablation": ablation,
              "n_train": int(len(train_all))}

    images = {}
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 4))
    for j, (ax, target) in enumerate(zip(np.atleast_1d(axes), TARGETS)):
        ok = np.isfinite(truth[:, j])
        ax.scatter(truth[ok, j], q[ok, j, 1], s=4, alpha=0.4)
        lo, hi = np.nanmin(truth[:, j]), np.nanmax(truth[:, j])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(title=f"{target}", xlabel="actual log1p", ylabel="predicted log1p (p50)")
    images["Predicted vs actual (test)"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    cover = [overall[t]["coverage_p10_p90"] or 0 for t in TARGETS]
    ax.bar(TARGETS, cover)
    ax.axhline(0.8, color="k", ls="--", label="nominal 80%")
    ax.set(ylim=(0, 1), ylabel="share of labels inside [p10, p90]", title="Interval coverage (test)")
    ax.legend()
    images["Interval coverage"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, history in enumerate(model.config.get("history", [])):
        stop = history.get("early_stopping", [])
        ax.plot([h["epoch"] for h in stop], [h["train_loss"] for h in stop], color=f"C{i}", alpha=0.6,
                label=f"member {i} train")
        ax.plot([h["epoch"] for h in stop if "val_loss" in h], [h["val_loss"] for h in stop if "val_loss" in h],
                color=f"C{i}", ls="--", label=f"member {i} validation")
    ax.set(xlabel="epoch", ylabel="pinball loss (normalised)", title="Learning curves (early-stopping run)")
    ax.legend(fontsize=7)
    images["Learning curves"] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(slice_metrics)
    ax.bar(names, [mean_mae(slice_metrics[n]) for n in names])
    ax.set(ylabel="mean MAE(log1p) over targets", title="Slices")
    ax.tick_params(axis="x", rotation=30)
    images["Slices"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["all modalities"] + list(ablation)
    ax.bar(names, [mean_mae(overall)] + [mean_mae(ablation[n]) for n in ablation])
    ax.set(ylabel="mean MAE(log1p) over targets", title="Ablation: one modality dropped")
    ax.tick_params(axis="x", rotation=30)
    images["Per-modality ablation"] = _png(fig)

    body = [f"<h1>popcast evaluation — model {html.escape(model.version)}</h1>",
            f"<p>Test rows: {len(rows)} (publish_time ≥ {html.escape(split_cfg.get('test_from_publish_time', ''))},"
            f" quantile {split_cfg['quantile']}); featurizers: {html.escape(json.dumps(model.featurizers))}.</p>",
            "<h2>Model and baselines (log1p scale)</h2>",
            _table(_metric_rows({"network": overall, **baselines}), METRIC_HEADER),
            "<h2>Slices</h2>",
            _table([[n] + r[1:] for n, r in zip(slice_metrics, _metric_rows(slice_metrics))], METRIC_HEADER),
            "<h2>Ablation</h2>",
            _table(_metric_rows({"all modalities": overall, **ablation}), METRIC_HEADER)]
    for title, uri in images.items():
        body.append(f"<h2>{html.escape(title)}</h2><img src='{uri}' alt='{html.escape(title)}'>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>popcast evaluation</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    storage.write_bytes(storage.join(report_dir, "index.html"), page.encode())
    storage.write_bytes(storage.join(report_dir, "metrics.json"),
                        json.dumps(report, indent=1, default=float).encode())
    return report
