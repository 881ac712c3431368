"""Named runner profiles that expand to Beam pipeline options; explicit Beam flags win over a profile.

    direct      in-process FnApiRunner (tests, small catalogs)
    local       DirectRunner multi_processing, one SDK worker process per core
    portable    Beam's Python job service (`python -m apache_beam.runners.portability.local_job_service_main
                --port 8099`), SDK workers LOOPBACK
    spark       Beam's Spark job server on localhost:8199 submitting to the Spark standalone master
                spark://127.0.0.1:7077 (`make cluster-up`), SDK workers LOOPBACK
    flink       Beam's Flink job server on localhost:8299 with its embedded Flink cluster, SDK workers LOOPBACK
    dataflow    Google Cloud Dataflow; needs --project, --region, --temp_location; ships the code with
                setup.py; pass --sdk_container_image=IMAGE for the custom worker container (deploy/Dockerfile)
    dataflow-gpu  dataflow + one NVIDIA L4 per worker (G2 machine type, driver installed by Dataflow)

For a remote Spark/Flink job server or an EXTERNAL worker pool, override the profile's flags, e.g.
`--job_endpoint=jobserver:8099 --environment_type=EXTERNAL --environment_config=localhost:50000`.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_PORTS", "JAVA_VERSION_ENV", "ALLOW_MISMATCH_ENV", "SPARK_RUNNER_ARTIFACT", "jars_dir",
           "beam_sdk_version", "job_server_version", "spark_runner_jar", "PROFILES", "expand"]

# The local clusters (`make cluster-up`, runners/clusters/local.py) listen on these loopback ports and cache
# their job-server jars here; the spark and flink profiles below point at them.
DEFAULT_PORTS = {"spark_master": 7077, "spark_master_ui": 8080, "spark_worker_ui": 8081,
                 "spark_job": 8199, "flink_job": 8299}
# The Spark/Flink job servers run the Beam Java release equal to the installed Python SDK's version (Beam
# supports only matching pairs). POPCAST_BEAM_JAVA_VERSION picks another release, and is refused unless
# POPCAST_ALLOW_BEAM_VERSION_MISMATCH=1 says the mismatch is meant (runners/clusters/local.py).
JAVA_VERSION_ENV = "POPCAST_BEAM_JAVA_VERSION"
ALLOW_MISMATCH_ENV = "POPCAST_ALLOW_BEAM_VERSION_MISMATCH"
SPARK_RUNNER_ARTIFACT = "beam-runners-spark-3"


def jars_dir() -> Path:
    return Path(os.environ.get("POPCAST_JARS_DIR", Path.home() / ".cache" / "popcast" / "jars"))


def beam_sdk_version() -> str:
    """The installed Beam Python SDK's version, e.g. 2.70.0."""
    from apache_beam.version import __version__
    return __version__


def job_server_version() -> str:
    """The Beam Java version of the local job servers: the SDK's own unless $POPCAST_BEAM_JAVA_VERSION
    overrides it (checked, not just read, by runners/clusters/local.py)."""
    return os.environ.get(JAVA_VERSION_ENV) or beam_sdk_version()


def spark_runner_jar() -> Path | None:
    """The cached Beam Spark runner jar of the assembled local job server, if there is one."""
    name = f"{SPARK_RUNNER_ARTIFACT}-{job_server_version()}"
    path = jars_dir() / name / f"{name}.jar"
    return path if path.exists() else None

SPARK_JOB_ENDPOINT = f"localhost:{DEFAULT_PORTS['spark_job']}"
FLINK_JOB_ENDPOINT = f"localhost:{DEFAULT_PORTS['flink_job']}"
# Dataflow ships the code to workers with this setup.py, named by an absolute path: the launcher may run in
# any folder (Airflow's BashOperator runs in a temporary one). POPCAST_SETUP_FILE overrides it, e.g. for a
# non-editable install whose package folder has no setup.py beside it.
SETUP_FILE = Path(os.environ.get("POPCAST_SETUP_FILE")
                  or Path(__file__).resolve().parents[1] / "setup.py").resolve()
# One NVIDIA L4 per worker; Dataflow installs the driver. L4 GPUs need G2 machine types.
DATAFLOW_GPU_SERVICE_OPTION = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"

PROFILES: dict[str, list[str]] = {
    # In-process FnApiRunner: named explicitly so the DirectRunner does not try to download Prism.
    "direct": ["--runner=DirectRunner", "--direct_running_mode=in_memory"],
    # Several local worker processes (one model copy per process).
    "local": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
              f"--direct_num_workers={max(2, os.cpu_count() or 2)}"],
    # Beam's portable job service on this machine, SDK workers in this process.
    "portable": ["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"],
    # Job servers started by `python -m runners.clusters.local up` (make cluster-up). PortableRunner, not
    # SparkRunner/FlinkRunner: those would try to download and start a job-server jar themselves.
    "spark": ["--runner=PortableRunner", f"--job_endpoint={SPARK_JOB_ENDPOINT}", "--environment_type=LOOPBACK"],
    "flink": ["--runner=PortableRunner", f"--job_endpoint={FLINK_JOB_ENDPOINT}", "--environment_type=LOOPBACK",
              "--parallelism=2"],
    # Dataflow: project/region/temp_location come from the user's flags (checked in expand()).
    "dataflow": ["--runner=DataflowRunner", f"--setup_file={SETUP_FILE}", "--save_main_session",
                 "--experiments=use_runner_v2"],
    "dataflow-gpu": ["--runner=DataflowRunner", f"--setup_file={SETUP_FILE}", "--save_main_session",
                     "--experiments=use_runner_v2", "--machine_type=g2-standard-4",
                     f"--dataflow_service_options={DATAFLOW_GPU_SERVICE_OPTION}"],
}
DATAFLOW_REQUIRED = ("project", "region", "temp_location")


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("-")


def _spark_staging(given: set[str]) -> list[str]:
    """With the job server assembled from Beam's runner jars (runners/clusters/local.py), stage only the
    runner jar to the executors (they get the rest on their classpath). Without this the Spark runner
    stages its whole JVM classpath, Spark's own 250 jars included (~400 MB per executor per job)."""
    if "files_to_stage" in given or "file_to_stage" in given:
        return []
    jar = spark_runner_jar()
    return [f"--files_to_stage={jar}"] if jar else []


def expand(profile: str | None, beam_args: list[str]) -> list[str]:
    """Profile options followed by the user's Beam flags; a flag given by the user replaces the profile's."""
    if profile is None:
        profile = "direct"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    given = {_flag_name(a) for a in beam_args if a.startswith("--")}
    options = [a for a in PROFILES[profile] if _flag_name(a) not in given]
    if profile.startswith("dataflow"):
        missing = [name for name in DATAFLOW_REQUIRED if name not in given]
        if missing:
            raise ValueError(f"profile {profile} needs {', '.join('--' + m for m in missing)} "
                             f"(e.g. --project=my-project --region=us-central1 --temp_location=gs://bucket/tmp)")
    if profile == "spark":
        options += _spark_staging(given)
    return options + list(beam_args)
