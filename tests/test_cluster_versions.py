"""The local Spark/Flink job servers are taken at the installed Beam Python SDK's version; a mismatched
pair is refused unless explicitly allowed. No JVM, no network (the cluster itself: tests/test_cluster.py)."""
import pytest
from apache_beam.version import __version__ as SDK

from pipelines.profiles import ALLOW_MISMATCH_ENV, JAVA_VERSION_ENV, SPARK_RUNNER_ARTIFACT, expand
from runners.clusters import local as clusters


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv(JAVA_VERSION_ENV, raising=False)
    monkeypatch.delenv(ALLOW_MISMATCH_ENV, raising=False)
    monkeypatch.setenv("POPCAST_JARS_DIR", str(tmp_path / "jars"))


def test_job_servers_run_at_the_sdk_version():
    assert clusters.java_version() == SDK
    assert clusters.JOB_SERVICE_SOURCES[clusters.JOB_SERVICE].get(SDK) in (None, "2.65.0")


def test_a_mismatched_pair_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setenv(JAVA_VERSION_ENV, "2.62.0")
    with pytest.raises(clusters.ClusterError, match=f"2.62.0 but the Beam Python SDK is {SDK}"):
        clusters.java_version()
    with pytest.raises(clusters.ClusterError, match=ALLOW_MISMATCH_ENV):
        clusters.job_server_jars("spark", offline=True)
    monkeypatch.setenv(ALLOW_MISMATCH_ENV, "1")
    assert clusters.java_version() == "2.62.0"


def test_offline_without_cached_jars_names_the_sdk_version():
    with pytest.raises(clusters.ClusterError, match=f"no cached flink job server at Beam {SDK}"):
        clusters.job_server_jars("flink", offline=True)


def test_spark_profile_stages_the_runner_jar_of_the_sdk_version(tmp_path):
    def runner_jar(version):
        name = f"{SPARK_RUNNER_ARTIFACT}-{version}"
        path = tmp_path / "jars" / name / f"{name}.jar"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        return path

    runner_jar("2.62.0")
    assert not any(a.startswith("--files_to_stage") for a in expand("spark", []))
    jar = runner_jar(SDK)
    assert f"--files_to_stage={jar}" in expand("spark", [])
