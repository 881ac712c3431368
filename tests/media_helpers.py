"""Seeded writers of REAL media files for tests: H.264 + AAC MP4 clips made with PyAV, and broken files.

Every clip is tiny (a few hundred KB at most) and deterministic for a given set of arguments. Frame
content changes with time (a colour ramp plus a moving bar), so frames taken at different times differ
and a test can tell which part of the clip a decoded frame came from (see `frame_brightness_at`).
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

PathLike = str | os.PathLike


def frame_brightness_at(t_s: float, seconds: float) -> float:
    """The mean grey level (0..255) `write_clip` gives the frame at time t_s: a linear ramp 16 -> 240.

    Tests use it to check that a decoded frame comes from the expected time of the clip.
    """
    fraction = min(max(t_s / max(seconds, 1e-9), 0.0), 1.0)
    return 16.0 + 224.0 * fraction


def _frame_image(index: int, t_s: float, seconds: float, width: int, height: int,
                 rng_colour: np.ndarray, moving: bool) -> np.ndarray:
    """An RGB uint8 [height, width, 3] picture whose brightness encodes t_s (see frame_brightness_at)."""
    level = frame_brightness_at(t_s, seconds)
    # A per-clip tint (seeded) on top of the time ramp, small enough to keep the mean near `level`.
    image = np.empty((height, width, 3), dtype=np.float32)
    image[...] = level + rng_colour
    if moving:
        # A vertical bar sweeping left to right: neighbouring frames differ even at equal brightness.
        bar_width = max(2, width // 16)
        x0 = int((index * 7) % max(1, width - bar_width))
        image[:, x0:x0 + bar_width, :] = 255.0 - level
    # A top-left marker that is bright in the first half of the picture's height only: a rotated
    # clip decodes with the marker somewhere else, which tests can detect.
    image[: height // 8, : width // 8, :] = 255.0
    return np.clip(image, 0, 255).astype(np.uint8)


def write_clip(path: PathLike, *, width: int = 320, height: int = 576, fps: int = 30,
               seconds: float = 2.0, gop: int = 30, audio: bool = True, rotation: int = 0,
               color_seed: int = 0, moving: bool = True, vfr: bool = False,
               audio_rate: int = 44100, audio_channels: int = 1, faststart: bool = False) -> Path:
    """Write an H.264 (libx264, yuv420p) MP4, with an AAC track unless audio=False.

    Args:
        path: where to write (parent must exist).
        width, height: coded size in pixels (even numbers; yuv420p needs them).
        fps: nominal frame rate; with vfr=True frame durations alternate irregularly around 1/fps.
        seconds: approximate duration.
        gop: keyframe interval in frames (x264 `keyint`, scene-cut detection off so it is exact).
        audio: add a 440 Hz sine AAC track (mono or stereo, at audio_rate).
        rotation: display rotation in degrees (0, 90, 180, 270) stored as the stream's display
            matrix, which is what phones write; decoders that honour it swap width and height.
        color_seed: seeds the per-clip tint, so two clips with different seeds differ.
        moving: draw a moving bar (otherwise frames differ only by the brightness ramp).
        vfr: irregular presentation timestamps (variable frame rate).
        audio_rate, audio_channels: AAC sample rate (44100 or 48000) and channel count (1 or 2).
        faststart: put the index (moov) before the media data, as phones and web uploads do; by
            default it comes last, so a truncated file has no index at all.

    Returns:
        The path written, as a Path.
    """
    path = Path(path)
    rng = np.random.default_rng(color_seed)
    tint = rng.uniform(-12.0, 12.0, size=3).astype(np.float32)
    n_frames = max(1, int(round(seconds * fps)))

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        # A fine time base lets vfr timestamps land between nominal frame slots.
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        time_base = Fraction(1, fps * 100)
        video.codec_context.time_base = time_base
        # bframes=0 keeps pts == dts order simple; scenecut=0 makes keyframes exactly every `gop`.
        video.options = {"g": str(gop), "keyint_min": str(gop), "preset": "ultrafast",
                         "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0",
                         "crf": "28"}
        if rotation:
            video.set_display_rotation(rotation)

        audio_stream = None
        if audio:
            layout = "mono" if audio_channels == 1 else "stereo"
            audio_stream = container.add_stream("aac", rate=audio_rate, layout=layout)

        ticks_per_frame = 100  # in units of the 1/(fps*100) time base
        pts = 0
        for index in range(n_frames):
            if vfr:
                # Alternate short and long frames (0.5x .. 1.7x nominal), deterministic.
                ticks = int(ticks_per_frame * (0.5 + 1.2 * ((index * 37) % 11) / 10))
            else:
                ticks = ticks_per_frame
            t_s = pts / (fps * 100)
            image = _frame_image(index, t_s, seconds, width, height, tint, moving)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = pts
            frame.time_base = time_base
            for packet in video.encode(frame):
                container.mux(packet)
            pts += ticks
        for packet in video.encode(None):
            container.mux(packet)

        if audio_stream is not None:
            _write_sine(container, audio_stream, seconds, audio_rate, audio_channels)
    return path


def _write_sine(container, stream, seconds: float, rate: int, channels: int) -> None:
    """A 440 Hz sine at amplitude 0.3 for `seconds`, in 1024-sample AAC frames."""
    total = int(round(seconds * rate))
    chunk = 1024
    layout = "mono" if channels == 1 else "stereo"
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n) / rate).astype(np.float32)
        wave = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        planar = np.tile(wave, (channels, 1))  # fltp: one row per channel
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_corrupt(path: PathLike, *, seed: int = 0, **clip_kwargs) -> Path:
    """A valid MP4 (write_clip) whose middle third of bytes is overwritten with seeded garbage.

    The container header (moov, at the end for PyAV's muxer, or at the start) is kept intact where
    possible so the file still opens; the damage hits the coded frames in mdat.
    """
    path = Path(path)
    write_clip(path, **clip_kwargs)
    data = bytearray(path.read_bytes())
    start, stop = len(data) // 3, 2 * len(data) // 3
    moov = data.find(b"moov")
    if moov != -1 and start <= moov < stop:
        stop = max(start + 1, moov - 8)  # keep the index readable
    garbage = np.random.default_rng(seed).integers(0, 256, size=stop - start, dtype=np.uint8)
    data[start:stop] = garbage.tobytes()
    path.write_bytes(bytes(data))
    return path


def write_truncated(path: PathLike, **clip_kwargs) -> Path:
    """The first half of a valid MP4 (write_clip): what an interrupted download leaves."""
    path = Path(path)
    write_clip(path, **clip_kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_empty(path: PathLike) -> Path:
    """A zero-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text(path: PathLike) -> Path:
    """A non-video file with a video extension (a text file named .mp4)."""
    path = Path(path)
    path.write_text("this is not a video, just a text file with an .mp4 name\n" * 20)
    return path


def write_audio_only(path: PathLike, *, seconds: float = 1.0, rate: int = 44100) -> Path:
    """An MP4 (.m4a-like) with an AAC track and no video stream."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        _write_sine(container, stream, seconds, rate, 1)
    return path
