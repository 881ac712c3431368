"""Metadata features known when a video is scored (creator, duration, posting time, caption size,
decode facts), per row and vectorised over an Arrow catalog. Never reads label columns.
"""
from __future__ import annotations

import math
import re
import zlib
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurizers.core.contracts import LABEL_COLUMNS, FeatureSpec
from featurizers.text import caption_length

__all__ = [
    "meta_features", "meta_features_table", "facts_table", "language_bucket", "age_days",
    "META_SPEC", "META_NAME", "META_VERSION", "META_SCALARS", "META_FEATURE_NAMES", "META_INPUT_COLUMNS",
    "FACT_KEYS", "LANGUAGE_BUCKETS", "CATEGORY_BUCKETS", "category_bucket",
]

META_NAME, META_VERSION = "meta", "2"   # 2: category_bucket
LANGUAGE_BUCKETS = 32  # bucket 0 = language missing or "un"/"und"; codes hash into 1..31
_UNKNOWN_LANGUAGES = frozenset({"", "un", "und", "unknown", "xx", "zz"})
# Platform categories hash into 1..2^30 (0 = none): wide enough that two real categories practically never
# share an id; the model keeps the most frequent ones of its training rows (model.data.MAX_CATEGORY_VOCAB).
CATEGORY_BUCKETS = 1 << 30

# The only catalog columns this module reads: everything here exists before the video is scored.
META_INPUT_COLUMNS: tuple[str, ...] = ("video_id", "publish_time", "video_uri", "title", "hashtags",
                                       "duration_s", "author_followers", "music_id", "language", "category")
assert not set(META_INPUT_COLUMNS) & set(LABEL_COLUMNS), "meta features must not read labels"

# Decode facts (from the media decoder) this module reads.
FACT_KEYS: tuple[str, ...] = ("duration_s", "fps", "width", "height", "rotation_deg", "aspect",
                              "has_audio", "frame_count", "bytes")

META_SCALARS: tuple[tuple[str, pa.DataType], ...] = (
    ("log_followers", pa.float32()),       # log1p(author_followers); 0 when unknown
    ("followers_known", pa.int32()),
    ("log_duration", pa.float32()),        # log1p(seconds): catalog duration_s, else decoded
    ("duration_known", pa.int32()),
    ("duration_from_decode", pa.int32()),  # 1 when the catalog had no usable duration
    # Hour and weekday stay numbers for the model: as embedded categories popcast's bilibili nowcasts did not
    # move, cold start was no better, and only the tree peers got worse (README "Nowcasting").
    ("publish_hour", pa.int32()),          # 0..23 UTC
    ("publish_weekday", pa.int32()),       # 0 = Monday .. 6 = Sunday, UTC
    ("caption_chars", pa.int32()),         # title characters, combining marks not counted
    ("hashtag_count", pa.int32()),         # hashtag list length, else '#word' count in the title
    ("has_music", pa.int32()),
    ("language_bucket", pa.int32()),       # 0 unknown, else 1 + crc32(code) % 31 (categorical)
    ("category_bucket", pa.int32()),       # 0 none, else 1 + crc32(category) % 2^30 (categorical)
    ("has_media", pa.int32()),
    ("facts_known", pa.int32()),           # decode facts were available for this video
    ("log_bytes", pa.float32()),           # log1p(file size); 0 when unknown
    ("fps", pa.float32()),                 # 0 when unknown
    ("aspect", pa.float32()),              # displayed width / height; 0 when unknown
    ("is_vertical", pa.int32()),
    ("has_audio", pa.int32()),
)
META_FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in META_SCALARS)
META_SPEC = FeatureSpec(modality="meta", name=META_NAME, version=META_VERSION, shapes={},
                        scalars=META_SCALARS,
                        config={"language_buckets": LANGUAGE_BUCKETS, "category_buckets": CATEGORY_BUCKETS,
                                "categorical": ["language_bucket", "category_bucket"], "hash": "crc32",
                                "timezone": "UTC", "inputs": list(META_INPUT_COLUMNS),
                                "facts": list(FACT_KEYS)})

_HASHTAG_IN_TITLE = re.compile(r"#\w+")
# The same patterns for Arrow's RE2, whose \w is ASCII-only. Arrow's utf8_normalize is not used:
# in pyarrow 25.0.1 every form returns NFD, so lengths are made normalisation-free instead.
_HASHTAG_IN_TITLE_RE2 = r"#[\p{L}\p{N}_]+"
_COMBINING_MARK_RE2 = r"\p{M}"


# ---------------------------------------------------------------------------------------------
# Small shared definitions
# ---------------------------------------------------------------------------------------------

def language_bucket(code: str | None) -> int:
    """Small categorical id of a language code: 'vi', 'VI', 'vi-VN', 'vi_VN' -> same bucket;
    missing/unknown -> 0. crc32 keeps it identical across processes and machines."""
    primary = re.split(r"[-_]", (code or "").strip().lower(), maxsplit=1)[0]
    if primary in _UNKNOWN_LANGUAGES:
        return 0
    return 1 + zlib.crc32(primary.encode("utf-8")) % (LANGUAGE_BUCKETS - 1)


def _as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken as UTC (the catalog contract stores UTC)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _to_datetime64_us(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if not pa.types.is_timestamp(values.type):
            raise TypeError(f"expected a timestamp array, got {values.type}")
        values = values.cast(pa.timestamp("us", tz="UTC")).to_numpy(zero_copy_only=False)
    elif isinstance(values, datetime):
        values = np.datetime64(_as_utc(values).replace(tzinfo=None), "us")
    return np.asarray(values, dtype="datetime64[us]")


def age_days(publish_time: Any, reference_time: Any) -> float | np.ndarray:
    """Age in days of a video published at `publish_time` when observed at `reference_time`.

    Datetimes give a float; numpy datetime64 arrays or Arrow timestamp arrays give a float64
    array (NaN where either is null). Not a meta feature: the model conditions on age separately.
    Negative ages (reference before publication) are returned as they are, for the caller to reject.
    """
    if isinstance(publish_time, datetime) and isinstance(reference_time, datetime):
        return (_as_utc(reference_time) - _as_utc(publish_time)).total_seconds() / 86400.0
    delta = _to_datetime64_us(reference_time) - _to_datetime64_us(publish_time)
    return delta.astype("timedelta64[us]").astype(np.float64) / 86_400e6 * np.where(
        np.isnat(delta), np.nan, 1.0)


# ---------------------------------------------------------------------------------------------
# Per row
# ---------------------------------------------------------------------------------------------

def _finite_positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _f32(value: float) -> float:
    return float(np.float32(value))


def _fact_aspect(facts: Mapping[str, Any]) -> float | None:
    """Displayed width/height: the decoder's `aspect` if given, else from width, height and a
    90/270-degree rotation (phones store portrait video as rotated landscape)."""
    aspect = _finite_positive(facts.get("aspect"))
    if aspect is not None:
        return aspect
    width, height = _finite_positive(facts.get("width")), _finite_positive(facts.get("height"))
    if width is None or height is None:
        return None
    rotation = facts.get("rotation_deg")
    rotation = abs(float(rotation)) if rotation is not None and math.isfinite(float(rotation)) else 0.0
    if round(rotation) % 180 == 90:
        width, height = height, width
    return width / height


def category_bucket(category: str | None) -> int:
    """Categorical id of a platform category (e.g. Bilibili's section): the exact string, trimmed; missing or
    empty -> 0. crc32 keeps it identical across processes and machines."""
    name = (category or "").strip()
    if not name:
        return 0
    return 1 + zlib.crc32(name.encode("utf-8")) % CATEGORY_BUCKETS


def meta_features(row: Mapping[str, Any], facts: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Meta features of one catalog row (a dict with contract columns) and optional decode facts.

    Reads only META_INPUT_COLUMNS of the row and FACT_KEYS of the facts. Missing values become 0
    with a flag; the float32 features are rounded to float32 so they equal the vectorised table.
    """
    followers = row.get("author_followers")
    followers_ok = followers is not None and math.isfinite(float(followers))
    catalog_duration = _finite_positive(row.get("duration_s"))
    decoded_duration = _finite_positive(facts.get("duration_s")) if facts else None
    duration = catalog_duration if catalog_duration is not None else decoded_duration

    publish = row.get("publish_time")
    if publish is None:
        raise ValueError(f"row {row.get('video_id')!r} has no publish_time (a required column)")
    publish = _as_utc(publish)

    title = row.get("title") or ""
    hashtags = row.get("hashtags")
    hashtag_count = len(hashtags) if hashtags is not None else len(_HASHTAG_IN_TITLE.findall(title))

    aspect = _fact_aspect(facts) if facts else None
    fps = _finite_positive(facts.get("fps")) if facts else None
    size = _finite_positive(facts.get("bytes")) if facts else None
    return {
        "log_followers": _f32(math.log1p(max(float(followers), 0.0))) if followers_ok else 0.0,
        "followers_known": int(followers_ok),
        "log_duration": _f32(math.log1p(duration)) if duration is not None else 0.0,
        "duration_known": int(duration is not None),
        "duration_from_decode": int(catalog_duration is None and decoded_duration is not None),
        "publish_hour": publish.hour,
        "publish_weekday": publish.weekday(),
        "caption_chars": caption_length(title),
        "hashtag_count": hashtag_count,
        "has_music": int(bool(row.get("music_id"))),
        "language_bucket": language_bucket(row.get("language")),
        "category_bucket": category_bucket(row.get("category")),
        "has_media": int(bool(row.get("video_uri"))),
        "facts_known": int(facts is not None),
        "log_bytes": _f32(math.log1p(size)) if size is not None else 0.0,
        "fps": _f32(fps) if fps is not None else 0.0,
        "aspect": _f32(aspect) if aspect is not None else 0.0,
        "is_vertical": int(aspect is not None and aspect < 1.0),
        "has_audio": int(bool(facts.get("has_audio"))) if facts else 0,
    }


# ---------------------------------------------------------------------------------------------
# Vectorised over an Arrow catalog
# ---------------------------------------------------------------------------------------------

def _column(table: pa.Table, name: str, dtype: pa.DataType) -> pa.ChunkedArray:
    """A column (chunks kept: combining copies), or all-null when the optional column is absent."""
    if name in table.column_names:
        return table.column(name)
    return pa.chunked_array([pa.nulls(table.num_rows, dtype)])


def _positive_or_nan(array: pa.Array) -> np.ndarray:
    values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
    values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    return values


def _flag(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.int32)


def _log1p_or_zero(values: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), 0.0, np.log1p(np.nan_to_num(values))).astype(np.float32)


def facts_table(facts_by_id: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """Decode facts {video_id: {fact: value}} as an Arrow table (video_id + FACT_KEYS)."""
    ids = list(facts_by_id)
    columns: dict[str, Any] = {"video_id": pa.array(ids, pa.string())}
    for key in FACT_KEYS:
        values = [facts_by_id[i].get(key) for i in ids]
        if key == "has_audio":
            columns[key] = pa.array([None if v is None else bool(v) for v in values], pa.bool_())
        else:
            columns[key] = pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.table(columns)


def meta_features_table(catalog: pa.Table,
                        facts_by_id: Mapping[str, Mapping[str, Any]] | pa.Table | None = None) -> pa.Table:
    """Meta features of every catalog row as a table in META_SPEC.schema(), with column ops only.

    `facts_by_id` maps video_id -> decode facts, or is a table with video_id and FACT_KEYS columns;
    rows without facts get facts_known = 0. Same values as `meta_features` row by row.
    """
    missing = [c for c in ("video_id", "publish_time") if c not in catalog.column_names]
    if missing:
        raise ValueError(f"catalog lacks required columns {missing}")
    n = catalog.num_rows
    video_ids = _column(catalog, "video_id", pa.string()).cast(pa.string())

    followers = pc.cast(_column(catalog, "author_followers", pa.int64()), pa.float64())
    followers = followers.to_numpy(zero_copy_only=False)
    followers_ok = np.isfinite(followers)  # null -> NaN
    catalog_duration = _positive_or_nan(_column(catalog, "duration_s", pa.float64()))
    publish = _publish_times(catalog)
    caption_chars, hashtag_count = _caption_counts(catalog)
    language_buckets = _language_buckets(catalog)

    fact_values = _facts_aligned(video_ids, facts_by_id, n)
    facts_known = fact_values.pop("_known")
    decoded_duration = np.where(facts_known, fact_values["duration_s"], np.nan)
    duration = np.where(np.isnan(catalog_duration), decoded_duration, catalog_duration)
    aspect = fact_values["aspect"]

    columns: dict[str, Any] = {
        "video_id": video_ids,
        "featurizer": pa.array([META_SPEC.featurizer_id] * n, pa.string()),
        "log_followers": np.where(followers_ok, np.log1p(np.maximum(np.nan_to_num(followers), 0.0)),
                                  0.0).astype(np.float32),
        "followers_known": _flag(followers_ok),
        "log_duration": _log1p_or_zero(duration),
        "duration_known": _flag(~np.isnan(duration)),
        "duration_from_decode": _flag(np.isnan(catalog_duration) & ~np.isnan(decoded_duration)),
        "publish_hour": pc.hour(publish),
        "publish_weekday": pc.day_of_week(publish),
        "caption_chars": caption_chars,
        "hashtag_count": hashtag_count.astype(np.int32),
        "has_music": _flag(_non_empty(catalog, "music_id")),
        "language_bucket": language_buckets,
        "category_bucket": _category_buckets(catalog),
        "has_media": _flag(_non_empty(catalog, "video_uri")),
        "facts_known": _flag(facts_known),
        "log_bytes": _log1p_or_zero(fact_values["bytes"]),
        "fps": np.nan_to_num(fact_values["fps"]).astype(np.float32),
        "aspect": np.nan_to_num(aspect).astype(np.float32),
        "is_vertical": _flag(np.nan_to_num(aspect, nan=np.inf) < 1.0),
        "has_audio": _flag(fact_values["has_audio"] > 0),
    }
    return _in_meta_schema(columns)


def _publish_times(catalog: pa.Table) -> pa.ChunkedArray:
    """publish_time as UTC microseconds; a null is an error, as in `meta_features`."""
    publish = _column(catalog, "publish_time", pa.timestamp("us", tz="UTC"))
    if publish.null_count:
        raise ValueError(f"{publish.null_count} catalog rows have no publish_time (a required column)")
    return publish.cast(pa.timestamp("us", tz="UTC"))


def _caption_counts(catalog: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(caption_chars, hashtag_count as float64) per row, as `caption_length` and the row path count them."""
    # One chunk for the regex kernels: Arrow compiles the RE2 pattern again for every chunk.
    title = _column(catalog, "title", pa.string()).combine_chunks().fill_null("")
    caption_chars = (pc.utf8_length(title).to_numpy(zero_copy_only=False)
                     - pc.count_substring_regex(title, _COMBINING_MARK_RE2).to_numpy(zero_copy_only=False))
    hashtags = _column(catalog, "hashtags", pa.list_(pa.string()))
    no_list = pc.is_null(hashtags).to_numpy(zero_copy_only=False)
    hashtag_count = np.nan_to_num(pc.list_value_length(hashtags).to_numpy(zero_copy_only=False)
                                  .astype(np.float64))
    if no_list.any():  # only rows without a hashtag list pay for the regex over the title
        titles_without_list = pc.filter(title, pa.array(no_list))
        hashtag_count[no_list] = pc.count_substring_regex(
            titles_without_list, _HASHTAG_IN_TITLE_RE2).to_numpy(zero_copy_only=False)
    return caption_chars, hashtag_count


def _non_empty(catalog: pa.Table, name: str) -> np.ndarray:
    """True where the string column has a non-empty value (null and "" are both absent)."""
    column = _column(catalog, name, pa.string()).cast(pa.string())
    return pc.fill_null(pc.greater(pc.utf8_length(column), 0), False).to_numpy(zero_copy_only=False)


def _language_buckets(catalog: pa.Table) -> np.ndarray:
    """language_bucket per row, int32."""
    # Few distinct language codes: hash the dictionary, then gather.
    languages = _column(catalog, "language", pa.string()).cast(pa.string()).combine_chunks()
    languages = languages.dictionary_encode()
    bucket_of_code = np.array([language_bucket(code) for code in languages.dictionary.to_pylist()]
                              + [0], dtype=np.int32)
    codes = languages.indices.to_numpy(zero_copy_only=False)
    codes = np.where(pc.is_null(languages.indices).to_numpy(zero_copy_only=False), -1,
                     np.nan_to_num(codes.astype(np.float64), nan=-1)).astype(np.int64)
    return bucket_of_code[codes]  # -1 picks the trailing 0 (null language)


def _category_buckets(catalog: pa.Table) -> np.ndarray:
    """category_bucket per row, int32 (few distinct categories: hash the dictionary, then gather)."""
    categories = _column(catalog, "category", pa.string()).cast(pa.string()).combine_chunks().dictionary_encode()
    bucket_of = np.array([category_bucket(c) for c in categories.dictionary.to_pylist()] + [0], dtype=np.int32)
    codes = pc.fill_null(categories.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return bucket_of[codes]   # -1 picks the trailing 0 (null category)


def _in_meta_schema(columns: Mapping[str, Any]) -> pa.Table:
    """The columns (numpy or Arrow) cast to META_SPEC.schema(), in its order."""
    schema = META_SPEC.schema()
    arrays = [pa.array(columns[field.name], type=field.type)
              if not isinstance(columns[field.name], (pa.Array, pa.ChunkedArray))
              else columns[field.name].cast(field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _facts_aligned(video_ids: pa.Array, facts_by_id: Mapping[str, Mapping[str, Any]] | pa.Table | None,
                   n: int) -> dict[str, np.ndarray]:
    """Decode facts aligned with the catalog rows as float64 arrays (NaN = unknown), plus a
    boolean "_known" (the video has a facts entry) and the displayed aspect ratio."""
    nan = np.full(n, np.nan)
    if facts_by_id is None:
        return {"_known": np.zeros(n, dtype=bool), "duration_s": nan, "fps": nan, "bytes": nan,
                "aspect": nan, "has_audio": np.zeros(n)}
    facts = facts_by_id if isinstance(facts_by_id, pa.Table) else facts_table(facts_by_id)
    position = pc.index_in(video_ids, value_set=facts.column("video_id").combine_chunks().cast(pa.string()))
    known = pc.is_valid(position).to_numpy(zero_copy_only=False)
    gather = np.where(known, np.nan_to_num(position.to_numpy(zero_copy_only=False).astype(np.float64)),
                      0).astype(np.int64)

    def fact(key: str) -> np.ndarray:
        if key not in facts.column_names or facts.num_rows == 0:
            return nan.copy()
        values = pc.cast(facts.column(key), pa.float64()).to_numpy(zero_copy_only=False)[gather]
        return np.where(known, values, np.nan)

    def positive(values: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(values) & (values > 0), values, np.nan)

    width, height, rotation = positive(fact("width")), positive(fact("height")), fact("rotation_deg")
    swap = np.round(np.abs(np.nan_to_num(rotation, nan=0.0, posinf=0.0, neginf=0.0))) % 180 == 90
    computed_aspect = np.where(swap, height / width, width / height)
    given_aspect = positive(fact("aspect"))
    return {
        "_known": known,
        "duration_s": positive(fact("duration_s")),
        "fps": positive(fact("fps")),
        "bytes": positive(fact("bytes")),
        "aspect": np.where(np.isnan(given_aspect), computed_aspect, given_aspect),
        "has_audio": np.nan_to_num(fact("has_audio")),
    }
