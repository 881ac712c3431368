"""The whole system on one machine: sample videos → featurize → train → evaluate → score (DirectRunner).

    popcast demo [--output demo_out] [--videos 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurizers.core.contracts import TARGETS

__all__ = ["parse_args", "step", "main", "print_metrics", "print_top_videos"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="popcast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_out", help="directory for every output of the demo")
    parser.add_argument("--videos", type=int, default=60, help="sample videos to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample catalog and of training")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    return parser.parse_args(argv)


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
    runner = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
    started = time.time()

    t = step(f"sample: {args.videos} MP4 videos with synthetic counts")
    if os.path.exists(catalog) and pq.read_metadata(catalog).num_rows == args.videos:
        print(f"reusing {catalog}")
    else:
        generate_sample(paths["sample"], args.videos, seed=args.seed)
    print(f"done in {time.time() - t:.0f} s")

    t = step("featurize (Beam DirectRunner): frames, audio, captions, metadata")
    summary = featurize(["--catalog", catalog, "--output", paths["features"], "--frames", str(args.frames),
                         *runner])
    print(f"done in {time.time() - t:.0f} s")

    t = step("train: fusion network + baselines on a time-ordered split")
    result = train_main(["--catalog", catalog, "--features", paths["features"], "--output", paths["model"],
                         "--seed", str(args.seed)])
    print(f"done in {time.time() - t:.0f} s")

    t = step("evaluate: HTML report")
    evaluate_main(["--catalog", catalog, "--features", paths["features"], "--model", paths["model"],
                   "--output", paths["report"]])
    print(f"done in {time.time() - t:.0f} s")

    t = step("score (Beam DirectRunner): predictions at a 7-day horizon, one partition per date")
    scored_summary = score(["--catalog", catalog, "--features", paths["features"], "--model", paths["model"],
                            "--output", paths["scored"], "--horizon-days", "7", *runner])
    print(f"done in {time.time() - t:.0f} s")

    print_metrics(result)
    print_top_videos(paths["scored"])
    print("\noutputs:")
    paths["report"] = os.path.join(paths["report"], "index.html")
    for name, path in paths.items():
        print(f"  {name:<9} {path}")
    print(f"\ndemo finished in {time.time() - started:.0f} s "
          f"({summary.rows_in} videos featurized, {scored_summary.rows_scored} rows scored)")
    return 0 if summary.rows_unaccounted == 0 and scored_summary.rows_unaccounted == 0 else 3


def print_metrics(result: dict) -> None:
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
