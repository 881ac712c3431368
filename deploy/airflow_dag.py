"""Nightly popcast on Airflow (example): featurize the previous UTC day's new videos, then score that day.

One file for Airflow 2 and 3 (tested on 2.11.2 and 3.3.2: `make test-dag`, tests/test_dag.py). Copy it
into the DAGs folder of a deployment whose workers have popcast installed from a checkout (`make install`,
an editable install: the dataflow profiles ship that checkout's setup.py, see pipelines/profiles.py), or
swap the BashOperators for KubernetesPodOperators running deploy/Dockerfile's image. Both commands are
the documented CLI; the heavy work runs on the engine the profile names (Dataflow by default), not on
Airflow. Parsing this file imports Airflow only, nothing of popcast.

Which day. The schedule is an explicit data-interval timetable, 02:30 UTC daily (the day's catalog export
has landed by then): the run scheduled at 2026-11-29 02:30 UTC has the data interval 2026-11-28 02:30 ->
2026-11-29 02:30 and processes dt=2026-11-28, on Airflow 2 and 3 alike. The day is computed from the end
of the data interval (`popcast_day`), not from `{{ ds }}`: Airflow 3's default timetable
(CronTriggerTimetable) puts the logical date at the run time (today, incomplete), and a manual run's
logical date is the moment it was triggered. A manual run processes the last day complete at the end of
its inferred data interval (or, on Airflow 3 without a logical date, at the time it was triggered). A
rerun or backfill rewrites that day's partition only (score replaces dt=DAY; featurize skips videos
already featurized).

Settings: Airflow Variables, each with a default, so the DAG renders with none set. A default is the
environment variable of the same name in capitals on the machine that parses the DAG (POPCAST_HOME...),
else the value below. Values are pasted into a bash command as they are.
    popcast_home         the popcast checkout; the commands run there            (/opt/popcast)
    popcast_venv         the virtualenv with popcast installed                    (<popcast_home>/.venv)
    popcast_catalog      catalog root with one dt=YYYY-MM-DD/ folder per day      (/data/catalog)
    popcast_features     feature table                                            (/data/features)
    popcast_model        trained model directory                                  (/data/model)
    popcast_scored       scored table                                             (/data/scored)
    popcast_profile      runner profile                                           (dataflow)
    popcast_beam_flags   extra Beam flags, e.g. "--project=P --region=us-central1
                         --temp_location=gs://B/tmp --sdk_container_image=IMAGE"  (empty)
With the dataflow profile the data paths must be gs:// URIs and popcast_beam_flags must name the project,
region and temp location: without them `popcast` stops with a one-line error naming the missing flags.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone

try:  # Airflow 3: the task SDK
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
try:  # Airflow 3.1+
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 2 (and 3.0)
    from airflow.timetables.interval import CronDataIntervalTimetable
try:  # Airflow 3 (and Airflow 2 with apache-airflow-providers-standard)
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

DAG_ID = "popcast_nightly"
SCHEDULE = "30 2 * * *"                 # 02:30 UTC: the day's catalog export has landed
READY_AFTER = timedelta(hours=2, minutes=30)


def popcast_day(dag_run) -> str:
    """The UTC day (YYYY-MM-DD) a run processes: the last day whose catalog export had landed (READY_AFTER
    past the next midnight) at the end of the run's data interval, which for a scheduled run is its
    scheduled time: the run at 2026-11-29 02:30 UTC processes 2026-11-28. An Airflow 3 run triggered
    without a logical date has no data interval: the time it was triggered (run_after) stands in."""
    end = getattr(dag_run, "data_interval_end", None) or getattr(dag_run, "run_after", None)
    if end is None:
        raise ValueError(f"dag run {getattr(dag_run, 'run_id', '?')} has neither a data interval nor run_after")
    return ((end.astimezone(timezone.utc) - READY_AFTER).date() - timedelta(days=1)).isoformat()


def popcast_run_id(task_id: str, day: str, dag_run_id: str, try_number) -> str:
    """A popcast --run-id (letters, digits, '-', '_', '.') that is new for each try of each task of each
    dag run and starts with the day, e.g. featurize-20261128-manual__2026-11-29T023000-0000-try2."""
    run = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(dag_run_id).replace(":", "")).strip("-.")
    return f"{task_id}-{day.replace('-', '')}-{run}-try{int(try_number)}"


def _setting(name: str, default: str) -> str:
    """Jinja for Airflow Variable `name`, else the parsing machine's $NAME, else `default`. The default is
    a Jinja expression (already quoted where it is a literal)."""
    env = os.environ.get(name.upper())
    fallback = repr(env) if env is not None else default
    return "var.value.get(%r, %s)" % (name, fallback)


HOME = _setting("popcast_home", "'/opt/popcast'")
VENV = _setting("popcast_venv", f"{HOME} ~ '/.venv'")
CATALOG = _setting("popcast_catalog", "'/data/catalog'")
FEATURES = _setting("popcast_features", "'/data/features'")
MODEL = _setting("popcast_model", "'/data/model'")
SCORED = _setting("popcast_scored", "'/data/scored'")
PROFILE = _setting("popcast_profile", "'dataflow'")
BEAM_FLAGS = _setting("popcast_beam_flags", "''")

# Jinja shared by both commands: the day, then cd to the checkout and run its venv's popcast (absolute
# paths: BashOperator runs in a temporary folder).
DAY = "{% set day = popcast_day(dag_run) %}"
RUN_ID = "{{ popcast_run_id(task.task_id, day, run_id, ti.try_number) }}"
PREFIX = DAY + "set -eu; cd {{ %s }} && exec {{ %s }}/bin/popcast " % (HOME, VENV)
COMMON = " --run-id %s --profile {{ %s }} {{ %s }}" % (RUN_ID, PROFILE, BEAM_FLAGS)

with DAG(
    dag_id=DAG_ID,
    description="featurize then score the previous UTC day's short videos",
    schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    user_defined_macros={"popcast_day": popcast_day, "popcast_run_id": popcast_run_id},
    tags=["popcast"],
) as dag:
    featurize = BashOperator(
        task_id="featurize",
        bash_command=(PREFIX + "featurize --catalog {{ %s }}/dt={{ day }}/ --output {{ %s }}" % (CATALOG, FEATURES)
                      + COMMON),
    )
    score = BashOperator(
        task_id="score",
        bash_command=(PREFIX + "score --catalog {{ %s }}/dt={{ day }}/ --features {{ %s }} --model {{ %s }} "
                      "--output {{ %s }} --date {{ day }}" % (CATALOG, FEATURES, MODEL, SCORED) + COMMON),
    )
    featurize >> score
