"""Score job: the catalog table comes back with popularity predictions attached, one partition per date.

    popcast score --catalog PATH --features DIR --model MODEL_DIR --output TABLE
                  [--date YYYY-MM-DD | --start YYYY-MM-DD --end YYYY-MM-DD] [--horizon-days 7] [Beam options]

Row ids are joined with stored features in shards of Arrow tables (a GroupByKey on a hash of video_id);
rows lacking features for the model's featurizer versions are featurized on the fly with the featurize
transforms. The job stages ids + predictions; publishing attaches them to the catalog rows and replaces
each date's partition TABLE/dt=YYYY-MM-DD/ whole.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import date, timedelta

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.parquetio import ReadFromParquet, ReadFromParquetBatched, WriteToParquetBatched
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from featurizers.core import storage
from featurizers.core.contracts import ERRORS_SCHEMA, PREDICTION_COLUMNS, FeatureSpec
from featurizers.core.feature_table import NEEDS_COLUMN, featurized_ids, modalities_needed, parquet_files
from model.artifact import LoadedModel, load_model
from pipelines import publish
from pipelines.catalog import read_catalog
from pipelines.history_transforms import history_side, stage_history_inputs
from pipelines.iceberg_sink import overwrite_partitions
from pipelines.job import (
    JobSummary,
    add_job_arguments,
    errors_by_reason,
    finish,
    job_main,
    new_run_id,
    resolve_device,
    run_beam,
    staging_dir,
)
from pipelines.score_transforms import JoinedShard, ScoreHandler, ValidateShard, on_the_fly_config
from pipelines.shards import default_shards, keep_featurizer, split_into_shards
from pipelines.transforms import ERRORS_TAG, FeaturizeConfig, FeaturizeRows, ToArrowTables, error_row

__all__ = ["parse_known_args", "selected_dates", "rows_of_dates", "ScoreSummary", "horizon_warnings",
           "build_pipeline", "ScorePlan", "plan_run", "run", "unaccounted_rows", "main"]

log = logging.getLogger("popcast.score")
# The only catalog columns that travel through the job: the join key, the per-row checks and the row's
# position in the scored catalog. The other catalog columns are attached to the predictions by position
# when partitions are published (publish_partitions), so the job shuffles, pickles and writes ids and
# predictions, not captions and hashtags.
ROW_COLUMN = publish.CATALOG_ROW_COLUMN
JOIN_COLUMNS = ("video_id", "publish_time", ROW_COLUMN)


def parse_known_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="popcast score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="catalog to score (Parquet/CSV/JSONL, local or gs://)")
    parser.add_argument("--features", required=True, help="features directory written by `popcast featurize`")
    parser.add_argument("--model", required=True, help="model directory written by `popcast train`")
    parser.add_argument("--output", required=True, help="scored table root (local or gs://): TABLE/dt=YYYY-MM-DD/")
    parser.add_argument("--date", default=None, help="score rows published on this UTC date")
    parser.add_argument("--start", default=None, help="first date of a backfill (inclusive)")
    parser.add_argument("--end", default=None, help="last date of a backfill (inclusive)")
    parser.add_argument("--horizon-days", type=float, default=7.0, help="age at which counts are predicted")
    parser.add_argument("--shards", type=int, default=0, help="join shards (default: about 20k rows each)")
    parser.add_argument("--iceberg", default=None,
                        help="also overwrite partitions of an Iceberg table: CATALOG_URI#namespace.table "
                             "(e.g. sqlite:////tmp/cat.db#popcast.scored)")
    parser.add_argument("--history", default=None,
                        help="extra history source for creator-history features: an earlier labelled catalog or "
                             "scored table (the labelled rows of --catalog are always used)")
    add_job_arguments(parser)
    return parser.parse_known_args(argv)


def selected_dates(args: argparse.Namespace, catalog: pa.Table) -> list[date]:
    """The dates whose partitions this run owns: --date, --start..--end, or every date in the catalog."""
    if args.date and (args.start or args.end):
        raise ValueError("give --date or --start/--end, not both")
    if args.date:
        return [date.fromisoformat(args.date)]
    if args.start or args.end:
        if not (args.start and args.end):
            raise ValueError("a backfill needs both --start and --end")
        first, last = date.fromisoformat(args.start), date.fromisoformat(args.end)
        if last < first:
            raise ValueError(f"--end {last} is before --start {first}")
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]
    days = pc.unique(pc.cast(catalog.column("publish_time"), pa.date32())).to_pylist()
    return sorted(d for d in days if d is not None)


def rows_of_dates(catalog: pa.Table, dates: list[date]) -> pa.Table:
    published = pc.cast(catalog.column("publish_time"), pa.date32())
    return catalog.filter(pc.is_in(published, pa.array(dates, pa.date32())))


@dataclass
class ScoreSummary(JobSummary):
    rows_scored: int
    rows_featurized_on_the_fly: int
    partitions: dict[str, int]
    rows_per_s: float
    counters: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        parts = ", ".join(f"dt={d}: {n}" for d, n in sorted(self.partitions.items()))
        return [f"score run {self.run_id}: {self.rows_in} rows in, {self.rows_scored} scored "
                f"({self.rows_featurized_on_the_fly} featurized on the fly) in {self.seconds:.1f} s "
                f"({self.rows_per_s:,.0f} rows/s)",
                f"  partitions: {parts or 'none'}",
                self.error_line(),
                f"  rows unaccounted for: {self.rows_unaccounted}"] + [f"  warning: {w}" for w in self.warnings]


def horizon_warnings(horizon_days: float, trained_age_days: tuple[float, float] | None) -> list[str]:
    """A warning when the scoring horizon lies outside the video ages the model was trained on."""
    if trained_age_days is None:
        return []
    low, high = trained_age_days
    if low <= horizon_days <= high:
        return []
    return [f"--horizon-days {horizon_days:g} is outside the ages the model was trained on ({low:.1f}–{high:.1f} "
            f"days); predictions are those at {min(max(horizon_days, low), high):.1f} days. Train on a catalog "
            "whose labels were observed at ages that include the horizon"]


def build_pipeline(pipeline, *, input_path: str, features_dir: str, staging: str, model_dir: str,
                   model_featurizers: dict[str, str], featurize_config, specs: dict, horizon_days: float,
                   shards: int, run_id: str, staged_schema: pa.Schema, needs_featurizing: bool, device: str,
                   history: tuple | None = None):
    """The Beam graph: row ids + stored features (+ on-the-fly features) → sharded join → model → Parquet
    of video_id + prediction columns (staged_schema)."""

    catalog = (pipeline
               | "ReadCatalogKeys" >> ReadFromParquetBatched(input_path, columns=list(JOIN_COLUMNS))
               | "ShardCatalog" >> beam.FlatMap(split_into_shards, shards, "catalog"))
    sides = [catalog]
    errors = []
    for modality, featurizer in model_featurizers.items():
        if modality == "history":   # computed below as of scoring, never read from stored features
            continue
        stored_files = parquet_files(storage.join(features_dir, modality))
        if stored_files:
            pattern = storage.join(features_dir, modality, "*.parquet")
            sides.append(pipeline
                         | f"ReadStored{modality}" >> ReadFromParquetBatched(pattern)
                         | f"Keep{modality}Version" >> beam.Map(keep_featurizer, featurizer)
                         | f"Shard{modality}" >> beam.FlatMap(split_into_shards, shards, modality))
    if needs_featurizing:
        rows = (pipeline
                | "ReadRowsToFeaturize" >> ReadFromParquet(input_path)
                | "NeedsFeatures" >> beam.Filter(lambda r: len(r[NEEDS_COLUMN]) > 0))
        fresh = rows | "FeaturizeOnTheFly" >> FeaturizeRows(featurize_config, specs)
        errors.append(fresh[ERRORS_TAG])
        for modality, spec in specs.items():
            sides.append(fresh[modality]
                         | f"Fresh{modality}ToArrow" >> ToArrowTables(spec.schema())
                         | f"ShardFresh{modality}" >> beam.FlatMap(split_into_shards, shards, modality))
    if history is not None:
        sides.append(history_side(pipeline, *history, shards))
    joined = (sides
              | "AllSides" >> beam.Flatten()
              | "JoinByShard" >> beam.GroupByKey()
              | "Assemble" >> beam.Map(JoinedShard.assemble)
              | "Validate" >> beam.ParDo(ValidateShard(run_id)).with_outputs(ERRORS_TAG, main="valid"))
    errors.append(joined[ERRORS_TAG])
    handler = KeyedModelHandler(ScoreHandler(model_dir, horizon_days, run_id, staged_schema, device))
    scored, failed = joined.valid | "Predict" >> RunInference(handler).with_exception_handling()
    errors.append(failed.failed_inferences | "PredictFailures" >> beam.FlatMap(_failed_shards, run_id))
    (scored
     | "Predictions" >> beam.Map(lambda kv: kv[1].inference)
     | "WriteScored" >> WriteToParquetBatched(storage.join(staging, "scored", f"part-{run_id}"), staged_schema,
                                              file_name_suffix=".parquet"))
    (errors
     | "AllErrors" >> beam.Flatten()
     | "ErrorsToArrow" >> ToArrowTables(ERRORS_SCHEMA)
     | "WriteErrors" >> WriteToParquetBatched(storage.join(staging, "_errors", f"part-{run_id}"),
                                              ERRORS_SCHEMA, file_name_suffix=".parquet"))


def _failed_shards(failed, run_id: str):
    batch, exception = failed
    for _shard, joined in batch:
        for video_id in joined.catalog.column("video_id").to_pylist():
            yield error_row(video_id, "score", type(exception).__name__, str(exception), run_id)


@dataclass
class ScorePlan:
    """What the driver decides before the Beam job runs: the rows to score, the model and how the rows
    reach it (stored features, on-the-fly featurization, history), and where the run stages its files."""
    run_id: str
    device: str
    catalog: pa.Table
    dates: list[date]
    todo: pa.Table
    model: LoadedModel
    featurize_config: FeaturizeConfig
    specs: dict[str, FeatureSpec]
    on_the_fly: int
    staging: str
    input_path: str
    scored_schema: pa.Schema
    staged_schema: pa.Schema
    shards: int
    history: tuple | None
    warnings: list[str]


def plan_run(args: argparse.Namespace) -> ScorePlan:
    """Read the catalog and the model, decide which rows need on-the-fly features, stage the job's input."""
    run_id = args.run_id or new_run_id()
    device = resolve_device(args.device)
    catalog = read_catalog(args.catalog)
    dates = selected_dates(args, catalog)
    todo = rows_of_dates(catalog, dates)
    model = load_model(args.model)
    warnings = horizon_warnings(args.horizon_days, model.trained_age_days)
    for warning in warnings:
        log.warning(warning)
    config, specs = on_the_fly_config(model, run_id, device)
    needs = modalities_needed(todo, featurized_ids(args.features, model.featurizers), list(specs))
    on_the_fly = int(np.count_nonzero(pc.list_value_length(needs).to_numpy(zero_copy_only=False)))
    mismatched = {m: (s.featurizer_id, model.featurizers[m]) for m, s in specs.items()
                  if s.featurizer_id != model.featurizers.get(m)}
    if on_the_fly and mismatched:
        raise ValueError(f"{on_the_fly} rows lack stored features and on-the-fly featurization would use "
                         f"other featurizer versions than the model's ({mismatched}); run `popcast featurize` "
                         "with the model's featurizer settings first")
    staging = staging_dir(args.output, run_id)
    input_path = storage.join(staging, "_input", "rows.parquet")
    todo_with_needs = (todo.append_column(NEEDS_COLUMN, needs)
                       .append_column(ROW_COLUMN, pa.array(np.arange(todo.num_rows, dtype=np.int64))))
    # Whole rows only when some need featurizing; the join itself reads JOIN_COLUMNS.
    publish.write_table(todo_with_needs if on_the_fly else todo_with_needs.select([*JOIN_COLUMNS, NEEDS_COLUMN]),
                        input_path)
    scored_schema = pa.schema(list(todo.schema) + [pa.field(c.name, c.type) for c in PREDICTION_COLUMNS])
    history = None
    if "history" in model.featurizers:
        history = stage_history_inputs(catalog, todo, args.history, args.features, model.featurizers["history"],
                                       staging)
    return ScorePlan(run_id=run_id, device=device, catalog=catalog, dates=dates, todo=todo, model=model,
                     featurize_config=config, specs=specs, on_the_fly=on_the_fly, staging=staging,
                     input_path=input_path, scored_schema=scored_schema,
                     staged_schema=publish.staged_prediction_schema(scored_schema, todo.schema),
                     shards=args.shards or default_shards(todo.num_rows, model), history=history,
                     warnings=warnings)


def run(argv: list[str] | None = None, test_pipeline=None) -> ScoreSummary:
    """Run the score job; returns its summary. `test_pipeline` replaces the Beam pipeline in tests."""
    args, beam_args = parse_known_args(argv)
    plan = plan_run(args)
    todo = plan.todo

    def build(pipeline: beam.Pipeline) -> None:
        build_pipeline(pipeline, input_path=plan.input_path, features_dir=args.features, staging=plan.staging,
                       model_dir=args.model, model_featurizers=plan.model.featurizers,
                       featurize_config=plan.featurize_config, specs=plan.specs, horizon_days=args.horizon_days,
                       shards=plan.shards, run_id=plan.run_id, staged_schema=plan.staged_schema,
                       needs_featurizing=plan.on_the_fly > 0, device=plan.device, history=plan.history)

    start = time.time()
    counters = run_beam(build, args.profile, beam_args, test_pipeline) if todo.num_rows else {}
    partitions = publish.publish_partitions(storage.join(plan.staging, "scored"), args.output, plan.dates,
                                            plan.run_id, plan.scored_schema, catalog=todo)
    errors = publish.publish_errors(plan.staging, args.output, plan.run_id)
    if args.iceberg:
        overwrite_partitions(args.iceberg, args.output, plan.dates)
    seconds = time.time() - start
    summary = ScoreSummary(
        run_id=plan.run_id, rows_in=todo.num_rows, rows_scored=sum(partitions.values()),
        rows_featurized_on_the_fly=plan.on_the_fly, partitions={str(d): n for d, n in partitions.items()},
        errors_by_reason=errors_by_reason(errors),
        rows_unaccounted=unaccounted_rows(todo, args.output, plan.dates, errors),
        seconds=seconds, rows_per_s=todo.num_rows / seconds if seconds > 0 else 0.0, counters=counters,
        warnings=plan.warnings)
    finish(summary, args.output, plan.staging)
    return summary


def unaccounted_rows(todo: pa.Table, output: str, dates: list[date], errors: pa.Table) -> int:
    """Distinct video_ids of `todo` that are neither in the published partitions nor dead letters."""
    accounted = pa.chunked_array([publish.partition_id_array(output, dates),
                                  errors.column("video_id").combine_chunks()], pa.string())
    unaccounted = todo.column("video_id").filter(pc.invert(pc.is_in(todo.column("video_id"), accounted)))
    return pc.count_distinct(unaccounted, mode="all").as_py()


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
