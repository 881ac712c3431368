"""Decode a video held in memory (bytes) into K resized RGB frames, 16 kHz mono audio and facts; Beam-free.

The container header is probed first with PyAV (no frame is decoded there) so size, pixel and duration
limits reject a file before any decoding work is spent on it. decord 0.6.0 then indexes the stream (frame
count, fps, keyframes, timestamps), decodes keyframe and frame-accurate samples and the audio; PyAV
runs the one sequential pass of "reference" sampling, which decord cannot do.

Samplings (`DecodedVideo.sampling_used` says which one ran):
- "keyframe" (the default request): the keyframes nearest to K uniform positions, decoded alone (a
  keyframe needs no predecessor: 4-16x cheaper than frame-accurate sampling). Used only when that gives
  at least ceil(K/2) distinct frames; otherwise "reference" runs instead.
- "reference": one sequential pass that decodes only reference frames (I and P; the B frames that
  nothing depends on -- most frames of short-form clips -- are skipped by the decoder) and converts only
  the frames nearest to the K uniform times. Short-form clips have 1-5 keyframes, so this is the usual
  path; it costs about half of decoding every frame, where decord's frame-accurate sampling costs more
  than decoding every frame (it seeks back to the previous keyframe for each index). Frames are distinct
  and increasing in time, each within a reference-frame gap (typically 1-3 frames) of its target. Falls
  back to "exact" when a clip has too few reference frames for ceil(K/2) distinct picks.
- "exact": frame-accurate uniform sampling (decord `get_batch` on the K segment centres).
"""
from __future__ import annotations

import io
import math
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence, TypeVar

import av
import decord
import numpy as np

__all__ = [
    "decode_video", "DecodedVideo", "VideoFacts", "DecodeLimits", "DecodeError",
    "SAMPLINGS", "AUDIO_SAMPLE_RATE", "DEFAULT_FRAMES", "DEFAULT_SAMPLING", "DEFAULT_FRAME_SIZE",
    "DEFAULT_AUDIO_SECONDS",
    # the sampling rules and header readers, pure and tested on their own
    "uniform_indices", "sample_keyframe_indices", "min_distinct_keyframes", "choose_indices",
    "pick_nearest_in_stream", "looks_like_video_container", "mp4_display_rotation",
]

SAMPLINGS: tuple[str, ...] = ("keyframe", "reference", "exact")
AUDIO_SAMPLE_RATE = 16_000
# The one place for the decode defaults: featurize's flags and FeaturizeConfig take theirs from here.
DEFAULT_FRAMES = 16
DEFAULT_SAMPLING = "keyframe"
DEFAULT_FRAME_SIZE = 224
DEFAULT_AUDIO_SECONDS = 30.0
# Frames are requested from decord in chunks so the time budget is checked while decoding long clips.
_DECODE_CHUNK = 4
# The sequential reference pass checks the time budget every this many decoded frames.
_BUDGET_CHECK_EVERY = 16
# PyAV's errors while demuxing/decoding a damaged stream (FFmpegError covers InvalidDataError & co).
_PYAV_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
# decord raises DECORDError (not a RuntimeError subclass), RuntimeError from its Python wrapper and
# AssertionError for a zero-frame stream ("Invalid frame count").
_DECORD_ERRORS = (RuntimeError, decord.DECORDError, AssertionError)

_T = TypeVar("_T")


@dataclass(frozen=True)
class DecodeLimits:
    """Per-video limits; a video over any of them fails with DecodeError(reason=<limit name>).

    max_bytes: file size, checked before anything is opened.
    max_duration_s: duration from the container header (or frame count / fps when absent).
    max_pixels: coded width * height, checked before any frame is decoded.
    max_decode_s: wall-clock budget for the whole decode. decord's calls cannot be interrupted, so it
        is checked between steps (probe, open, each chunk of frames, audio); one step may overrun it.
    """
    max_bytes: int = 512 * 1024 * 1024
    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096
    max_decode_s: float = 120.0


class DecodeError(Exception):
    """A video that cannot be decoded, or that breaks a limit.

    `reason` is a short machine name: "empty_file", "not_a_video", "max_bytes", "max_duration",
    "max_pixels", "decode_timeout" or "corrupt". The message says what was found.
    """
    REASONS: tuple[str, ...] = ("empty_file", "not_a_video", "max_bytes", "max_duration", "max_pixels",
                                "decode_timeout", "corrupt")

    def __init__(self, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown DecodeError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across Beam / multiprocessing workers
        return (DecodeError, (self.reason, self.message))


@dataclass(frozen=True)
class VideoFacts:
    """What the file says about itself.

    width, height: coded (stored) size in pixels. rotation_deg: the display rotation stored in the
    container, counter-clockwise, in {0, 90, 180, 270} (FFmpeg's display-matrix convention; a phone's
    legacy `rotate=90` tag is 270 here). aspect: width / height as displayed, i.e. after rotation.
    duration_s: end time of the last frame (first frame at 0). fps: decord's average frame rate.
    """
    duration_s: float
    fps: float
    width: int
    height: int
    rotation_deg: int
    aspect: float
    has_audio: bool
    frame_count: int
    bytes: int
    keyframe_count: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodedVideo:
    """The result of decode_video.

    frames: uint8 [K, size, size, 3] RGB. frame_indices: int64 [K] source frame numbers (non-decreasing;
    repeated when the clip has fewer usable frames than K). frame_times_s: float64 [K] presentation
    times. audio: float32 [n] mono 16 kHz, at most audio_seconds long; None when the file has no audio
    stream or the audio could not be decoded (then audio_error says why).
    """
    frames: np.ndarray
    frame_indices: np.ndarray
    frame_times_s: np.ndarray
    sampling_used: str
    audio: np.ndarray | None
    facts: VideoFacts
    audio_error: str | None = None
    decode_s: float = field(default=0.0)


# ---------------------------------------------------------------------------------------------------
# Sampling rules (pure functions of frame counts and keyframe positions)

def uniform_indices(frame_count: int, k: int) -> list[int]:
    """K frame indices at the centres of K equal segments of [0, frame_count).

    Centres, not the ends, because first and last frames are often black or title cards. With fewer
    frames than K, indices repeat (always exactly K, non-decreasing).
    """
    if frame_count <= 0 or k <= 0:
        raise ValueError(f"need frame_count > 0 and k > 0, got {frame_count}, {k}")
    return [min(frame_count - 1, int((i + 0.5) * frame_count / k)) for i in range(k)]


def sample_keyframe_indices(key_indices: list[int] | np.ndarray, frame_count: int, k: int) -> list[int]:
    """For each of the K uniform positions, the nearest keyframe (ties go to the earlier one).

    Returns exactly K non-decreasing indices; neighbouring positions may share a keyframe, so indices
    repeat when keyframes are sparse. Keyframes outside [0, frame_count) are ignored; with none left,
    frame 0 (always decodable on its own) stands in.
    """
    keys = np.unique(np.asarray(key_indices, dtype=np.int64))
    keys = keys[(keys >= 0) & (keys < frame_count)]
    if keys.size == 0:
        keys = np.array([0], dtype=np.int64)
    targets = np.asarray(uniform_indices(frame_count, k), dtype=np.int64)
    right = np.searchsorted(keys, targets, side="left").clip(0, keys.size - 1)
    left = (right - 1).clip(0, keys.size - 1)
    take_left = np.abs(targets - keys[left]) <= np.abs(keys[right] - targets)
    return np.where(take_left, keys[left], keys[right]).tolist()


def min_distinct_keyframes(k: int) -> int:
    """Keyframe sampling is used only when it yields at least this many distinct frames (ceil(K/2))."""
    return (k + 1) // 2


def choose_indices(key_indices: list[int], frame_count: int, k: int, sampling: str) -> tuple[list[int], str]:
    """(indices, sampling) under the module's rule: keyframes unless too few distinct ones.

    For "keyframe" with enough distinct keyframes: the keyframe indices and "keyframe". Otherwise the
    K uniform target indices and the sampling that must reach them: "reference" (the fallback of
    "keyframe", or requested) or "exact". The reference pass picks the decoded frames nearest to
    these targets, so its final indices are known only after decoding.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "keyframe":
        keyed = sample_keyframe_indices(key_indices, frame_count, k)
        if len(set(keyed)) >= min(min_distinct_keyframes(k), frame_count):
            return keyed, "keyframe"
        sampling = "reference"
    return uniform_indices(frame_count, k), sampling


def pick_nearest_in_stream(items: Iterable[tuple[float, _T]], targets: Sequence[float]
                           ) -> Iterator[tuple[int, _T]]:
    """Match a time-ordered stream of (time, item) to increasing target times, consuming it lazily.

    Yields (target number, item) in target order, each as soon as it is decided, and stops reading
    `items` once every target is matched -- so a decoder feeding it stops right after the last target.
    Each target takes the nearer of the items just before and at/after it (ties go to the earlier);
    an item is never given to two targets while later items remain, so picks are distinct and
    increasing in time when the stream has enough items. Targets left when the stream ends take its
    last item (repeats: a stream with fewer items than targets). An empty stream yields nothing.
    """
    n = len(targets)
    j = 0
    previous: tuple[float, _T] | None = None
    previous_used = False
    for time_s, item in items:
        current_used = False
        while j < n and time_s >= targets[j] and not current_used:
            if previous is not None and not previous_used and targets[j] - previous[0] <= time_s - targets[j]:
                yield j, previous[1]
                previous_used = True
            else:
                yield j, item
                current_used = True
            j += 1
        if j == n:
            return
        previous, previous_used = (time_s, item), current_used
    if previous is not None:
        for remaining in range(j, n):
            yield remaining, previous[1]


# ---------------------------------------------------------------------------------------------------
# Container probing (header only)

_ISO_BMFF_TOP_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid", b"styp"}


def looks_like_video_container(data: bytes) -> bool:
    """True when the first bytes carry a known video container signature.

    Separates a damaged video ("corrupt") from something that never was one ("not_a_video").
    """
    head = data[:12]
    if len(head) >= 8 and head[4:8] in _ISO_BMFF_TOP_BOXES:
        return True                                      # MP4 / MOV / 3GP
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return True                                      # Matroska / WebM
    if head[:4] == b"RIFF" and data[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head[:3] == b"FLV" or head[:4] == b"OggS" or head[:4] == b"\x00\x00\x01\xba":
        return True
    if head[:1] == b"\x47" and (len(data) <= 188 or data[188:189] == b"\x47"):
        return True                                      # MPEG-TS sync bytes
    return False


@dataclass(frozen=True)
class _ContainerProbe:
    width: int
    height: int
    duration_s: float | None
    has_audio: bool


def _probe_container(data: bytes) -> _ContainerProbe:
    """Read the container header with PyAV: coded size, duration, streams. Decodes no frame."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise DecodeError("not_a_video", f"no video stream (streams: "
                                  f"{[s.type for s in container.streams]})")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            duration_s = None
            if container.duration is not None and container.duration > 0:
                duration_s = container.duration / av.time_base
            elif stream.duration is not None and stream.time_base is not None:
                duration_s = float(stream.duration * stream.time_base)
            return _ContainerProbe(width, height, duration_s, bool(container.streams.audio))
    except DecodeError:
        raise
    except _PYAV_ERRORS as error:
        if looks_like_video_container(data):
            raise DecodeError("corrupt", f"container header unreadable: {error}") from error
        raise DecodeError("not_a_video", f"no known video container: {error}") from error


def _iter_boxes(data: bytes, start: int, stop: int):
    """(type, payload_start, payload_stop) for ISO-BMFF boxes in data[start:stop]."""
    pos = start
    while pos + 8 <= stop:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > stop:
                return
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
            header = 16
        elif size == 0:
            size = stop - pos
        if size < header or pos + size > stop:
            return
        yield kind, pos + header, pos + size
        pos += size


def mp4_display_rotation(data: bytes) -> int:
    """Counter-clockwise display rotation (0/90/180/270) of the first video track of an MP4/MOV.

    Read from the track header (tkhd) matrix, as FFmpeg's av_display_rotation_get does; 0 for other
    containers or when the header cannot be parsed (decord applies the same matrix when decoding).
    """
    for kind, moov_start, moov_stop in _iter_boxes(data, 0, len(data)):
        if kind != b"moov":
            continue
        for trak_kind, trak_start, trak_stop in _iter_boxes(data, moov_start, moov_stop):
            if trak_kind != b"trak":
                continue
            matrix, is_video = None, False
            for box, start, stop in _iter_boxes(data, trak_start, trak_stop):
                if box == b"tkhd" and stop - start >= 84:
                    version = data[start]
                    # version/flags, then times and ids: 20 bytes (v0) or 32 (v1); 16 more reserved
                    # /layer/group/volume bytes precede the 9-int matrix.
                    offset = start + 4 + (32 if version == 1 else 20) + 16
                    if offset + 36 <= stop:
                        matrix = struct.unpack(">9i", data[offset:offset + 36])
                elif box == b"mdia":
                    for sub, sub_start, _ in _iter_boxes(data, start, stop):
                        if sub == b"hdlr" and data[sub_start + 8:sub_start + 12] == b"vide":
                            is_video = True
            if is_video and matrix is not None:
                a, b = matrix[0], matrix[1]
                if a == 0 and b == 0:
                    return 0
                ccw = -math.degrees(math.atan2(b, a))
                return int(round(ccw / 90.0)) * 90 % 360
        return 0
    return 0


# ---------------------------------------------------------------------------------------------------
# Decoding

def _check_time(started: float, limits: DecodeLimits, step: str) -> None:
    elapsed = time.monotonic() - started
    if elapsed > limits.max_decode_s:
        raise DecodeError("decode_timeout", f"{elapsed:.1f}s spent (limit {limits.max_decode_s}s) "
                          f"by the end of {step}")


def _decode_audio(data: bytes, audio_seconds: float) -> np.ndarray:
    """Mono 16 kHz float32, at most audio_seconds long.

    mono=True always: decord's mono=False returns scrambled samples (dmlc/decord#242). Stereo is
    downmixed by FFmpeg's default (L + R) * 0.707, so a stereo source reads up to 3 dB louder than
    the same signal in mono. decord decodes the whole track before we cut it; the duration limit
    bounds that cost.
    """
    reader = decord.AudioReader(io.BytesIO(data), sample_rate=AUDIO_SAMPLE_RATE, mono=True)
    keep = int(audio_seconds * AUDIO_SAMPLE_RATE)
    # The decoded (channels, samples) array; the public slicing API builds a Python list of every
    # sample index (seconds of overhead for long tracks), so read the array decord already holds.
    samples = reader._array if hasattr(reader, "_array") else reader[:keep].asnumpy()
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    return np.ascontiguousarray(samples[:keep])


def _decode_indexed_frames(reader, indices: list[int], started: float, limits: DecodeLimits) -> np.ndarray:
    """decord: the frames at `indices` (keyframe or frame-accurate samples), uint8 [K, size, size, 3].

    decord applies the display rotation itself. Raises decord's errors (the caller maps them).
    """
    unique = sorted(set(indices))
    decoded: dict[int, np.ndarray] = {}
    for chunk_start in range(0, len(unique), _DECODE_CHUNK):
        chunk = unique[chunk_start:chunk_start + _DECODE_CHUNK]
        batch = reader.get_batch(chunk).asnumpy()
        decoded.update(zip(chunk, batch))
        _check_time(started, limits, f"frames {chunk[0]}..{chunk[-1]}")
    return np.stack([decoded[i] for i in indices]).astype(np.uint8, copy=False)


def _decode_reference_frames(data: bytes, frame_starts: np.ndarray, target_indices: list[int], size: int,
                             rotation: int, num_threads: int, started: float, limits: DecodeLimits
                             ) -> tuple[list[int], np.ndarray] | None:
    """PyAV, one sequential pass over reference frames only: (frame indices, uint8 [K, size, size, 3]).

    `frame_starts` are decord's per-frame start times (stream start subtracted) and define the frame
    numbering; each decoded frame maps to the index whose start time is nearest. Only the K picked
    frames are converted to RGB (bilinear scaling, as decord's resize, so samplings agree to ~0.1 grey
    levels), then rotated for display like decord does. Decoding stops after the last target.
    Returns None when the clip has too few reference frames for min(ceil(K/2), frame_count)
    distinct picks (the caller then samples frame-accurately).
    """
    k = len(target_indices)
    target_times = frame_starts[np.asarray(target_indices, dtype=np.int64)]
    picked_index: list[int] = [0] * k
    picked_rgb: list[np.ndarray | None] = [None] * k
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            # Frame + slice threads; B frames nothing refers to are dropped inside the decoder, before
            # any pixel work (most frames of phone/TikTok H.264 are such B frames).
            stream.thread_type = "AUTO"
            if num_threads > 0:
                stream.thread_count = num_threads
            # Kept frames are bit-identical to the same frames of a full decode (checked on the real
            # H.264 and HEVC clips): only frames no other frame predicts from are dropped.
            stream.codec_context.skip_frame = "NONREF"
            start_s = float(stream.start_time * stream.time_base) \
                if stream.start_time is not None and stream.time_base is not None else 0.0

            def timed_frames():
                for count, frame in enumerate(container.decode(stream)):
                    if count % _BUDGET_CHECK_EVERY == _BUDGET_CHECK_EVERY - 1:
                        _check_time(started, limits, f"reference frame {count}")
                    if frame.time is not None:
                        yield frame.time - start_s, frame

            last_frame, last_rgb = None, None
            for target, frame in pick_nearest_in_stream(timed_frames(), target_times):
                if frame is not last_frame:        # repeats (stream end) reuse the conversion
                    last_frame = frame
                    last_rgb = frame.to_ndarray(width=size, height=size, format="rgb24")
                    if rotation:
                        # rotation is counter-clockwise, as is np.rot90 on (rows, columns).
                        last_rgb = np.ascontiguousarray(np.rot90(last_rgb, k=rotation // 90))
                    # Nearest start time (ties to the earlier frame); K lookups, so a linear scan is fine
                    # and does not assume decord's timestamps are sorted.
                    last_index = int(np.argmin(np.abs(frame_starts - (frame.time - start_s))))
                picked_index[target], picked_rgb[target] = last_index, last_rgb
    except _PYAV_ERRORS as error:
        raise DecodeError("corrupt", f"reference-frame decoding failed: {error}") from error
    if any(rgb is None for rgb in picked_rgb) or \
            len(set(picked_index)) < min(min_distinct_keyframes(k), len(frame_starts)):
        return None
    return picked_index, np.stack(picked_rgb)


def decode_video(data: bytes, *, frames: int = DEFAULT_FRAMES, sampling: str = DEFAULT_SAMPLING,
                 size: int = DEFAULT_FRAME_SIZE, limits: DecodeLimits = DecodeLimits(),
                 audio_seconds: float = DEFAULT_AUDIO_SECONDS,
                 num_threads: int = 0) -> DecodedVideo:
    """Decode `frames` RGB frames (resized to size x size) plus audio and facts from a video's bytes.

    Args:
        data: the whole file (pipelines read it through Beam FileSystems).
        frames: K, the number of frames returned (always exactly K).
        sampling: "keyframe" (default; falls back to "reference" on sparse keyframes), "reference" or
            "exact"; see the module docstring. `DecodedVideo.sampling_used` says which one ran.
        size: output side. The resize happens inside the decoder (cheap) and is a plain square
            stretch, not a crop: a 9:16 clip is squeezed horizontally. Encoders see the whole picture.
        limits: DecodeLimits checked along the way.
        audio_seconds: keep at most this much audio from the start; 0 skips audio decoding (audio
            None, audio_error None; facts.has_audio still reports the stream).
        num_threads: decoder threads (0 = the decoders' automatic choice).

    Raises:
        DecodeError: with reason "empty_file", "not_a_video", "corrupt" or a limit name. A file
            without an audio stream is not an error (audio None, facts.has_audio False).
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    started = time.monotonic()
    probe = _probe_within_limits(data, limits)
    _check_time(started, limits, "probe")

    reader, stream = _open_stream_index(data, size, num_threads)
    if probe.duration_s is None and stream.duration_s > limits.max_duration_s:
        raise DecodeError("max_duration", f"{stream.duration_s:.1f}s > limit {limits.max_duration_s}s")
    _check_time(started, limits, "open")

    rotation = mp4_display_rotation(data)
    indices, sampling_used = choose_indices(stream.key_indices, stream.frame_count, frames, sampling)
    try:
        sampled = _sample_frames(reader, data, indices, sampling_used, size, rotation, num_threads,
                                 started, limits)
    except _DECORD_ERRORS as error:
        raise DecodeError("corrupt", f"decoding frames failed: {error}") from error
    finally:
        del reader  # decord holds decoder threads and a copy of the bytes until freed

    facts = _video_facts(probe, stream, rotation, n_bytes=len(data))
    audio, audio_error = _decode_audio_if_wanted(data, probe.has_audio, audio_seconds)
    _check_time(started, limits, "audio")

    return DecodedVideo(frames=sampled.frames, frame_indices=np.asarray(sampled.indices, dtype=np.int64),
                        frame_times_s=sampled.times_s, sampling_used=sampled.sampling_used, audio=audio,
                        facts=facts, audio_error=audio_error, decode_s=time.monotonic() - started)


def _probe_within_limits(data: bytes, limits: DecodeLimits) -> _ContainerProbe:
    """The container header, once the file has passed every limit the header can show.

    Runs before any decoder is opened, so an oversized or huge-resolution upload costs no decoding.
    """
    n_bytes = len(data)
    if n_bytes == 0:
        raise DecodeError("empty_file", "the file has zero bytes")
    if n_bytes > limits.max_bytes:
        raise DecodeError("max_bytes", f"{n_bytes} bytes > limit {limits.max_bytes}")
    probe = _probe_container(data)
    if probe.width * probe.height > limits.max_pixels:
        raise DecodeError("max_pixels", f"{probe.width}x{probe.height} = {probe.width * probe.height} "
                          f"pixels > limit {limits.max_pixels}")
    if probe.duration_s is not None and probe.duration_s > limits.max_duration_s:
        raise DecodeError("max_duration", f"{probe.duration_s:.1f}s > limit {limits.max_duration_s}s")
    return probe


@dataclass(frozen=True)
class _StreamIndex:
    """decord's index of the video stream: what sampling and VideoFacts need from it."""
    frame_count: int
    fps: float
    key_indices: list[int]
    duration_s: float           # end of the last frame, else frame_count / fps, else 0


def _open_stream_index(data: bytes, size: int, num_threads: int) -> tuple[decord.VideoReader, _StreamIndex]:
    """decord's reader (decoding straight to size x size) and its index of the stream."""
    try:
        reader = decord.VideoReader(io.BytesIO(data), width=size, height=size, num_threads=num_threads)
        frame_count = len(reader)
        fps = float(reader.get_avg_fps())
        key_indices = list(reader.get_key_indices())
        last_frame_end = float(reader.get_frame_timestamp(frame_count - 1)[1])
    except _DECORD_ERRORS as error:
        raise DecodeError("corrupt", f"decord cannot open the video stream: {error}") from error
    duration_s = last_frame_end if last_frame_end > 0 else (frame_count / fps if fps > 0 else 0.0)
    return reader, _StreamIndex(frame_count, fps, key_indices, duration_s)


@dataclass(frozen=True)
class _SampledFrames:
    indices: list[int]
    frames: np.ndarray          # uint8 [K, size, size, 3]
    times_s: np.ndarray         # float64 [K]
    sampling_used: str


def _sample_frames(reader, data: bytes, indices: list[int], sampling: str, size: int, rotation: int,
                   num_threads: int, started: float, limits: DecodeLimits) -> _SampledFrames:
    """The K frames under `sampling` (from choose_indices). Raises decord's errors (the caller maps them).

    "reference" turns into "exact" when the clip has too few reference frames for a useful spread.
    """
    frame_starts = reader.get_frame_timestamp(list(range(len(reader))))[:, 0].astype(np.float64)
    frame_array = None
    if sampling == "reference":
        picked = _decode_reference_frames(data, frame_starts, indices, size, rotation, num_threads,
                                          started, limits)
        if picked is not None:
            indices, frame_array = picked
        else:
            sampling = "exact"
    if frame_array is None:
        frame_array = _decode_indexed_frames(reader, indices, started, limits)
    times = frame_starts[np.asarray(indices, dtype=np.int64)]
    return _SampledFrames(indices, frame_array, times, sampling)


def _video_facts(probe: _ContainerProbe, stream: _StreamIndex, rotation: int, n_bytes: int) -> VideoFacts:
    # A 90/270-degree rotation swaps the displayed sides (phones store portrait as rotated landscape).
    display_w, display_h = (probe.height, probe.width) if rotation in (90, 270) else (probe.width, probe.height)
    return VideoFacts(duration_s=stream.duration_s, fps=stream.fps, width=probe.width, height=probe.height,
                      rotation_deg=rotation, aspect=display_w / display_h if display_h else 0.0,
                      has_audio=probe.has_audio, frame_count=stream.frame_count, bytes=n_bytes,
                      keyframe_count=len(stream.key_indices))


def _decode_audio_if_wanted(data: bytes, has_audio: bool, audio_seconds: float
                            ) -> tuple[np.ndarray | None, str | None]:
    """(audio, audio_error): (None, None) without a stream or when audio_seconds is 0."""
    audio, audio_error = None, None
    if has_audio and audio_seconds > 0:
        try:
            audio = _decode_audio(data, audio_seconds)
        except _DECORD_ERRORS as error:
            # A broken audio track should not cost the frames: report it, keep going.
            audio_error = f"audio decode failed: {error}"
        if audio is not None and not np.isfinite(audio).all():
            audio, audio_error = None, "audio decode returned non-finite samples"
    return audio, audio_error
