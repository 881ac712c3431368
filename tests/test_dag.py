"""The nightly schedule (README "Nightly schedule"): the Airflow DAG deploy/airflow_dag.py on the installed
Airflow, the cron wrapper deploy/nightly.sh, and the absolute --setup_file they rely on.

Airflow is not in the project's .venv (its pins fight popcast's): `make test-dag` builds .venv-airflow
(Airflow 3.3.2; AIRFLOW_VERSION=2.11.2 for Airflow 2) and runs this file there. Elsewhere the Airflow tests
skip; the cron and setup.py tests run everywhere. The Airflow tests run the DAG for real with `dag.test()`
in a temporary AIRFLOW_HOME with its own SQLite database and no Variables, against a stub `popcast` that
records its arguments: what is checked is the command line each task actually ran.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DAG_FILE = DEPLOY / "airflow_dag.py"
NIGHTLY = DEPLOY / "nightly.sh"


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


# The run scheduled at 2026-11-29 02:30 UTC must process the complete previous UTC day.
RUN_AT = utc(2026, 11, 29, 2, 30)
DAY = "2026-11-28"


def _stub_popcast(project: Path, calls: Path, fail_first: str | None = None) -> None:
    """A checkout with a venv whose `popcast` appends its argv and cwd to `calls` (JSON lines) and exits 0,
    except the first call of subcommand `fail_first`, which exits 3 (a failed try)."""
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "popcast"
    stub.write_text(f"""#!{sys.executable}
import json, os, sys
calls = {str(calls)!r}
seen = open(calls).read().count('"' + sys.argv[1] + '"') if os.path.exists(calls) else 0
with open(calls, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
sys.exit(3 if sys.argv[1] == {fail_first!r} and seen == 0 else 0)
""")
    stub.chmod(0o755)


def _calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- the dataflow profiles' setup.py ----------------------------------------------------------------------

def test_dataflow_profiles_ship_an_absolute_setup_py():
    # BashOperator (and cron) run popcast in another folder: a relative ./setup.py would not be found.
    from pipelines.profiles import PROFILES

    for name in ("dataflow", "dataflow-gpu"):
        [flag] = [a for a in PROFILES[name] if a.startswith("--setup_file=")]
        path = Path(flag.split("=", 1)[1])
        assert path.is_absolute() and path.is_file(), flag
        if not os.environ.get("POPCAST_SETUP_FILE"):
            assert path == ROOT / "setup.py"


# --- cron: deploy/nightly.sh ------------------------------------------------------------------------------

def _nightly(tmp_path: Path, *args: str, now: str | None = None, tz: str = "UTC", fail_first=None):
    project, calls = tmp_path / "popcast", tmp_path / "calls.jsonl"
    if not project.exists():
        _stub_popcast(project, calls, fail_first)
    env = {"PATH": "/usr/bin:/bin", "TZ": tz, "POPCAST_HOME": str(project),
           "POPCAST_CATALOG": "/data/catalog", "POPCAST_LOCK": str(tmp_path / "lock"),
           "POPCAST_BEAM_FLAGS": "--job_endpoint=jobs:8099  --environment_type=LOOPBACK"}
    if now:
        env["POPCAST_NOW"] = now
    proc = subprocess.run(["bash", str(NIGHTLY), *args], env=env, capture_output=True, text=True, timeout=60)
    return proc, _calls(calls)


def test_cron_wrapper_scores_yesterday_in_utc_whatever_the_machine_zone(tmp_path):
    # 02:30 UTC is 11:30 in Tokyo, 08:00 in Kolkata, 23:00 the evening before in St. John's.
    for tz in ("UTC", "Asia/Tokyo", "Asia/Kolkata", "America/St_Johns"):
        proc, calls = _nightly(tmp_path / tz.replace("/", "_"), now="2026-11-29 02:30:02 UTC", tz=tz)
        assert proc.returncode == 0, proc.stderr
        assert [c["argv"][0] for c in calls] == ["featurize", "score"], tz
        featurize, score = (c["argv"] for c in calls)
        assert _flag(featurize, "--catalog") == f"/data/catalog/dt={DAY}/"
        assert _flag(score, "--catalog") == f"/data/catalog/dt={DAY}/" and _flag(score, "--date") == DAY
        assert _flag(score, "--run-id").startswith("score-20261128-")
        assert _flag(score, "--profile") == "spark"
        assert featurize[-2:] == ["--job_endpoint=jobs:8099", "--environment_type=LOOPBACK"]
        assert {c["cwd"] for c in calls} == {str(tmp_path / tz.replace("/", "_") / "popcast")}


def test_cron_wrapper_acts_once_per_utc_day_when_started_every_quarter_hour(tmp_path):
    # deploy/crontab starts it every 15 minutes (local time; local quarter hours are UTC quarter hours).
    # Kathmandu is UTC+05:45: its quarter hours are still UTC quarter hours.
    ran, seen = [], 0
    for quarter in range(96):
        now = utc(2026, 11, 29) + timedelta(minutes=15 * quarter)
        proc, calls = _nightly(tmp_path, now=now.strftime("%Y-%m-%d %H:%M:%S UTC"), tz="Asia/Kathmandu")
        assert proc.returncode == 0, proc.stderr
        if len(calls) > seen:
            ran.append(now)
            seen = len(calls)
        else:
            assert proc.stdout == proc.stderr == ""       # the quiet starts leave nothing in the log
    assert ran == [RUN_AT] and seen == 2


def test_cron_wrapper_reruns_a_given_day_and_stops_when_featurize_fails(tmp_path):
    proc, calls = _nightly(tmp_path, "2026-11-20", now="2026-11-29 14:00 UTC")
    assert proc.returncode == 0 and _flag(calls[-1]["argv"], "--date") == "2026-11-20"
    proc, _ = _nightly(tmp_path / "bad", "2026-02-30")
    assert proc.returncode == 2 and "not a date" in proc.stderr
    proc, calls = _nightly(tmp_path / "failing", "2026-11-20", fail_first="featurize")
    assert proc.returncode == 3 and [c["argv"][0] for c in calls] == ["featurize"]


# --- Airflow: deploy/airflow_dag.py -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """Airflow, imported only after pointing it at a fresh AIRFLOW_HOME and SQLite database (never the
    caller's), with no Variables, and POPCAST_HOME at a stub checkout (read when the DAG is parsed)."""
    if importlib.util.find_spec("airflow") is None:
        pytest.skip("Airflow is not installed here (it has its own venv): run `make test-dag`")
    if "airflow" in sys.modules:
        pytest.skip("airflow was imported before this module could give it a temporary AIRFLOW_HOME; "
                    "run tests/test_dag.py in its own pytest process (`make test-dag`)")
    tmp = tmp_path_factory.mktemp("airflow")
    project, calls = tmp / "popcast", tmp / "calls.jsonl"
    _stub_popcast(project, calls, fail_first="featurize")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("AIRFLOW", "POPCAST_")):
                mp.delenv(name)
        mp.setenv("AIRFLOW_HOME", str(tmp / "home"))
        mp.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{tmp / 'home' / 'airflow.db'}")
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DEPLOY))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        mp.setenv("POPCAST_HOME", str(project))
        mp.setattr(sys, "dont_write_bytecode", True)     # no __pycache__ in deploy/
        (tmp / "home").mkdir()
        import airflow as af
        from airflow.utils import db

        db.resetdb()
        yield SimpleNamespace(version=int(af.__version__.split(".")[0]), full_version=af.__version__,
                              project=project, calls=calls)


@pytest.fixture(scope="module")
def dag(airflow):
    before = set(sys.modules)
    try:
        from airflow.dag_processing.dagbag import DagBag      # Airflow 3
        bag = DagBag(dag_folder=str(DAG_FILE))
    except ImportError:
        from airflow.models.dagbag import DagBag               # Airflow 2
        bag = DagBag(dag_folder=str(DAG_FILE), include_examples=False)
    assert bag.import_errors == {}
    assert list(bag.dag_ids) == ["popcast_nightly"]
    dag = bag.get_dag("popcast_nightly")
    dag.modules_imported_by_parsing = set(sys.modules) - before
    return dag


@pytest.fixture(scope="module")
def test_run(airflow, dag):
    """One real run of the DAG (`dag.test()`) whose data interval is that of the run scheduled at RUN_AT;
    featurize's first try fails (the stub exits 3) and is retried at once."""
    for task in dag.tasks:
        task.retry_delay = timedelta(0)
    if airflow.version >= 3:
        run = dag.test(logical_date=RUN_AT, run_after=RUN_AT)
    else:
        run = dag.test(execution_date=RUN_AT)
    return SimpleNamespace(run=run, calls=_calls(airflow.calls))


def test_dag_imports_with_no_errors_and_uses_only_airflow_at_parse_time(airflow, dag):
    assert {t.task_id for t in dag.tasks} == {"featurize", "score"}
    assert dag.get_task("featurize").downstream_task_ids == {"score"}
    assert not [name for name in dag.modules_imported_by_parsing
                if name.split(".")[0] in ("pipelines", "featurizers", "model", "runners", "apache_beam", "torch")]


def test_schedule_is_02_30_utc_with_an_explicit_data_interval(airflow, dag):
    import pendulum
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = dag.timetable
    assert type(timetable).__name__ == "CronDataIntervalTimetable"
    if not hasattr(timetable, "next_dagrun_info"):        # Airflow 3: the scheduler's side of the SDK's one
        from airflow.serialization.encoders import coerce_to_core_timetable
        timetable = coerce_to_core_timetable(timetable)
    previous = DataInterval(pendulum.datetime(2026, 11, 27, 2, 30), pendulum.datetime(2026, 11, 28, 2, 30))
    info = timetable.next_dagrun_info(last_automated_data_interval=previous,
                                      restriction=TimeRestriction(earliest=None, latest=None, catchup=True))
    assert info.run_after == RUN_AT
    assert (info.data_interval.start, info.data_interval.end) == (utc(2026, 11, 28, 2, 30), RUN_AT)
    # A manual run at RUN_AT (what dag.test makes) gets the same data interval as the scheduled one.
    assert timetable.infer_manual_data_interval(run_after=pendulum.instance(RUN_AT)) == info.data_interval


def test_the_run_at_02_30_utc_featurizes_and_scores_the_previous_utc_day(airflow, test_run):
    run = test_run.run
    assert (run.data_interval_start, run.data_interval_end) == (utc(2026, 11, 28, 2, 30), RUN_AT)
    assert str(run.state).lower().endswith("success"), run.state
    assert [c["argv"][0] for c in test_run.calls] == ["featurize", "featurize", "score"]
    for call in test_run.calls:
        assert _flag(call["argv"], "--catalog") == f"/data/catalog/dt={DAY}/"
        assert call["cwd"] == str(airflow.project)        # cd to popcast_home; its venv's popcast ran
    score = test_run.calls[-1]["argv"]
    assert _flag(score, "--date") == DAY
    assert _flag(score, "--features") == "/data/features" and _flag(score, "--model") == "/data/model"
    assert _flag(score, "--output") == "/data/scored"


def test_each_try_gets_its_own_run_id_with_the_day_in_it(test_run):
    first, second, score = (_flag(c["argv"], "--run-id") for c in test_run.calls)
    assert first != second
    assert first.startswith("featurize-20261128-") and first.endswith("-try1")
    assert second.startswith("featurize-20261128-") and second.endswith("-try2")
    assert score.startswith("score-20261128-") and score.endswith("-try1")
    assert all(c.isalnum() or c in "-_." for c in first + second + score)   # popcast's --run-id alphabet


def test_renders_with_no_variables_set(test_run):
    # The run above had no Airflow Variable (empty database, no AIRFLOW_VAR_*): every setting fell back
    # to its default, and the last flags are the profile's with no Beam flags after them.
    for call in test_run.calls:
        assert call["argv"][-2:] == ["--profile", "dataflow"]


def test_the_day_is_the_last_complete_utc_day_at_the_end_of_the_data_interval(airflow):
    spec = importlib.util.spec_from_file_location("popcast_nightly_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    day = module.popcast_day
    assert day(SimpleNamespace(data_interval_end=RUN_AT)) == DAY
    # Airflow 3 runs triggered without a logical date have no data interval: the trigger time stands in,
    # and before 02:30 UTC the previous day's export may not have landed yet.
    assert day(SimpleNamespace(data_interval_end=None, run_after=utc(2026, 11, 29, 9, 0))) == DAY
    assert day(SimpleNamespace(data_interval_end=None, run_after=utc(2026, 11, 29, 1, 0))) == "2026-11-27"
    assert module.popcast_run_id("score", DAY, "manual__2026-11-29T02:30:00+00:00", 2) == \
        "score-20261128-manual__2026-11-29T023000-0000-try2"


def test_airflow3_manual_run_without_a_logical_date_processes_the_last_complete_day(airflow, dag, test_run):
    # Airflow 3 lets a manual run have no logical date and so no data interval (and no `ds`): the time it
    # was triggered stands in for the end of the interval.
    if airflow.version < 3:
        pytest.skip(f"Airflow {airflow.full_version}: every run has a logical date and a data interval")
    before = len(_calls(airflow.calls))
    run = dag.test(logical_date=None, run_after=utc(2026, 11, 29, 9, 0))
    assert run.data_interval_end is None and str(run.state).lower().endswith("success"), run.state
    calls = _calls(airflow.calls)[before:]
    assert [c["argv"][0] for c in calls] == ["featurize", "score"]
    assert _flag(calls[-1]["argv"], "--date") == DAY
    assert _flag(calls[-1]["argv"], "--run-id").startswith("score-20261128-manual__2026-11-29T090000")
