"""Beam building blocks shared by the featurize and score jobs: thin DoFns and ModelHandlers around featurizers/.

`FeaturizeRows` turns catalog rows (dicts) into one PCollection of feature rows per modality plus a
PCollection of dead letters; every input row ends in features or in a dead letter.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
from apache_beam.utils.windowed_value import WindowedValue

from featurizers import audio, meta, text
from featurizers.audio import audio_features
from featurizers.core.contracts import DEFAULT_FEATURIZE_MODALITIES, MEDIA_MODALITIES, FeatureSpec
from featurizers.core.feature_table import NEEDS_COLUMN, rows_to_table
from featurizers.core.storage import local_path, scheme_of, within_roots
from featurizers.decode import (
    DEFAULT_AUDIO_SECONDS,
    DEFAULT_FRAME_SIZE,
    DEFAULT_FRAMES,
    DEFAULT_SAMPLING,
    DecodeError,
    DecodeLimits,
    decode_video,
    estimate_decode_memory,
    process_memory_budget,
)
from featurizers.meta import meta_features
from featurizers.text import text_features

__all__ = [
    "DECODE_FED_MODALITIES",
    "ERRORS_TAG",
    "NAMESPACE",
    "Caption",
    "ComputeAudioFeatures",
    "CountAndLog",
    "FeatureRow",
    "FeaturizeConfig",
    "FeaturizeRows",
    "FeaturizerHandler",
    "FrameStack",
    "ReadAndDecode",
    "ToArrowTables",
    "ValidateFrames",
    "ValidateText",
    "embed_captions",
    "embed_frame_stacks",
    "error_row",
    "feature_row",
    "feature_specs",
    "meta_row",
    "popcast_counters",
    "text_embedder",
    "visual_embedder",
]

NAMESPACE = "popcast"
ERRORS_TAG = "errors"
# Modalities fed by the decoder: meta reads duration and frame size facts from it when a row has media.
DECODE_FED_MODALITIES = (*MEDIA_MODALITIES, "meta")


def error_row(video_id: str | None, stage: str, error_class: str, message: str, run_id: str = "") -> dict:
    """A dead letter in contracts.ERRORS_SCHEMA."""
    return {"video_id": video_id, "stage": stage, "error_class": error_class,
            "message": message[:2000], "run_id": run_id}


@dataclass(frozen=True)
class FeaturizeConfig:
    """Everything the featurize transforms need; picklable, so it travels to workers."""
    modalities: tuple[str, ...] = DEFAULT_FEATURIZE_MODALITIES
    frames: int = DEFAULT_FRAMES
    frame_sampling: str = DEFAULT_SAMPLING
    frame_size: int = DEFAULT_FRAME_SIZE
    audio_seconds: float = DEFAULT_AUDIO_SECONDS
    visual_model: str | None = None      # None = packaged EfficientNet-Lite0; else a transformers image model
    text_model: str | None = None        # None = packaged all-MiniLM-L6-v2; else a dir / hub id / gs:// dir
    device: str = "cpu"
    visual_batch_videos: int = 4
    # Videos decoded at once per worker (threads: PyAV and decord release the GIL); 0 = min(4, cores).
    # One video keeps ~1.3 cores busy (P-frame chains decode serially), two keep ~1.9 busy, so the
    # videos are decoded one decoder thread each. Use 1 where the runner already runs one process per core.
    decode_parallelism: int = 0
    text_batch: int = 64
    max_bytes: int = DecodeLimits.max_bytes
    max_duration_s: float = DecodeLimits.max_duration_s
    max_pixels: int = DecodeLimits.max_pixels
    max_decode_s: float = DecodeLimits.max_decode_s
    # The worker process's decode memory (bytes, estimated; featurizers.decode.estimate_decode_memory):
    # shared by every video it decodes at once, and the most one video may need (more: "max_memory").
    max_memory: int = DecodeLimits.max_memory
    run_id: str = ""
    yamnet: bool = True
    # When set, a video_uri outside these prefixes (after resolving .. and symlinks) is a dead letter,
    # never a read: for catalogs that come from upstream systems.
    media_roots: tuple[str, ...] = ()

    def resolved_decode_parallelism(self) -> int:
        """decode_parallelism, with 0 resolved on the machine that runs the decoder."""
        return self.decode_parallelism or min(4, os.cpu_count() or 1)

    def limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_bytes, max_duration_s=self.max_duration_s,
                            max_pixels=self.max_pixels, max_decode_s=self.max_decode_s,
                            max_memory=self.max_memory)


# ---------------------------------------------------------------- featurizers (built once per worker)

# featurizers.visual is imported where a visual featurizer is built, never at module level: it brings
# torch (~500 MB resident), which the text/meta featurize workers and the score driver do not need.

def visual_embedder(config: FeaturizeConfig):
    from featurizers import visual
    if config.visual_model:
        return visual.TransformersVisionEmbedder(config.visual_model, device=config.device)
    return visual.EfficientNetLite0Embedder(device=config.device)


def text_embedder(config: FeaturizeConfig):
    """By name ("minilm", "e5-multilingual") or any transformers model source (dir, hub id, gs://)."""
    if config.text_model in (None, "minilm"):
        return text.SentenceEmbedder(None, device=config.device)
    if config.text_model in text.EMBEDDERS:
        return text.make_text_embedder(config.text_model)
    return text.SentenceEmbedder(config.text_model, device=config.device)


def feature_specs(config: FeaturizeConfig) -> dict[str, FeatureSpec]:
    """The spec (name@version, shapes) of each requested modality."""
    specs = {}
    if "visual" in config.modalities:
        if config.visual_model:
            specs["visual"] = visual_embedder(config).spec(config.frames)
        else:
            from featurizers.visual import EfficientNetLite0Embedder
            specs["visual"] = EfficientNetLite0Embedder.spec_without_loading(config.frames, config.device)
    if "audio" in config.modalities:
        specs["audio"] = audio.audio_spec(yamnet=audio.default_yamnet() if config.yamnet else None)
    if "text" in config.modalities:
        specs["text"] = text.text_spec(text_embedder(config) if config.text_model not in (None, "minilm")
                                       else None)
    if "meta" in config.modalities:
        specs["meta"] = meta.META_SPEC
    return specs


# What the featurize handlers receive once KeyedModelHandler has taken the video_id off each element.
FrameStack = np.ndarray                               # uint8 [K, H, W, 3], one video's sampled frames
Caption = tuple[str | None, Sequence[str] | None]     # (title, hashtags)
FeatureRow = dict[str, Any]                           # one example's feature columns
ExampleT = TypeVar("ExampleT")
ModelT = TypeVar("ModelT")


def embed_frame_stacks(stacks: Sequence[FrameStack], embedder) -> list[FeatureRow]:
    """K frames per video → one [K, D] embedding sequence per video, all frames in one encoder batch."""
    embeddings = np.asarray(embedder.embed(np.concatenate(stacks, axis=0)), dtype=np.float32)
    rows, start = [], 0
    for stack in stacks:
        rows.append({"frames": embeddings[start:start + len(stack)], "n_frames": len(stack)})
        start += len(stack)
    return rows


def embed_captions(captions: Sequence[Caption], embedder) -> list[FeatureRow]:
    """(title, hashtags) pairs → text feature rows (sentence embedding, hashed words, counts)."""
    columns = text_features([c[0] for c in captions], [c[1] for c in captions], embedder)
    return [{name: values[i] for name, values in columns.items()} for i in range(len(captions))]


class FeaturizerHandler(ModelHandler[ExampleT, PredictionResult, ModelT]):
    """RunInference handler around a featurizer: each example comes back as a PredictionResult whose
    `inference` is the example's feature row.

    Args:
      load: builds the featurizer (visual or text embedder); called once per worker process, so it
        travels pickled (see _Factory).
      featurize: `featurize(examples, featurizer)` → one FeatureRow per example, in order
        (embed_frame_stacks for FrameStacks, embed_captions for Captions).
      max_batch_size: most examples per `featurize` call.
      name: the modality, named in errors.
    """

    def __init__(self, load: Callable[[], ModelT],
                 featurize: Callable[[Sequence[ExampleT], ModelT], list[FeatureRow]],
                 max_batch_size: int, name: str):
        super().__init__()
        self._load = load
        self._featurize = featurize
        self._max_batch_size = max_batch_size
        self._name = name

    def load_model(self) -> ModelT:
        return self._load()

    def run_inference(self, batch: Sequence[ExampleT], model: ModelT,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        """Featurize the batch in one call (one encoder batch for all its frames or captions).

        Args:
          batch: FrameStacks or Captions, without their keys.
          model: the featurizer built by load_model.
          inference_args: unused; featurizers take no per-call arguments.
        """
        rows = self._featurize(batch, model)
        # A short result would silently lose rows (zip stops early); failing the batch turns them
        # into dead letters instead.
        if len(rows) != len(batch):
            raise ValueError(f"{self._name} featurizer returned {len(rows)} rows for {len(batch)} examples")
        return [PredictionResult(example, row) for example, row in zip(batch, rows)]

    def get_num_bytes(self, batch: Sequence[ExampleT]) -> int:
        """Bytes of the examples' payload: array buffers and UTF-8 text.

        Overridden because the base class pickles every batch a second time just to measure it, and a
        batch of frame stacks is megabytes.
        """
        return sum(_payload_bytes(example) for example in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": self._max_batch_size}


def _payload_bytes(value: Any) -> int:
    """Payload size of a FrameStack, a Caption or one of their parts; sys.getsizeof for anything else,
    which is cheap and close enough for a metric."""
    if value is None:
        return 0
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(_payload_bytes(part) for part in value)
    return sys.getsizeof(value)


# ---------------------------------------------------------------- DoFns

class ReadAndDecode(beam.DoFn):
    """Read videos through Beam FileSystems (local or gs://) and decode frames, audio and facts.

    Decodes up to `decode_parallelism` videos at once on a thread pool, one decoder thread each, keeping
    twice that many rows in flight so that no thread waits for a slow video's neighbours; results leave
    in arrival order, the rest at the end of the bundle. A row's outcome does not depend on the others.
    Every row comes out either decoded, or as a dead letter plus an "undecoded" copy (so it still gets
    text and meta).

    Memory does not grow with the videos: a local file is decoded where it lies and a remote one is first
    copied to a local temporary file in 8 MiB chunks, so no video's bytes are held in memory; each decode's
    estimated peak (from the header) is reserved from the process's `max_memory` budget before it starts,
    waiting while the videos already decoding leave too little, and a video that would not fit alone is a
    "max_memory" dead letter.
    """

    def __init__(self, config: FeaturizeConfig):
        self._config = config
        self._decoded = Metrics.counter(NAMESPACE, "videos_decoded")
        self._failed = Metrics.counter(NAMESPACE, "videos_failed")
        self._bytes = Metrics.counter(NAMESPACE, "bytes_read")

    def setup(self):
        parallelism = self._config.resolved_decode_parallelism()
        self._pool = ThreadPoolExecutor(parallelism, thread_name_prefix="decode") if parallelism > 1 else None
        # One video alone may use the decoders' own threads; several at once get one thread each.
        self._decoder_threads = 1 if self._pool is not None else 0
        self._max_in_flight = 2 * parallelism
        # One budget per process, shared with any other ReadAndDecode instance the runner runs in it.
        self._budget = process_memory_budget(self._config.max_memory)

    def start_bundle(self):
        self._in_flight: deque = deque()

    def process(self, row: dict, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if self._pool is None:
            yield from self._outputs(row, self._read_and_decode(row))
            return
        place = WindowedValue(None, timestamp, (window,))
        self._in_flight.append((row, self._pool.submit(self._read_and_decode, row), place))
        while self._in_flight and (len(self._in_flight) > self._max_in_flight or self._in_flight[0][1].done()):
            yield from self._finish(*self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield from self._finish(*self._in_flight.popleft())

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _finish(self, row: dict, future, place: WindowedValue):
        """A pooled row's outputs, in its own window (they may leave during a later row or finish_bundle)."""
        for output in self._outputs(row, future.result()):
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, place.with_value(output.value))
            else:
                yield place.with_value(output)

    def _outputs(self, row: dict, outcome: tuple[dict | None, int, dict | None]):
        decoded, n_bytes, error = outcome
        # Counters belong to the bundle's thread, so they are updated here, never in the pool.
        self._bytes.inc(n_bytes)
        if error is not None:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error)
            yield beam.pvalue.TaggedOutput("undecoded", row)
        else:
            self._decoded.inc()
            yield decoded

    def _read_and_decode(self, row: dict) -> tuple[dict | None, int, dict | None]:
        """(decoded element or None, bytes read, dead letter or None); never raises."""

        video_id = row["video_id"]
        if self._config.media_roots and not within_roots(row["video_uri"], self._config.media_roots):
            return None, 0, error_row(video_id, "read", "outside_media_root",
                                      f"{row['video_uri']} is outside --media-root "
                                      f"{', '.join(self._config.media_roots)}", self._config.run_id)
        try:
            with self._local_file(row["video_uri"]) as (path, n_bytes):
                try:
                    decoded = self._decode(row, path)
                except DecodeError as err:
                    stage = "limits" if err.reason.startswith("max_") or err.reason == "decode_timeout" else "decode"
                    return None, n_bytes, error_row(video_id, stage, err.reason, str(err), self._config.run_id)
                except Exception as err:
                    return None, n_bytes, error_row(video_id, "decode", type(err).__name__, str(err),
                                                    self._config.run_id)
        except DecodeError as err:
            return None, 0, error_row(video_id, "limits", err.reason, str(err), self._config.run_id)
        except Exception as err:  # unreadable storage must not fail the job
            return None, 0, error_row(video_id, "read", type(err).__name__, str(err), self._config.run_id)
        return ({"row": row, "frames": decoded.frames, "audio": decoded.audio,
                 "facts": decoded.facts.as_dict()}, n_bytes, None)

    @contextlib.contextmanager
    def _local_file(self, uri: str):
        """(local path, size): the file itself when local, else a temporary copy (deleted afterwards)
        written in chunks, so the video's bytes are never held in memory."""
        from apache_beam.io.filesystems import FileSystems

        path = local_path(uri)
        matched = FileSystems.match([path])[0].metadata_list
        if not matched:
            raise FileNotFoundError(f"no such video: {uri}")
        size = matched[0].size_in_bytes
        if size > self._config.max_bytes:
            raise DecodeError("max_bytes", f"{size} bytes exceeds max_bytes={self._config.max_bytes}")
        if scheme_of(uri) in ("", "file"):
            yield path, size
            return
        descriptor, spool = tempfile.mkstemp(prefix="popcast-video-", suffix=os.path.splitext(path)[1][:16])
        try:
            with os.fdopen(descriptor, "wb") as out, \
                    FileSystems.open(path, compression_type="uncompressed") as handle:
                written = 0
                while chunk := handle.read(_SPOOL_CHUNK):
                    written += len(chunk)
                    if written > self._config.max_bytes:   # grew since it was listed
                        raise DecodeError("max_bytes", f"more than max_bytes={self._config.max_bytes} bytes")
                    out.write(chunk)
            yield spool, size
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spool)

    def _decode(self, row: dict, path: str):

        # Audio is decoded only for rows that need audio features (0 s skips it; has_audio stays a fact).
        audio_seconds = self._config.audio_seconds if "audio" in row.get(NEEDS_COLUMN, ("audio",)) else 0.0
        settings = dict(frames=self._config.frames, size=self._config.frame_size, limits=self._config.limits(),
                        audio_seconds=audio_seconds, num_threads=self._decoder_threads)
        # The header says how much memory the decode needs; wait for it, then decode (same estimate).
        estimate = estimate_decode_memory(path, **settings)
        with self._budget.reserve(estimate.total):
            return decode_video(path, sampling=self._config.frame_sampling, **settings)


# Remote videos are copied to a local temporary file this many bytes at a time.
_SPOOL_CHUNK = 8 * 1024 * 1024


class ValidateFrames(beam.DoFn):
    """Check each frame stack before RunInference: one bad element must not fail a whole batch."""

    def __init__(self, frames: int, run_id: str):
        self._frames = frames
        self._run_id = run_id

    def process(self, keyed):
        video_id, frames = keyed
        problem = None
        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
            problem = f"frames must be [K,H,W,3], got {getattr(frames, 'shape', type(frames))}"
        elif frames.dtype != np.uint8:
            problem = f"frames must be uint8, got {frames.dtype}"
        elif frames.shape[0] != self._frames:
            problem = f"expected {self._frames} frames, got {frames.shape[0]}"
        if problem:
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(video_id, "visual", "InvalidFrames", problem,
                                                                 self._run_id))
        else:
            yield keyed


class ValidateText(beam.DoFn):
    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, keyed):
        video_id, (title, hashtags) = keyed
        problem = None
        if title is not None and not isinstance(title, str):
            problem = f"title is {type(title).__name__}, not text"
        elif hashtags is not None and not all(isinstance(tag, str) for tag in hashtags):
            problem = "hashtags must be a list of strings"
        if problem:
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(video_id, "text", "InvalidText", problem,
                                                                 self._run_id))
        else:
            yield keyed


class ComputeAudioFeatures(beam.DoFn):
    """Log-mel statistics (+ YAMNet when available) per decoded clip; no audio is a row, not an error."""

    def __init__(self, config: FeaturizeConfig, spec: FeatureSpec):
        self._config = config
        self._spec = spec

    def process(self, decoded: dict):
        video_id = decoded["row"]["video_id"]
        try:
            values = audio_features(decoded["audio"], yamnet=self._config.yamnet)
        except Exception as err:
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(video_id, "audio", type(err).__name__, str(err),
                                                                 self._config.run_id))
            return
        yield {"video_id": video_id, "featurizer": self._spec.featurizer_id, **values}


def meta_row(row: dict, facts: dict | None, spec: FeatureSpec) -> dict:
    return {"video_id": row["video_id"], "featurizer": spec.featurizer_id, **meta_features(row, facts)}


def feature_row(result: tuple[str, PredictionResult], spec: FeatureSpec) -> dict:
    video_id, prediction = result
    return {"video_id": video_id, "featurizer": spec.featurizer_id, **prediction.inference}


class CountAndLog(beam.DoFn):
    """Count elements (rows per modality, score shards) and log progress with rate and ETA (per worker)."""

    def __init__(self, name: str, expected: int, every_s: float = 15.0, unit: str = "rows", job: str = "featurize"):
        self._name = name
        self._expected = expected
        self._every_s = every_s
        self._unit, self._job = unit, job
        self._counter = Metrics.counter(NAMESPACE, f"{name}_ok")

    def setup(self):
        self._start = time.time()
        self._seen = 0
        self._last = self._start

    def process(self, element):
        self._counter.inc()
        self._seen += 1
        now = time.time()
        if now - self._last >= self._every_s:
            rate = self._seen / max(now - self._start, 1e-9)
            eta = max(self._expected - self._seen, 0) / rate if rate else float("inf")
            logging.getLogger("popcast").info("%s %s: %d/%d %s in this worker, %.2f %s/s, ETA %.0f s", self._job,
                                              self._name, self._seen, self._expected, self._unit, rate,
                                              self._unit, eta)
            self._last = now
        yield element


class FeaturizeRows(beam.PTransform):
    """Catalog rows (dicts with a `_needs` list of modalities) → {modality: feature rows, "errors": dead letters}."""

    def __init__(self, config: FeaturizeConfig, specs: dict[str, FeatureSpec], expected_rows: int = 0):
        super().__init__()
        self._config = config
        self._specs = specs
        self._expected = expected_rows

    def expand(self, rows):
        config, specs = self._config, self._specs
        outputs: dict[str, beam.PCollection] = {}
        errors: list[beam.PCollection] = []

        def needs_decode(row: dict) -> bool:
            # Meta of a row with media wants the decode facts (duration, fps, size, audio presence).
            return row.get("video_uri") is not None and bool(set(DECODE_FED_MODALITIES) & set(row[NEEDS_COLUMN]))

        with_media = rows | "WithMedia" >> beam.Filter(needs_decode)
        without_media = rows | "WithoutMedia" >> beam.Filter(lambda r: not needs_decode(r))
        decoded = (
            with_media
            | "SpreadVideos" >> beam.Reshuffle()
            | "ReadAndDecode" >> beam.ParDo(ReadAndDecode(config)).with_outputs(ERRORS_TAG, "undecoded",
                                                                                 main="decoded"))
        errors.append(decoded[ERRORS_TAG])

        if "visual" in specs:
            spec = specs["visual"]
            frames = (decoded.decoded
                      | "NeedsVisual" >> beam.Filter(lambda d: "visual" in d["row"][NEEDS_COLUMN])
                      | "KeyFrames" >> beam.Map(lambda d: (d["row"]["video_id"], d["frames"]))
                      | "ValidateFrames" >> beam.ParDo(ValidateFrames(config.frames, config.run_id)).with_outputs(
                          ERRORS_TAG, main="valid"))
            errors.append(frames[ERRORS_TAG])
            handler = KeyedModelHandler(FeaturizerHandler(
                _Factory(visual_embedder, config), embed_frame_stacks,
                max_batch_size=config.visual_batch_videos, name="visual"))
            embedded, failed = frames.valid | "EmbedFrames" >> RunInference(handler).with_exception_handling()
            errors.append(failed.failed_inferences | "VisualFailures" >> beam.FlatMap(
                _batch_errors, "visual", config.run_id))
            outputs["visual"] = (embedded | "VisualRows" >> beam.Map(feature_row, spec)
                                 | "CountVisual" >> beam.ParDo(CountAndLog("visual", self._expected)))

        if "audio" in specs:
            audio = (decoded.decoded
                     | "NeedsAudio" >> beam.Filter(lambda d: "audio" in d["row"][NEEDS_COLUMN])
                     | "AudioFeatures" >> beam.ParDo(ComputeAudioFeatures(config, specs["audio"])).with_outputs(
                         ERRORS_TAG, main="rows"))
            errors.append(audio[ERRORS_TAG])
            outputs["audio"] = audio.rows | "CountAudio" >> beam.ParDo(CountAndLog("audio", self._expected))

        if "text" in specs:
            captions = (rows
                        | "NeedsText" >> beam.Filter(lambda r: "text" in r[NEEDS_COLUMN])
                        | "Caption" >> beam.Map(lambda r: (r["video_id"], (r.get("title"), r.get("hashtags"))))
                        | "ValidateText" >> beam.ParDo(ValidateText(config.run_id)).with_outputs(
                            ERRORS_TAG, main="valid"))
            errors.append(captions[ERRORS_TAG])
            handler = KeyedModelHandler(FeaturizerHandler(
                _Factory(text_embedder, config), embed_captions, max_batch_size=config.text_batch, name="text"))
            embedded, failed = captions.valid | "EmbedText" >> RunInference(handler).with_exception_handling()
            errors.append(failed.failed_inferences | "TextFailures" >> beam.FlatMap(
                _batch_errors, "text", config.run_id))
            outputs["text"] = (embedded | "TextRows" >> beam.Map(feature_row, specs["text"])
                               | "CountText" >> beam.ParDo(CountAndLog("text", self._expected)))

        if "meta" in specs:
            spec = specs["meta"]
            from_decoded = (decoded.decoded
                            | "NeedsMetaDecoded" >> beam.Filter(lambda d: "meta" in d["row"][NEEDS_COLUMN])
                            | "MetaWithFacts" >> beam.Map(lambda d: meta_row(d["row"], d["facts"], spec)))
            from_rows = ((without_media, decoded.undecoded)
                         | "RowsWithoutFacts" >> beam.Flatten()
                         | "NeedsMeta" >> beam.Filter(lambda r: "meta" in r[NEEDS_COLUMN])
                         | "MetaWithoutFacts" >> beam.Map(lambda r: meta_row(r, None, spec)))
            outputs["meta"] = ((from_decoded, from_rows) | "MetaRows" >> beam.Flatten()
                               | "CountMeta" >> beam.ParDo(CountAndLog("meta", self._expected)))

        outputs[ERRORS_TAG] = (errors | "AllErrors" >> beam.Flatten()
                               | "CountErrors" >> beam.ParDo(CountAndLog("errors", self._expected)))
        return outputs


@dataclass(frozen=True)
class _Factory:
    """A picklable zero-argument constructor: `factory(config)` called on the worker."""
    build: Callable[[FeaturizeConfig], Any]
    config: FeaturizeConfig

    def __call__(self):
        return self.build(self.config)


def _batch_errors(failed, stage: str, run_id: str):
    batch, exception = failed
    for item in batch:
        video_id = item[0] if isinstance(item, tuple) else None
        yield error_row(video_id, stage, type(exception).__name__, str(exception), run_id)


# ---------------------------------------------------------------- rows → Arrow tables

class ToArrowTables(beam.PTransform):
    """Group rows into Arrow tables for WriteToParquetBatched."""

    def __init__(self, schema: pa.Schema, max_rows: int = 512):
        super().__init__()
        self._schema = schema
        self._max_rows = max_rows

    def expand(self, rows):
        return (rows
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._max_rows)
                | "ToArrow" >> beam.Map(rows_to_table, self._schema))


def popcast_counters(result) -> dict[str, int]:
    """Totals of the popcast-namespace Beam counters of a finished pipeline ({} where unsupported)."""
    try:
        metrics = result.metrics().query()
    except Exception:  # some runners cannot report metrics
        return {}
    totals: dict[str, int] = {}
    for counter in metrics.get("counters", []):
        if counter.key.metric.namespace.startswith("popcast"):
            name = counter.key.metric.name
            totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
    return totals
