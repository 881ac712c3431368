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
    DEFAULT_MAX_MEMORY,
    DecodeError,
    DecodeLimits,
    MemoryBudget,
    choose_indices,
    decode_video,
    estimate_decode_memory,
    looks_like_video_container,
    mp4_display_rotation,
    pick_nearest_in_stream,
    process_memory_budget,
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


# --------------------------------------------------------------------------- memory bounded by design

# The bound a featurize worker must stay under, models and all (issue "Catalog scale", item 4).
WORKER_RSS_BOUND = 2_500_000_000


def test_max_memory_is_a_decode_error_reason_and_a_limit(clips) -> None:
    assert "max_memory" in DecodeError.REASONS
    assert DecodeLimits().max_memory == DEFAULT_MAX_MEMORY
    with pytest.raises(DecodeError) as caught:
        decode_video(clips["vertical"], frames=4, size=32, limits=DecodeLimits(max_memory=10 * 2**20))
    assert caught.value.reason == "max_memory"
    assert "estimated peak" in caught.value.message and "pictures" in caught.value.message


def test_a_path_decodes_exactly_like_the_bytes(clips, tmp_path) -> None:
    for name in ("vertical", "stereo48k", "rot90", "vfr"):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(clips[name])
        from_bytes = decode_video(clips[name], frames=6, size=48)
        from_path = decode_video(path, frames=6, size=48)
        np.testing.assert_array_equal(from_path.frames, from_bytes.frames)
        np.testing.assert_array_equal(from_path.frame_indices, from_bytes.frame_indices)
        assert from_path.facts == from_bytes.facts and from_path.sampling_used == from_bytes.sampling_used
        if from_bytes.audio is None:
            assert from_path.audio is None
        else:
            np.testing.assert_array_equal(from_path.audio, from_bytes.audio)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty_file"):
        decode_video(empty)


@pytest.mark.parametrize("name", ["vertical", "stereo48k"])
@pytest.mark.parametrize("seconds", [0.5, 30.0])
def test_cut_audio_equals_the_start_of_a_whole_track_decode(clips, name: str, seconds: float) -> None:
    # Only the first audio_seconds are cut out and decoded; the samples are those decord gives when it
    # decodes the whole track (what popcast did before), bit for bit.
    whole = decord.AudioReader(io.BytesIO(clips[name]), sample_rate=AUDIO_SAMPLE_RATE, mono=True)
    expected = np.asarray(whole._array, dtype=np.float32).reshape(-1)[: int(seconds * AUDIO_SAMPLE_RATE)]
    decoded = decode_video(clips[name], frames=2, size=32, audio_seconds=seconds)
    np.testing.assert_array_equal(decoded.audio, expected)


def test_estimate_grows_with_pixels_and_bytes_in_memory_not_with_a_path(clips, tmp_path) -> None:
    small = estimate_decode_memory(clips["no_audio"], frames=4, size=32, num_threads=1)   # 128x96
    large = estimate_decode_memory(clips["vertical"], frames=4, size=32, num_threads=1)   # 320x576
    assert large.pictures > small.pictures > 0
    assert small.file == 4 * len(clips["no_audio"])       # bytes are copied by decord
    path = tmp_path / "vertical.mp4"
    path.write_bytes(clips["vertical"])
    from_path = estimate_decode_memory(path, frames=4, size=32, num_threads=1)
    assert from_path.file == 0 and from_path.total < large.total
    assert from_path.audio > 0 and estimate_decode_memory(path, frames=4, size=32, audio_seconds=0).audio == 0


def test_decoder_threads_are_reduced_to_fit_before_refusing(clips) -> None:
    data = clips["vertical"]
    wide_open = estimate_decode_memory(data, frames=4, size=32, num_threads=16)
    assert wide_open.threads == 16 and wide_open.num_threads == 16
    one = estimate_decode_memory(data, frames=4, size=32, num_threads=1)
    # A limit between the one-thread and the 16-thread estimates: fewer threads, same frames.
    limits = DecodeLimits(max_memory=(one.total + wide_open.total) // 2)
    fitted = estimate_decode_memory(data, frames=4, size=32, num_threads=16, limits=limits)
    assert 1 <= fitted.threads < 16 and fitted.num_threads == fitted.threads and fitted.total <= limits.max_memory
    reduced = decode_video(data, frames=4, size=32, num_threads=16, limits=limits)
    np.testing.assert_array_equal(reduced.frames, decode_video(data, frames=4, size=32, num_threads=1).frames)
    with pytest.raises(DecodeError, match="max_memory"):
        estimate_decode_memory(data, frames=4, size=32, num_threads=16, limits=DecodeLimits(max_memory=one.total - 1))


def test_memory_budget_waits_first_come_first_served_and_never_for_itself() -> None:
    import threading

    budget = MemoryBudget(100)
    order: list[str] = []
    with budget.reserve(70):
        def take(name: str, n: int) -> None:
            with budget.reserve(n):
                order.append(name)

        big = threading.Thread(target=take, args=("big", 60))
        big.start()
        while not budget._queue:                       # big is waiting in line
            threading.Event().wait(0.01)
        small = threading.Thread(target=take, args=("small", 30))   # would fit now, but big came first
        small.start()
        threading.Event().wait(0.1)
        assert order == [] and budget.reserved == 70
    big.join(5)
    small.join(5)
    assert sorted(order) == ["big", "small"] and budget.reserved == 0
    with budget.reserve(10**12) as granted:            # capped at the capacity: no deadlock
        assert granted == 100
    assert process_memory_budget(123) is process_memory_budget(123)
    with pytest.raises(ValueError):
        MemoryBudget(0)


# Adversarial media, each decoded in a fresh process whose peak RSS (ru_maxrss) is measured. Peak RSS
# before this change / after, on a 2-core machine (the interpreter and imports are ~62 MiB of it):
#   hour-long 16x16 1 fps clip with an hour of 48 kHz stereo AAC (limits raised): 1061 MiB, 12 s / 106 MiB, 1 s
#   2 s clip with an hour of 48 kHz stereo AAC (limits raised):                 1057 MiB, 15 s / 105 MiB, 1.4 s
#   8K 7680x4320, 2 frames, max_pixels raised: 304 MiB decoded / refused "max_memory" at the default budget
#   a 400 MB file (tiny clip + padding): 1693 MiB / 86 MiB as a path; as bytes "max_memory" before decoding

@pytest.fixture(scope="module")
def adversarial(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adversarial")
    return {
        "hour": media.write_long_clip(root / "hour.mp4", seconds=3600.0),
        "hour_of_audio": media.write_long_clip(root / "hour_of_audio.mp4", seconds=2.0, width=64, height=64,
                                               fps=30, gop=30, audio_seconds=3600.0),
        "8k": media.write_still_clip(root / "8k.mp4", width=7680, height=4320, frames=2),
        "padded": media.write_padded(root / "padded.mp4", pad_bytes=200 * 2**20, width=64, height=64,
                                     seconds=1.0),
    }


def _bounded(result: dict) -> None:
    """The decode stayed under the worker bound and, when it ran, under its own estimate."""
    assert result["peak_rss"] < WORKER_RSS_BOUND, result
    if result["outcome"] == "ok":
        assert result["peak_rss"] - result["baseline_rss"] <= result["estimate"], result


@pytest.mark.parametrize("name, video_seconds", [("hour", 3600.0), ("hour_of_audio", 2.0)])
def test_an_hour_of_video_or_audio_is_refused_by_default_and_bounded_when_allowed(adversarial, name: str,
                                                                                  video_seconds: float) -> None:
    refused = media.measure_decode(adversarial[name])          # the container lasts an hour either way
    assert refused["outcome"] == "max_duration"
    _bounded(refused)
    allowed = media.measure_decode(adversarial[name], limits={"max_duration_s": 7200.0})
    assert allowed["outcome"] == "ok" and allowed["duration_s"] == pytest.approx(video_seconds, abs=1.0)
    assert allowed["audio_samples"] == 30 * AUDIO_SAMPLE_RATE          # only audio_seconds were decoded
    _bounded(allowed)
    # Before: decord decoded the whole hour of audio (~1 GB at its peak); now ~50 MB over the imports.
    assert allowed["peak_rss"] - allowed["baseline_rss"] < 200 * 2**20, allowed


def test_8k_frames_are_refused_by_pixels_then_memory_and_bounded_when_allowed(adversarial) -> None:
    path = adversarial["8k"]
    by_pixels = media.measure_decode(path)
    assert by_pixels["outcome"] == "max_pixels"
    _bounded(by_pixels)
    # The probe decodes no frame: refusing an 8K file costs nothing like an 8K picture (50 MB each).
    assert by_pixels["peak_rss"] - by_pixels["baseline_rss"] < 40 * 2**20, by_pixels
    by_memory = media.measure_decode(path, limits={"max_pixels": 8192 * 4320})
    assert by_memory["outcome"] == "max_memory" and "7680x4320" in by_memory["message"]
    _bounded(by_memory)
    allowed = media.measure_decode(path, limits={"max_pixels": 8192 * 4320, "max_memory": 2 * 2**30},
                                   num_threads=1)
    assert allowed["outcome"] == "ok" and allowed["frames_shape"] == [16, 224, 224, 3]
    _bounded(allowed)


def test_a_huge_file_costs_nothing_as_a_path_and_is_refused_as_bytes(adversarial) -> None:
    path = adversarial["padded"]
    as_path = media.measure_decode(path)
    assert as_path["outcome"] == "ok" and as_path["audio_samples"] > 0
    _bounded(as_path)
    assert as_path["peak_rss"] - as_path["baseline_rss"] < 100 * 2**20, as_path    # the file is 200 MB
    as_bytes = media.measure_decode(path, as_bytes=True)
    assert as_bytes["outcome"] == "max_memory"       # decord would copy 200 MB ~3 more times
    _bounded(as_bytes)
    assert as_bytes["peak_rss"] - as_bytes["baseline_rss"] < as_bytes["file_bytes"] + 100 * 2**20, as_bytes
