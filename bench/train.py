"""Training benchmark: samples/s of the fusion network on stored text+meta features, and the peak memory
of loading 1M rows of text+meta features into model tensors (synthetic tables in a temp dir).

    python -m bench.train [--rows 1000000] [--train-rows 20000]
Prints readable lines and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import feature_table_to_arrow
from model.data import fit_layout, make_batch, read_features
from model.network import NetworkConfig, PopularityNet, pinball_loss

TEXT = FeatureSpec("text", "text-bench", "1", {"embedding": (384,), "bow": (512,)},
                   (("caption_chars", pa.float32()), ("hashtag_count", pa.float32())))
META = FeatureSpec("meta", "meta-bench", "1", {},
                   (("log_followers", pa.float32()), ("duration_s", pa.float32()), ("hour", pa.int32()),
                    ("weekday", pa.int32()), ("has_music", pa.float32())))
CHUNK = 100_000


def write_synthetic(directory: str, rows: int, seed: int = 0) -> None:
    """rows of text + meta features, in CHUNK-row Parquet files (as a sharded Beam write would leave)."""
    rng = np.random.default_rng(seed)
    for modality in ("text", "meta"):
        os.makedirs(os.path.join(directory, modality), exist_ok=True)
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        ids = [f"v{i:08d}" for i in range(start, start + n)]
        text = feature_table_to_arrow(TEXT, ids, {"embedding": rng.normal(size=(n, 384)).astype(np.float32),
                                                  "bow": rng.random((n, 512), dtype=np.float32)},
                                      {"caption_chars": rng.integers(0, 300, n), "hashtag_count": rng.integers(0, 9, n)})
        meta = feature_table_to_arrow(META, ids, {}, {"log_followers": rng.normal(8, 2, n),
                                                      "duration_s": rng.uniform(5, 90, n),
                                                      "hour": rng.integers(0, 24, n), "weekday": rng.integers(0, 7, n),
                                                      "has_music": rng.integers(0, 2, n)})
        pq.write_table(text, os.path.join(directory, "text", f"part-{start // CHUNK:05d}.parquet"))
        pq.write_table(meta, os.path.join(directory, "meta", f"part-{start // CHUNK:05d}.parquet"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the memory measurement")
    parser.add_argument("--train-rows", type=int, default=20_000, help="rows for the samples/s measurement")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_synthetic(tmp, args.rows)
        result["write_s"] = round(time.perf_counter() - t0, 1)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tracemalloc.start()
        t0 = time.perf_counter()
        tables = read_features(tmp)
        ids = tables["text"].video_ids
        layouts = {k: fit_layout(t, np.arange(min(len(t), 100_000))) for k, t in sorted(tables.items())}
        batch = make_batch(layouts, tables, ids, np.full(len(ids), np.log1p(30.0)),
                           np.random.default_rng(1).normal(size=(len(ids), 4)))
        result["load_s"] = round(time.perf_counter() - t0, 1)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["load_peak_traced_mib"] = round(peak / 2**20)
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["rss_before_load_mib"] = round(rss_before)
        tensor_bytes = sum(t.numel() * t.element_size() for m in batch.modalities.values()
                           for t in (m.vectors, m.numeric, m.categorical, m.present))
        result["model_input_mib"] = round(tensor_bytes / 2**20)
        print(f"loaded {len(ids):,} rows of text+meta in {result['load_s']} s: inputs {result['model_input_mib']} MiB, "
              f"traced peak {result['load_peak_traced_mib']} MiB, process peak RSS {result['peak_rss_mib']} MiB")
        del tables
        train_rows = torch.arange(min(args.train_rows, len(batch)))
        small = batch.index(train_rows)
        del batch
        net = PopularityNet(layouts, NetworkConfig())
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net.train()
        t0 = time.perf_counter()
        seen = 0
        for start in range(0, len(small), args.batch_size):
            part = small.index(torch.arange(start, min(start + args.batch_size, len(small))))
            loss = pinball_loss(net(part), part.labels, part.label_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(part)
        elapsed = time.perf_counter() - t0
        result["train_samples_per_s"] = round(seen / elapsed)
        result["threads"] = args.threads
        print(f"training: {result['train_samples_per_s']:,} samples/s (batch {args.batch_size}, "
              f"{args.threads} thread(s), CPU)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
