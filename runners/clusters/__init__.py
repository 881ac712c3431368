"""Local Spark and Flink clusters on 127.0.0.1 for running the Beam pipelines on a real engine.

See runners/clusters/local.py (`python -m runners.clusters.local up|down|status|fetch`).
"""
