"""featurizers.visual: packaged EfficientNet-Lite0 weights and tiny transformers models built from configs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from featurizers.core.storage import download_model_dir
from featurizers.visual import (
    EfficientNetLite0Embedder,
    TransformersVisionEmbedder,
    resolve_device,
)


def _frames(n: int, side: int, seed: int) -> np.ndarray:
    """Seeded uint8 [n, side, side, 3] pictures: smooth colour gradients plus noise (not flat)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    base = np.empty((n, side, side, 3), dtype=np.float32)
    for i in range(n):
        colour = rng.uniform(0, 255, size=3)
        base[i] = colour * ramp[None, :, None] + (255 - colour) * ramp[:, None, None]
    noisy = base + rng.normal(0, 20, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- EfficientNet-Lite0

@pytest.fixture(scope="module")
def efficientnet() -> EfficientNetLite0Embedder:
    return EfficientNetLite0Embedder(device="cpu")


@pytest.fixture(scope="module")
def two_frames_embedded(efficientnet) -> tuple[np.ndarray, np.ndarray]:
    """(frames, embeddings) computed once: the CPU forward pass is the slow part of this module."""
    frames = _frames(2, 224, seed=0)
    return frames, efficientnet.embed(frames)


def test_efficientnet_embeds_1280_finite_and_distinguishes_images(two_frames_embedded) -> None:
    _, embeddings = two_frames_embedded
    assert embeddings.shape == (2, 1280) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    # Pooled ReLU6 activations: within [0, 6], and not collapsed to one vector.
    assert embeddings.min() >= 0 and embeddings.max() <= 6
    assert np.abs(embeddings[0] - embeddings[1]).mean() > 1e-2


def test_efficientnet_item_by_item_equals_batched_and_is_deterministic(efficientnet,
                                                                       two_frames_embedded) -> None:
    frames, embeddings = two_frames_embedded
    # RunInference batches arbitrarily: a row must not depend on its batch mates.
    one_by_one = np.concatenate([efficientnet.embed(frames[i:i + 1]) for i in range(2)])
    np.testing.assert_allclose(one_by_one, embeddings, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(efficientnet.embed(frames[:1]), one_by_one[:1])


def test_efficientnet_features_are_the_classifier_input_of_the_packaged_weights(
        efficientnet, two_frames_embedded) -> None:
    # The classifier applied to our pooled features must equal the model's own logits on
    # (x - 127) / 128 input: the features are exactly what the ImageNet head sees.
    frames, embeddings = two_frames_embedded
    pixels = (torch.from_numpy(frames[:1]).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.inference_mode():
        logits = efficientnet.model(pixels)
        head = efficientnet.model._fc(torch.from_numpy(embeddings[:1]))
    np.testing.assert_allclose(head.numpy(), logits.numpy(), atol=1e-3)
    state = torch.load(efficientnet.weights_path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(efficientnet.model._conv_stem.weight.detach(), state["_conv_stem.weight"])


def test_efficientnet_resizes_other_sizes_and_handles_empty_input(efficientnet) -> None:
    assert efficientnet.embed(_frames(1, 96, seed=2)).shape == (1, 1280)
    assert efficientnet.embed(np.zeros((0, 224, 224, 3), dtype=np.uint8)).shape == (0, 1280)
    with pytest.raises(ValueError):
        efficientnet.embed(np.zeros((1, 224, 224, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        efficientnet.embed(np.zeros((224, 224, 3), dtype=np.uint8))


def test_efficientnet_spec(efficientnet) -> None:
    spec = efficientnet.spec(16)
    assert (spec.modality, spec.name, spec.version) == ("visual", "efficientnet_lite0", "1")
    assert spec.shapes == {"frames": (16, 1280)}
    assert spec.scalars == (("n_frames", pa.int32()),)
    schema = spec.schema()
    assert schema.field("frames").type == pa.list_(pa.float32(), 16 * 1280)
    assert json.loads(schema.metadata[b"popcast.config"])["normalization"] == "(x-127)/128"
    # Drivers build the spec without loading the model; it must be the very same spec.
    assert EfficientNetLite0Embedder.spec_without_loading(16) == spec
    # A driver without a GPU can still describe what GPU workers will write.
    on_gpu = EfficientNetLite0Embedder.spec_without_loading(16, device="cuda")
    assert on_gpu.featurizer_id == spec.featurizer_id and on_gpu.config["runtime"] == "torch"


def test_efficientnet_onnxruntime_and_torch_runtimes_agree(efficientnet, two_frames_embedded, tmp_path,
                                                           monkeypatch) -> None:
    # The default CPU runtime is ONNX Runtime (4x faster); the TorchScript path must give the same
    # features, so either can be used on either side of a train/score split.
    assert efficientnet.runtime == "onnxruntime"
    frames, embeddings = two_frames_embedded
    scripted = EfficientNetLite0Embedder(device="cpu", runtime="torch")
    assert scripted.runtime == "torch"
    np.testing.assert_allclose(scripted.embed(frames), embeddings, rtol=1e-4, atol=1e-4)
    # The exported graph is cached by key: a second embedder with the same weights reuses the file.
    monkeypatch.setenv("POPCAST_MODEL_CACHE", str(tmp_path))
    first = EfficientNetLite0Embedder(device="cpu")
    cached = list(tmp_path.glob("onnx-*.onnx"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.partial"))
    mtime = cached[0].stat().st_mtime_ns
    second = EfficientNetLite0Embedder(device="cpu")
    assert cached[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.embed(frames[:1]), second.embed(frames[:1]))
    assert json.loads(first.spec(4).schema().metadata[b"popcast.config"])["runtime"] == "onnxruntime"
    with pytest.raises(ValueError):
        EfficientNetLite0Embedder(device="cpu", runtime="tensorrt")


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")


# --------------------------------------------------------------------------- transformers models

@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=8)
    directory = tmp_path_factory.mktemp("models") / "tiny-vit"
    ViTModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=12)
    directory = tmp_path_factory.mktemp("models") / "tiny-clip"
    CLIPModel(config).save_pretrained(directory)
    # A processor config, as real CLIP directories have: its mean/std must be picked up.
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.4, 0.4], "image_std": [0.3, 0.3, 0.3], "crop_size": {"height": 32, "width": 32}}))
    return directory


def test_vit_directory_pooled_embeddings(tiny_vit_dir) -> None:
    embedder = TransformersVisionEmbedder(str(tiny_vit_dir))
    frames = _frames(5, 64, seed=3)                     # resized to the model's 32x32
    embeddings = embedder.embed(frames)
    assert embedder.dim == 32 and embeddings.shape == (5, 32) and embeddings.dtype == np.float32
    assert np.isfinite(embeddings).all()
    assert np.abs(embeddings[0] - embeddings[1]).mean() > 1e-4
    one_by_one = np.concatenate([embedder.embed(frames[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, embeddings, rtol=1e-4, atol=1e-5)
    # Deterministic across a fresh load of the same directory.
    np.testing.assert_array_equal(TransformersVisionEmbedder(str(tiny_vit_dir)).embed(frames), embeddings)
    # ViT defaults (no processor config): mean/std 0.5, input size from config.image_size.
    spec = embedder.spec(4)
    assert spec.name == "hf_vision:tiny-vit" and spec.shapes == {"frames": (4, 32)}
    assert spec.config["mean"] == [0.5, 0.5, 0.5] and spec.config["input_size"] == 32
    assert len(spec.version) == 10


def test_vit_embedding_is_the_pooler_output(tiny_vit_dir) -> None:
    embedder = TransformersVisionEmbedder(str(tiny_vit_dir))
    frames = _frames(2, 32, seed=4)
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.inference_mode():
        expected = embedder.model(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(embedder.embed(frames), expected, rtol=1e-4, atol=1e-5)


def test_clip_directory_gives_projected_image_embeds(tiny_clip_dir) -> None:
    embedder = TransformersVisionEmbedder(str(tiny_clip_dir), batch_size=2)
    frames = _frames(3, 32, seed=5)
    embeddings = embedder.embed(frames)
    assert embeddings.shape == (3, 12)                  # projection_dim, not the tower's hidden size
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0 - 0.4) / 0.3
    with torch.inference_mode():
        output = embedder.model.get_image_features(pixel_values=pixels)
        expected = output if isinstance(output, torch.Tensor) else output.pooler_output
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert embedder.spec(2).config["mean"] == [0.4, 0.4, 0.4]


def test_version_changes_with_config(tiny_vit_dir, tmp_path) -> None:
    from transformers import ViTConfig, ViTModel

    other = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                      image_size=32, patch_size=8)
    ViTModel(other).save_pretrained(tmp_path / "tiny-vit")
    assert (TransformersVisionEmbedder(str(tmp_path / "tiny-vit")).version
            != TransformersVisionEmbedder(str(tiny_vit_dir)).version)


def test_remote_directory_is_copied_once_into_the_cache(tiny_vit_dir, tmp_path) -> None:
    # file:// goes through the same pyarrow filesystem path as gs:// (storage.filesystem_and_path).
    uri = f"file://{tiny_vit_dir}"
    local = download_model_dir(uri, cache_root=tmp_path)
    assert (local / "config.json").is_file() and (local / ".complete").is_file()
    assert sorted(p.name for p in local.iterdir() if p.name != ".complete") == sorted(
        p.name for p in tiny_vit_dir.iterdir())
    (local / "config.json").write_text("{}")            # reused, not re-downloaded
    assert download_model_dir(uri, cache_root=tmp_path) == local
    assert (local / "config.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        download_model_dir(f"file://{tmp_path / 'missing'}", cache_root=tmp_path / "other")
