"""Decode a video held in memory (bytes) into K resized RGB frames, 16 kHz mono audio and facts; Beam-free.

Frames and audio come from decord 0.6.0; the container header is probed first with PyAV (no frame is
decoded there) so size, pixel and duration limits reject a file before any decoding work is spent on it.

Sampling ("keyframe", the default): take the keyframes nearest to K uniform positions and decode only
those (a keyframe decodes without its predecessors: 4-16x cheaper than frame-accurate sampling, see
RESEARCH.md). When the clip has too few keyframes for that to give a useful spread -- fewer than
ceil(K/2) distinct keyframes are nearest to the K positions -- it falls back to frame-accurate uniform
sampling ("exact"). `DecodedVideo.sampling_used` says which one ran.
"""
from __future__ import annotations

import io
import math
import struct
import time
from dataclasses import asdict, dataclass, field

import numpy as np

import av
import decord

SAMPLINGS: tuple[str, ...] = ("keyframe", "exact")
AUDIO_SAMPLE_RATE = 16_000
# Frames are requested from decord in chunks so the time budget is checked while decoding long clips.
_DECODE_CHUNK = 4
# decord raises DECORDError (not a RuntimeError subclass), RuntimeError from its Python wrapper and
# AssertionError for a zero-frame stream ("Invalid frame count").
_DECORD_ERRORS = (RuntimeError, decord.DECORDError, AssertionError)


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
    """(indices, sampling_used) under the module's rule: keyframes unless too few distinct ones."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "keyframe":
        keyed = sample_keyframe_indices(key_indices, frame_count, k)
        if len(set(keyed)) >= min(min_distinct_keyframes(k), frame_count):
            return keyed, "keyframe"
    return uniform_indices(frame_count, k), "exact"


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
    except (av.FFmpegError, OSError, ValueError, EOFError) as error:
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


def decode_video(data: bytes, *, frames: int = 16, sampling: str = "keyframe", size: int = 224,
                 limits: DecodeLimits = DecodeLimits(), audio_seconds: float = 60.0,
                 num_threads: int = 0) -> DecodedVideo:
    """Decode `frames` RGB frames (resized to size x size) plus audio and facts from a video's bytes.

    Args:
        data: the whole file (pipelines read it through Beam FileSystems).
        frames: K, the number of frames returned (always exactly K).
        sampling: "keyframe" (default; may fall back to "exact", see the module docstring) or "exact".
        size: output side. The resize happens inside the decoder (cheap) and is a plain square
            stretch, not a crop: a 9:16 clip is squeezed horizontally. Encoders see the whole picture.
        limits: DecodeLimits checked along the way.
        audio_seconds: keep at most this much audio from the start.
        num_threads: decoder threads (0 = decord's automatic choice).

    Raises:
        DecodeError: with reason "empty_file", "not_a_video", "corrupt" or a limit name. A file
            without an audio stream is not an error (audio None, facts.has_audio False).
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    started = time.monotonic()
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
    _check_time(started, limits, "probe")

    try:
        reader = decord.VideoReader(io.BytesIO(data), width=size, height=size, num_threads=num_threads)
        frame_count = len(reader)
        fps = float(reader.get_avg_fps())
        key_indices = list(reader.get_key_indices())
        last_frame_end = float(reader.get_frame_timestamp(frame_count - 1)[1])
    except _DECORD_ERRORS as error:
        raise DecodeError("corrupt", f"decord cannot open the video stream: {error}") from error
    duration_s = last_frame_end if last_frame_end > 0 else (frame_count / fps if fps > 0 else 0.0)
    if probe.duration_s is None and duration_s > limits.max_duration_s:
        raise DecodeError("max_duration", f"{duration_s:.1f}s > limit {limits.max_duration_s}s")
    _check_time(started, limits, "open")

    indices, sampling_used = choose_indices(key_indices, frame_count, frames, sampling)
    unique = sorted(set(indices))
    decoded: dict[int, np.ndarray] = {}
    try:
        for chunk_start in range(0, len(unique), _DECODE_CHUNK):
            chunk = unique[chunk_start:chunk_start + _DECODE_CHUNK]
            batch = reader.get_batch(chunk).asnumpy()
            decoded.update(zip(chunk, batch))
            _check_time(started, limits, f"frames {chunk[0]}..{chunk[-1]}")
        times = reader.get_frame_timestamp(indices)[:, 0].astype(np.float64)
    except _DECORD_ERRORS as error:
        raise DecodeError("corrupt", f"decoding frames {unique[:3]}.. failed: {error}") from error
    finally:
        del reader  # decord holds decoder threads and a copy of the bytes until freed
    frame_array = np.stack([decoded[i] for i in indices]).astype(np.uint8, copy=False)

    rotation = mp4_display_rotation(data)
    display_w, display_h = (probe.height, probe.width) if rotation in (90, 270) else (probe.width, probe.height)
    facts = VideoFacts(duration_s=duration_s, fps=fps, width=probe.width, height=probe.height,
                       rotation_deg=rotation, aspect=display_w / display_h if display_h else 0.0,
                       has_audio=probe.has_audio, frame_count=frame_count, bytes=n_bytes,
                       keyframe_count=len(key_indices))

    audio, audio_error = None, None
    if probe.has_audio and audio_seconds > 0:
        try:
            audio = _decode_audio(data, audio_seconds)
        except _DECORD_ERRORS as error:
            # A broken audio track should not cost the frames: report it, keep going.
            audio_error = f"audio decode failed: {error}"
        if audio is not None and not np.isfinite(audio).all():
            audio, audio_error = None, "audio decode returned non-finite samples"
    _check_time(started, limits, "audio")

    return DecodedVideo(frames=frame_array, frame_indices=np.asarray(indices, dtype=np.int64),
                        frame_times_s=times, sampling_used=sampling_used, audio=audio, facts=facts,
                        audio_error=audio_error, decode_s=time.monotonic() - started)
