"""Benchmark: popcast featurize vs. a decode-every-frame baseline vs. this machine's limit, same K and encoder.

    python -m bench.featurize [--clips DIR] [--frames 16] [--limit N] [--repeats 3]

Measures, on the clips in DIR (default ../shared/media/clips), with K frames per clip and the packaged
EfficientNet-Lite0 encoder (featurizers.visual) for all three:
  (a) popcast: `pipelines.featurize.run` end to end (visual modality, in-memory DirectRunner) into a
      fresh temporary directory: catalog read, Beam graph, decode, RunInference, Parquet, publish;
  (b) decode_all: the clip-video-encode design -- decord decodes and resizes EVERY frame, every n-th is
      kept so K remain, and those are embedded in encoder batches;
  (c) limit: only popcast's sampled frames decoded (decode_video, audio off) plus the bare encoder's
      batched time on them: no Beam, no I/O, no model loading.
(b) and (c) decode --decode-parallelism videos at once with one decoder thread each, as popcast does
(clip-video-encode's frame reader also decodes several videos at once), so the ratio compares decoding
strategies, not thread counts. (b) is also run one video at a time with decord's own threads
("decode_all_sequential", the single-process form of the baseline) for reference.
Each is run --repeats times in rotating order and the median is reported. One extra run of popcast with
all four modalities is timed once. Prints a table, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".ts", ".avi", ".3gp", ".flv"}
DEFAULT_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "media" / "clips"
FIXED_PUBLISH_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)
# Frames decord decodes per get_batch call in the baseline: bounds memory on long clips.
_DECORD_CHUNK = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.featurize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=Path, default=DEFAULT_CLIPS, help="directory of video clips")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (K), same for all three")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N clips (sorted by name)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (median reported)")
    parser.add_argument("--decode-parallelism", type=int, default=0,
                        help="videos decoded at once in all three (0 = popcast's default, min(4, cores))")
    parser.add_argument("--skip-all-modalities", action="store_true",
                        help="do not time the extra all-modalities popcast run")
    return parser.parse_args(argv)


def find_clips(directory: Path, limit: int | None) -> list[Path]:
    if not directory.is_dir():
        sys.exit(f"bench.featurize: clips directory not found: {directory} "
                 f"(pass --clips DIR with video files)")
    clips = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if limit is not None:
        clips = clips[:limit]
    if not clips:
        sys.exit(f"bench.featurize: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in {directory}")
    return clips


def write_bench_catalog(clips: list[Path], path: Path) -> None:
    """A catalog (featurizers.core.contracts schema) with one row per clip: video_id = file name."""
    import pyarrow as pa

    from featurizers.core.contracts import CATALOG_SCHEMA
    from pipelines.catalog import write_catalog
    columns = {field.name: pa.nulls(len(clips), field.type) for field in CATALOG_SCHEMA}
    columns["video_id"] = pa.array([c.name for c in clips], pa.string())
    columns["publish_time"] = pa.array([FIXED_PUBLISH_TIME] * len(clips), CATALOG_SCHEMA.field("publish_time").type)
    columns["video_uri"] = pa.array([str(c.resolve()) for c in clips], pa.string())
    write_catalog(pa.table(columns, schema=CATALOG_SCHEMA), str(path))


# ---------------------------------------------------------------------------------------------------
# The three measurements. Each returns wall seconds (plus, for checks, how many frames it embedded).

def run_popcast(catalog: Path, frames: int, modalities: str, parallelism: int) -> tuple[float, dict]:
    """(a) The product end to end, into a fresh output directory (so nothing is skipped as done)."""
    from pipelines import featurize
    with tempfile.TemporaryDirectory(prefix="popcast-bench-") as out:
        argv = ["--catalog", str(catalog), "--output", out, "--modalities", modalities,
                "--frames", str(frames), "--decode-parallelism", str(parallelism),
                "--runner", "DirectRunner", "--direct_running_mode", "in_memory"]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):      # keep the bench table readable
            summary = featurize.run(argv)
        wall = time.perf_counter() - started
    return wall, {"ok": summary.ok, "errors": summary.errors_by_reason, "unaccounted": summary.rows_unaccounted}


def every_nth(frame_count: int, k: int) -> list[int]:
    """clip-video-encode's rule: keep every n-th frame, n = frame_count // K, first K of them.

    Clips shorter than K frames keep all and repeat the last, so every clip gives K frames.
    """
    step = max(1, frame_count // k)
    kept = list(range(0, frame_count, step))[:k]
    return kept + [kept[-1]] * (k - len(kept))


def _map_clips(function, clips: list[Path], parallelism: int) -> list:
    """function(clip, decoder_threads) over the clips, `parallelism` at once (1 decoder thread each)."""
    if parallelism <= 1:
        return [function(clip, 0) for clip in clips]
    with ThreadPoolExecutor(parallelism) as pool:
        return list(pool.map(lambda clip: function(clip, 1), clips))


def decode_all_kept(clip: Path, frames: int, size: int, threads: int) -> np.ndarray:
    """Decode and resize every frame of one clip with decord; keep every n-th (K frames)."""
    import decord
    reader = decord.VideoReader(str(clip), width=size, height=size, num_threads=threads)
    count = len(reader)
    order = every_nth(count, frames)
    keep = set(order)
    by_index = {}
    for start in range(0, count, _DECORD_CHUNK):
        chunk = list(range(start, min(count, start + _DECORD_CHUNK)))
        batch = reader.get_batch(chunk).asnumpy()       # every frame decoded and converted
        by_index.update((i, batch[i - start]) for i in chunk if i in keep)
    del reader
    return np.stack([by_index[i] for i in order])


def run_decode_all(clips: list[Path], frames: int, size: int, encoder, parallelism: int) -> tuple[float, int]:
    """(b) Decode and resize every frame with decord, keep every n-th, embed them in encoder batches."""
    started = time.perf_counter()
    kept_frames = _map_clips(lambda clip, threads: decode_all_kept(clip, frames, size, threads), clips, parallelism)
    embeddings = encoder.embed(np.concatenate(kept_frames))
    wall = time.perf_counter() - started
    return wall, len(embeddings)


def run_limit(clips: list[Path], frames: int, size: int, encoder, parallelism: int) -> tuple[float, int, dict]:
    """(c) Only popcast's sampled frames decoded (no audio) + the bare encoder, batched; no Beam."""
    from featurizers.decode import decode_video
    started = time.perf_counter()
    decoded = _map_clips(lambda clip, threads: decode_video(clip.read_bytes(), frames=frames, size=size,
                                                            audio_seconds=0, num_threads=threads),
                         clips, parallelism)
    stacks, used = [d.frames for d in decoded], {}
    for d in decoded:
        used[d.sampling_used] = used.get(d.sampling_used, 0) + 1
    embeddings = encoder.embed(np.concatenate(stacks))
    wall = time.perf_counter() - started
    return wall, len(embeddings), used


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    return f"{os.cpu_count()} cores, {cpu}, torch threads {torch.get_num_threads()}, {platform.system()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clips = find_clips(args.clips, args.limit)
    k = args.frames
    from pipelines.transforms import FeaturizeConfig
    parallelism = FeaturizeConfig(decode_parallelism=args.decode_parallelism).resolved_decode_parallelism()
    from featurizers.visual import EfficientNetLite0Embedder
    encoder = EfficientNetLite0Embedder(device="cpu")
    size = encoder.input_size

    with tempfile.TemporaryDirectory(prefix="popcast-bench-catalog-") as tmp:
        catalog = Path(tmp) / "catalog.parquet"
        write_bench_catalog(clips, catalog)
        # Warm-up (not timed): imports, Beam, first-call allocations, file cache.
        run_limit(clips[:1], k, size, encoder, parallelism)

        walls: dict[str, list[float]] = {"popcast": [], "decode_all": [], "limit": [], "decode_all_sequential": []}
        checks: dict = {}
        names = list(walls)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:   # rotate the order
                if name == "popcast":
                    wall, checks["popcast"] = run_popcast(catalog, k, "visual", parallelism)
                elif name == "decode_all":
                    wall, checks["decode_all_frames"] = run_decode_all(clips, k, size, encoder, parallelism)
                elif name == "decode_all_sequential":
                    wall, _ = run_decode_all(clips, k, size, encoder, 1)
                else:
                    wall, checks["limit_frames"], checks["sampling_used"] = run_limit(clips, k, size, encoder,
                                                                                      parallelism)
                walls[name].append(wall)
                print(f"  repeat {repeat + 1}: {name:10s} {wall:7.2f} s", flush=True)
        all_modalities = None
        if not args.skip_all_modalities:
            all_modalities, checks["all_modalities"] = run_popcast(catalog, k, "visual,audio,text,meta",
                                                                   parallelism)

    medians = {name: statistics.median(values) for name, values in walls.items()}
    a, b, c = medians["popcast"], medians["decode_all"], medians["limit"]
    b_sequential = medians["decode_all_sequential"]
    n = len(clips)
    print(f"\nfeaturize benchmark: {n} clips from {args.clips}, K={k} frames/clip, EfficientNet-Lite0 "
          f"{size}x{size} on CPU, {parallelism} videos decoded at once, median of {args.repeats}")
    print(f"{'measurement':44s} {'wall s':>8s} {'videos/s':>9s} {'frames/s':>9s}")
    rows = [("(a) popcast featurize (visual, Beam in-memory)", a),
            ("(b) decode every frame, keep every n-th", b),
            ("(c) limit: sampled frames + bare encoder", c),
            ("(b) one video at a time, decord's threads", b_sequential)]
    for label, wall in rows:
        print(f"{label:44s} {wall:8.2f} {n / wall:9.2f} {n * k / wall:9.1f}")
    if all_modalities is not None:
        print(f"{'popcast featurize, all four modalities (1 run)':44s} {all_modalities:8.2f} "
              f"{n / all_modalities:9.2f}")
    print(f"ratio_vs_decode_all = b/a = {b / a:.2f} (bar >= 1.5); efficiency = c/a = {c / a:.2f} (bar >= 0.8); "
          f"vs the one-at-a-time baseline: {b_sequential / a:.2f}")
    print(f"sampling used: {checks.get('sampling_used')}; popcast outcome: {checks.get('popcast')}")
    if "all_modalities" in checks:
        print(f"all-modalities outcome: {checks['all_modalities']}")
    result = {
        "clips": n, "frames_per_clip": k,
        "wall_s": {"popcast": round(a, 3), "decode_all": round(b, 3), "limit": round(c, 3),
                   "decode_all_sequential": round(b_sequential, 3)},
        "decode_parallelism": parallelism,
        "wall_s_all_modalities": round(all_modalities, 3) if all_modalities is not None else None,
        "videos_per_s": round(n / a, 3), "frames_per_s": round(n * k / a, 2),
        "ratio_vs_decode_all": round(b / a, 3), "efficiency": round(c / a, 3),
        "ratio_vs_decode_all_sequential": round(b_sequential / a, 3),
        "repeats": args.repeats, "machine": machine_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
