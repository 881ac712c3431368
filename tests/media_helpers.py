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


# --------------------------------------------------------------------------- adversarial media
# Files that stress the decoder's memory rather than its correctness: hour-long tracks, 8K frames, a huge
# audio track, a huge file. Each is written in about a second, from a few encoded packets repeated.

def _sine_packets(rate: int, channels: int, seconds: float, bit_rate: int) -> list[tuple[bytes, int]]:
    """(payload, duration in samples) of the AAC packets of a 440 Hz sine lasting `seconds`."""
    layout = "mono" if channels == 1 else "stereo"
    codec = av.CodecContext.create("aac", "w")
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = rate, layout, "fltp", bit_rate
    codec.time_base = Fraction(1, rate)
    packets: list[tuple[bytes, int]] = []
    total, chunk = int(round(seconds * rate)), 1024
    for start in range(0, total, chunk):
        t = (np.arange(start, start + chunk) / rate).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.tile(0.3 * np.sin(2 * np.pi * 440.0 * t), (channels, 1))
                                           .astype(np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        packets += [(bytes(p), int(p.duration or chunk)) for p in codec.encode(frame)]
    return packets


def write_long_clip(path: PathLike, *, seconds: float = 3600.0, width: int = 16, height: int = 16,
                    fps: int = 1, gop: int = 10, audio_seconds: float | None = None, audio_rate: int = 48000,
                    audio_channels: int = 2, audio_bit_rate: int = 24000) -> Path:
    """A long MP4 written fast: `seconds` of tiny H.264 frames at a low rate, and an AAC sine track
    lasting `audio_seconds` (default: as long as the video; 0 = no audio).

    The audio is one second of encoded sine whose packets repeat to the end, so an hour of 48 kHz stereo
    is ~170k packets muxed in a few seconds; it decodes to a continuous 440 Hz tone. The container's
    duration is the longer track's, as FFmpeg reports it.
    """
    path = Path(path)
    audio_seconds = seconds if audio_seconds is None else audio_seconds
    n_frames = max(1, int(round(seconds * fps)))
    ramp = np.linspace(16, 240, n_frames).astype(np.uint8)
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "40",
                         "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0"}
        audio = None
        if audio_seconds > 0:
            audio = container.add_stream("aac", rate=audio_rate,
                                         layout="mono" if audio_channels == 1 else "stereo")
        image = np.zeros((height, width, 3), dtype=np.uint8)
        for index in range(n_frames):
            image[...] = ramp[index]
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            pieces = _sine_packets(audio_rate, audio_channels, 1.0, audio_bit_rate)
            total = int(round(audio_seconds * audio_rate))
            pts, index = 0, 0
            while pts < total:
                payload, duration = pieces[index % len(pieces)]
                packet = av.Packet(payload)
                packet.pts = packet.dts = pts
                packet.duration = duration
                packet.time_base = Fraction(1, audio_rate)
                packet.stream = audio
                container.mux(packet)
                pts += duration
                index += 1
    return path


def write_still_clip(path: PathLike, *, width: int = 7680, height: int = 4320, frames: int = 2,
                     fps: int = 30, audio: bool = False) -> Path:
    """A few frames of a very large picture (8K by default): flat grey with a white top-left marker.

    Frames are built as uint8 directly (write_clip's float ramp would need 400 MB for one 8K frame).
    """
    path = Path(path)
    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "40",
                         "x264-params": "bframes=0:scenecut=0:threads=2:lookahead-threads=1"}
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        image[: height // 8, : width // 8] = 255
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio:
            stream = container.add_stream("aac", rate=44100, layout="mono")
            _write_sine(container, stream, frames / fps, 44100, 1)
    return path


def write_padded(path: PathLike, *, pad_bytes: int, **clip_kwargs) -> Path:
    """A valid MP4 (write_clip) followed by a `free` box of `pad_bytes` zeros: a huge file that
    decodes like a tiny one (demuxers skip free boxes), for memory that scales with file size."""
    path = Path(path)
    write_clip(path, **clip_kwargs)
    header = (pad_bytes + 16).to_bytes(8, "big")
    with open(path, "ab") as handle:
        handle.write((1).to_bytes(4, "big") + b"free" + header)    # 64-bit box size
        chunk = bytes(1 << 20)
        remaining = pad_bytes
        while remaining > 0:
            handle.write(chunk[:min(remaining, len(chunk))])
            remaining -= len(chunk)
    return path


_MEASURE_DECODE = r"""
import json, resource, sys
from featurizers.decode import DecodeError, DecodeLimits, decode_video, estimate_decode_memory

args = json.loads(sys.argv[1])
limits = DecodeLimits(**args["limits"])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
source = open(args["path"], "rb").read() if args["as_bytes"] else args["path"]
result = {"baseline_rss": baseline, "file_bytes": len(source) if args["as_bytes"] else None}
try:
    estimate = estimate_decode_memory(source, limits=limits, **{k: v for k, v in args["kwargs"].items()
                                                                   if k != "sampling"})
    result.update(estimate=estimate.total, threads=estimate.threads)
    decoded = decode_video(source, limits=limits, **args["kwargs"])
    result.update(outcome="ok", sampling_used=decoded.sampling_used, frames_shape=list(decoded.frames.shape),
                  audio_samples=None if decoded.audio is None else len(decoded.audio),
                  duration_s=decoded.facts.duration_s)
except DecodeError as error:
    result.update(outcome=error.reason, message=error.message)
result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def measure_decode(path: PathLike, *, as_bytes: bool = False, limits: dict | None = None, **kwargs) -> dict:
    """Decode `path` with featurizers.decode in a fresh Python process and report its peak memory.

    The file is handed over as a path (as the pipeline does), or read into bytes first (`as_bytes`).
    Returns a dict: outcome ("ok" or the DecodeError reason), peak_rss (the process's ru_maxrss, bytes),
    baseline_rss (before the file was read and decoded: the interpreter and imports), estimate (the bytes
    estimate_decode_memory reserved, when the limits let it through), threads, and for a decoded video
    sampling_used, frames_shape, audio_samples, duration_s.
    """
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    payload = json.dumps({"path": str(path), "as_bytes": as_bytes, "limits": limits or {}, "kwargs": kwargs})
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _MEASURE_DECODE, payload], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"decode subprocess failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
