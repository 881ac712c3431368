"""The evaluation report: one self-contained index.html (PNG plots embedded as base64) + metrics.json.

It re-scores the model's own test split (same split as training, recorded in config.json), so the numbers
can be recomputed from the catalog, the features and MODEL_DIR alone.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from featurizers.core import storage
from featurizers.core.contracts import TARGETS
from featurizers.core.feature_table import FeatureTable
from model.artifact import LoadedModel, load_model
from model.baselines import creator_history_mean
from model.data import Split, catalog_arrays, log_age, read_features
from model.samples import observation_samples, split_samples
from model.metrics import all_target_metrics, mean_mae

__all__ = ["evaluate"]

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
            row += [m.get("mae_log1p"), m.get("spearman"), m.get("nmse"), m.get("bias_log1p"),
                    m.get("coverage_p10_p90"), m.get("below_p10")]
        rows.append(row)
    return rows


# bias: mean of prediction − truth in log1p (> 0 over-predicts); cov: inside p10–p90; <p10: below p10 (the rest
# of the misses lie above p90).
METRIC_HEADER = ["model"] + [f"{t} {m}" for t in TARGETS
                             for m in ("MAE", "Spearman", "nMSE", "bias", "cov", "<p10")]


def evaluate(catalog: pa.Table, features_dir: str, model_dir: str, report_dir: str) -> dict:
    """Write report_dir/index.html and report_dir/metrics.json; returns the metrics. `catalog` is the
    conformed catalog table the model was trained on."""
    test = _load_test_split(catalog, features_dir, model_dir)
    q = test.model.predict_log(test.rows_table, test.tables, test.log_ages)
    report = _report_metrics(test, q)
    images = _plots(report, test.truth, q, test.model.config.get("history", []))
    page = _html_page(report, len(test.rows), images)
    storage.write_bytes(storage.join(report_dir, "index.html"), page.encode())
    storage.write_bytes(storage.join(report_dir, "metrics.json"),
                        json.dumps(report, indent=1, default=float).encode())
    return report


@dataclass
class _TestSplit:
    """The model's own test rows, re-derived from the catalog with the split recorded at training time."""
    model: LoadedModel
    tables: dict[str, FeatureTable]
    arrays: dict[str, np.ndarray]
    split: Split
    labelled: np.ndarray
    rows_table: pa.Table
    log_ages: np.ndarray
    truth: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        return self.split.test


def _load_test_split(catalog: pa.Table, features_dir: str, model_dir: str) -> _TestSplit:
    model = load_model(model_dir)
    tables = read_features(features_dir, tuple(model.layouts))
    # The split of training: by video over the observation log; the report's rows are the cold test rows
    # (cold sample i is catalog row i), the nowcasts are reported from training's metrics.
    samples = observation_samples(catalog_arrays(catalog))
    arrays = samples.arrays
    labelled = np.isfinite(arrays["log_labels"]).any(axis=1)
    split = split_samples(samples, model.config["split"]["quantile"], model.config["training"]["validation_fraction"])
    rows = split.test[samples.cold[split.test]]
    split = Split(split.train, split.validation, rows, split.cutoff_s, split.validation_cutoff_s)
    return _TestSplit(model, tables, arrays, split, labelled, catalog.take(pa.array(rows)),
                      log_age(arrays["age_days"][rows]), arrays["log_labels"][rows])


def _quantile_metrics(truth: np.ndarray, q: np.ndarray) -> dict[str, dict]:
    """Metrics of (N, T, 3) p10/p50/p90 predictions."""
    return all_target_metrics(truth, q[..., 1], q[..., 0], q[..., 2])


def _report_metrics(test: _TestSplit, q: np.ndarray) -> dict:
    """metrics.json: the network overall, per slice and per dropped modality, beside the baselines recorded
    at training time."""
    overall = _quantile_metrics(test.truth, q)
    slice_metrics = _slice_metrics(test, q)
    ablation = _ablation_metrics(test)
    trained = test.model.config.get("metrics", {}).get("test", {})
    baselines = {k: v for k, v in trained.items() if k not in ("model", "nowcast")}
    return {"nowcast": trained.get("nowcast"),"model_version": test.model.version, "split": test.model.config["split"],
            "featurizers": test.model.featurizers, "test": overall, "baselines": baselines,
            "slices": slice_metrics, "ablation": ablation,
            "n_train": int(len(test.split.train) + len(test.split.validation))}


def _test_slices(test: _TestSplit) -> dict[str, np.ndarray]:
    """Masks over the test rows: new vs known creators (any labelled video published earlier), media, age."""
    arrays, rows = test.arrays, test.rows
    seen = creator_history_mean(arrays["author_id"], arrays["publish_s"], arrays["log_labels"],
                                np.flatnonzero(test.labelled), rows, np.full(len(TARGETS), np.nan))
    known_creator = np.isfinite(seen[:, 0])
    slices: dict[str, np.ndarray] = {"new creators": ~known_creator, "known creators": known_creator,
                                     "with media": arrays["has_media"][rows],
                                     "without media": ~arrays["has_media"][rows]}
    age_days = arrays["age_days"][rows]
    for lo, hi in zip(AGE_BUCKETS_DAYS[:-1], AGE_BUCKETS_DAYS[1:]):
        slices[f"age {lo:g}–{hi:g} d"] = (age_days >= lo) & (age_days < hi)
    return slices


def _slice_metrics(test: _TestSplit, q: np.ndarray) -> dict[str, dict]:
    return {name: {"n": int(mask.sum()), **_quantile_metrics(test.truth[mask], q[mask])}
            for name, mask in _test_slices(test).items() if mask.sum() > 0}


def _ablation_metrics(test: _TestSplit) -> dict[str, dict]:
    """One modality dropped at a time through the masks, as if its featurizer had failed for every row."""
    ablation = {}
    for name in test.model.layouts:
        qa = test.model.predict_log(test.rows_table, test.tables, test.log_ages, drop_modalities=(name,))
        ablation[f"without {name}"] = _quantile_metrics(test.truth, qa)
    return ablation


def _plots(report: dict, truth: np.ndarray, q: np.ndarray, histories: list[dict]) -> dict[str, str]:
    """Title → PNG data URI, in page order."""
    import matplotlib
    matplotlib.use("Agg")   # headless: the report is written by batch jobs without a display
    return {"Predicted vs actual (test)": _png(_predicted_vs_actual_plot(truth, q)),
            "Interval coverage": _png(_coverage_plot(report["test"])),
            "Learning curves": _png(_learning_curves_plot(histories)),
            "Slices": _png(_slices_plot(report["slices"])),
            "Per-modality ablation": _png(_ablation_plot(report["test"], report["ablation"]))}


def _predicted_vs_actual_plot(truth: np.ndarray, q: np.ndarray):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 4))
    for j, (ax, target) in enumerate(zip(np.atleast_1d(axes), TARGETS)):
        ok = np.isfinite(truth[:, j])
        ax.scatter(truth[ok, j], q[ok, j, 1], s=4, alpha=0.4)
        lo, hi = np.nanmin(truth[:, j]), np.nanmax(truth[:, j])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(title=f"{target}", xlabel="actual log1p", ylabel="predicted log1p (p50)")
    return fig


def _coverage_plot(overall: dict[str, dict]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    cover = [overall[t]["coverage_p10_p90"] or 0 for t in TARGETS]
    ax.bar(TARGETS, cover)
    ax.axhline(0.8, color="k", ls="--", label="nominal 80%")
    ax.set(ylim=(0, 1), ylabel="share of labels inside [p10, p90]", title="Interval coverage (test)")
    ax.legend()
    return fig


def _learning_curves_plot(histories: list[dict]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, history in enumerate(histories):
        stop = history.get("early_stopping", [])
        ax.plot([h["epoch"] for h in stop], [h["train_loss"] for h in stop], color=f"C{i}", alpha=0.6,
                label=f"member {i} train")
        ax.plot([h["epoch"] for h in stop if "val_loss" in h], [h["val_loss"] for h in stop if "val_loss" in h],
                color=f"C{i}", ls="--", label=f"member {i} validation")
    ax.set(xlabel="epoch", ylabel="pinball loss (normalised)", title="Learning curves (early-stopping run)")
    ax.legend(fontsize=7)
    return fig


def _slices_plot(slice_metrics: dict[str, dict]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(slice_metrics)
    ax.bar(names, [mean_mae(slice_metrics[n]) for n in names])
    ax.set(ylabel="mean MAE(log1p) over targets", title="Slices")
    ax.tick_params(axis="x", rotation=30)
    return fig


def _ablation_plot(overall: dict[str, dict], ablation: dict[str, dict]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["all modalities"] + list(ablation)
    ax.bar(names, [mean_mae(overall)] + [mean_mae(ablation[n]) for n in ablation])
    ax.set(ylabel="mean MAE(log1p) over targets", title="Ablation: one modality dropped")
    ax.tick_params(axis="x", rotation=30)
    return fig


def _nowcast_section(nowcast: dict | None) -> list[str]:
    """Nowcasting (observation logs): the network beside its peers, then MAE by input age and by gap."""
    if not nowcast:
        return []
    named = {k: v for k, v in nowcast.items() if isinstance(v, dict) and "views" in v}
    out = ["<h2>Nowcasting</h2>", f"<p>{html.escape(nowcast.get('protocol', ''))}: "
           f"{nowcast.get('n_videos', 0)} test videos.</p>", _table(_metric_rows(named), METRIC_HEADER)]
    for key, title in (("by_input_age", "MAE by age of the input observation"), ("by_gap", "MAE by gap")):
        buckets = nowcast.get(key) or {}
        rows = [[bucket, values["n"], name] + [values[name][t] for t in TARGETS]
                for bucket, values in buckets.items() for name in named if name in values]
        out += [f"<h3>{title}</h3>", _table(rows, ["bucket", "n", "predictor"] + [f"{t} MAE" for t in TARGETS])]
    return out


def _html_page(report: dict, n_test: int, images: dict[str, str]) -> str:
    """One self-contained page: metric tables, then the plots inline."""
    split_cfg, overall, slice_metrics = report["split"], report["test"], report["slices"]
    body = [f"<h1>popcast evaluation — model {html.escape(report['model_version'])}</h1>",
            f"<p>Test rows: {n_test} (publish_time ≥ {html.escape(split_cfg.get('test_from_publish_time', ''))},"
            f" quantile {split_cfg['quantile']}); featurizers: {html.escape(json.dumps(report['featurizers']))}.</p>",
            "<h2>Model and baselines (log1p scale)</h2>",
            _table(_metric_rows({"network": overall, **report["baselines"]}), METRIC_HEADER),
            "<h2>Slices</h2>",
            _table([[n] + r[1:] for n, r in zip(slice_metrics, _metric_rows(slice_metrics))], METRIC_HEADER),
            "<h2>Ablation</h2>",
            _table(_metric_rows({"all modalities": overall, **report["ablation"]}), METRIC_HEADER)]
    body += _nowcast_section(report.get("nowcast"))
    for title, uri in images.items():
        body.append(f"<h2>{html.escape(title)}</h2><img src='{uri}' alt='{html.escape(title)}'>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>popcast evaluation</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
            + "\n".join(body) + "</body></html>")
