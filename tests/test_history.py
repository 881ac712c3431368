"""Creator-history features: strictly-earlier as-of rule, no leakage, ties, null labels, per-author vs whole
table vs an independent brute-force reference, and the featurize job on two Beam runners."""
from __future__ import annotations

import math
import statistics
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA
from featurizers.history import (
    HISTORY_FEATURE_NAMES,
    TARGETS,
    TREND_K,
    AgeCurve,
    author_history_rows,
    combine_sources,
    fit_age_curve,
    history_features,
    history_spec,
)
from pipelines.catalog import read_catalog

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
OBSERVED = datetime(2025, 6, 1, tzinfo=timezone.utc)
CURVE = AgeCurve({"views": (5.0, 1.0, -0.1), "likes": (2.0, 1.0, -0.1), "comments": (0.5, 0.8, -0.05),
                  "shares": (0.3, 0.9, -0.05)}, x_min=0.0, x_max=8.0)


def row(video_id: str, author: str | None, hours: float, views=100, likes=10, comments=1, shares=0,
        observed: datetime | None = OBSERVED) -> dict:
    return dict(video_id=video_id, author_id=author, publish_time=T0 + timedelta(hours=hours),
                observed_at=observed, views=views, likes=likes, comments=comments, shares=shares)


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([CATALOG_SCHEMA.field(c) for c in rows[0]]))


def features(rows: list[dict], curve: AgeCurve = CURVE) -> dict[str, dict]:
    t = table(rows)
    return {r["video_id"]: r for r in history_features(t, t, curve).to_pylist()}


def same(a: dict, b: dict) -> bool:
    """Feature rows equal, NaN == NaN."""
    for name in HISTORY_FEATURE_NAMES:
        x, y = a[name], b[name]
        if not (x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


def random_catalog(n: int, seed: int, authors: int = 6) -> list[dict]:
    """Rows with repeated publish instants, null labels, unlabelled rows, missing authors and ages."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        author = None if rng.random() < 0.08 else f"a{rng.integers(authors)}"
        hours = float(rng.integers(0, 40))                 # few instants: many ties
        labels = {t: (None if rng.random() < 0.2 else int(rng.integers(0, 10_000)) * int(rng.random() < 0.8))
                  for t in TARGETS}
        observed = None if rng.random() < 0.05 else OBSERVED - timedelta(days=float(rng.integers(0, 100)))
        rows.append(row(f"v{i:03d}", author, hours, observed=observed, **labels))
    return rows


# ---------------------------------------------------------------- an independent reference
def reference(rows: list[dict], curve: AgeCurve) -> dict[str, dict]:
    """Brute force, one query at a time, written without the featurizer's sorting or as-of machinery."""
    def residual(r: dict, target: str) -> float | None:
        if r[target] is None or r["observed_at"] is None or r[target] < 0:
            return None
        age_days = max((r["observed_at"] - r["publish_time"]).total_seconds() / 86400, 1 / 24)
        x = min(max(math.log1p(age_days), curve.x_min), curve.x_max)
        a, b, c = curve.coefficients[target]
        return math.log1p(r[target]) - (a + b * x + c * x * x)

    out = {}
    for q in rows:
        earlier = [r for r in rows if q["author_id"] is not None and r["author_id"] == q["author_id"]
                   and r["publish_time"] < q["publish_time"]]
        earlier.sort(key=lambda r: (r["publish_time"], r["video_id"]))
        labelled = [r for r in earlier if any(residual(r, t) is not None for t in TARGETS)]
        f = {"has_history": int(bool(labelled)), "n_earlier_videos": len(earlier),
             "n_earlier_labelled": len(labelled)}
        days = lambda rs: (q["publish_time"] - rs[-1]["publish_time"]).total_seconds() / 86400 if rs else math.nan
        f["days_since_prev_video"], f["days_since_prev_labelled"] = days(earlier), days(labelled)
        for target in TARGETS:
            values = [v for v in (residual(r, target) for r in earlier) if v is not None]
            f[f"{target}_resid_mean"] = statistics.fmean(values) if values else math.nan
            f[f"{target}_resid_median"] = statistics.median(values) if values else math.nan
            f[f"{target}_resid_last"] = values[-1] if values else math.nan
            f[f"{target}_resid_trend"] = (statistics.fmean(values[-TREND_K:]) - statistics.fmean(values[:-TREND_K])
                                          if len(values) > TREND_K else math.nan)
            f[f"{target}_resid_std"] = statistics.pstdev(values) if len(values) > 1 else math.nan
            f[f"{target}_resid_max"] = max(values) if values else math.nan
            zeros = [r[target] == 0 for r in earlier if residual(r, target) is not None]
            f[f"{target}_zero_share"] = sum(zeros) / len(zeros) if zeros else math.nan
        out[q["video_id"]] = f
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_brute_force_reference(seed):
    rows = random_catalog(120, seed)
    got, want = features(rows), reference(rows, CURVE)
    assert set(got) == set(want)
    for vid, expected in want.items():
        for name in HISTORY_FEATURE_NAMES:
            assert got[vid][name] == pytest.approx(expected[name], abs=1e-5, nan_ok=True), (vid, name)
    assert any(f["has_history"] for f in want.values()) and not all(f["has_history"] for f in want.values())
    assert any(math.isfinite(f["views_resid_trend"]) for f in want.values())


def test_per_author_groups_in_any_order_match_the_whole_table():
    rows = random_catalog(150, seed=4)
    whole = features(rows)
    rng = np.random.default_rng(0)
    for author in {r["author_id"] for r in rows if r["author_id"]}:
        own = [r for r in rows if r["author_id"] == author]
        shuffled = [own[i] for i in rng.permutation(len(own))]   # runners deliver a group in any order
        for f in author_history_rows(shuffled, shuffled, CURVE):
            assert same(f, whole[f["video_id"]]), f["video_id"]


def test_later_labels_never_change_earlier_features_and_own_label_never_enters():
    rows = random_catalog(100, seed=5)
    base = features(rows)
    cut = T0 + timedelta(hours=20)
    rng = np.random.default_rng(1)
    perturbed = [dict(r, **{t: int(rng.integers(0, 10**7)) for t in TARGETS}) if r["publish_time"] >= cut else r
                 for r in rows]
    after = features(perturbed)
    for r in rows:
        if r["publish_time"] <= cut:   # same-instant videos do not see each other either
            assert same(base[r["video_id"]], after[r["video_id"]]), r["video_id"]
    assert any(not same(base[r["video_id"]], after[r["video_id"]]) for r in rows if r["publish_time"] > cut)
    # Changing (or nulling) only a video's own label leaves its own features unchanged.
    for i in (0, 17, 42):
        for new in (123456, None):
            changed = list(rows)
            changed[i] = dict(rows[i], views=new, likes=new)
            vid = rows[i]["video_id"]
            assert same(features(changed)[vid], base[vid])


def test_ties_at_the_same_instant_are_not_seen():
    rows = [row("a", "x", 0, views=10), row("b", "x", 5, views=1000), row("c", "x", 5, views=5),
            row("d", "x", 6, views=50)]
    f = features(rows)
    assert f["b"]["n_earlier_videos"] == f["c"]["n_earlier_videos"] == 1
    assert f["b"]["views_resid_mean"] == f["c"]["views_resid_mean"] == pytest.approx(f["b"]["views_resid_last"])
    assert f["b"]["views_resid_last"] == f["c"]["views_resid_last"] == pytest.approx(CURVE_RESID(rows[0]))
    assert f["d"]["n_earlier_videos"] == 3 and f["d"]["days_since_prev_video"] == pytest.approx(1 / 24)
    # The two same-instant videos enter together: d's median is over all three earlier residuals.
    residuals = sorted(CURVE_RESID(r) for r in rows[:3])
    assert f["d"]["views_resid_median"] == pytest.approx(residuals[1])


def CURVE_RESID(r: dict) -> float:   # noqa: N802 - reads as a formula
    age = (r["observed_at"] - r["publish_time"]).total_seconds() / 86400
    return math.log1p(r["views"]) - float(CURVE.predict("views", np.array([age]))[0])


def test_single_video_authors_and_missing_authors_have_explicit_no_history():
    rows = [row("solo", "lonely", 3), row("anon1", None, 1), row("anon2", None, 2)]
    f = features(rows)
    for vid in ("solo", "anon1", "anon2"):
        assert f[vid]["has_history"] == 0 and f[vid]["n_earlier_videos"] == 0
        assert f[vid]["n_earlier_labelled"] == 0
        for name in HISTORY_FEATURE_NAMES[3:]:
            assert math.isnan(f[vid][name]), name   # NaN, never 0


def test_null_labels_skip_the_target_but_count_for_recency():
    rows = [row("first", "x", 0, views=1000, likes=None),
            row("unlabelled", "x", 10, views=None, likes=None, comments=None, shares=None),
            row("query", "x", 12, views=7)]
    f = features(rows)["query"]
    assert f["has_history"] == 1 and f["n_earlier_videos"] == 2 and f["n_earlier_labelled"] == 1
    assert f["days_since_prev_video"] == pytest.approx(2 / 24)
    assert f["days_since_prev_labelled"] == pytest.approx(12 / 24)
    assert f["views_resid_mean"] == pytest.approx(CURVE_RESID(rows[0]))
    assert math.isnan(f["likes_resid_mean"]) and math.isfinite(f["comments_resid_mean"])
    # An unknown observation time means no age: the labels of such a row are unknown, not used.
    rows[0]["observed_at"] = None
    f = features(rows)["query"]
    assert f["has_history"] == 0 and f["n_earlier_videos"] == 2 and math.isnan(f["views_resid_mean"])


def test_query_apart_from_source_and_combined_sources():
    source = table([row("old1", "x", 0, views=100, observed=T0 + timedelta(days=1)),
                    row("old2", "x", 1, views=5000)])
    newer_obs = table([row("old1", "x", 0, views=900, observed=T0 + timedelta(days=30))])
    query = table([dict(video_id="new", author_id="x", publish_time=T0 + timedelta(hours=2))])
    combined = combine_sources(source, newer_obs)
    assert combined.num_rows == 2
    f = history_features(query, combined, CURVE).to_pylist()[0]
    assert f["n_earlier_videos"] == 2
    old1 = dict(video_id="old1", publish_time=T0, observed_at=T0 + timedelta(days=30), views=900)
    old2 = dict(video_id="old2", publish_time=T0 + timedelta(hours=1), observed_at=OBSERVED, views=5000)
    assert f["views_resid_mean"] == pytest.approx((CURVE_RESID(old1) + CURVE_RESID(old2)) / 2)


def test_age_curve_fit_and_version():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        age = float(rng.uniform(1, 300))
        views = int(np.expm1(4.0 + 1.5 * np.log1p(age) + rng.normal(0, 0.1)))
        rows.append(row(f"v{i}", f"a{i % 7}", -age * 24, views=views, observed=T0))
    curve = fit_age_curve(table(rows))
    assert curve.predict("views", np.array([30.0]))[0] == pytest.approx(4.0 + 1.5 * np.log1p(30.0), abs=0.05)
    spec = history_spec(curve)
    assert spec.featurizer_id.startswith("creator_history@2.") and spec.config["age_curve"]["coefficients"]
    assert AgeCurve.from_json(curve.to_json()) == curve
    other = fit_age_curve(table(rows[:200]))
    assert history_spec(other).featurizer_id != spec.featurizer_id   # the curve is part of the version
    assert set(spec.schema().names) == {"video_id", "featurizer", *HISTORY_FEATURE_NAMES}


def test_curve_before_fits_only_on_earlier_rows_and_ignores_later_labels(tmp_path):
    from pipelines.history_transforms import prepare_history

    rows = random_catalog(60, seed=3)
    catalog = pa.Table.from_pylist([dict(r, title=None, hashtags=None) for r in rows], schema=CATALOG_SCHEMA)
    times = sorted(r["publish_time"] for r in rows)
    cutoff = times[40]
    earlier = catalog.filter(pc.less(catalog.column("publish_time"), pa.scalar(cutoff, catalog.schema.field("publish_time").type)))
    spec = prepare_history(catalog, str(tmp_path / "a"), curve_before=cutoff)
    assert spec.featurizer_id == history_spec(fit_age_curve(earlier)).featurizer_id
    assert spec.featurizer_id != prepare_history(catalog, str(tmp_path / "b")).featurizer_id
    # Labels published at or after the cutoff cannot move the curve.
    later_changed = [dict(r, title=None, hashtags=None, views=(r["views"] or 0) * 50 + 7)
                     if r["publish_time"] >= cutoff else dict(r, title=None, hashtags=None) for r in rows]
    changed = pa.Table.from_pylist(later_changed, schema=CATALOG_SCHEMA)
    assert prepare_history(changed, str(tmp_path / "c"), curve_before=cutoff).featurizer_id == spec.featurizer_id
    assert prepare_history(changed, str(tmp_path / "d"),
                           curve_before=cutoff + timedelta(days=3650)).featurizer_id != spec.featurizer_id


# ---------------------------------------------------------------- the featurize job
def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    """Same columns and values, NaN == NaN (Arrow's Table.equals treats NaN as unequal)."""
    assert a.column_names == b.column_names
    for name in a.column_names:
        x, y = (t.column(name).to_numpy(zero_copy_only=False) for t in (a, b))
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert x.tolist() == y.tolist(), name


def run_featurize(catalog: str, out: str, *runner: str):
    from pipelines.featurize import run
    return run(["--catalog", catalog, "--output", out, "--modalities", "history", "--runner", "DirectRunner",
                *runner])


def test_featurize_history_on_two_runners_is_identical_and_matches_the_featurizer(tmp_path):
    from featurizers.core.feature_table import read_feature_table
    from pipelines.history_transforms import find_history_spec

    rows = random_catalog(40, seed=7)
    full = [dict(r, title=None, hashtags=None) for r in rows]
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(full, schema=CATALOG_SCHEMA), path)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    summary = run_featurize(str(path), a, "--direct_running_mode", "in_memory")
    run_featurize(str(path), b, "--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    assert summary.ok["history"] == 40 and summary.rows_unaccounted == 0
    ta = pq.read_table(tmp_path / "a" / "history").sort_by("video_id")
    tb = pq.read_table(tmp_path / "b" / "history").sort_by("video_id")
    assert_same_table(ta, tb)
    catalog = pq.read_table(path)
    curve = fit_age_curve(catalog)
    expected = history_features(catalog, catalog, curve).sort_by("video_id")
    assert_same_table(ta, expected)
    table_a = read_feature_table(a, "history")
    assert table_a.featurizer == history_spec(curve).featurizer_id
    assert find_history_spec(a, table_a.featurizer).featurizer_id == table_a.featurizer
    # A re-run recomputes history for every row (labels may have changed) without duplicating ids.
    again = run_featurize(str(path), a, "--direct_running_mode", "in_memory")
    assert again.ok["history"] == 40
    ids = read_feature_table(a, "history").video_ids.tolist()
    assert len(ids) == len(set(ids)) == 40


# ---------------------------------------------------------------- the score job
def test_score_computes_history_as_of_scoring_with_an_extra_history_source(tmp_path):
    from model.train import TrainingConfig, train
    from pipelines.featurize import run as featurize
    from pipelines.sample_catalog import generate_rows
    from pipelines.score import run as score

    direct = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
    catalog, _ = generate_rows(80, seed=11)
    catalog = catalog.sort_by("publish_time")
    pq.write_table(catalog, tmp_path / "catalog.parquet")
    features, model = str(tmp_path / "features"), str(tmp_path / "model")
    featurize(["--catalog", str(tmp_path / "catalog.parquet"), "--output", features, "--modalities",
               "meta,history", *direct])
    train(read_catalog(str(tmp_path / "catalog.parquet")), features, model, modalities=("meta", "history"),
          training=TrainingConfig(epochs=2, ensemble_size=1), baselines_enabled=False)
    # Score the latest 20 rows as a fresh catalog: alone, their authors' earlier videos are unknown; with
    # --history (the earlier 60 rows) they are known, and the predictions change accordingly.
    newest = catalog.slice(60)
    pq.write_table(newest, tmp_path / "newest.parquet")
    pq.write_table(catalog.slice(0, 60), tmp_path / "earlier.parquet")
    start = str(newest.column("publish_time")[0].as_py().date())
    end = str(newest.column("publish_time")[-1].as_py().date())
    base = ["--catalog", str(tmp_path / "newest.parquet"), "--features", features, "--model", model,
            "--start", start, "--end", end, *direct]
    alone = score([*base, "--output", str(tmp_path / "alone")])
    with_history = score([*base, "--output", str(tmp_path / "with"), "--history", str(tmp_path / "earlier.parquet")])
    assert alone.rows_unaccounted == with_history.rows_unaccounted == 0
    a = pq.read_table(tmp_path / "alone").sort_by("video_id")
    b = pq.read_table(tmp_path / "with").sort_by("video_id")
    assert a.num_rows == b.num_rows == 20
    # The model's curve was fitted on the featurized catalog: recompute both sources' features with it.
    curve = fit_age_curve(catalog)
    known = history_features(newest, catalog, curve).to_pylist()
    unknown = history_features(newest, newest, curve).to_pylist()
    differs = {k["video_id"] for k, u in zip(known, unknown) if k["n_earlier_videos"] != u["n_earlier_videos"]}
    changed = {vid for vid, x, y in zip(a.column("video_id").to_pylist(), a.column("pred_views").to_pylist(),
                                        b.column("pred_views").to_pylist()) if abs(x - y) > 1e-9}
    # Exactly the rows whose history differs between the two sources get different predictions.
    assert differs and changed == differs
    assert sum(r["has_history"] for r in known) > sum(r["has_history"] for r in unknown)
