"""The whole system on one machine: sample videos → featurize → train → evaluate → score (DirectRunner).

    popcast demo [--output demo_out] [--videos 600] [--media-videos 150] [--size-scale 0.25] [--frames 8]
                 [--seed 0]

The sample is big enough for the evaluation to mean something: the test split is the latest 20% of
the rows by publish time, so 600 rows give about 120 test rows. Rendering and featurizing 600 videos
would take far too long on a laptop, so only the first --media-videos rows get a real (small) MP4 and
the rest are metadata + caption rows without media, which the model handles as missing modalities.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurizers.core.contracts import TARGETS

__all__ = ["DEFAULTS", "parse_args", "step", "main", "sample_config", "count_test_rows", "print_metrics",
           "print_evaluation", "print_top_videos"]

# The demo's sample. tests/test_demo.py checks that these (and the Makefile's `demo` line) give at
# least 100 test rows under the training split: lower them and the report's numbers stop meaning much.
DEFAULTS = {"videos": 600, "media_videos": 150, "size_scale": 0.25, "frames": 8, "seed": 0}
SAMPLE_CONFIG = "demo_sample.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="popcast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_out", help="directory for every output of the demo")
    parser.add_argument("--videos", type=int, default=DEFAULTS["videos"],
                        help="sample catalog rows (the latest 20%% by publish time are the test set)")
    parser.add_argument("--media-videos", type=int, default=DEFAULTS["media_videos"],
                        help="rows that get a rendered MP4 (the rest are metadata + caption rows)")
    parser.add_argument("--size-scale", type=float, default=DEFAULTS["size_scale"],
                        help="scale of the rendered resolutions (1.0: 720x1280 etc.)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="seed of the sample catalog and of training")
    parser.add_argument("--frames", type=int, default=DEFAULTS["frames"], help="frames per video")
    args = parser.parse_args(argv)
    if args.videos < 1:
        parser.error("--videos must be at least 1")
    if not 0 <= args.media_videos <= args.videos:
        parser.error(f"--media-videos must be between 0 and --videos ({args.videos})")
    if not args.size_scale > 0:
        parser.error("--size-scale must be > 0")
    return args


def sample_config(args: argparse.Namespace) -> dict:
    """What determines the sample's files: a sample written with another config is regenerated."""
    return {"videos": args.videos, "media_videos": args.media_videos, "size_scale": args.size_scale,
            "seed": args.seed}


def step(name: str):
    print(f"\n== {name}", flush=True)
    return time.time()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    from pipelines.featurize import run as featurize
    from pipelines.sample_catalog import generate_sample
    from pipelines.score import run as score
    from runners.model_commands import evaluate_main, train_main

    out = os.path.abspath(args.output)
    paths = {name: os.path.join(out, name) for name in ("sample", "features", "model", "report", "scored")}
    catalog = os.path.join(paths["sample"], "catalog.parquet")
    config_path = os.path.join(paths["sample"], SAMPLE_CONFIG)
    runner = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
    started = time.time()

    media = (f"{args.media_videos} of them as MP4 files (size scale {args.size_scale:g}), the rest metadata + "
             f"caption only" if args.media_videos < args.videos else f"all MP4 files (size scale {args.size_scale:g})")
    t = step(f"sample: {args.videos} videos with synthetic counts, {media}")
    config = sample_config(args)
    regenerated = not (os.path.exists(catalog) and os.path.exists(config_path)
                       and _read_json(config_path) == config)
    if regenerated:
        if os.path.exists(config_path):
            os.remove(config_path)
        generate_sample(paths["sample"], args.videos, seed=args.seed, size_scale=args.size_scale,
                        media_videos=args.media_videos)
        with open(config_path, "w") as f:
            json.dump(config, f)
    else:
        print(f"reusing {catalog}")
    print(f"done in {time.time() - t:.0f} s")

    t = step("featurize (Beam DirectRunner): frames, audio, captions, metadata")
    # A regenerated sample may reuse video_ids with other media: featurize them again.
    summary = featurize(["--catalog", catalog, "--output", paths["features"], "--frames", str(args.frames),
                         *(["--force"] if regenerated else []), *runner])
    print(f"done in {time.time() - t:.0f} s")

    # One torch thread from here on: the network is small, and on a busy machine two threads that wait on
    # each other at every operation made training 5-7x slower (16 s against 108 s for one ensemble member
    # at load 3 on 2 cores); the results are the same.
    import torch
    torch.set_num_threads(1)

    t = step("train: fusion network + baselines on a time-ordered split")
    result = train_main(["--catalog", catalog, "--features", paths["features"], "--output", paths["model"],
                         "--seed", str(args.seed)])
    print(f"done in {time.time() - t:.0f} s")

    t = step("evaluate: HTML report")
    report = evaluate_main(["--catalog", catalog, "--features", paths["features"], "--model", paths["model"],
                            "--output", paths["report"]])
    print(f"done in {time.time() - t:.0f} s")

    t = step("score (Beam DirectRunner): predictions at a 7-day horizon, one partition per date")
    scored_summary = score(["--catalog", catalog, "--features", paths["features"], "--model", paths["model"],
                            "--output", paths["scored"], "--horizon-days", "7", *runner])
    print(f"done in {time.time() - t:.0f} s")

    print_evaluation(report, result)
    print_top_videos(paths["scored"])
    print("\noutputs:")
    paths["report"] = os.path.join(paths["report"], "index.html")
    for name, path in paths.items():
        print(f"  {name:<9} {path}")
    print(f"\ndemo finished in {time.time() - started:.0f} s ({args.videos} catalog rows, {summary.rows_in} "
          f"featurized, {count_test_rows(report)} test rows evaluated, {scored_summary.rows_scored} rows scored)")
    return 0 if summary.rows_unaccounted == 0 and scored_summary.rows_unaccounted == 0 else 3


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def count_test_rows(report: dict) -> int:
    """Rows in the report's test split (its with / without media slices partition them)."""
    slices = report.get("slices", {})
    return sum(int(slices.get(name, {}).get("n", 0)) for name in ("with media", "without media"))


def _metric_line(name: str, metrics: dict, key: str, fmt: str) -> str | None:
    if not (isinstance(metrics, dict) and all(isinstance(metrics.get(t), dict) for t in TARGETS)):
        return None
    values = [metrics[t].get(key) for t in TARGETS]
    return f"  {name:<26}" + "".join(f"{'—':>10}" if v is None else f"{v:>10{fmt}}" for v in values)


def print_evaluation(report: dict, result: dict | None = None) -> None:
    """The report's headline on stdout: test rows, the network against its ablations and the baselines,
    then the [p10, p90] coverage."""
    n_test = count_test_rows(report)
    with_media = report.get("slices", {}).get("with media", {}).get("n", 0)
    quantile = report.get("split", {}).get("quantile")
    split = f"the latest {1 - quantile:.0%} by publish time" if quantile else "time-ordered split"
    print(f"\ntest set: {n_test} rows ({split}; {with_media} with media), {report.get('n_train', '?')} "
          f"rows for training")
    header = f"  {'':<26}" + "".join(f"{t:>10}" for t in TARGETS)
    print("\ntest-set MAE on log1p(count) (lower is better):")
    print(header)
    lines = [_metric_line("popcast network", report.get("test", {}), "mae_log1p", ".3f")]
    lines += [_metric_line(name, metrics, "mae_log1p", ".3f") for name, metrics in report.get("ablation", {}).items()]
    baselines = report.get("baselines") or {k: v for k, v in (result or {}).get("test", {}).items() if k != "model"}
    lines += [_metric_line(name, metrics, "mae_log1p", ".3f") for name, metrics in baselines.items()]
    print("\n".join(line for line in lines if line))
    print("\nshare of test labels inside the network's [p10, p90] interval (nominal 80%):")
    print(header)
    line = _metric_line("popcast network", report.get("test", {}), "coverage_p10_p90", ".0%")
    if line:
        print(line)


def print_metrics(result: dict) -> None:
    """Training's own test-set MAE (the network and the baselines), as train_main returns it."""
    print("\ntest-set MAE on log1p(count) (lower is better):")
    header = f"  {'':<22}" + "".join(f"{t:>10}" for t in TARGETS)
    print(header)
    for name, metrics in result.get("test", {}).items():
        if isinstance(metrics, dict) and all(t in metrics for t in TARGETS):
            print(f"  {name:<22}" + "".join(f"{metrics[t]['mae_log1p']:>10.3f}" for t in TARGETS))


def print_top_videos(scored_root: str, top: int = 5) -> None:
    table = pq.read_table(scored_root)
    order = pc.sort_indices(table, sort_keys=[("pred_views", "descending")])
    best = table.take(order[:top]).select(["video_id", "title", "pred_views", "p10_views", "p90_views"])
    print(f"\ntop {top} predicted videos (views at 7 days, 80% interval):")
    for row in best.to_pylist():
        title = (row["title"] or "")[:48]
        print(f"  {row['video_id']:<14} {row['pred_views']:>12,.0f}  [{row['p10_views']:,.0f} – "
              f"{row['p90_views']:,.0f}]  {title}")


if __name__ == "__main__":
    sys.exit(main())
