"""Scoring benchmark: rows/s of `popcast score` with stored features, Parquet in to Parquet out, beside a plain
pyarrow/numpy script that applies the same model without Beam (read, join, predict, write partitions).

    python -m bench.score [--rows 1000000] [--modalities meta|text,meta] [--runners in_memory,multi_processing]

The catalog is 20k rows from pipelines.sample_catalog replicated with new unique video_ids and publish
dates shifted by a day per copy; meta features come from featurizers.meta.meta_features_table. Text
features are real bag-of-words and counts but SYNTHETIC unit-norm 384-d embeddings (featurizer
"text_synthetic@1"): embedding 1M captions with MiniLM on 2 CPU cores is a separate cost, not scoring.
Data and a small model (trained on the first 20k rows) are cached under --cache-dir, keyed by parameters.
Both sides run in processes of their own (same start-up cost); peak_rss_mb is the popcast process and its
worker processes together, sampled from /proc. Prints a table and one JSON line per runner (runner, rows,
rows_per_s, baseline_rows_per_s, ratio, peak_rss_mb, rows_unaccounted, ...); the last is in_memory's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from featurizers.core.contracts import CATALOG_SCHEMA, PREDICTION_COLUMNS
from pipelines.catalog import read_catalog

BASE_ROWS = 20_000          # rows drawn by generate_rows; larger catalogs are copies of them
FEATURE_FILE_ROWS = 100_000  # feature tables are written in parts of this size (as a sharded write leaves)
ROW_GROUP_ROWS = 20_000      # readers yield one table per row group: keeps 896-float text rows in ~70 MB pieces
DATA_VERSION = "3"          # bump when the generated data or the model changes, so old caches are not reused
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
    """Feature files as featurize publishes them: one file per FEATURE_FILE_ROWS rows (a run), each sorted
    by video_id in small row groups (featurizers.core.feature_table.write_sorted)."""
    from featurizers.core.feature_table import write_sorted

    os.makedirs(directory, exist_ok=True)
    for i, start in enumerate(range(0, table.num_rows, FEATURE_FILE_ROWS)):
        unsorted = os.path.join(directory, f"_unsorted-{i:05d}.parquet")
        pq.write_table(table.slice(start, FEATURE_FILE_ROWS), unsorted, row_group_size=ROW_GROUP_ROWS)
        write_sorted([unsorted], os.path.join(directory, f"part-{i:05d}.parquet"), pafs.LocalFileSystem())
        os.remove(unsorted)


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
        columns["input_observed_at"] = pa.nulls(n, pa.timestamp("us", tz="UTC"))   # cold-start model: none used
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
def popcast_score(paths: dict[str, str], output: str, runner: str, extra: list[str],
                  torch_threads: int = 0) -> tuple[float, dict, float]:
    """`popcast score` in a process of its own: (seconds, run summary, peak RSS in MB of that process and
    its worker processes together, sampled every 50 ms)."""
    command = [sys.executable, "-m", "pipelines.score", "--catalog", paths["catalog"], "--features",
               paths["features"], "--model", paths["model"], "--output", output, "--run-id", "bench",
               *RUNNER_ARGS[runner], *extra]
    seconds, peak_mb, code = run_measured(command, torch_threads)
    if code not in (0, 3):
        raise RuntimeError(f"{runner}: popcast score exited {code}: {' '.join(command)}")
    with open(os.path.join(f"{output}.popcast", "runs", "bench.json")) as f:   # score records beside the table
        return seconds, json.load(f), peak_mb


def baseline_in_process_of_its_own(paths: dict[str, str], output: str, torch_threads: int) -> tuple[float, float, int]:
    """The baseline script in a fresh process too, so both sides pay the same start-up (imports)."""
    code = ("import sys; from bench.score import baseline_score; "
            f"print(baseline_score({paths['catalog']!r}, {paths['features']!r}, {paths['model']!r}, {output!r}))")
    seconds, peak_mb, status = run_measured([sys.executable, "-c", code], torch_threads, capture=True)
    if status.returncode != 0:
        raise RuntimeError(f"baseline failed: {status.stderr[-2000:]}")
    return seconds, peak_mb, int(status.stdout.strip().splitlines()[-1])


def run_measured(command: list[str], torch_threads: int = 0, capture: bool = False):
    """Run `command`; (seconds, peak RSS in MB of it and its children together, sampled every 50 ms, and its
    exit code — or the CompletedProcess-like result with output when `capture`)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {}))
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    started = time.time()
    process = subprocess.Popen(command, stdout=out, stderr=out, env=env, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(0.05)
    seconds = time.time() - started
    if capture:
        stdout, stderr = process.communicate()
        return seconds, peak / 2**20, subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    return seconds, peak / 2**20, process.returncode


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc), 0 once it is gone."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


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
    baseline_peak: list[float] = []
    results: dict[str, list[float]] = {r: [] for r in args.runners.split(",")}
    internal: dict[str, list[float]] = {r: [] for r in results}
    peaks: dict[str, list[float]] = {r: [] for r in results}
    unaccounted: dict[str, int] = {r: 0 for r in results}
    try:
        for repeat in range(args.repeats):
            if not args.no_baseline:
                out = os.path.join(work, f"baseline-{repeat}")
                seconds, peak_mb, written = baseline_in_process_of_its_own(paths, out, args.torch_threads)
                baseline_s.append(seconds)
                baseline_peak.append(peak_mb)
                assert written == args.rows, f"baseline wrote {written} of {args.rows} rows"
                print(f"baseline run {repeat}: {seconds:.1f} s, peak {peak_mb:,.0f} MB", flush=True)
                shutil.rmtree(out)
                shutil.rmtree(f"{out}.popcast", ignore_errors=True)
            for runner in results:
                out = os.path.join(work, f"{runner}-{repeat}")
                seconds, summary, peak_mb = popcast_score(paths, out, runner, args.score_args.split(),
                                                          args.torch_threads)
                if summary["rows_scored"] != args.rows or summary["rows_unaccounted"]:
                    print(f"{runner}: scored {summary['rows_scored']} of {args.rows} rows "
                          f"({summary['rows_unaccounted']} unaccounted)", flush=True)
                results[runner].append(seconds)
                internal[runner].append(summary["seconds"])
                peaks[runner].append(peak_mb)
                unaccounted[runner] = max(unaccounted[runner], args.rows - summary["rows_scored"],
                                          summary["rows_unaccounted"])
                print(f"{runner} run {repeat}: {seconds:.1f} s end to end "
                      f"({summary['seconds']:.1f} s from pipeline start to published), peak {peak_mb:,.0f} MB",
                      flush=True)
                shutil.rmtree(out)
                shutil.rmtree(f"{out}.popcast", ignore_errors=True)
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
        lines.append({"runner": runner, "rows": rows, "modalities": ",".join(modalities), "rows_per_s": round(rps),
                      "pipeline_rows_per_s": round(rows / statistics.median(internal[runner])),
                      "baseline_rows_per_s": round(base_rps) if base_rps else None,
                      "ratio": round(ratio, 3) if ratio is not None else None,
                      "peak_rss_mb": round(max(peaks[runner])), "rows_unaccounted": unaccounted[runner],
                      "baseline_peak_rss_mb": round(max(baseline_peak)) if baseline_peak else None,
                      "repeats": len(seconds), "torch_threads": args.torch_threads or "default",
                      "machine": machine(), "load_avg_1m": round(os.getloadavg()[0], 1),
                      "date": date.today().isoformat()})
    lines.sort(key=lambda line: line["runner"] != "multi_processing")  # in_memory last
    for line in lines:
        print(json.dumps(line))
    return lines


if __name__ == "__main__":
    main()
