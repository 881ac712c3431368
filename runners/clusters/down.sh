#!/usr/bin/env bash
# Stop what up.sh started (only the processes recorded in the state directory's pid files).
# Usage: runners/clusters/down.sh [spark|flink|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m runners.clusters.local down "${1:-all}"
