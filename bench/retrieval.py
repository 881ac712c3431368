"""Retrieval benchmark: featurizers.retrieval.neighbour_features over a whole catalog of --rows videos, beside
the same search one query at a time; throughput, their ratio, and peak RSS.

    python -m bench.retrieval [--rows 1000000] [--dim 384] [--baseline-queries 2000] [--repeats 1]

The data are synthetic: unit-norm random caption embeddings (float32), publish times spread over a year,
normal residuals with 10% unknown. Timing does not depend on what the vectors mean: every query is compared
with its whole candidate window (the MAX_CANDIDATES most recent earlier videos) either way.
The baseline is the same function with block=1 (one matrix-vector product per query) on the catalog's
--baseline-queries latest videos, whose windows are full; its rows/s is the per-query design's. The blocked
run's features for those queries must equal the baseline's (checked). Prints readable lines, then a JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from datetime import date

import numpy as np

from bench.score import machine
from featurizers.core.contracts import TARGETS
from featurizers.retrieval import MAX_CANDIDATES, RETRIEVAL_FEATURE_NAMES, RETRIEVAL_K, neighbour_features


def synthetic_catalog(rows: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    publish_us = np.sort(rng.integers(0, 365 * 86_400, rows)).astype(np.int64) * 1_000_000
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    residuals = rng.standard_normal((rows, len(TARGETS)))
    residuals[rng.random((rows, len(TARGETS))) < 0.1] = np.nan
    return publish_us, vectors, residuals


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--baseline-queries", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    publish_us, vectors, residuals = synthetic_catalog(args.rows, args.dim)
    data_mib = _peak_rss_mib()
    tail = slice(args.rows - args.baseline_queries, args.rows)
    baseline_s, blocked_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one_by_one = neighbour_features(publish_us[tail], vectors[tail], publish_us, vectors, residuals, block=1)
        baseline_s.append(time.perf_counter() - start)
    for _ in range(args.repeats):
        start = time.perf_counter()
        blocked = neighbour_features(publish_us, vectors, publish_us, vectors, residuals)
        blocked_s.append(time.perf_counter() - start)
    for name in RETRIEVAL_FEATURE_NAMES:
        np.testing.assert_allclose(blocked[name][tail].astype(float), one_by_one[name].astype(float),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    baseline_rate = args.baseline_queries / statistics.median(baseline_s)
    blocked_rate = args.rows / statistics.median(blocked_s)
    result = {"benchmark": "retrieval", "date": str(date.today()), "machine": machine(), "rows": args.rows,
              "dim": args.dim, "k": RETRIEVAL_K, "max_candidates": MAX_CANDIDATES, "repeats": args.repeats,
              "blocked_seconds": round(statistics.median(blocked_s), 1),
              "blocked_rows_per_s": round(blocked_rate, 1), "one_by_one_rows_per_s": round(baseline_rate, 1),
              "ratio": round(blocked_rate / baseline_rate, 2), "peak_rss_mib": round(_peak_rss_mib()),
              "data_mib": round(data_mib)}
    print(f"retrieval over {args.rows:,} videos ({args.dim}-d, k={RETRIEVAL_K}, window {MAX_CANDIDATES:,}): "
          f"{result['blocked_seconds']} s, {blocked_rate:,.0f} videos/s; one query at a time "
          f"{baseline_rate:,.0f} videos/s (latest {args.baseline_queries:,}); ratio {result['ratio']}×; "
          f"peak RSS {result['peak_rss_mib']:,} MiB (data {result['data_mib']:,} MiB)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
