"""Score job: the catalog table comes back with popularity predictions attached, one partition per date.

    popcast score --catalog PATH --features DIR --model MODEL_DIR --output TABLE
                  [--date YYYY-MM-DD | --start YYYY-MM-DD --end YYYY-MM-DD] [--horizon-days 7] [Beam options]

Feature files are sorted by video_id in small row groups (featurizers/core/feature_table.py). The job cuts
the rows to score into shards of contiguous video_id ranges; only the ranges pass through the runner, and
each worker reads its shard's rows and feature row groups straight from Parquet, so no feature vector is
shuffled and a worker's memory does not grow with the catalog. Rows lacking features for the
model's featurizer versions are featurized on the fly first (the featurize transforms), as is creator
history. The job stages ids + predictions; publishing attaches them to the catalog rows and replaces each
date's partition TABLE/dt=YYYY-MM-DD/ whole.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.parquetio import ReadFromParquet, WriteToParquetBatched
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from featurizers.core import storage
from featurizers.core.contracts import (ERRORS_SCHEMA, PREDICTION_COLUMNS, SCORE_RECOMPUTED_MODALITIES, TARGETS,
                                        FeatureSpec)
from featurizers.core.feature_table import (
    FEATURE_ROW_GROUP_ROWS,
    NEEDS_COLUMN,
    featurized_ids,
    id_ranges,
    is_sorted_by_id,
    modalities_needed,
    parquet_files,
    write_sorted,
)
from featurizers.core.observations import latest_observations
from featurizers.history import curve_from_spec_config
from model.card import ModelCard, read_model_card
from pipelines import publish
from pipelines.catalog import read_catalog
from pipelines.history_transforms import CreatorHistory, stage_history_inputs
from pipelines.iceberg_sink import overwrite_partitions
from pipelines.memory import bound_process_memory, release_memory
from pipelines.job import (
    JobArgumentParser,
    JobSummary,
    RunPlaces,
    add_job_arguments,
    add_media_root_argument,
    check_input_path,
    check_output_dir,
    errors_by_reason,
    finish,
    iso_date,
    job_main,
    new_run_id,
    non_negative_int,
    positive_float,
    resolve_device,
    run_beam,
    start_run,
    utc_instant,
)
from pipelines.score_transforms import ReadShard, ScoreHandler, ShardSources, ValidateShard, on_the_fly_config
from pipelines.transforms import ERRORS_TAG, CountAndLog, FeaturizeConfig, FeaturizeRows, ToArrowTables, error_row

__all__ = ["parse_known_args", "selected_dates", "rows_of_dates", "ScoreSummary", "horizon_warnings",
           "build_inputs_pipeline", "build_pipeline", "ScorePlan", "plan_run", "stage_rows_to_score",
           "stored_feature_files", "add_fresh_features", "run", "unaccounted_rows", "main"]

log = logging.getLogger("popcast.score")
# The only catalog columns the workers read: the join key, the per-row checks and the row's position in the
# scored catalog. The other catalog columns are attached to the predictions by position when partitions
# are published (publish_partitions), so the job reads and writes ids and predictions, not captions.
ROW_COLUMN = publish.CATALOG_ROW_COLUMN
# Rows per shard: one shard is one model batch. At 896 text floats a 6,144-row shard is ~22 MB of features.
# A worker's transient memory grows with the shard, and each shard costs ~0.2 s of fixed work (bench.score,
# 1M rows, tree-blended model, driver + two workers: 8,192-row shards 3.0 GB at 1.0x the plain script;
# 4,096 2.7 GB at 0.79x).
ROWS_PER_SHARD = 6_144


def parse_known_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = JobArgumentParser(prog="popcast score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="catalog to score (Parquet/CSV/JSONL, local or gs://)")
    parser.add_argument("--features", required=True, help="features directory written by `popcast featurize`")
    parser.add_argument("--model", required=True, help="model directory written by `popcast train`")
    parser.add_argument("--output", required=True, help="scored table root (local or gs://): TABLE/dt=YYYY-MM-DD/")
    parser.add_argument("--date", default=None, type=iso_date, help="score rows published on this UTC date")
    parser.add_argument("--start", default=None, type=iso_date, help="first date of a backfill (inclusive)")
    parser.add_argument("--end", default=None, type=iso_date, help="last date of a backfill (inclusive)")
    parser.add_argument("--horizon-days", type=positive_float, default=7.0,
                        help="age (days since publication) at which counts are predicted; a video already older "
                             "whose counts are known is predicted at the age of its latest observation")
    parser.add_argument("--as-of", type=utc_instant, default=None, metavar="TIME",
                        help="reference time (ISO date/time, UTC): each video's latest observation at or before it "
                             "is used, later ones never (default: now; set it for backfills)")
    parser.add_argument("--shards", type=non_negative_int, default=0,
                        help=f"split the rows into about this many shards (default: {ROWS_PER_SHARD:,} rows each)")
    parser.add_argument("--iceberg", default=None,
                        help="also overwrite partitions of an Iceberg table: CATALOG_URI#namespace.table "
                             "(e.g. sqlite:////tmp/cat.db#popcast.scored)")
    parser.add_argument("--history", default=None,
                        help="extra history source for creator-history features: an earlier labelled catalog or "
                             "scored table (the labelled rows of --catalog are always used)")
    add_media_root_argument(parser)
    add_job_arguments(parser)
    args, beam_args = parser.parse_job_args(argv)
    if args.date and (args.start or args.end):
        parser.error("give --date or --start/--end, not both")
    if bool(args.start) != bool(args.end):
        parser.error("a backfill needs both --start and --end")
    if args.start and args.end < args.start:
        parser.error(f"--end {args.end} is before --start {args.start}")
    for flag, path in (("--catalog", args.catalog), ("--features", args.features), ("--model", args.model),
                       ("--history", args.history)):
        if path:
            check_input_path(parser, flag, path)
    check_output_dir(parser, "--output", args.output)
    return args, beam_args


def selected_dates(args: argparse.Namespace, catalog: pa.Table) -> list[date]:
    """The dates whose partitions this run owns: --date, --start..--end, or every date in the catalog (the
    flags are checked when parsed)."""
    if args.date:
        return [args.date]
    if args.start:
        return [args.start + timedelta(days=i) for i in range((args.end - args.start).days + 1)]
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
                f"  rows unaccounted for: {self.rows_unaccounted}"] + [f"  warning: {w}" for w in self.warnings] \
            + self.verdict_lines()


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


def build_inputs_pipeline(pipeline: beam.Pipeline, plan: "ScorePlan") -> None:
    """The first Beam graph, when needed: features of the rows that lack stored ones (the featurize
    transforms and dead-letter rules) and creator history as of scoring, staged unsorted under
    STAGING/_fresh/<modality>/ (publish-free: they serve this run only)."""
    if plan.on_the_fly:
        rows = pipeline | "ReadRowsToFeaturize" >> ReadFromParquet(plan.featurize_input)
        fresh = rows | "FeaturizeOnTheFly" >> FeaturizeRows(plan.featurize_config, plan.specs, plan.on_the_fly)
        for modality, spec in plan.specs.items():
            (fresh[modality]
             | f"Fresh{modality}ToArrow" >> ToArrowTables(spec.schema())
             | f"WriteFresh{modality}" >> WriteToParquetBatched(
                 storage.join(plan.staging, "_fresh", modality, "part"), spec.schema(), file_name_suffix=".parquet"))
        (fresh[ERRORS_TAG]
         | "FeaturizeErrorsToArrow" >> ToArrowTables(ERRORS_SCHEMA)
         | "WriteFeaturizeErrors" >> WriteToParquetBatched(
             storage.join(plan.staging, "_errors", f"featurize-{plan.run_id}"), ERRORS_SCHEMA,
             file_name_suffix=".parquet"))
    if plan.history is not None:
        query_path, source_path, spec = plan.history
        rows = {"query": pipeline | "ReadHistoryQuery" >> ReadFromParquet(query_path),
                "source": pipeline | "ReadHistorySource" >> ReadFromParquet(source_path)}
        (rows
         | "CreatorHistory" >> CreatorHistory(curve_from_spec_config(spec.config))
         | "HistoryToArrow" >> ToArrowTables(spec.schema())
         | "WriteHistory" >> WriteToParquetBatched(storage.join(plan.staging, "_fresh", "history", "part"),
                                                   spec.schema(), file_name_suffix=".parquet"))


def build_pipeline(pipeline: beam.Pipeline, plan: "ScorePlan", model_dir: str, horizon_days: float) -> None:
    """The scoring Beam graph: video_id ranges → each worker reads its shard's rows and features from the
    sorted Parquet files → per-row checks → model → Parquet of video_id + predictions
    (plan.staged_schema). Only the ranges are shuffled; the dead letters go to STAGING/_errors/."""
    joined = (pipeline
              | "ShardRanges" >> beam.Create(plan.shard_ranges)
              | "SpreadShards" >> beam.Reshuffle()
              | "ReadShards" >> beam.ParDo(ReadShard(plan.sources))
              | "Validate" >> beam.ParDo(ValidateShard(plan.run_id)).with_outputs(ERRORS_TAG, main="valid"))
    handler = KeyedModelHandler(ScoreHandler(model_dir, horizon_days, plan.run_id, plan.staged_schema,
                                             plan.device))
    scored, failed = joined.valid | "Predict" >> RunInference(handler).with_exception_handling()
    (scored
     | "Progress" >> beam.ParDo(CountAndLog("shards", len(plan.shard_ranges), every_s=10.0, unit="shards",
                                            job="score"))
     | "Predictions" >> beam.Map(lambda kv: kv[1].inference)
     | "WriteScored" >> WriteToParquetBatched(storage.join(plan.staging, "scored", f"part-{plan.run_id}"),
                                              plan.staged_schema, file_name_suffix=".parquet"))
    ((joined[ERRORS_TAG], failed.failed_inferences | "PredictFailures" >> beam.FlatMap(_failed_shards, plan.run_id))
     | "AllErrors" >> beam.Flatten()
     | "ErrorsToArrow" >> ToArrowTables(ERRORS_SCHEMA)
     | "WriteErrors" >> WriteToParquetBatched(storage.join(plan.staging, "_errors", f"part-{plan.run_id}"),
                                              ERRORS_SCHEMA, file_name_suffix=".parquet"))


def _failed_shards(failed, run_id: str):
    batch, exception = failed
    for _shard, joined in batch:
        for video_id in joined.catalog.column("video_id").to_pylist():
            yield error_row(video_id, "score", type(exception).__name__, str(exception), run_id)


@dataclass
class ScorePlan:
    """What the driver decides before the Beam jobs run: the rows to score, the model and how the rows
    reach it (stored features, on-the-fly featurization, history), the shards, and where the run stages."""
    run_id: str
    device: str
    dates: list[date]
    rows_to_score: int
    catalog_rows: str    # the rows to score, every catalog column, staged so the driver need not hold them
    model: ModelCard      # config and layouts only: the driver never loads the weights (nor torch)
    featurize_config: FeaturizeConfig
    specs: dict[str, FeatureSpec]
    on_the_fly: int
    staging: str
    featurize_input: str
    sources: ShardSources
    shard_ranges: list[tuple[str | None, str | None]]
    scored_schema: pa.Schema
    staged_schema: pa.Schema
    history: tuple | None
    warnings: list[str]


def plan_run(args: argparse.Namespace, run_id: str, places: RunPlaces) -> ScorePlan:
    """Read the catalog and the model, decide which rows need on-the-fly features, stage the job's input:
    the rows to score sorted by video_id, cut into shards of about ROWS_PER_SHARD rows (or --shards shards)."""
    device = resolve_device(args.device)
    catalog = read_catalog(args.catalog)
    dates = selected_dates(args, catalog)
    as_of = args.as_of or datetime.now(timezone.utc)
    # An observation log gives one row per video: its latest observation at the reference time.
    todo = latest_observations(rows_of_dates(catalog, dates), as_of)
    del catalog
    model = read_model_card(args.model)
    warnings = horizon_warnings(args.horizon_days, model.trained_age_days)
    for warning in warnings:
        log.warning(warning)
    config, specs = on_the_fly_config(model, run_id, device, tuple(args.media_root))
    stored = {m: f for m, f in model.featurizers.items() if m not in SCORE_RECOMPUTED_MODALITIES}
    needs = modalities_needed(todo, featurized_ids(args.features, stored), list(specs))
    on_the_fly = int(np.count_nonzero(pc.list_value_length(needs).to_numpy(zero_copy_only=False)))
    mismatched = {m: (s.featurizer_id, model.featurizers[m]) for m, s in specs.items()
                  if s.featurizer_id != model.featurizers.get(m)}
    if on_the_fly and mismatched:
        raise ValueError(f"{on_the_fly} rows lack stored features and on-the-fly featurization would use "
                         f"other featurizer versions than the model's ({mismatched}); run `popcast featurize` "
                         "with the model's featurizer settings first")
    staging = places.staging(run_id)
    featurize_input = storage.join(staging, "_input", "featurize.parquet")
    if on_the_fly:
        has_needs = pc.greater(pc.list_value_length(needs), 0)
        publish.write_table(todo.append_column(NEEDS_COLUMN, needs).filter(has_needs), featurize_input)
    rows_input = storage.join(staging, "_input", "rows.parquet")
    stage_rows_to_score(todo, rows_input, OBSERVATION_COLUMNS if model.nowcasts else ())
    scored_schema = pa.schema(list(todo.schema) + [pa.field(c.name, c.type) for c in PREDICTION_COLUMNS])
    history = None
    if "history" in model.featurizers:
        history = stage_history_inputs(latest_observations(read_catalog(args.catalog), as_of), todo, args.history,
                                       args.features,
                                       model.featurizers["history"], staging)
    rows_per_shard = -(-todo.num_rows // args.shards) if args.shards else ROWS_PER_SHARD
    sources = ShardSources(rows=rows_input, features={
        m: (stored_feature_files(args.features, m, f), f) for m, f in stored.items()})
    catalog_rows = storage.join(staging, "_input", "catalog.parquet")
    publish.write_table(todo, catalog_rows)
    shard_ranges = id_ranges(todo.column("video_id"), rows_per_shard)
    rows_to_score, todo_schema = todo.num_rows, todo.schema
    # The driver waits while the workers score: it holds no catalog rows meanwhile (they come back from
    # staging to be published), and hands the memory they took back to the system.
    del todo
    release_memory()
    return ScorePlan(run_id=run_id, device=device, dates=dates, rows_to_score=rows_to_score,
                     catalog_rows=catalog_rows, model=model,
                     featurize_config=config, specs=specs, on_the_fly=on_the_fly, staging=staging,
                     featurize_input=featurize_input, sources=sources,
                     shard_ranges=shard_ranges, scored_schema=scored_schema,
                     staged_schema=publish.staged_prediction_schema(scored_schema, todo_schema),
                     history=history, warnings=warnings)


# What a nowcasting model reads from the rows it scores besides their features: the counts known so far.
OBSERVATION_COLUMNS = ("observed_at", *TARGETS)


def stage_rows_to_score(todo: pa.Table, uri: str, extra_columns: tuple[str, ...] = ()) -> None:
    """Write the join columns (and extra_columns) of the rows to score with their position in `todo`, sorted by
    video_id in small row groups (a shard reads only its own), to `uri`."""
    rows = (todo.select(["video_id", "publish_time", *extra_columns])
            .append_column(ROW_COLUMN, pa.array(np.arange(todo.num_rows, dtype=np.int64))))
    fs, path = storage.filesystem_and_path(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(rows.sort_by("video_id"), path, filesystem=fs, row_group_size=FEATURE_ROW_GROUP_ROWS)


def stored_feature_files(features_dir: str, modality: str, featurizer: str) -> list[str]:
    """The published files of `modality` written by `featurizer` (the version the model needs). Files of
    other versions are left out unread, so a shard never reads vectors of another width."""
    files = []
    fs, _ = storage.filesystem_and_path(features_dir)
    for path in parquet_files(storage.join(features_dir, modality)):
        schema = pq.read_schema(path, filesystem=fs)
        written_by = (schema.metadata or {}).get(b"popcast.featurizer", b"").decode()
        if written_by and written_by != featurizer:
            continue
        if not is_sorted_by_id(schema):
            log.warning("%s/%s/%s was written before sorted storage: every shard reads all of it; "
                        "`popcast migrate-features --features %s` sorts it once", features_dir, modality,
                        path.rsplit("/", 1)[-1], features_dir)
        files.append(f"gs://{path}" if storage.scheme_of(features_dir) == "gs" else path)
    return files


def add_fresh_features(plan: ScorePlan) -> None:
    """Sort what the inputs pipeline staged under _fresh/ by video_id and add it to the shards' sources."""
    fs, _ = storage.filesystem_and_path(plan.staging)
    features = dict(plan.sources.features)
    for modality in [*plan.specs, "history"]:
        staged = parquet_files(storage.join(plan.staging, "_fresh", modality))
        uri = storage.join(plan.staging, "fresh", modality, "fresh.parquet")
        _, target = storage.filesystem_and_path(uri)
        if not staged:
            continue
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if write_sorted(staged, target, fs):
            files, featurizer = features.get(modality, ([], plan.model.featurizers[modality]))
            features[modality] = ([*files, uri], featurizer)
    plan.sources = ShardSources(rows=plan.sources.rows, features=features)


def run(argv: list[str] | None = None, test_pipeline=None) -> ScoreSummary:
    """Run the score job; returns its summary. `test_pipeline` replaces the scoring Beam pipeline in tests."""
    args, beam_args = parse_known_args(argv)
    run_id = args.run_id or new_run_id()
    places = RunPlaces.beside_table(args.output)
    outputs = {"table": args.output, **({"iceberg": args.iceberg} if args.iceberg else {})}
    record = start_run("score", argv, args.profile, beam_args, places, {
        "catalog": args.catalog, "features": args.features, "model": args.model, "history": args.history}, outputs)
    bound_process_memory()
    plan = plan_run(args, run_id, places)
    log.info("score %s: %d rows of %d dates in %d shards, %d to featurize on the fly", run_id, plan.rows_to_score,
             len(plan.dates), len(plan.shard_ranges), plan.on_the_fly)
    start = time.time()
    counters: dict[str, int] = {}
    if plan.on_the_fly or (plan.history is not None and plan.rows_to_score):
        counters = run_beam(lambda p: build_inputs_pipeline(p, plan), args.profile, beam_args)
        add_fresh_features(plan)
    if plan.rows_to_score:
        scored = run_beam(lambda p: build_pipeline(p, plan, args.model, args.horizon_days), args.profile,
                          beam_args, test_pipeline)
        counters = {k: counters.get(k, 0) + scored.get(k, 0) for k in {*counters, *scored}}
    todo = publish.read_table(plan.catalog_rows)
    partitions = publish.publish_partitions(storage.join(plan.staging, "scored"), args.output, plan.dates,
                                            plan.run_id, plan.scored_schema, catalog=todo, work_dir=plan.staging)
    errors = publish.publish_errors(plan.staging, places.errors, plan.run_id)
    if args.iceberg:
        overwrite_partitions(args.iceberg, args.output, plan.dates)
    seconds = time.time() - start
    summary = ScoreSummary(
        run_id=plan.run_id, rows_in=todo.num_rows, rows_scored=sum(partitions.values()),
        rows_featurized_on_the_fly=plan.on_the_fly, partitions={str(d): n for d, n in partitions.items()},
        errors_by_reason=errors_by_reason(errors),
        rows_unaccounted=unaccounted_rows(todo, args.output, plan.dates, errors),
        rows_worked=todo.num_rows, max_error_fraction=args.max_error_fraction,
        rows_dead_lettered=pc.count_distinct(pc.filter(errors.column("video_id"), pc.is_in(
            errors.column("video_id"), todo.column("video_id"))), mode="all").as_py(),
        seconds=seconds, rows_per_s=todo.num_rows / seconds if seconds > 0 else 0.0, counters=counters,
        warnings=plan.warnings)
    finish(summary, record, places)
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
