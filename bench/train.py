"""Training benchmark: `popcast train` end to end (the real CLI, in a process of its own) on stored text+meta
features of --rows catalog rows, one epoch and one ensemble member; its training samples/s and the peak RSS
of that train process alone.

    python -m bench.train [--rows 1000000] [--epochs 1] [--ensemble 1] [--threads 1] [--code-dir DIR]

The data are bench.score's (its build_dataset): pipelines.sample_catalog rows replicated to --rows with new
ids and shifted dates, meta features from featurizers.meta.meta_features_table, text features with real
bag-of-words and counts but SYNTHETIC unit-norm 384-d embeddings. They are cached under --cache-dir keyed by
rows and seed, by default bench.score's own cache, so that one generation serves both benchmarks.
samples_per_s: rows trained over all epochs (early-stopping run and refit) / the epochs' seconds as the
train log reports them (an early-stopping epoch includes its validation pass).
--threads sets OMP_NUM_THREADS (torch's intra-op threads) of the train process, 1 by default as in the
earlier version of this benchmark: on a shared 2-core machine two threads per step are many times slower.
--code-dir runs the train command of another checkout on the same data (before/after comparisons).
Prints the train log and readable lines, then a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

from bench.score import DATA_VERSION, build_dataset, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r"\[m\d+( refit)?\] epoch \d+/\d+ train_loss .*\((\d+(?:\.\d+)?)s\)")
PHASE_LINE = re.compile(r"(features|inputs): .* in (\d+(?:\.\d+)?)s")


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_train(argv: list[str], code_dir: str, threads: int = 0) -> dict:
    """Run `python -m runners.cli train ARGV` from code_dir; its log lines, seconds and peak RSS (its own:
    wait4's rusage of that child, plus /proc sampling for when the peak happened)."""
    env = {**os.environ, "PYTHONPATH": code_dir, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runners.cli", "train", *argv], cwd=code_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            rss = _rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - started, rss))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"popcast train exited with {proc.returncode}")
    peak_at = max(samples, key=lambda s: s[1])[0] if samples else None
    return {"lines": lines, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_at_s": peak_at}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="catalog rows (all labelled) to train on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the train process (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=7, help="data seed (the train seed is popcast's default)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "popcast-bench-score"),
                        help="where the data are cached, keyed by rows and seed (default: bench.score's cache)")
    parser.add_argument("--code-dir", default=REPO, help="checkout whose `popcast train` runs (default: this one)")
    args = parser.parse_args(argv)
    modalities = ("text", "meta")
    key = f"v{DATA_VERSION}-rows{args.rows}-{'+'.join(modalities)}-seed{args.seed}"
    paths = build_dataset(os.path.join(args.cache_dir, key), args.rows, modalities, args.seed)
    work = tempfile.mkdtemp(prefix="popcast-bench-train-")
    try:
        model_dir = os.path.join(work, "model")
        run = run_train(["--catalog", paths["catalog"], "--features", paths["features"], "--output", model_dir,
                         "--epochs", str(args.epochs), "--ensemble", str(args.ensemble),
                         "--modalities", ",".join(modalities)], os.path.abspath(args.code_dir), args.threads)
        with open(os.path.join(model_dir, "metrics.json")) as f:
            split = json.load(f)["split"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    epochs = [(bool(m.group(1)), float(m.group(2))) for _, line in run["lines"] if (m := EPOCH_LINE.search(line))]
    phases = {m.group(1): float(m.group(2)) for _, line in run["lines"] if (m := PHASE_LINE.search(line))}
    n_train, n_fit = split["n_train"], split["n_train"] + split["n_validation"]
    samples = sum(n_fit if refit else n_train for refit, _ in epochs)
    epoch_seconds = sum(s for _, s in epochs)
    result = {"rows": args.rows, "modalities": ",".join(modalities), "epochs": args.epochs,
              "ensemble": args.ensemble, "n_train": n_train, "n_validation": split["n_validation"],
              "n_test": split["n_test"],
              "samples_per_s": round(samples / epoch_seconds) if epoch_seconds else None,
              "epoch_s": [s for _, s in epochs],
              "train_peak_rss_mb": round(run["peak_rss_mib"]),
              "peak_at_s": round(run["peak_at_s"], 1) if run["peak_at_s"] is not None else None,
              "features_s": phases.get("features"), "inputs_s": phases.get("inputs"),
              "seconds": round(run["seconds"], 1), "torch_threads": args.threads or "default",
              "code_dir": os.path.abspath(args.code_dir),
              "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "machine": machine(), "load_avg_1m": round(os.getloadavg()[0], 1), "date": date.today().isoformat()}
    print(f"\npopcast train on {args.rows:,} rows (text+meta, {args.epochs} epoch(s), {args.ensemble} member(s)): "
          f"{run['seconds']:.0f} s, {result['samples_per_s']} samples/s, peak RSS {result['train_peak_rss_mb']} MiB")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
