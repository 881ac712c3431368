"""Decode a video (its bytes, or a local path) into K resized RGB frames, 16 kHz mono audio and facts; Beam-free.

The container header is probed first with PyAV (no frame is decoded there) so size, pixel, duration and
memory limits reject a file before any decoding work is spent on it. decord 0.6.0 then indexes the stream
(frame count, fps, keyframes, timestamps), decodes keyframe and frame-accurate samples and the audio; PyAV
runs the one sequential pass of "reference" sampling, which decord cannot do.

Memory is bounded by design, whatever the clip's length, resolution or audio track (`estimate_decode_memory`):
- the peak of a decode is estimated from the header before anything is decoded: the file's bytes when it
  is held in memory (decord copies them: ~4x the file at its peak; a path costs nothing), full-size
  decoded pictures (coded width x height x bytes per pixel x (16 reference frames + 4 held + 2 per
  decoder thread): the resize happens after decoding), the demuxers' per-packet indexes, the first
  `audio_seconds` of audio, the K output frames and a fixed part. Over `DecodeLimits.max_memory`, the
  decoder threads are reduced first, then the video fails with reason "max_memory";
- only the first `audio_seconds` (+1 s) of the audio track are cut out (packets copied, nothing decoded) and
  decoded, so an hour of 48 kHz stereo costs what 30 s cost;
- `MemoryBudget` lets the videos decoded at once in one process share one budget: each reserves its
  estimate, waiting while the others' reservations leave too little.

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
import os
import struct
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import av
import decord
import numpy as np

__all__ = [
    "decode_video", "DecodedVideo", "VideoFacts", "DecodeLimits", "DecodeError",
    "SAMPLINGS", "AUDIO_SAMPLE_RATE", "DEFAULT_FRAMES", "DEFAULT_SAMPLING", "DEFAULT_FRAME_SIZE",
    "DEFAULT_AUDIO_SECONDS", "DEFAULT_MAX_MEMORY",
    # memory: the estimate decode_video checks, and a budget shared by concurrent decodes
    "MemoryEstimate", "estimate_decode_memory", "MemoryBudget", "process_memory_budget",
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

# Memory (see the module docstring and estimate_decode_memory). The default budget is the decode share of a
# 2.5 GB featurize worker: its interpreter, Beam, the encoders and a 4-video frame batch peak at ~1.7 GB.
DEFAULT_MAX_MEMORY = 768 * 1024 * 1024
# Full-size pictures a decoder may hold: up to 16 reference frames (H.264/HEVC DPB), plus the picture being
# decoded, the reorder delay and the frames PyAV/decord hold while converting, plus per frame thread the
# picture it decodes and its output delay. Calibrated on a 4K H.264 stream with 16 reference frames and
# B-pyramids: 217 MiB measured with 1 thread, 477 MiB with 16 (decord, frame-accurate), against 12.5 MiB a
# picture x (20 + 2 x threads) + the rest: 318 and 676 MiB estimated.
_REFERENCE_FRAMES = 16
_HELD_FRAMES = 4
_FRAMES_PER_THREAD = 2
# Per packet of the file (video frames and audio packets): the demuxer's index in each open container
# (probe, decord, the reference pass: ~100 B each) and the sampler's per-frame timestamps.
_INDEX_BYTES_PER_PACKET = 256
# Codec and container state, decord's and PyAV's buffers (~32 MiB measured on tiny clips).
_FIXED_BYTES = 48 * 1024 * 1024
# A file held in memory (bytes input) is copied twice by decord (bytearray + its own buffer), once more
# while its reader is built: with the caller's copy, 4x the file at the peak. A path costs nothing.
_IN_MEMORY_FILE_COPIES = 4
# Audio: the first audio_seconds + this margin of packets are copied into a small container and decoded
# (decoding is causal, so the kept samples equal a whole-track decode's); the cut stops at this many
# compressed bytes whatever the packets say (31 s of 48 kHz stereo 16-bit PCM is 6 MB).
_AUDIO_MARGIN_S = 1.0
_AUDIO_CUT_MAX_BYTES = 8 * 1024 * 1024
# The cut is written in the source's own container family, which stores priming / codec delay the way the
# source did, so decoding the cut gives the source's samples bit for bit; then the fallbacks.
_AUDIO_CUT_FAMILIES = {"mov": "mov", "mp4": "mov", "matroska": "matroska", "webm": "matroska",
                       "mpegts": "mpegts", "avi": "avi", "flv": "flv", "ogg": "ogg", "asf": "asf"}
_AUDIO_CUT_FALLBACKS = ("mov", "matroska")
# Decoded audio copies at the peak: decord's growing vector (up to 2x), its array, the numpy copy, ours.
_AUDIO_COPIES = 5
# Bytes per pixel of the decoded picture when the header names no pixel format: 8-bit 4:2:0 for the
# profiles that are 8-bit 4:2:0 by definition, 10/12-bit 4:2:0 for those, else the worst (16-bit 4:4:4 + alpha).
_PROFILES_8BIT_420 = {"baseline", "constrained baseline", "main", "extended", "high", "progressive high",
                      "constrained high", "main still picture", "profile 0", "simple profile",
                      "advanced simple profile", "simple", "advanced"}
_PROFILES_HIGH_BIT_420 = {"high 10", "high 10 intra", "main 10", "profile 2"}
_CODECS_8BIT_420 = {"vp8", "h263", "flv1", "mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v2", "msmpeg4v3",
                    "wmv1", "wmv2", "theora"}
_WORST_BYTES_PER_PIXEL = 8.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class DecodeLimits:
    """Per-video limits; a video over any of them fails with DecodeError(reason=<limit name>).

    max_bytes: file size, checked before anything is opened.
    max_duration_s: duration from the container header (or frame count / fps when absent).
    max_pixels: coded width * height, checked before any frame is decoded.
    max_decode_s: wall-clock budget for the whole decode. decord's calls cannot be interrupted, so it
        is checked between steps (probe, open, each chunk of frames, audio); one step may overrun it.
    max_memory: estimated peak bytes of the decode (estimate_decode_memory), checked from the header
        before any frame is decoded (decoder threads are reduced first) and again once the frame count
        is known.
    """
    max_bytes: int = 512 * 1024 * 1024
    max_duration_s: float = 600.0
    max_pixels: int = 4096 * 4096
    max_decode_s: float = 120.0
    max_memory: int = DEFAULT_MAX_MEMORY


class DecodeError(Exception):
    """A video that cannot be decoded, or that breaks a limit.

    `reason` is a short machine name: "empty_file", "not_a_video", "max_bytes", "max_duration",
    "max_pixels", "max_memory", "decode_timeout" or "corrupt". The message says what was found.
    """
    REASONS: tuple[str, ...] = ("empty_file", "not_a_video", "max_bytes", "max_duration", "max_pixels",
                                "max_memory", "decode_timeout", "corrupt")

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


class _Source:
    """The video as given: bytes in memory (decord copies them; counted by the memory estimate) or the path
    of a local file (read by FFmpeg in small buffers: the file's size costs no memory)."""

    def __init__(self, data: bytes | str | os.PathLike):
        if isinstance(data, (str, os.PathLike)):
            self.path: str | None = os.fspath(data)
            self.data: bytes | None = None
            self.size = os.path.getsize(self.path)
        else:
            self.path = None
            self.data = data if isinstance(data, bytes) else bytes(data)
            self.size = len(self.data)

    @property
    def bytes_in_memory(self) -> int:
        """File bytes a decode holds at its peak: decord's copies of an in-memory file, none for a path."""
        return _IN_MEMORY_FILE_COPIES * self.size if self.data is not None else 0

    def for_decoder(self) -> str | io.BytesIO:
        """What av.open and decord's readers take: the path, or a new BytesIO sharing the bytes (no copy)."""
        return self.path if self.path is not None else io.BytesIO(self.data)

    def head(self, n: int) -> bytes:
        if self.data is not None:
            return self.data[:n]
        with open(self.path, "rb") as handle:
            return handle.read(n)

    @contextmanager
    def reader(self) -> Iterator[Callable[[int, int], bytes]]:
        """`read(position, n)`: up to n bytes from position, for the box parser (a file is never read whole)."""
        if self.data is not None:
            data = self.data
            yield lambda position, n: data[position:position + n]
            return
        with open(self.path, "rb") as handle:
            def read(position: int, n: int) -> bytes:
                handle.seek(position)
                return handle.read(n)
            yield read


@dataclass(frozen=True)
class _ContainerProbe:
    """What the container header says, read without decoding a frame."""
    width: int
    height: int
    duration_s: float | None
    has_audio: bool
    codec: str = ""
    profile: str | None = None
    pix_fmt: str | None = None      # often unknown before decoding (then the profile decides)
    video_packets: int = 0          # frames the header lists; 0 = not listed (Matroska, MPEG-TS)
    fps: float = 0.0                # the header's frame rate; 0 = unknown
    audio_packets: int = 0          # packets of every audio track, listed or implied by their duration


# Decoders that avformat_find_stream_info opens while probing would decode up to 20 H.264 frames at full
# size (to guess the reorder delay) before any limit could look at the picture size; with skip_frame=all
# they decode none. The header's sizes, durations and streams are the same.
_PROBE_OPTIONS = {"skip_frame": "all"}


def _probe_container(source: _Source) -> _ContainerProbe:
    """Read the container header with PyAV: coded size, duration, streams, packet counts. Decodes no frame."""
    try:
        with av.open(source.for_decoder(), mode="r", options=_PROBE_OPTIONS) as container:
            if not container.streams.video:
                raise DecodeError("not_a_video", f"no video stream (streams: "
                                  f"{[s.type for s in container.streams]})")
            stream = container.streams.video[0]
            context = stream.codec_context
            width, height = int(context.width or 0), int(context.height or 0)
            duration_s = None
            if container.duration is not None and container.duration > 0:
                duration_s = container.duration / av.time_base
            elif stream.duration is not None and stream.time_base is not None:
                duration_s = float(stream.duration * stream.time_base)
            rate = stream.guessed_rate or stream.average_rate
            return _ContainerProbe(
                width, height, duration_s, bool(container.streams.audio), codec=context.name or "",
                profile=stream.profile, pix_fmt=context.pix_fmt, video_packets=max(int(stream.frames or 0), 0),
                fps=float(rate) if rate else 0.0,
                audio_packets=sum(_audio_packets(audio, duration_s) for audio in container.streams.audio))
    except DecodeError:
        raise
    except _PYAV_ERRORS as error:
        if looks_like_video_container(source.head(512)):
            raise DecodeError("corrupt", f"container header unreadable: {error}") from error
        raise DecodeError("not_a_video", f"no known video container: {error}") from error


def _audio_packets(stream, container_duration_s: float | None) -> int:
    """Packets of an audio track: the header's count, else its duration at >= 50 packets a second."""
    if stream.frames:
        return int(stream.frames)
    seconds = container_duration_s or 0.0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    rate = (stream.codec_context.sample_rate if stream.codec_context is not None else 0) or 48_000
    return int(math.ceil(max(seconds, 0.0) * max(50.0, rate / 1024)))


def _iter_boxes(read: Callable[[int, int], bytes], start: int, stop: int):
    """(type, payload_start, payload_stop) for ISO-BMFF boxes in [start, stop) of what `read` reads."""
    pos = start
    while pos + 8 <= stop:
        size, kind = struct.unpack(">I4s", read(pos, 8))
        header = 8
        if size == 1:
            if pos + 16 > stop:
                return
            size = struct.unpack(">Q", read(pos + 8, 8))[0]
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
    return _mp4_rotation(lambda position, n: data[position:position + n], len(data))


def _mp4_rotation(read: Callable[[int, int], bytes], size: int) -> int:
    """mp4_display_rotation over `read(position, n)`: only box headers and a few fields are read."""
    for kind, moov_start, moov_stop in _iter_boxes(read, 0, size):
        if kind != b"moov":
            continue
        for trak_kind, trak_start, trak_stop in _iter_boxes(read, moov_start, moov_stop):
            if trak_kind != b"trak":
                continue
            matrix, is_video = None, False
            for box, start, stop in _iter_boxes(read, trak_start, trak_stop):
                if box == b"tkhd" and stop - start >= 84:
                    version = read(start, 1)[0]
                    # version/flags, then times and ids: 20 bytes (v0) or 32 (v1); 16 more reserved
                    # /layer/group/volume bytes precede the 9-int matrix.
                    offset = start + 4 + (32 if version == 1 else 20) + 16
                    if offset + 36 <= stop:
                        matrix = struct.unpack(">9i", read(offset, 36))
                elif box == b"mdia":
                    for sub, sub_start, _ in _iter_boxes(read, start, stop):
                        if sub == b"hdlr" and read(sub_start + 8, 4) == b"vide":
                            is_video = True
            if is_video and matrix is not None:
                a, b = matrix[0], matrix[1]
                if a == 0 and b == 0:
                    return 0
                ccw = -math.degrees(math.atan2(b, a))
                return int(round(ccw / 90.0)) * 90 % 360
        return 0
    return 0


def _display_rotation(source: _Source) -> int:
    with source.reader() as read:
        return _mp4_rotation(read, source.size)


# ---------------------------------------------------------------------------------------------------
# Memory: the estimate decode_video checks before decoding, and the budget concurrent decodes share

@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one decode_video call, in bytes, by part (see the module docstring).

    file: the file's bytes held in memory (bytes input; 0 for a path). pictures: full-size decoded
    pictures (reference frames, held frames, one per decoder thread). index: per-packet indexes.
    audio: the cut audio and its decoded samples. output: the K resized frames. fixed: codec and container
    state. threads: the decoder threads assumed; num_threads: what decode_video passes to the decoders
    (0 = their automatic choice, kept when it fits). video_packets: the frame count assumed.
    """
    file: int
    pictures: int
    index: int
    audio: int
    output: int
    fixed: int
    threads: int
    num_threads: int
    video_packets: int

    @property
    def total(self) -> int:
        return self.file + self.pictures + self.index + self.audio + self.output + self.fixed

    def describe(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:.0f}"
        return (f"{mib(self.total)} MiB (file {mib(self.file)}, pictures {mib(self.pictures)} with "
                f"{self.threads} decoder thread(s), index {mib(self.index)} for {self.video_packets} frames, "
                f"audio {mib(self.audio)}, output {mib(self.output)}, fixed {mib(self.fixed)})")


def _auto_threads(height: int) -> int:
    """The decoder threads FFmpeg picks for thread_count=0 (libavcodec/pthread.c): cores + 1, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cores = min(cores, max(1, (height + 15) // 16))
    return min(cores + 1, 16) if cores > 1 else 1


def _bytes_per_pixel(probe: _ContainerProbe) -> float:
    """Bytes per pixel of a decoded picture: from the pixel format when the header names it, else from the
    codec profile (8-bit 4:2:0: 1.5; 10/12-bit 4:2:0: 3), else the worst case."""
    if probe.pix_fmt:
        try:
            bits = av.VideoFormat(probe.pix_fmt).padded_bits_per_pixel
            if bits > 0:
                return bits / 8
        except (ValueError, av.FFmpegError):
            pass
    profile = (probe.profile or "").lower()
    if probe.codec == "av1":
        return 3.0 if profile == "main" else _WORST_BYTES_PER_PIXEL
    if profile in _PROFILES_8BIT_420 or (not profile and probe.codec in _CODECS_8BIT_420):
        return 1.5
    if profile in _PROFILES_HIGH_BIT_420:
        return 3.0
    return _WORST_BYTES_PER_PIXEL


def _picture_bytes(probe: _ContainerProbe) -> int:
    """One decoded picture at the coded size, planes aligned as FFmpeg allocates them (to 64)."""
    def aligned(n: int) -> int:
        return (max(n, 1) + 63) // 64 * 64
    return int(aligned(probe.width) * aligned(probe.height) * _bytes_per_pixel(probe))


def _plan_memory(probe: _ContainerProbe, source: _Source, frames: int, size: int, audio_seconds: float,
                 num_threads: int, max_memory: int) -> MemoryEstimate:
    """The estimate with the most decoder threads (up to the requested ones) that fit max_memory.

    Raises DecodeError("max_memory") when even one decoder thread does not fit.
    """
    video_packets = probe.video_packets or int(math.ceil((probe.duration_s or 0.0) * (probe.fps or 60.0)))
    audio = 0
    if probe.has_audio and audio_seconds > 0:
        samples = (audio_seconds + _AUDIO_MARGIN_S) * AUDIO_SAMPLE_RATE
        audio = int(_AUDIO_COPIES * 4 * samples) + _IN_MEMORY_FILE_COPIES * _AUDIO_CUT_MAX_BYTES
    requested = num_threads if num_threads > 0 else _auto_threads(probe.height)
    picture = _picture_bytes(probe)
    estimate = MemoryEstimate(
        file=source.bytes_in_memory, pictures=0,
        index=(video_packets + probe.audio_packets) * _INDEX_BYTES_PER_PACKET, audio=audio,
        output=3 * frames * size * size * 3, fixed=_FIXED_BYTES, threads=requested, num_threads=num_threads,
        video_packets=video_packets)
    fitting = ((max_memory - estimate.total) // picture - _REFERENCE_FRAMES - _HELD_FRAMES) // _FRAMES_PER_THREAD
    threads = int(max(1, min(requested, fitting)))
    pictures = picture * (_REFERENCE_FRAMES + _HELD_FRAMES + _FRAMES_PER_THREAD * threads)
    estimate = replace(estimate, pictures=pictures, threads=threads,
                       num_threads=num_threads if threads == requested else threads)
    if estimate.total > max_memory:
        raise DecodeError("max_memory", f"{probe.width}x{probe.height}, {video_packets} frames, {source.size} "
                          f"bytes{' in memory' if source.data is not None else ''}: estimated peak "
                          f"{estimate.describe()} > limit {max_memory} bytes")
    return estimate


def estimate_decode_memory(data: bytes | str | os.PathLike, *, frames: int = DEFAULT_FRAMES,
                           size: int = DEFAULT_FRAME_SIZE, audio_seconds: float = DEFAULT_AUDIO_SECONDS,
                           num_threads: int = 0, limits: DecodeLimits = DecodeLimits()) -> MemoryEstimate:
    """The peak memory decode_video(data, ...) with the same arguments is estimated to need, from the header.

    Decodes nothing. Raises the DecodeError decode_video would raise for the file's size, header, pixel,
    duration or memory limits, so a caller can reserve the estimate (MemoryBudget) before decoding.
    """
    source = _Source(data)
    probe = _probe_within_limits(source, limits)
    return _plan_memory(probe, source, frames, size, audio_seconds, num_threads, limits.max_memory)


class MemoryBudget:
    """Estimated decode memory shared by the videos one process decodes at once; thread-safe.

    `reserve(n)` waits until n bytes fit beside the other reservations, first come first served (a big
    video is not overtaken forever by small ones), and gives them back when its block ends. n is capped at
    the capacity, so a reservation never waits for itself: with DecodeLimits.max_memory equal to the
    capacity, decode_video refuses larger estimates anyway. Each video reserves once, so waiting
    threads hold nothing and the decoding ones always finish: no deadlock.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._reserved = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def reserved(self) -> int:
        with self._changed:
            return self._reserved

    @contextmanager
    def reserve(self, n_bytes: int) -> Iterator[int]:
        n_bytes = max(0, min(int(n_bytes), self.capacity))
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                self._changed.wait_for(
                    lambda: self._queue[0] is ticket and self._reserved + n_bytes <= self.capacity)
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
            self._reserved += n_bytes
        try:
            yield n_bytes
        finally:
            with self._changed:
                self._reserved -= n_bytes
                self._changed.notify_all()


_PROCESS_BUDGETS: dict[int, MemoryBudget] = {}
_PROCESS_BUDGETS_LOCK = threading.Lock()


def process_memory_budget(capacity: int) -> MemoryBudget:
    """This process's MemoryBudget of `capacity` bytes: one per process and capacity, so that every
    decoder of a worker process shares it (a runner may run several DoFn instances, each with its own
    thread pool, in one process)."""
    with _PROCESS_BUDGETS_LOCK:
        budget = _PROCESS_BUDGETS.get(capacity)
        if budget is None:
            budget = _PROCESS_BUDGETS[capacity] = MemoryBudget(capacity)
        return budget


# ---------------------------------------------------------------------------------------------------
# Decoding

def _check_time(started: float, limits: DecodeLimits, step: str) -> None:
    elapsed = time.monotonic() - started
    if elapsed > limits.max_decode_s:
        raise DecodeError("decode_timeout", f"{elapsed:.1f}s spent (limit {limits.max_decode_s}s) "
                          f"by the end of {step}")


def _cut_audio(source: _Source, seconds: float) -> bytes:
    """The first `seconds` of the first audio track, its packets copied (not decoded) into a small container.

    decord's AudioReader decodes a whole track into memory (an hour of 48 kHz stereo peaks near 1 GB);
    fed this cut it decodes only the start. Decoding is causal and the cut is written in the source's own
    container family (which stores priming and codec delay as the source did), so the samples kept from
    it equal a whole-track decode's bit for bit (checked on the real clips and on AAC, Opus, MP3, AC-3,
    FLAC, ALAC and PCM in MP4/MOV, Matroska/WebM, MPEG-TS, AVI and FLV). At most _AUDIO_CUT_MAX_BYTES
    are copied.
    """
    with av.open(source.for_decoder(), mode="r", options=_PROBE_OPTIONS) as container:
        family = _AUDIO_CUT_FAMILIES.get(container.format.name.split(",")[0])
    formats = ((family,) if family else ()) + tuple(f for f in _AUDIO_CUT_FALLBACKS if f != family)
    failure: Exception | None = None
    for container_format in formats:
        try:
            return _cut_audio_into(source, seconds, container_format)
        except _PYAV_ERRORS as error:      # the format cannot hold this codec: try the next one
            failure = error
    assert failure is not None
    raise failure


def _cut_audio_into(source: _Source, seconds: float, container_format: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(source.for_decoder(), mode="r", options=_PROBE_OPTIONS) as container:
        stream = container.streams.audio[0]          # the track decord decodes: the first audio stream
        with av.open(buffer, mode="w", format=container_format) as cut:
            target = cut.add_stream_from_template(stream)
            first, copied = None, 0
            for packet in container.demux(stream):
                when = packet.pts if packet.pts is not None else packet.dts
                if when is None:
                    continue                        # the demuxer's empty packet at the end
                if first is None:
                    first = when
                if float((when - first) * packet.time_base) > seconds or \
                        copied + packet.size > _AUDIO_CUT_MAX_BYTES:
                    break
                copied += packet.size
                packet.stream = target
                cut.mux(packet)
    return buffer.getvalue()


def _decode_audio(source: _Source, audio_seconds: float) -> np.ndarray:
    """Mono 16 kHz float32, at most audio_seconds long.

    mono=True always: decord's mono=False returns scrambled samples (dmlc/decord#242). Stereo is
    downmixed by FFmpeg's default (L + R) * 0.707, so a stereo source reads up to 3 dB louder than
    the same signal in mono. Only the first audio_seconds (+ a margin) are cut out and decoded, so
    memory and time do not grow with the track's length.
    """
    cut = _cut_audio(source, audio_seconds + _AUDIO_MARGIN_S)
    reader = decord.AudioReader(io.BytesIO(cut), sample_rate=AUDIO_SAMPLE_RATE, mono=True)
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


def _decode_reference_frames(source: _Source, frame_starts: np.ndarray, target_indices: list[int], size: int,
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
        with av.open(source.for_decoder(), mode="r") as container:
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


def decode_video(data: bytes | str | os.PathLike, *, frames: int = DEFAULT_FRAMES,
                 sampling: str = DEFAULT_SAMPLING, size: int = DEFAULT_FRAME_SIZE,
                 limits: DecodeLimits = DecodeLimits(), audio_seconds: float = DEFAULT_AUDIO_SECONDS,
                 num_threads: int = 0) -> DecodedVideo:
    """Decode `frames` RGB frames (resized to size x size) plus audio and facts from a video.

    Args:
        data: the whole file as bytes, or the path of a local file. A path is read by the decoders in
            small buffers, so the file's size costs no memory (pipelines pass paths); bytes are copied
            by decord and count ~4x in the memory estimate.
        frames: K, the number of frames returned (always exactly K).
        sampling: "keyframe" (default; falls back to "reference" on sparse keyframes), "reference" or
            "exact"; see the module docstring. `DecodedVideo.sampling_used` says which one ran.
        size: output side. The resize happens inside the decoder (cheap) and is a plain square
            stretch, not a crop: a 9:16 clip is squeezed horizontally. Encoders see the whole picture.
        limits: DecodeLimits checked along the way (max_memory against estimate_decode_memory).
        audio_seconds: keep at most this much audio from the start; 0 skips audio decoding (audio
            None, audio_error None; facts.has_audio still reports the stream).
        num_threads: decoder threads (0 = the decoders' automatic choice). Fewer are used when the
            requested ones would not fit limits.max_memory; the frames are the same either way.

    Raises:
        DecodeError: with reason "empty_file", "not_a_video", "corrupt" or a limit name. A file
            without an audio stream is not an error (audio None, facts.has_audio False).
    """
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    started = time.monotonic()
    source = _Source(data)
    probe = _probe_within_limits(source, limits)
    plan = _plan_memory(probe, source, frames, size, audio_seconds, num_threads, limits.max_memory)
    _check_time(started, limits, "probe")

    reader, stream = _open_stream_index(source, size, plan.num_threads)
    if probe.duration_s is None and stream.duration_s > limits.max_duration_s:
        raise DecodeError("max_duration", f"{stream.duration_s:.1f}s > limit {limits.max_duration_s}s")
    _check_memory_with_frame_count(plan, stream.frame_count, limits)
    _check_time(started, limits, "open")

    rotation = _display_rotation(source)
    indices, sampling_used = choose_indices(stream.key_indices, stream.frame_count, frames, sampling)
    try:
        sampled = _sample_frames(reader, source, indices, sampling_used, size, rotation, plan.num_threads,
                                 started, limits)
    except _DECORD_ERRORS as error:
        raise DecodeError("corrupt", f"decoding frames failed: {error}") from error
    finally:
        del reader  # decord holds decoder threads (and a copy of in-memory bytes) until freed

    facts = _video_facts(probe, stream, rotation, n_bytes=source.size)
    audio, audio_error = _decode_audio_if_wanted(source, probe.has_audio, audio_seconds)
    _check_time(started, limits, "audio")

    return DecodedVideo(frames=sampled.frames, frame_indices=np.asarray(sampled.indices, dtype=np.int64),
                        frame_times_s=sampled.times_s, sampling_used=sampled.sampling_used, audio=audio,
                        facts=facts, audio_error=audio_error, decode_s=time.monotonic() - started)


def _probe_within_limits(source: _Source, limits: DecodeLimits) -> _ContainerProbe:
    """The container header, once the file has passed every limit the header can show.

    Runs before any decoder is opened, so an oversized or huge-resolution upload costs no decoding.
    """
    if source.size == 0:
        raise DecodeError("empty_file", "the file has zero bytes")
    if source.size > limits.max_bytes:
        raise DecodeError("max_bytes", f"{source.size} bytes > limit {limits.max_bytes}")
    probe = _probe_container(source)
    if probe.width * probe.height > limits.max_pixels:
        raise DecodeError("max_pixels", f"{probe.width}x{probe.height} = {probe.width * probe.height} "
                          f"pixels > limit {limits.max_pixels}")
    if probe.duration_s is not None and probe.duration_s > limits.max_duration_s:
        raise DecodeError("max_duration", f"{probe.duration_s:.1f}s > limit {limits.max_duration_s}s")
    return probe


def _check_memory_with_frame_count(plan: MemoryEstimate, frame_count: int, limits: DecodeLimits) -> None:
    """Once decord has counted the frames: the index part with the real count (headers of Matroska or
    MPEG-TS do not list frames, so the plan guessed from duration x rate) must still fit."""
    if frame_count <= plan.video_packets:
        return
    actual = replace(plan, index=plan.index + (frame_count - plan.video_packets) * _INDEX_BYTES_PER_PACKET,
                     video_packets=frame_count)
    if actual.total > limits.max_memory:
        raise DecodeError("max_memory", f"{frame_count} frames: estimated peak {actual.describe()} > limit "
                          f"{limits.max_memory} bytes")


@dataclass(frozen=True)
class _StreamIndex:
    """decord's index of the video stream: what sampling and VideoFacts need from it."""
    frame_count: int
    fps: float
    key_indices: list[int]
    duration_s: float           # end of the last frame, else frame_count / fps, else 0


def _open_stream_index(source: _Source, size: int, num_threads: int
                       ) -> tuple[decord.VideoReader, _StreamIndex]:
    """decord's reader (decoding straight to size x size) and its index of the stream."""
    try:
        reader = decord.VideoReader(source.for_decoder(), width=size, height=size, num_threads=num_threads)
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


def _sample_frames(reader, source: _Source, indices: list[int], sampling: str, size: int, rotation: int,
                   num_threads: int, started: float, limits: DecodeLimits) -> _SampledFrames:
    """The K frames under `sampling` (from choose_indices). Raises decord's errors (the caller maps them).

    "reference" turns into "exact" when the clip has too few reference frames for a useful spread.
    """
    frame_starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0].astype(np.float64)
    frame_array = None
    if sampling == "reference":
        picked = _decode_reference_frames(source, frame_starts, indices, size, rotation, num_threads,
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


def _decode_audio_if_wanted(source: _Source, has_audio: bool, audio_seconds: float
                            ) -> tuple[np.ndarray | None, str | None]:
    """(audio, audio_error): (None, None) without a stream or when audio_seconds is 0."""
    audio, audio_error = None, None
    if has_audio and audio_seconds > 0:
        try:
            audio = _decode_audio(source, audio_seconds)
        except (*_DECORD_ERRORS, *_PYAV_ERRORS) as error:
            # A broken audio track should not cost the frames: report it, keep going.
            audio_error = f"audio decode failed: {error}"
        if audio is not None and not np.isfinite(audio).all():
            audio, audio_error = None, "audio decode returned non-finite samples"
    return audio, audio_error
