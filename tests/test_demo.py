"""`popcast demo`: its sample is big enough for the report to mean something (fast: no rendering)."""
from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA, TARGETS
from model.data import catalog_arrays, time_split
from pipelines.sample_catalog import generate_rows
from runners.demo import DEFAULTS, count_test_rows, parse_args, print_evaluation, sample_config
from runners.model_commands import train_parser

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
# Below ~100 test rows the demo's ablations and interval coverage are noise (13 rows once made the model
# without text look better than the full model).
MIN_TEST_ROWS = 100
# Enough test rows with media that the "with media" slice and the visual / audio branches are exercised.
MIN_TEST_ROWS_WITH_MEDIA = 20


def _make_demo_argv() -> list[str]:
    """The flags `make demo` passes to `popcast demo`."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    recipe = next(line for line in lines[start + 1:] if "popcast demo" in line)
    return shlex.split(recipe.split("popcast demo", 1)[1])


def _demo_split(argv: list[str]):
    """The training split (model.data.time_split at train's default quantile) of the demo's sample, with
    the media rows generate_sample would render (the first --media-videos rows)."""
    args = parse_args(argv)
    catalog, _ = generate_rows(args.videos, args.seed, args.size_scale)
    uris = [f"/sample/videos/{i}.mp4" if i < args.media_videos else None for i in range(args.videos)]
    catalog = catalog.set_column(catalog.schema.get_field_index("video_uri"), CATALOG_SCHEMA.field("video_uri"),
                                 pa.array(uris, pa.string()))
    arrays = catalog_arrays(catalog)
    labelled = np.isfinite(arrays["log_labels"]).any(axis=1)
    split = time_split(arrays["publish_s"], labelled, train_parser().get_default("split_quantile"))
    return split, arrays["has_media"]


@pytest.mark.parametrize("argv", [[], _make_demo_argv()], ids=["defaults", "make demo"])
def test_demo_sample_gives_at_least_100_test_rows(argv):
    split, has_media = _demo_split(argv)
    assert len(split.test) >= MIN_TEST_ROWS, f"the demo would evaluate on {len(split.test)} test rows"
    media_test = has_media[split.test].sum()
    media_train = has_media[np.concatenate([split.train, split.validation])].sum()
    assert media_test >= MIN_TEST_ROWS_WITH_MEDIA, f"only {media_test} test rows with media"
    assert media_train >= 4 * MIN_TEST_ROWS_WITH_MEDIA, f"only {media_train} training rows with media"


def test_demo_defaults_are_the_documented_ones():
    args = parse_args([])
    assert {k: getattr(args, k) for k in DEFAULTS} == DEFAULTS
    assert sample_config(args) == {"videos": args.videos, "media_videos": args.media_videos,
                                   "size_scale": args.size_scale, "seed": args.seed}
    assert sample_config(parse_args(["--media-videos", "10"])) != sample_config(args)


@pytest.mark.parametrize("argv", [["--media-videos", "700", "--videos", "600"], ["--media-videos", "-1"],
                                  ["--videos", "0"], ["--size-scale", "0"]])
def test_demo_rejects_impossible_samples(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def _metrics(mae: float, coverage: float | None = None, n: int = 120) -> dict:
    return {t: {"n": n, "mae_log1p": mae + j / 10, "spearman": 0.5, "nmse": 0.5, "coverage_p10_p90": coverage}
            for j, t in enumerate(TARGETS)}


def test_demo_summary_states_test_rows_ablations_and_coverage(capsys):
    report = {"split": {"quantile": 0.8}, "n_train": 480,
              "test": _metrics(1.0, 0.79), "ablation": {"without text": _metrics(1.5, 0.7)},
              "baselines": {"global median": _metrics(2.0)},
              "slices": {"with media": {"n": 30}, "without media": {"n": 90}, "new creators": {"n": 50}}}
    assert count_test_rows(report) == 120
    print_evaluation(report)
    out = capsys.readouterr().out
    assert "test set: 120 rows (the latest 20% by publish time; 30 with media), 480 rows for training" in out
    assert "popcast network" in out and "without text" in out and "global median" in out
    assert "1.000" in out and "1.500" in out and "2.000" in out
    coverage = out.split("[p10, p90]", 1)[1]
    assert "79%" in coverage and "70%" not in coverage
