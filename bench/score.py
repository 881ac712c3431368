"""Scoring benchmark: rows/s of `popcast score` with stored features, Parquet in to Parquet out, beside a plain
pyarrow/numpy script that applies the same model without Beam (read, join, predict, write partitions).

    python -m bench.score [--rows 1000000] [--modalities meta|text,meta] [--runners in_memory,multi_processing]

The catalog is 20k rows from pipelines.sample_catalog replicated with new unique video_ids and publish
dates shifted by a day per copy; meta features come from featurizers.meta.meta_features_table. Text
features are real bag-of-words and counts but SYNTHETIC unit-norm 384-d embeddings (featurizer
"text_synthetic@1"): embedding 1M captions with MiniLM on 2 CPU cores is a separate cost, not scoring.
Data and a small model (trained on the first 20k rows) are cached under --cache-dir, keyed by parameters.
Prints a table and one JSON line per runner; the last line is the in_memory runner's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from featurizers.core.contracts import CATALOG_SCHEMA, PREDICTION_COLUMNS
from pipelines.catalog import read_catalog

BASE_ROWS = 20_000          # rows drawn by generate_rows; larger catalogs are copies of them
FEATURE_FILE_ROWS = 100_000  # feature tables are written in parts of this size (as a sharded write leaves)
ROW_GROUP_ROWS = 20_000      # readers yield one table per row group: keeps 896-float text rows in ~70 MB pieces
DATA_VERSION = "1"          # bump when the generated data changes, so old caches are not reused
RUNNER_ARGS = {
    "in_memory": ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"],
    "multi_processing": ["--runner", "DirectRunner", "--direct_running_mode", "multi_processing",
                         "--direct_num_workers", "2"],
}


class SyntheticUnitEmbedder:
    """Stand-in sentence embedder: seeded random unit-norm 384-d vectors (throughput bench only)."""
    name = "text_synthetic"
    dim = 384

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def embed(self, texts) -> np.ndarray:
        vectors = self._rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    @property
    def config(self) -> dict:
        return {"model": "synthetic unit-norm gaussian (benchmark only)", "dim": self.dim}


def replicate_catalog(base: pa.Table, rows: int) -> pa.Table:
    """`rows` catalog rows: copy k of `base` gets video_id + a 3-digit k suffix and times shifted k days."""
    copies = []
    day_us = 86_400 * 1_000_000
    for k in range(-(-rows // base.num_rows)):
        copy = base
        copy = copy.set_column(0, CATALOG_SCHEMA.field("video_id"),
                               pc.binary_join_element_wise(base.column("video_id"), f"{k:03d}", ""))
        for name in ("publish_time", "observed_at"):
            shifted = pc.add(pc.cast(base.column(name), pa.int64()), k * day_us)
            copy = copy.set_column(copy.schema.get_field_index(name), CATALOG_SCHEMA.field(name),
                                   pc.cast(shifted, pa.timestamp("us", tz="UTC")))
        copies.append(copy)
    return pa.concat_tables(copies).slice(0, rows).combine_chunks()


def base_text_features(base: pa.Table, seed: int) -> pa.Table:
    from featurizers.text import text_feature_table
    return text_feature_table(base.column("video_id").to_pylist(), base.column("title").to_pylist(),
                              base.column("hashtags").to_pylist(), SyntheticUnitEmbedder(seed))


def write_parts(table: pa.Table, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for i, start in enumerate(range(0, table.num_rows, FEATURE_FILE_ROWS)):
        pq.write_table(table.slice(start, FEATURE_FILE_ROWS), os.path.join(directory, f"part-{i:05d}.parquet"),
                       use_dictionary=["video_id", "featurizer"], row_group_size=ROW_GROUP_ROWS)


def build_dataset(root: str, rows: int, modalities: tuple[str, ...], seed: int) -> dict[str, str]:
    """Catalog, features and a small trained model under `root` (reused when already complete)."""
    paths = {"catalog": os.path.join(root, "catalog.parquet"), "features": os.path.join(root, "features"),
             "train_catalog": os.path.join(root, "train_catalog.parquet"),
             "train_features": os.path.join(root, "train_features"), "model": os.path.join(root, "model")}
    done_marker = os.path.join(root, "_COMPLETE")
    if os.path.exists(done_marker):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    from featurizers.meta import meta_features_table
    from model.train import TrainingConfig, train
    from pipelines.sample_catalog import generate_rows

    started = time.time()
    base, _ = generate_rows(min(rows, BASE_ROWS), seed=seed)
    catalog = replicate_catalog(base.cast(CATALOG_SCHEMA), rows)
    pq.write_table(catalog, paths["catalog"])
    train_rows = catalog.slice(0, min(rows, BASE_ROWS))
    pq.write_table(train_rows, paths["train_catalog"])
    tables = {}
    if "meta" in modalities:
        tables["meta"] = meta_features_table(catalog)
    if "text" in modalities:
        base_text = base_text_features(base, seed)
        copies = -(-rows // base.num_rows)
        text = pa.concat_tables([base_text] * copies).slice(0, rows).combine_chunks()
        tables["text"] = text.set_column(0, text.schema.field("video_id"), catalog.column("video_id"))
    for modality, table in tables.items():
        write_parts(table, os.path.join(paths["features"], modality))
        write_parts(table.slice(0, train_rows.num_rows), os.path.join(paths["train_features"], modality))
    del tables
    print(f"data: {rows:,} rows, {', '.join(modalities)} in {time.time() - started:.0f} s", flush=True)
    started = time.time()
    train(read_catalog(paths["train_catalog"]), paths["train_features"], paths["model"],
          training=TrainingConfig(epochs=2, ensemble_size=1), baselines_enabled=False, modalities=modalities,
          threads=1)
    print(f"model: trained on {train_rows.num_rows:,} rows in {time.time() - started:.0f} s", flush=True)
    open(done_marker, "w").close()
    return paths


# ------------------------------------------------------------------------------------------- baseline
def baseline_score(catalog_path: str, features_dir: str, model_dir: str, output: str,
                   horizon_days: float = 7.0, chunk_rows: int = 65_536) -> int:
    """The same model applied without Beam: read Parquet, join by video_id, predict, write dt= partitions.

    Returns the rows written. Rows without features for every modality are left out (none in the bench).
    """
    from datetime import datetime, timezone

    from featurizers.core.feature_table import feature_table_from_arrow
    from model.artifact import load_model

    model = load_model(model_dir)
    catalog = pq.read_table(catalog_path)
    # Join ids only (Arrow's hash join refuses list columns), then gather every table in catalog order.
    keys = pa.table({"video_id": catalog.column("video_id"), "_row": np.arange(catalog.num_rows)})
    aligned, metadata = {}, {}
    for modality, featurizer in model.featurizers.items():
        dataset = ds.dataset(os.path.join(features_dir, modality), format="parquet")
        metadata[modality] = dataset.schema.metadata
        table = dataset.to_table(filter=pc.field("featurizer") == featurizer)
        ids = pa.table({"video_id": table.column("video_id"), f"_{modality}_row": np.arange(table.num_rows)})
        keys = keys.join(ids, "video_id", join_type="inner")
        aligned[modality] = table
    keys = keys.sort_by("_row")
    catalog = catalog.take(keys.column("_row"))
    for modality, table in aligned.items():
        aligned[modality] = table.take(keys.column(f"_{modality}_row"))
    schema = pa.schema(list(catalog.schema) + [pa.field(c.name, c.type) for c in PREDICTION_COLUMNS])
    scored_at = datetime.now(timezone.utc)
    parts = []
    for start in range(0, catalog.num_rows, chunk_rows):
        rows = catalog.slice(start, chunk_rows)
        tables = {m: feature_table_from_arrow(t.slice(start, chunk_rows), m, metadata[m]) for m, t in aligned.items()}
        # Same call as the job's handler: one batch per chunk (smaller batches each re-join the chunk's
        # feature tables).
        predictions = model.predict(rows, tables, horizon_days, batch_size=rows.num_rows)
        n = rows.num_rows
        columns = {name: rows.column(name) for name in rows.column_names}
        columns.update({name: pa.array(values, pa.float64()) for name, values in predictions.items()})
        columns["horizon_days"] = pa.array(np.full(n, horizon_days))
        columns["model_version"] = pa.repeat(pa.scalar(model.version), n)
        columns["featurizer_versions"] = pa.repeat(pa.scalar(",".join(sorted(model.featurizers.values()))), n)
        columns["scored_at"] = pa.repeat(pa.scalar(scored_at, pa.timestamp("us", tz="UTC")), n)
        columns["run_id"] = pa.repeat(pa.scalar("baseline"), n)
        parts.append(pa.table([columns[f.name] for f in schema], schema=schema))
    scored = pa.concat_tables(parts)
    day = pc.cast(scored.column("publish_time"), pa.date32())
    scored = scored.append_column("_day", day).sort_by([("_day", "ascending"), ("video_id", "ascending")])
    days = scored.column("_day").combine_chunks()
    scored = scored.drop_columns(["_day"])
    values = days.to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.diff(values.astype(np.int64))) + 1
    starts, stops = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(values)]])
    for lo, hi in zip(starts, stops):
        directory = os.path.join(output, f"dt={values[lo]}")
        os.makedirs(directory, exist_ok=True)
        pq.write_table(scored.slice(lo, hi - lo), os.path.join(directory, "part-baseline.parquet"),
                       use_dictionary=["model_version", "featurizer_versions", "run_id"])
    return scored.num_rows


# ------------------------------------------------------------------------------------------- popcast
def popcast_score(paths: dict[str, str], output: str, runner: str, extra: list[str]) -> tuple[float, object]:
    from pipelines.score import run
    started = time.time()
    summary = run(["--catalog", paths["catalog"], "--features", paths["features"], "--model", paths["model"],
                   "--output", output, *RUNNER_ARGS[runner], *extra])
    return time.time() - started, summary


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores {model}, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="catalog rows to score")
    parser.add_argument("--modalities", default="meta", help="meta or text,meta")
    parser.add_argument("--runners", default="in_memory,multi_processing",
                        help=f"comma-separated DirectRunner modes: {', '.join(RUNNER_ARGS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; medians are reported")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "popcast-bench-score"),
                        help="where data and model are cached (keyed by rows, modalities, seed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain pyarrow/numpy baseline")
    parser.add_argument("--score-args", default="", help="extra `popcast score` flags, space-separated")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch threads in this process (baseline and in_memory runner); 0 = torch default")
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)
    modalities = tuple(m for m in ("text", "meta") if m in args.modalities.split(","))
    if not modalities or set(args.modalities.split(",")) - {"text", "meta"}:
        parser.error("--modalities must be meta or text,meta")
    key = f"v{DATA_VERSION}-rows{args.rows}-{'+'.join(modalities)}-seed{args.seed}"
    paths = build_dataset(os.path.join(args.cache_dir, key), args.rows, modalities, args.seed)
    work = tempfile.mkdtemp(prefix="popcast-bench-score-out-")
    baseline_s: list[float] = []
    results: dict[str, list[float]] = {r: [] for r in args.runners.split(",")}
    internal: dict[str, list[float]] = {r: [] for r in results}
    try:
        for repeat in range(args.repeats):
            if not args.no_baseline:
                out = os.path.join(work, f"baseline-{repeat}")
                started = time.time()
                written = baseline_score(paths["catalog"], paths["features"], paths["model"], out)
                baseline_s.append(time.time() - started)
                assert written == args.rows, f"baseline wrote {written} of {args.rows} rows"
                print(f"baseline run {repeat}: {baseline_s[-1]:.1f} s", flush=True)
                shutil.rmtree(out)
            for runner in results:
                out = os.path.join(work, f"{runner}-{repeat}")
                seconds, summary = popcast_score(paths, out, runner, args.score_args.split())
                if summary.rows_scored != args.rows or summary.rows_unaccounted:
                    raise RuntimeError(f"{runner}: scored {summary.rows_scored} of {args.rows} rows "
                                       f"({summary.rows_unaccounted} unaccounted)")
                results[runner].append(seconds)
                internal[runner].append(summary.seconds)
                print(f"{runner} run {repeat}: {seconds:.1f} s end to end "
                      f"({summary.seconds:.1f} s from pipeline start to published)", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = args.rows
    base_rps = rows / statistics.median(baseline_s) if baseline_s else None
    print(f"\n{'what':<28}{'median s':>10}{'rows/s':>12}{'vs baseline':>13}")
    if base_rps:
        print(f"{'baseline (pyarrow+numpy)':<28}{rows / base_rps:>10.1f}{base_rps:>12,.0f}{1.0:>13.2f}")
    lines = []
    for runner, seconds in results.items():
        rps = rows / statistics.median(seconds)
        ratio = rps / base_rps if base_rps else None
        print(f"{'popcast ' + runner:<28}{statistics.median(seconds):>10.1f}{rps:>12,.0f}"
              f"{ratio if ratio is not None else float('nan'):>13.2f}")
        lines.append({"rows": rows, "modalities": ",".join(modalities), "rows_per_s": round(rps),
                      "pipeline_rows_per_s": round(rows / statistics.median(internal[runner])),
                      "baseline_rows_per_s": round(base_rps) if base_rps else None,
                      "ratio": round(ratio, 3) if ratio is not None else None, "runner": f"DirectRunner {runner}",
                      "repeats": len(seconds), "torch_threads": args.torch_threads or "default",
                      "machine": machine(), "load_avg_1m": round(os.getloadavg()[0], 1),
                      "date": date.today().isoformat()})
    lines.sort(key=lambda line: line["runner"] != "DirectRunner multi_processing")  # in_memory last
    for line in lines:
        print(json.dumps(line))
    return lines


if __name__ == "__main__":
    main()
