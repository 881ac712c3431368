"""Nightly popcast on Airflow (example): featurize the day's new videos, then score that day's partition.

Copy into the DAGs folder of an Airflow 2.x deployment whose workers have `popcast` installed (or swap
the BashOperators for KubernetesPodOperators running deploy/Dockerfile's image). Both commands are the
documented CLI; the heavy work runs on the engine the profile names (Dataflow here), not on Airflow.
`{{ ds }}` is the run's logical date (YYYY-MM-DD): a rerun or backfill of a day rewrites that day's
partition only (score replaces dt=DAY; featurize skips videos already featurized).

Settings come from Airflow Variables: popcast_catalog (a catalog root with one dt=YYYY-MM-DD/ folder per
day), popcast_features, popcast_model, popcast_scored, popcast_beam_flags (e.g. "--project=P
--region=us-central1 --temp_location=gs://B/tmp --sdk_container_image=IMAGE").
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

COMMON = "--profile {{ var.value.get('popcast_profile', 'dataflow') }} {{ var.value.popcast_beam_flags }}"

with DAG(
    dag_id="popcast_nightly",
    description="featurize then score the day's short videos",
    schedule="30 2 * * *",          # 02:30 UTC, after the day's catalog export has landed
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["popcast"],
) as dag:
    featurize = BashOperator(
        task_id="featurize",
        bash_command=(
            "popcast featurize --catalog {{ var.value.popcast_catalog }}/dt={{ ds }}/ "
            "--output {{ var.value.popcast_features }} --run-id featurize-{{ ds_nodash }}-{{ ts_nodash }} "
            + COMMON
        ),
    )
    score = BashOperator(
        task_id="score",
        bash_command=(
            "popcast score --catalog {{ var.value.popcast_catalog }}/dt={{ ds }}/ "
            "--features {{ var.value.popcast_features }} --model {{ var.value.popcast_model }} "
            "--output {{ var.value.popcast_scored }} --date {{ ds }} "
            "--run-id score-{{ ds_nodash }}-{{ ts_nodash }} " + COMMON
        ),
    )
    featurize >> score
