#!/usr/bin/env bash
# Start the local Spark standalone cluster (+ Beam Spark job server) and/or Beam's Flink job server on
# 127.0.0.1. Usage: runners/clusters/up.sh [spark|flink|all]   (default: spark)
# Logs and pids: ${POPCAST_CLUSTER_STATE:-~/.cache/popcast/cluster}/<engine>/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m runners.clusters.local up "${1:-spark}"
