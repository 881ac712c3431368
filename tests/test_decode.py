"""featurizers.decode on real MP4 files written by tests/media_helpers.py (and real clips when present)."""
from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path

import decord
import numpy as np
import pytest

from featurizers.decode import (
    AUDIO_SAMPLE_RATE,
    DecodeError,
    DecodeLimits,
    choose_indices,
    decode_video,
    looks_like_video_container,
    mp4_display_rotation,
    pick_nearest_in_stream,
    sample_keyframe_indices,
    uniform_indices,
)
from tests import media_helpers as media

REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "media" / "clips"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """Every synthetic file the tests need, written once per module (all tiny)."""
    root = tmp_path_factory.mktemp("clips")
    paths = {
        "vertical": media.write_clip(root / "vertical.mp4", width=320, height=576, seconds=2.0, gop=30),
        "still_ramp": media.write_clip(root / "ramp.mp4", width=64, height=64, seconds=2.0, gop=30,
                                       moving=False, audio=False),
        "short_gop": media.write_clip(root / "short_gop.mp4", width=96, height=160, seconds=2.0, gop=5,
                                      audio=False, color_seed=1),
        "no_audio": media.write_clip(root / "no_audio.mp4", width=128, height=96, seconds=1.0, audio=False),
        "stereo48k": media.write_clip(root / "stereo.mp4", width=64, height=64, seconds=1.5,
                                      audio_channels=2, audio_rate=48000),
        "vfr": media.write_clip(root / "vfr.mp4", width=96, height=96, seconds=1.5, vfr=True, audio=False),
        "tiny": media.write_clip(root / "tiny.mp4", width=64, height=64, seconds=5 / 30, audio=False),
        "corrupt": media.write_corrupt(root / "corrupt.mp4", width=96, height=160, seconds=2.0),
        "truncated": media.write_truncated(root / "truncated.mp4", width=96, height=160, seconds=1.0),
        "truncated_faststart": media.write_truncated(root / "truncated_fs.mp4", width=96, height=160,
                                                     seconds=1.0, faststart=True),
        "empty": media.write_empty(root / "empty.mp4"),
        "text": media.write_text(root / "text.mp4"),
        "audio_only": media.write_audio_only(root / "audio_only.m4a"),
    }
    for rotation in (0, 90, 180, 270):
        paths[f"rot{rotation}"] = media.write_clip(root / f"rot{rotation}.mp4", width=160, height=96,
                                                   seconds=0.3, rotation=rotation, moving=False,
                                                   audio=False)
    return {name: Path(path).read_bytes() for name, path in paths.items()}


# --------------------------------------------------------------------------- sampling rules (pure)

def test_uniform_indices_are_segment_centres_and_repeat_when_short() -> None:
    assert uniform_indices(10, 5) == [1, 3, 5, 7, 9]
    assert uniform_indices(3, 5) == [0, 0, 1, 2, 2]
    assert uniform_indices(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


def test_sample_keyframe_indices_takes_nearest_keyframe_ties_to_earlier() -> None:
    # Targets for 120 frames, K=4: 15, 45, 75, 105 -> each equidistant between two keyframes.
    assert sample_keyframe_indices([0, 30, 60, 90], 120, 4) == [0, 30, 60, 90]
    assert sample_keyframe_indices([0, 100], 120, 4) == [0, 0, 100, 100]
    # Keyframes outside the clip are ignored; none left -> frame 0.
    assert sample_keyframe_indices([500], 120, 2) == [0, 0]


def test_choose_indices_falls_back_to_reference_below_half_k_distinct_keyframes() -> None:
    n = 300
    indices, used = choose_indices(list(range(0, n, 10)), n, 8, "keyframe")
    assert used == "keyframe" and all(i % 10 == 0 for i in indices)
    indices, used = choose_indices([0, 150], n, 8, "keyframe")   # 2 distinct < ceil(8/2)
    assert used == "reference" and indices == uniform_indices(n, 8)
    for requested in ("reference", "exact"):                      # requested: keyframes are ignored
        indices, used = choose_indices(list(range(0, n, 10)), n, 8, requested)
        assert used == requested and indices == uniform_indices(n, 8)
    with pytest.raises(ValueError):
        choose_indices([0], n, 8, "nearest")


def _picks(times: list[float], targets: list[float]) -> list[int]:
    """pick_nearest_in_stream over positions 0..n-1, as a list of picked positions in target order."""
    picked = list(pick_nearest_in_stream(((t, i) for i, t in enumerate(times)), targets))
    assert [j for j, _ in picked] == list(range(len(targets)))
    return [i for _, i in picked]


def test_pick_nearest_in_stream_takes_the_nearer_neighbour_ties_to_earlier() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert _picks(times, [0.4, 1.6, 4.9]) == [0, 2, 5]
    assert _picks(times, [0.4, 1.6, 3.5, 4.9]) == [0, 2, 3, 5]        # 3.5 is a tie: earlier frame
    assert _picks(times, [-1.0, 9.0]) == [0, 5]                       # outside the stream: its ends


def test_pick_nearest_in_stream_never_gives_one_frame_to_two_targets_while_frames_remain() -> None:
    # Sparse frames, dense targets: every target nearest to frame 0 or 10, but later frames exist.
    times = [0.0, 10.0, 20.0, 30.0, 40.0]
    assert _picks(times, [1.0, 2.0, 3.0, 9.0]) == [0, 1, 2, 3]        # distinct and increasing
    # Fewer frames than targets: the last frame repeats, never an earlier one.
    assert _picks([0.0, 1.0], [0.0, 0.5, 0.9, 1.0]) == [0, 1, 1, 1]
    assert list(pick_nearest_in_stream(iter([]), [1.0])) == []


def test_pick_nearest_in_stream_stops_reading_after_the_last_target() -> None:
    consumed: list[float] = []

    def stream():
        for t in range(100):
            consumed.append(float(t))
            yield float(t), t

    picked = [i for _, i in pick_nearest_in_stream(stream(), [2.2, 10.7])]
    assert picked == [2, 11]
    assert consumed[-1] == 11.0                # the first frame past the last target ends the pass


def test_container_signatures() -> None:
    assert looks_like_video_container(b"\x00\x00\x00\x20ftypisom" + b"\x00" * 20)
    assert looks_like_video_container(b"\x1a\x45\xdf\xa3" + b"\x00" * 20)
    assert not looks_like_video_container(b"hello world, not a video")


# --------------------------------------------------------------------------- decoding real files

def test_vertical_clip_facts_frames_and_audio(clips) -> None:
    decoded = decode_video(clips["vertical"], frames=8, size=112)
    facts = decoded.facts
    assert decoded.frames.shape == (8, 112, 112, 3) and decoded.frames.dtype == np.uint8
    assert (facts.width, facts.height, facts.rotation_deg) == (320, 576, 0)
    assert facts.aspect == pytest.approx(320 / 576)
    assert facts.fps == pytest.approx(30.0)
    assert facts.frame_count == 60 and facts.keyframe_count == 2
    assert facts.duration_s == pytest.approx(2.0, abs=0.05)
    assert facts.has_audio and facts.bytes == len(clips["vertical"])
    assert set(facts.as_dict()) >= {"duration_s", "fps", "width", "height", "rotation_deg", "aspect",
                                    "has_audio", "frame_count", "bytes", "keyframe_count"}
    # Audio: mono float32 at 16 kHz, about duration * 16000 samples (AAC adds a little padding).
    assert decoded.audio is not None and decoded.audio.dtype == np.float32 and decoded.audio.ndim == 1
    assert len(decoded.audio) == pytest.approx(2.0 * AUDIO_SAMPLE_RATE, rel=0.03)
    assert decoded.audio_error is None


def test_exact_sampling_returns_uniform_frames_from_the_right_times(clips) -> None:
    decoded = decode_video(clips["still_ramp"], frames=6, sampling="exact", size=32)
    expected = uniform_indices(60, 6)
    assert decoded.sampling_used == "exact"
    assert decoded.frame_indices.tolist() == expected
    np.testing.assert_allclose(decoded.frame_times_s, np.array(expected) / 30.0, atol=1e-3)
    # Brightness encodes the time: each frame's mean grey level matches the ramp at its time.
    brightness = decoded.frames.reshape(6, -1).mean(axis=1)
    ramp = [media.frame_brightness_at(t, 2.0) for t in decoded.frame_times_s]
    assert np.all(np.diff(brightness) > 0)
    np.testing.assert_allclose(brightness, ramp, atol=20)


def test_keyframe_sampling_returns_distinct_keyframes_spread_over_the_clip(clips) -> None:
    decoded = decode_video(clips["short_gop"], frames=8, size=32)   # keyframe every 5 frames
    indices = decoded.frame_indices
    assert decoded.sampling_used == "keyframe"
    assert np.all(indices % 5 == 0)                    # only keyframes were decoded
    assert np.all(np.diff(indices) > 0)                # distinct and increasing
    assert indices[0] < 60 // 4 and indices[-1] > 3 * 60 // 4   # spans the clip
    flat = decoded.frames.reshape(8, -1).astype(np.int16)
    assert all(np.abs(flat[i] - flat[i + 1]).mean() > 1 for i in range(7))   # different pictures


def test_keyframe_sampling_falls_back_to_reference_on_sparse_keyframes(clips) -> None:
    decoded = decode_video(clips["vertical"], frames=8, size=32)     # 2 keyframes for K=8
    assert decoded.sampling_used == "reference"
    indices = decoded.frame_indices
    assert np.all(np.diff(indices) > 0)                              # distinct, increasing
    # Each pick is a decoded reference frame within a few frames of its uniform target.
    assert np.abs(indices - np.array(uniform_indices(60, 8))).max() <= 3


def test_reference_sampling_frames_match_the_same_frames_decoded_exactly(clips) -> None:
    data = clips["still_ramp"]
    reference = decode_video(data, frames=6, sampling="reference", size=32, audio_seconds=0)
    assert reference.sampling_used == "reference"
    assert np.all(np.diff(reference.frame_indices) > 0)
    np.testing.assert_allclose(reference.frame_times_s, reference.frame_indices / 30.0, atol=1e-3)
    # The same indices through decord's frame-accurate path: same pictures (PyAV's bilinear scaling
    # matches decord's resize to well under one grey level), same facts.
    exact = decode_video(data, frames=6, sampling="exact", size=32, audio_seconds=0)
    assert reference.facts == exact.facts
    brightness = reference.frames.reshape(6, -1).mean(axis=1)
    ramp = [media.frame_brightness_at(t, 2.0) for t in reference.frame_times_s]
    np.testing.assert_allclose(brightness, ramp, atol=20)
    assert np.all(np.diff(brightness) > 0)


def test_reference_sampling_falls_back_to_exact_when_too_few_reference_frames(clips) -> None:
    # 5 frames, K=16: the reference pass must give min(ceil(16/2), 5) = 5 distinct frames; if the
    # encoder made any of the 5 a B frame it cannot, and exact sampling (every frame) runs instead.
    decoded = decode_video(clips["tiny"], frames=16, sampling="reference", size=32, audio_seconds=0)
    assert decoded.sampling_used in ("reference", "exact")
    assert set(decoded.frame_indices.tolist()) == set(range(5))


def test_fewer_frames_than_k_repeats_indices(clips) -> None:
    decoded = decode_video(clips["tiny"], frames=16, size=32)
    assert decoded.frames.shape == (16, 32, 32, 3)
    assert decoded.facts.frame_count == 5
    assert np.all(np.diff(decoded.frame_indices) >= 0)
    assert set(decoded.frame_indices.tolist()) == set(range(5))


@pytest.mark.parametrize("sampling", ["keyframe", "reference", "exact"])
@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rotation_is_reported_and_applied(clips, rotation: int, sampling: str) -> None:
    data = clips[f"rot{rotation}"]
    assert mp4_display_rotation(data) == rotation
    decoded = decode_video(data, frames=2, size=64, sampling=sampling)
    assert decoded.sampling_used == sampling      # 9 frames, 1 keyframe: 1 distinct suffices for K=2
    facts = decoded.facts
    assert (facts.width, facts.height, facts.rotation_deg) == (160, 96, rotation)
    assert facts.aspect == pytest.approx(96 / 160 if rotation in (90, 270) else 160 / 96)
    # The white marker is top-left in the coded picture; a counter-clockwise display rotation moves
    # it: 90 -> bottom-left, 180 -> bottom-right, 270 -> top-right. decord applies it itself; the
    # reference path (PyAV) rotates the RGB array.
    frame = decoded.frames[0].astype(np.float32).mean(axis=2)
    corners = {"tl": frame[:4, :4], "bl": frame[-4:, :4], "br": frame[-4:, -4:], "tr": frame[:4, -4:]}
    expected = {0: "tl", 90: "bl", 180: "br", 270: "tr"}[rotation]
    assert max(corners, key=lambda c: corners[c].mean()) == expected


def test_no_audio_stream_is_not_an_error(clips) -> None:
    decoded = decode_video(clips["no_audio"], frames=4, size=32)
    assert decoded.audio is None and decoded.audio_error is None
    assert decoded.facts.has_audio is False


def test_stereo_48k_audio_is_downmixed_and_resampled_exactly(clips) -> None:
    decoded = decode_video(clips["stereo48k"], frames=2, size=32)
    audio = decoded.audio
    assert audio is not None and np.isfinite(audio).all()
    assert len(audio) == pytest.approx(1.5 * AUDIO_SAMPLE_RATE, rel=0.03)
    # A 0.3-amplitude 440 Hz sine in both channels. FFmpeg's default stereo->mono downmix is
    # (L + R) * 0.707 (-3 dB pan law), so the peak is 0.3 * sqrt(2); scrambled samples (what
    # mono=False gives) would be neither this level nor this pitch.
    middle = audio[4000:20000]
    assert np.abs(middle).max() == pytest.approx(0.3 * np.sqrt(2), abs=0.04)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.fft.rfftfreq(len(middle), 1 / AUDIO_SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=3)


def test_audio_is_capped_at_audio_seconds(clips) -> None:
    decoded = decode_video(clips["vertical"], frames=2, size=32, audio_seconds=0.5)
    assert len(decoded.audio) == int(0.5 * AUDIO_SAMPLE_RATE)


def test_zero_audio_seconds_skips_audio_but_keeps_the_fact(clips) -> None:
    decoded = decode_video(clips["vertical"], frames=2, size=32, audio_seconds=0)
    assert decoded.audio is None and decoded.audio_error is None and decoded.facts.has_audio


def test_variable_frame_rate_clip_decodes_with_increasing_times(clips) -> None:
    decoded = decode_video(clips["vfr"], frames=6, size=32)
    facts = decoded.facts
    assert decoded.frames.shape == (6, 32, 32, 3)
    assert facts.fps != pytest.approx(30.0, abs=0.5)      # irregular timestamps change the average
    assert np.all(np.diff(decoded.frame_times_s) > 0)
    assert 0 <= decoded.frame_times_s[0] and decoded.frame_times_s[-1] < facts.duration_s


@pytest.mark.parametrize("name, reason", [
    ("empty", "empty_file"),
    ("text", "not_a_video"),
    ("audio_only", "not_a_video"),
    ("truncated", "corrupt"),             # index (moov) lost: header unreadable, but an MP4 signature
    ("truncated_faststart", "corrupt"),   # index present, media data cut: decord fails to open
    ("corrupt", "corrupt"),               # garbage in the middle of mdat: fails while decoding frames
])
def test_broken_inputs_fail_with_a_reason(clips, name: str, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_video(clips[name], frames=8, sampling="exact", size=32)
    assert caught.value.reason == reason


@pytest.mark.parametrize("limits, reason", [
    (DecodeLimits(max_bytes=1000), "max_bytes"),
    (DecodeLimits(max_pixels=320 * 576 - 1), "max_pixels"),
    (DecodeLimits(max_duration_s=1.0), "max_duration"),
    (DecodeLimits(max_decode_s=0.0), "decode_timeout"),
])
def test_limits_trigger_with_their_reason(clips, limits: DecodeLimits, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_video(clips["vertical"], frames=4, size=32, limits=limits)
    assert caught.value.reason == reason
    assert reason in str(caught.value)


def test_limits_at_the_boundary_pass(clips) -> None:
    data = clips["vertical"]
    decoded = decode_video(data, frames=2, size=32, limits=DecodeLimits(
        max_bytes=len(data), max_pixels=320 * 576, max_duration_s=2.1))
    assert decoded.frames.shape[0] == 2


def test_decode_error_pickles_with_its_reason() -> None:
    error = pickle.loads(pickle.dumps(DecodeError("max_pixels", "too big")))
    assert error.reason == "max_pixels" and "too big" in str(error)
    with pytest.raises(ValueError):
        DecodeError("no_such_reason", "x")


def test_bad_arguments_raise_value_error(clips) -> None:
    with pytest.raises(ValueError):
        decode_video(clips["no_audio"], frames=0)
    with pytest.raises(ValueError):
        decode_video(clips["no_audio"], sampling="random")


# --------------------------------------------------------------------------- real clips

# Small, varied real clips: no audio, 0.5 s, many keyframes, 1080x1920 vertical, WebM/VP9+Opus.
_REAL_CLIP_NAMES = ("clip_004.mp4", "clip_005.mp4", "clip_026.mp4", "clip_032.mp4", "clip_039.webm")


def _real_clip_bytes() -> list[tuple[str, bytes]]:
    present = [REAL_CLIPS / name for name in _REAL_CLIP_NAMES if (REAL_CLIPS / name).is_file()]
    if not present:
        pytest.skip(f"real clips not found under {REAL_CLIPS}")
    return [(path.name, path.read_bytes()) for path in present]


def test_real_clips_decode_or_fail_with_decode_error_only() -> None:
    manifest = {}
    if (REAL_CLIPS / "MANIFEST.csv").is_file():
        with open(REAL_CLIPS / "MANIFEST.csv", newline="") as handle:
            manifest = {row["file"]: row for row in csv.DictReader(handle)}
    outcomes = {}
    for name, data in _real_clip_bytes():
        # The clip itself, its first half and a copy with a damaged middle: each must decode or fail
        # with a DecodeError, never another exception type.
        damaged = bytearray(data)
        middle = len(damaged) // 2
        damaged[middle:middle + 4096] = bytes(4096)
        for variant, payload in (("whole", data), ("half", data[: len(data) // 2]), ("damaged", bytes(damaged))):
            try:
                decoded = decode_video(payload, frames=4, size=64)
            except DecodeError as error:
                outcomes[(name, variant)] = error.reason
                continue
            outcomes[(name, variant)] = "ok"
            assert decoded.frames.shape == (4, 64, 64, 3)
            if variant == "whole" and name in manifest:
                row = manifest[name]
                assert (decoded.facts.width, decoded.facts.height) == (int(row["width"]), int(row["height"]))
                assert decoded.facts.has_audio == (row["audio_codec"] != "no audio")
                listed = row["video_duration_s"] or row["duration_s"]
                assert decoded.facts.duration_s == pytest.approx(float(listed), abs=0.1)
                assert (decoded.audio is not None) == decoded.facts.has_audio
    assert all(outcomes[(name, "whole")] == "ok" for name, _ in _real_clip_bytes())
    assert set(outcomes.values()) <= {"ok", *DecodeError.REASONS}


def test_real_clip_reference_sampling_equals_decord_at_the_same_frames() -> None:
    """A real TikTok-style clip (1 keyframe, mostly B frames): the default falls back to the reference
    pass, whose pictures equal decord's frame-accurate decode of the same indices."""
    path = REAL_CLIPS / "clip_004.mp4"
    if not path.is_file():
        pytest.skip(f"real clip not found: {path}")
    data = path.read_bytes()
    decoded = decode_video(data, frames=16, size=64, audio_seconds=0)
    assert decoded.sampling_used == "reference"
    indices = decoded.frame_indices
    assert np.all(np.diff(indices) > 0) and len(indices) == 16
    targets = np.array(uniform_indices(decoded.facts.frame_count, 16))
    assert np.abs(indices - targets).max() <= 3
    reader = decord.VideoReader(io.BytesIO(data), width=64, height=64)
    same = reader.get_batch(indices.tolist()).asnumpy()
    assert np.abs(decoded.frames.astype(np.int16) - same.astype(np.int16)).mean() < 1.0
