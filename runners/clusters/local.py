"""Start and stop a Spark standalone cluster and Beam job servers on 127.0.0.1.

    python -m runners.clusters.local fetch               # cache the Beam job-server jars (Maven Central)
    python -m runners.clusters.local up spark|flink|all  # start; prints the Beam flags to use
    python -m runners.clusters.local status
    python -m runners.clusters.local down spark|flink|all

Spark: one master and two workers from pyspark's bundled Spark (`pip install pyspark==3.5.9`: Spark 3.5,
Scala 2.12, the line Beam's Spark 3 runner is built against), plus Beam's Spark job server submitting
to that master. Flink: Beam's Flink job server with its embedded cluster (`--flink-master=[local]`).
Python SDK workers run LOOPBACK, in the submitting process. Everything binds to 127.0.0.1; logs and
pid files live in the state directory (default ~/.cache/popcast/cluster, or $POPCAST_CLUSTER_STATE).

Job-server jars. Beam supports an SDK only with the job server of the same Beam release, so the job
servers run at the installed Python SDK's version (`java_version()`). Beam publishes a ready job server
(`beam-runners-spark-3-job-server`, `beam-runners-flink-1.xx-job-server`) at each release; `fetch`
tries that jar first. Where Maven Central does not serve it (the case on our machines: 404 for every
version), `fetch` assembles the same job server from its parts at the same version: the runner artifact,
which contains the job-server main class, plus its runtime dependencies, resolved by Maven. At 2.70.0,
the newest release whose Spark 3 and Flink 1.19 runners Maven Central serves here, one part is missing:
beam-runners-java-job-service (JobServerDriver, InMemoryJobService) has neither jar nor pom. `fetch` then
compiles it from the published sources named in JOB_SERVICE_SOURCES against that release's dependencies
(needs a JDK, javac) and resolves the job server with Maven from a local repository of its own under the
jars directory, so the built part never enters ~/.m2.

A job server at another Beam version ($POPCAST_BEAM_JAVA_VERSION) is refused with a ClusterError unless
$POPCAST_ALLOW_BEAM_VERSION_MISMATCH=1: Beam does not support mixed pairs. The integration test
(tests/test_cluster.py) checks the engines' outputs against the DirectRunner's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.profiles import (ALLOW_MISMATCH_ENV, DEFAULT_PORTS, JAVA_VERSION_ENV, SPARK_RUNNER_ARTIFACT,
                                beam_sdk_version, jars_dir)

__all__ = ["ClusterError", "default_state_dir", "beam_python_version", "java_version", "JobServerJars",
           "job_server_jars", "spark_home", "free_port", "ClusterInfo", "spark_up", "flink_up", "down", "status",
           "main"]

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
# Flink line of the Flink job server. Maven Central serves here only the 1.19 runner at 2.70.0
# (beam-runners-flink-1.19; no 1.17, 1.18, 1.20 or 2.x runner at any release from 2.62.0 on).
FLINK_LINE = "1.19"
# Parts of a job server that Maven Central does not serve at a Beam release, compiled from the published
# sources of another release (its -sources.jar, and its pom with the Beam versions set to the target):
# {artifact: {target version: source version}}. Checked for 2.70.0 <- 2.65.0: the module's sources
# differ from 2.62.0 to 2.65.0 only in the vendored gRPC package, which 2.70.0 still uses
# (beam-vendor-grpc-1_69_0); they compile against the 2.70.0 dependencies into the official 2.65.0 jar's
# classes (same bytecode up to constant-pool numbering); every reference from the 2.70.0 Spark 3 and
# Flink 1.19 runners into the module resolves to them; and tests/test_cluster.py passes on them.
JOB_SERVICE = "beam-runners-java-job-service"
JOB_SERVICE_SOURCES = {JOB_SERVICE: {"2.70.0": "2.65.0"}}
# AutoValue annotation processor for those sources (JobPreparation is an @AutoValue class).
AUTO_VALUE_PROCESSOR = "com.google.auto.value:auto-value:1.10.4"
# Loopback only: these clusters must never listen on, or talk to, anything else.
HOST = "127.0.0.1"
# Java 17 needs these opens for Spark's and Flink's reflection (the same list Beam's Python launcher uses).
JAVA_OPENS = ["--add-opens=java.base/sun.nio.ch=ALL-UNNAMED", "--add-opens=java.base/java.nio=ALL-UNNAMED",
              "--add-opens=java.base/java.util=ALL-UNNAMED", "--add-opens=java.base/java.lang=ALL-UNNAMED",
              "--add-opens=java.base/java.lang.invoke=ALL-UNNAMED",
              "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED", "--add-opens=java.base/java.io=ALL-UNNAMED",
              "--add-opens=java.base/java.net=ALL-UNNAMED", "--add-opens=java.base/java.text=ALL-UNNAMED",
              "--add-opens=java.base/java.time=ALL-UNNAMED",
              "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED"]


class ClusterError(RuntimeError):
    """A cluster could not be fetched, started or reached; the message says what to look at."""


def default_state_dir() -> Path:
    return Path(os.environ.get("POPCAST_CLUSTER_STATE", Path.home() / ".cache" / "popcast" / "cluster"))


def beam_python_version() -> str:
    return beam_sdk_version()


def java_version() -> str:
    """The Beam Java version of the job servers: the installed Python SDK's. Another version given in
    $POPCAST_BEAM_JAVA_VERSION is a ClusterError unless $POPCAST_ALLOW_BEAM_VERSION_MISMATCH=1."""
    sdk = beam_python_version()
    wanted = os.environ.get(JAVA_VERSION_ENV) or sdk
    if wanted != sdk and os.environ.get(ALLOW_MISMATCH_ENV) != "1":
        raise ClusterError(f"{JAVA_VERSION_ENV}={wanted} but the Beam Python SDK is {sdk}: Beam supports a job "
                           f"server only with the SDK of the same release. Unset {JAVA_VERSION_ENV}, or install "
                           f"apache-beam=={wanted}, or set {ALLOW_MISMATCH_ENV}=1 to run the unsupported pair")
    return wanted


# ---------------------------------------------------------------------------------------------
# Job-server jars
# ---------------------------------------------------------------------------------------------
@dataclass
class JobServerJars:
    """What it takes to launch one Beam job server: a classpath and a main class."""
    engine: str            # spark | flink
    source: str            # official (Beam's job-server jar) | assembled (runner artifact + dependencies)
    version: str           # Beam Java version of the runner
    main_class: str
    classpath: list[str]
    runner_jar: str        # the jar holding the runner itself (staged to Spark executors)
    notes: list[str] = field(default_factory=list)
    sdk_version: str = ""  # the Beam Python SDK it was chosen for


ENGINES = {
    "spark": dict(job_server=f"{SPARK_RUNNER_ARTIFACT}-job-server", runner=SPARK_RUNNER_ARTIFACT,
                  main="org.apache.beam.runners.spark.SparkJobServerDriver"),
    "flink": dict(job_server=f"beam-runners-flink-{FLINK_LINE}-job-server", runner=f"beam-runners-flink-{FLINK_LINE}",
                  main="org.apache.beam.runners.flink.FlinkJobServerDriver"),
}


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    partial.replace(dest)


def _beam_url(artifact: str, version: str, suffix: str = ".jar") -> str:
    return f"{MAVEN_CENTRAL}/org/apache/beam/{artifact}/{version}/{artifact}-{version}{suffix}"


def _served(url: str) -> bool:
    """Whether Maven Central answers `url` (HEAD)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30):
            return True
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise ClusterError(f"HEAD {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise ClusterError(f"HEAD {url}: {err}") from err


def _try_official(engine: str, version: str) -> tuple[Path | None, str]:
    """Beam's own job-server jar at `version`, cached; (None, why) when Maven Central does not serve it."""
    artifact = ENGINES[engine]["job_server"]
    dest = jars_dir() / f"{artifact}-{version}.jar"
    if dest.exists():
        return dest, "cached"
    url = _beam_url(artifact, version)
    try:
        _download(url, dest)
    except urllib.error.HTTPError as err:
        return None, f"GET {url}: HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, OSError) as err:
        return None, f"GET {url}: {err}"
    return dest, url


def _mvn(args: list[str], what: str, timeout_s: float = 1200) -> None:
    done = subprocess.run(["mvn", "-q", "-B", *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ClusterError(f"mvn could not {what}:\n{tail}")


def _private_repo() -> Path:
    """Maven's local repository for job servers with built parts: their own, never ~/.m2."""
    return jars_dir() / "m2"


def _built_jar(artifact: str, version: str) -> Path:
    return _private_repo() / "org" / "apache" / "beam" / artifact / version / f"{artifact}-{version}.jar"


def _build_part(artifact: str, version: str) -> None:
    """Compile org.apache.beam:ARTIFACT:VERSION from the published sources that JOB_SERVICE_SOURCES names
    and install it (jar + pom) into _private_repo(), where the job server's Maven resolution finds it."""
    source = JOB_SERVICE_SOURCES.get(artifact, {}).get(version)
    dest = _built_jar(artifact, version).parent
    if _built_jar(artifact, version).exists():
        return
    if source is None:
        raise ClusterError(f"Maven Central serves no org.apache.beam:{artifact}:{version} "
                           f"({_beam_url(artifact, version)} answers 404) and JOB_SERVICE_SOURCES in {__file__} "
                           f"names no sources to build it from: pin apache-beam to a release whose job server "
                           f"resolves (2.70.0 here)")
    for tool in ("mvn", "javac"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} is needed to build {artifact}:{version}: apt-get install maven "
                               f"openjdk-17-jdk-headless")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _download(_beam_url(artifact, source, "-sources.jar"), work / "sources.jar")
        _download(_beam_url(artifact, source, ".pom"), work / "source.pom")
        # The source release's pom, at the target version: its Beam dependencies move with it, the
        # third-party ones stay (the target release's runner pom mediates them as it would the original).
        pom = re.sub(rf"<version>{re.escape(source)}</version>", f"<version>{version}</version>",
                     (work / "source.pom").read_text())
        (work / "pom.xml").write_text(pom)
        repo = f"-Dmaven.repo.local={_private_repo()}"
        _mvn([repo, "-f", str(work / "pom.xml"), "dependency:build-classpath", "-DincludeScope=compile",
              f"-Dmdep.outputFile={work / 'classpath.txt'}"], f"resolve the dependencies of {artifact}:{version}")
        _mvn([repo, "-f", str(work / "pom.xml"), "dependency:copy", f"-Dartifact={AUTO_VALUE_PROCESSOR}",
              f"-DoutputDirectory={work / 'processor'}"], f"fetch {AUTO_VALUE_PROCESSOR}")
        with zipfile.ZipFile(work / "sources.jar") as sources:
            sources.extractall(work / "src")
        java = sorted(str(p) for p in (work / "src").rglob("*.java"))
        classes = work / "classes"
        classes.mkdir()
        # Java 8 bytecode, like the Beam runners that load it.
        done = subprocess.run(["javac", "--release", "8", "-nowarn", "-encoding", "UTF-8", "-d", str(classes),
                               "-processorpath", ":".join(str(p) for p in (work / "processor").glob("*.jar")),
                               "-cp", (work / "classpath.txt").read_text().strip(), *java],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise ClusterError(f"javac could not compile {artifact} {source} sources against Beam {version}:\n"
                               + "\n".join(done.stderr.strip().splitlines()[-10:]))
        jar = work / f"{artifact}-{version}.jar"
        with zipfile.ZipFile(jar, "w", zipfile.ZIP_DEFLATED) as out:
            out.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nAutomatic-Module-Name: "
                         f"org.apache.beam.runners.jobservice\r\nCreated-By: popcast runners/clusters/local.py "
                         f"from {artifact}-{source}-sources.jar\r\n\r\n")
            for extra in ("META-INF/LICENSE", "META-INF/NOTICE"):
                if (work / "src" / extra).exists():
                    out.write(work / "src" / extra, extra)
            for path in sorted(classes.rglob("*.class")):
                out.write(path, path.relative_to(classes).as_posix())
        dest.mkdir(parents=True, exist_ok=True)
        for name, path in ((f"{artifact}-{version}.pom", work / "pom.xml"), (f"{artifact}-{version}.jar", jar)):
            shutil.copyfile(path, dest / (name + ".part"))
            (dest / f"{name}.sha1").write_text(hashlib.sha1(path.read_bytes()).hexdigest())
            (dest / (name + ".part")).replace(dest / name)   # the jar last: its presence means done


def _assemble(engine: str, version: str) -> Path:
    """Resolve the runner artifact and its runtime dependencies with Maven into jars_dir()/NAME-VERSION/.
    A part Maven Central does not serve at `version` is built first (_build_part); Maven then resolves
    everything into _private_repo() instead of ~/.m2."""
    runner = ENGINES[engine]["runner"]
    target = jars_dir() / f"{runner}-{version}"
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise ClusterError("Maven (mvn) is needed to assemble the Beam job server: apt-get install maven")
    if not _served(_beam_url(runner, version, ".pom")):
        raise ClusterError(f"Maven Central serves no org.apache.beam:{runner}:{version} (nor its job-server jar): "
                           f"no {engine} job server at the SDK's Beam version; pin apache-beam to a release "
                           f"whose runners resolve (2.70.0 here)")
    repo_args: list[str] = []
    if not _served(_beam_url(JOB_SERVICE, version, ".pom")):
        _build_part(JOB_SERVICE, version)
        repo_args = [f"-Dmaven.repo.local={_private_repo()}"]
    with tempfile.TemporaryDirectory() as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>popcast</groupId><artifactId>{runner}-classpath</artifactId><version>1</version>
  <dependencies><dependency><groupId>org.apache.beam</groupId><artifactId>{runner}</artifactId>
    <version>{version}</version></dependency></dependencies>
</project>""")
        partial = target.with_name(target.name + ".part")
        shutil.rmtree(partial, ignore_errors=True)
        _mvn([*repo_args, "-f", str(pom), "dependency:copy-dependencies", "-DincludeScope=runtime",
              f"-DoutputDirectory={partial}"], f"resolve org.apache.beam:{runner}:{version}")
    if not (partial / f"{runner}-{version}.jar").exists():
        raise ClusterError(f"mvn resolved the dependencies of {runner}:{version} but not the runner jar itself")
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    (target / ".complete").write_text(version + "\n")
    return target


# Jars that must come from the engine's own distribution, not from Beam's dependency tree: Spark's
# jackson-module-scala needs its own jackson; Spark ships slf4j 2 + log4j 2 bindings.
_ENGINE_OWNED_PREFIXES = ("jackson-", "slf4j-", "log4j-")


def job_server_jars(engine: str, *, offline: bool = False) -> JobServerJars:
    """The job server for `engine` at the installed SDK's Beam version (java_version()): Beam's official
    jar if Maven Central serves it, else the runner assembled at that same version (see the module
    docstring). `offline` uses only the cache."""
    if engine not in ENGINES:
        raise ClusterError(f"unknown engine {engine!r}; choose spark or flink")
    sdk = beam_python_version()
    version = java_version()
    main = ENGINES[engine]["main"]
    notes: list[str] = [] if version == sdk else [f"UNSUPPORTED: Beam Java {version} under Python SDK {sdk} "
                                                   f"({ALLOW_MISMATCH_ENV}=1)"]
    official = jars_dir() / f"{ENGINES[engine]['job_server']}-{version}.jar"
    if official.exists() or not offline:
        jar, why = _try_official(engine, version)
        if jar is not None:
            return JobServerJars(engine, "official", version, main, [str(jar)], str(jar), notes + [why], sdk)
        notes.append(why)
    runner = ENGINES[engine]["runner"]
    target = jars_dir() / f"{runner}-{version}"
    if offline and not (target / ".complete").exists():
        raise ClusterError(f"no cached {engine} job server at Beam {version} under {jars_dir()}: run "
                           f"`python -m runners.clusters.local fetch` (needs Maven Central)")
    lib = _assemble(engine, version)
    jars = sorted(str(p) for p in lib.glob("*.jar") if not p.name.startswith(_ENGINE_OWNED_PREFIXES)
                  or engine == "flink")
    notes.append(f"assembled {runner}:{version} + {len(jars) - 1} dependencies in {lib}")
    if _built_jar(JOB_SERVICE, version).exists():
        notes.append(f"{JOB_SERVICE}:{version} (not on Maven Central) compiled from its "
                     f"{JOB_SERVICE_SOURCES[JOB_SERVICE][version]} sources into {_private_repo()}")
    return JobServerJars(engine, "assembled", version, main, jars, str(lib / f"{runner}-{version}.jar"), notes, sdk)


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def spark_home() -> Path:
    try:
        import pyspark
    except ImportError as err:
        raise ClusterError("pyspark is not installed: pip install 'pyspark==3.5.9' (Spark 3.5, Scala 2.12)") \
            from err
    return Path(pyspark.__file__).parent


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _start(state: Path, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Start `cmd` in its own session with its output in state/NAME.log; record its pid in state/NAME.pid."""
    log = open(state / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, start_new_session=True, cwd=state)
    (state / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child we started that exited stays a zombie until reaped; it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait(what: str, ready, state: Path, names: list[str], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ready():
            return
        for name in names:
            pid = int((state / f"{name}.pid").read_text())
            if not _alive(pid):
                raise ClusterError(f"{name} exited while starting; see {state / (name + '.log')}:\n"
                                   + _tail(state / f"{name}.log"))
        time.sleep(0.5)
    raise ClusterError(f"{what} not ready after {timeout_s:.0f} s; see the logs in {state}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _log_contains(path: Path, text: str, count: int = 1) -> bool:
    try:
        return path.read_text(errors="replace").count(text) >= count
    except OSError:
        return False


@dataclass
class ClusterInfo:
    """What `up` started, saved as state/ENGINE.json; `flags` are the Beam flags that reach it."""
    engine: str
    state_dir: str
    ports: dict[str, int]
    job_endpoint: str
    flags: list[str]
    job_server: dict
    seconds_to_start: float


def spark_up(state_dir: Path | None = None, *, ports: dict[str, int] | None = None, workers: int = 2,
             worker_memory: str = "1536m", offline: bool = False, timeout_s: float = 240.0) -> ClusterInfo:
    """Start a Spark standalone master + `workers` workers + Beam's Spark job server, all on 127.0.0.1."""
    started = time.time()
    state = Path(state_dir or default_state_dir()) / "spark"
    ports = {**DEFAULT_PORTS, **(ports or {})}
    if (state / "spark.json").exists() and any(_alive(p) for p in _pids(state)):
        raise ClusterError(f"a Spark cluster from {state} is already running: stop it first (down spark)")
    jars = job_server_jars("spark", offline=offline)
    home = spark_home()
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    for port_name in ("spark_master", "spark_job"):
        if _port_open(ports[port_name]):
            raise ClusterError(f"port {ports[port_name]} ({port_name}) on {HOST} is taken")
    spark_class = str(home / "bin" / "spark-class")
    env = {"SPARK_HOME": str(home), "SPARK_LOCAL_IP": HOST, "SPARK_LOG_DIR": str(state),
           "SPARK_DAEMON_MEMORY": "512m", "SPARK_NO_DAEMONIZE": "1"}
    master_url = f"spark://{HOST}:{ports['spark_master']}"
    _start(state, "master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST,
                             "--port", str(ports["spark_master"]), "--webui-port", str(ports["spark_master_ui"])],
           env)
    _wait("Spark master", lambda: _log_contains(state / "master.log", "I have been elected leader"),
          state, ["master"], timeout_s)
    names = []
    for i in range(1, workers + 1):
        name = f"worker{i}"
        names.append(name)
        (state / name).mkdir()
        _start(state, name, [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", HOST,
                             "--cores", "1", "--memory", worker_memory, "--work-dir", str(state / name),
                             "--webui-port", str(ports["spark_worker_ui"] + i - 1 if ports["spark_worker_ui"] else 0),
                             master_url], env)
    _wait("Spark workers", lambda: _log_contains(state / "master.log", "Registering worker", workers),
          state, ["master", *names], timeout_s)

    if jars.source == "official":
        classpath = jars.classpath
        executor_classpath: list[str] = []
    else:
        # Beam's jars first (they need guava 33, Spark ships guava 14), then Spark's own.
        classpath = jars.classpath + [str(p) for p in sorted((home / "jars").glob("*.jar"))
                                      if not p.name.startswith("guava-14")]
        # Executors run on this machine: give them the same Beam jars, ahead of Spark's, like
        # libraries installed on each node of a real cluster (see profiles.py for what is staged).
        executor_classpath = jars.classpath
    java_props = [f"-Dspark.driver.host={HOST}", f"-Dspark.driver.bindAddress={HOST}",
                  "-Dspark.ui.enabled=false", "-Dspark.executor.memory=1g",
                  f"-Dspark.executor.extraJavaOptions={' '.join(JAVA_OPENS)}"]
    if executor_classpath:
        java_props.append(f"-Dspark.executor.extraClassPath={':'.join(executor_classpath)}")
    job = ports["spark_job"]
    _start(state, "jobserver",
           ["java", "-Xmx1g", *JAVA_OPENS, *java_props, "-cp", ":".join(classpath), jars.main_class,
            "--spark-master-url", master_url, "--job-host", HOST, "--job-port", str(job),
            "--artifact-port", "0", "--expansion-port", "0", "--artifacts-dir", str(state / "artifacts")],
           {"SPARK_LOCAL_IP": HOST})
    _wait("Spark job server", lambda: _port_open(job), state, ["jobserver"], timeout_s)
    info = ClusterInfo("spark", str(state), ports, f"localhost:{job}",
                       [f"--job_endpoint=localhost:{job}"], asdict(jars) | {"classpath": len(jars.classpath)},
                       round(time.time() - started, 1))
    (state / "spark.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def flink_up(state_dir: Path | None = None, *, job_port: int | None = None, offline: bool = False,
             timeout_s: float = 240.0) -> ClusterInfo:
    """Start Beam's Flink job server with its embedded Flink cluster (`--flink-master=[local]`)."""
    started = time.time()
    state = Path(state_dir or default_state_dir()) / "flink"
    if (state / "flink.json").exists() and any(_alive(p) for p in _pids(state)):
        raise ClusterError(f"a Flink job server from {state} is already running: stop it first (down flink)")
    jars = job_server_jars("flink", offline=offline)
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    job = job_port or DEFAULT_PORTS["flink_job"]
    if _port_open(job):
        raise ClusterError(f"port {job} (flink_job) on {HOST} is taken")
    _start(state, "jobserver",
           ["java", "-Xmx1500m", *JAVA_OPENS, f"-Drest.bind-address={HOST}", f"-Drest.address={HOST}",
            "-cp", ":".join(jars.classpath), jars.main_class, "--flink-master=[local]", "--job-host", HOST,
            "--job-port", str(job), "--artifact-port", "0", "--expansion-port", "0",
            "--artifacts-dir", str(state / "artifacts")])
    _wait("Flink job server", lambda: _port_open(job), state, ["jobserver"], timeout_s)
    info = ClusterInfo("flink", str(state), {"flink_job": job}, f"localhost:{job}",
                       [f"--job_endpoint=localhost:{job}"], asdict(jars) | {"classpath": len(jars.classpath)},
                       round(time.time() - started, 1))
    (state / "flink.json").write_text(json.dumps(asdict(info), indent=2))
    return info


def _pids(state: Path) -> list[int]:
    pids = []
    for pid_file in sorted(state.glob("*.pid")):
        try:
            pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def down(engine: str, state_dir: Path | None = None, timeout_s: float = 30.0) -> list[int]:
    """Stop the processes recorded in state/ENGINE/*.pid (only those: each is its own session leader,
    and its session, e.g. Spark executors, is signalled with it). Returns the pids stopped."""
    state = Path(state_dir or default_state_dir()) / engine
    pids = [p for p in _pids(state) if _alive(p)]
    for pid in pids:   # every process is signalled before any is waited for, so order does not matter
        try:
            os.killpg(pid, signal.SIGTERM)  # pid == its session/group id: started with start_new_session
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.3)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pid_file in state.glob("*.pid"):
        pid_file.unlink()
    return pids


def status(state_dir: Path | None = None) -> dict[str, dict]:
    result = {}
    for engine in ENGINES:
        state = Path(state_dir or default_state_dir()) / engine
        info_file = state / f"{engine}.json"
        if not info_file.exists():
            continue
        info = json.loads(info_file.read_text())
        info["running"] = {f.stem: _alive(int(f.read_text())) for f in sorted(state.glob("*.pid"))}
        result[engine] = info
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.clusters.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("fetch", "up", "down", "status"))
    parser.add_argument("engine", nargs="?", default="all", choices=("spark", "flink", "all"))
    parser.add_argument("--state-dir", type=Path, default=None, help="logs, pids (default %(default)s → "
                                                                     "~/.cache/popcast/cluster)")
    parser.add_argument("--offline", action="store_true", help="use only cached jars")
    args = parser.parse_args(argv)
    engines = list(ENGINES) if args.engine == "all" else [args.engine]
    try:
        if args.command == "fetch":
            for engine in engines:
                jars = job_server_jars(engine)
                print(f"{engine}: {jars.source} Beam {jars.version} job server ({len(jars.classpath)} jars)")
                for note in jars.notes:
                    print(f"  {note}")
        elif args.command == "up":
            for engine in engines:
                info = spark_up(args.state_dir, offline=args.offline) if engine == "spark" \
                    else flink_up(args.state_dir, offline=args.offline)
                print(f"{engine} up in {info.seconds_to_start} s (logs: {info.state_dir}); "
                      f"run with --profile {engine}  (job endpoint {info.job_endpoint})")
        elif args.command == "down":
            for engine in engines:
                stopped = down(engine, args.state_dir)
                print(f"{engine}: stopped {len(stopped)} processes")
        else:
            print(json.dumps(status(args.state_dir), indent=2))
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
