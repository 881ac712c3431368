"""A synthetic, seeded sample of short videos: real H.264+AAC MP4 files plus a catalog whose counts
follow a documented rule in which every modality (visual, audio, text, meta) carries signal.

Beam-free (pyarrow, numpy, PyAV). `generate_rows` draws catalog rows and per-video latents without
encoding anything; `generate_sample` renders the MP4 files from those latents and writes
catalog.parquet (featurizers.core.contracts.CATALOG_SCHEMA) and latents.parquet (diagnostics, not a catalog).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any, Mapping

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurizers.core.contracts import CATALOG_SCHEMA
from featurizers.core.storage import local_path, scheme_of

__all__ = [
    # entry points
    "generate_rows", "generate_sample", "render_video", "describe_rule", "reference_time", "age_growth",
    "LATENTS_SCHEMA",
    # formats and the rule's constants (describe_rule and the tests read them)
    "RESOLUTIONS", "FPS_CHOICES", "GOP_CHOICES", "DURATION_BANDS", "EXPENSIVE_MAX_DURATION_S", "AUDIO_KINDS",
    "SILENT_SHARE_OF_QUIET", "AUDIO_SAMPLE_RATES", "NULL_RATES", "PUBLISH_WINDOW_DAYS", "AGE_RANGE_DAYS",
    "REFERENCE_BASE", "TOPICS", "TOPIC_NAMES", "TOPIC_ENGAGEMENT", "GENERIC_HASHTAGS", "OPENERS", "CLOSERS",
    "INTERCEPT", "VISUAL_VIVIDNESS_COEF", "VISUAL_MOTION_COEF", "AUDIO_LOUDNESS_COEF", "AUDIO_NO_STREAM_EFFECT",
    "FOLLOWERS_COEF", "FOLLOWERS_LOG_MEAN", "FOLLOWERS_LOG_SD", "DURATION_COEF", "HOUR_COEF", "PEAK_HOUR_UTC",
    "CREATOR_EFFECT_SD", "NOISE_SD", "LIKE_RATE", "COMMENT_RATE", "SHARE_RATE", "LIKE_VIVIDNESS_COEF",
    "RATE_NOISE_SD",
]

# ---------------------------------------------------------------------------------------------
# Formats: what real short videos look like, and how often (weights are probabilities).
# ---------------------------------------------------------------------------------------------
RESOLUTIONS: tuple[tuple[int, int, float], ...] = (  # (width, height, weight)
    (720, 1280, 0.60),   # vertical, the common phone upload
    (1080, 1920, 0.15),  # vertical full HD
    (720, 720, 0.12),    # square
    (1280, 720, 0.13),   # landscape
)
FPS_CHOICES: tuple[tuple[int, float], ...] = ((24, 0.10), (25, 0.15), (30, 0.55), (50, 0.07), (60, 0.13))
GOP_CHOICES: tuple[int, ...] = (12, 24, 30, 48, 60, 90, 120, 150, 250)  # keyframe interval, frames
# Durations (whole seconds, as platforms list them): mostly short, a long tail up to 60 s.
DURATION_BANDS: tuple[tuple[int, int, float], ...] = ((5, 9, 0.65), (10, 20, 0.25), (21, 40, 0.07),
                                                      (41, 60, 0.03))
# Expensive combinations (1080p, or 50/60 fps) are capped so a 40-video sample stays fast.
EXPENSIVE_MAX_DURATION_S = 20
AUDIO_KINDS: tuple[tuple[str, float], ...] = (("beat", 0.50), ("quiet", 0.30), ("none", 0.20))
SILENT_SHARE_OF_QUIET = 1.0 / 3.0  # "quiet" tracks that are digital silence
AUDIO_SAMPLE_RATES: tuple[int, ...] = (44100, 48000)
NULL_RATES: dict[str, float] = {"likes": 0.04, "comments": 0.02, "shares": 0.04, "language": 0.05}
PUBLISH_WINDOW_DAYS = 60
AGE_RANGE_DAYS: tuple[float, float] = (1.0, 30.0)
REFERENCE_BASE = datetime(2025, 6, 1, tzinfo=timezone.utc)  # + (seed % 100) days: no wall clock

# ---------------------------------------------------------------------------------------------
# Caption topics: (effect on log views, English words, Vietnamese words, hashtags).
# ---------------------------------------------------------------------------------------------
TOPICS: dict[str, tuple[float, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "dance": (1.0, ("dance", "choreo", "dance challenge", "new moves"),
              ("nhảy", "vũ đạo", "thử thách nhảy", "nhảy cover"), ("dance", "nhay", "dancechallenge")),
    "comedy": (0.8, ("funny", "prank", "comedy", "so funny lol"),
               ("hài hước", "troll", "cười xỉu", "vui quá"), ("funny", "haihuoc", "comedy")),
    "pets": (0.6, ("cute cat", "puppy", "my pets", "kitten"),
             ("mèo cưng", "cún con", "thú cưng", "dễ thương"), ("cat", "meo", "pets")),
    "food": (0.3, ("street food", "recipe", "yummy", "food review"),
             ("món ngon", "ẩm thực", "phở bò", "bánh mì"), ("food", "amthuc", "anngon")),
    "travel": (0.0, ("travel", "beach", "sunset", "road trip"),
               ("du lịch", "biển Đà Nẵng", "phố cổ Hội An", "phượt"), ("travel", "dulich", "vietnam")),
    "tutorial": (-0.3, ("how to", "tips", "tutorial", "learn this"),
                 ("hướng dẫn", "mẹo hay", "học", "cách làm"), ("tips", "huongdan", "learnontiktok")),
    "news": (-0.7, ("news", "breaking update", "daily report", "headlines"),
             ("tin tức", "thời sự", "cập nhật", "tin nóng"), ("news", "tintuc", "thoisu")),
    "sale": (-1.2, ("sale", "discount code", "shop now", "promo"),
             ("giảm giá", "khuyến mãi", "mua ngay", "săn sale"), ("sale", "giamgia", "shopping")),
}
TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
# Per-topic log-multipliers of the like / comment / share rates (topics engage differently).
TOPIC_ENGAGEMENT: dict[str, tuple[float, float, float]] = {
    "dance": (0.2, -0.2, 0.0), "comedy": (0.1, 0.3, 0.5), "pets": (0.3, 0.0, 0.2),
    "food": (0.0, 0.2, 0.1), "travel": (0.0, 0.0, 0.2), "tutorial": (-0.3, 0.4, 0.6),
    "news": (-0.4, 0.6, 0.4), "sale": (-0.5, -0.3, -0.5),
}
GENERIC_HASHTAGS: tuple[str, ...] = ("fyp", "foryou", "xuhuong", "viral", "trending")
OPENERS = {"en": ("Check this", "Today:", "Trying", "Best", "My first", "POV:"),
           "vi": ("Hôm nay", "Thử", "Cùng mình", "Lần đầu", "Siêu", "Review")}
CLOSERS = {"en": ("", "!", " 😂", " ❤️", " part 2", " wait for it"),
           "vi": ("", "!", " 😂", " ❤️", " phần 2", " xem hết nhé")}

# ---------------------------------------------------------------------------------------------
# The synthetic rule (natural-log scale). describe_rule() renders it from these constants.
# ---------------------------------------------------------------------------------------------
INTERCEPT = 8.0
VISUAL_VIVIDNESS_COEF = 2.0      # x (vividness - 0.5); vividness raises saturation and brightness
VISUAL_MOTION_COEF = 1.8         # x (motion - 0.5); motion = moving shapes + camera pan speed
AUDIO_LOUDNESS_COEF = 1.8        # x (loudness - 0.35); beats are loud, quiet/silent tracks are ~0
AUDIO_NO_STREAM_EFFECT = -0.4    # no audio stream at all
FOLLOWERS_COEF = 0.5             # x (ln followers - FOLLOWERS_LOG_MEAN)
FOLLOWERS_LOG_MEAN, FOLLOWERS_LOG_SD = 9.0, 1.6
DURATION_COEF = -0.7             # x ln(duration_s / 12): shorter is better
HOUR_COEF = 0.45                 # x cos(2 pi (hour_utc - 13) / 24): peak 13:00 UTC (20:00 in Vietnam)
PEAK_HOUR_UTC = 13
CREATOR_EFFECT_SD = 0.3          # hidden per-creator quality, learnable from a creator's history
NOISE_SD = 0.6
LIKE_RATE, COMMENT_RATE, SHARE_RATE = 0.06, 0.004, 0.003
LIKE_VIVIDNESS_COEF = 0.4
RATE_NOISE_SD: tuple[float, float, float] = (0.35, 0.5, 0.5)

LATENTS_SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    # visual
    pa.field("vividness", pa.float64()), pa.field("motion", pa.float64()),
    pa.field("hue", pa.float64()), pa.field("brightness", pa.float64()), pa.field("saturation", pa.float64()),
    # audio
    pa.field("audio_kind", pa.string()), pa.field("has_audio", pa.bool_()),
    pa.field("loudness", pa.float64()), pa.field("bpm", pa.float64()), pa.field("sample_rate", pa.int64()),
    # text
    pa.field("topic", pa.string()), pa.field("topic_effect", pa.float64()),
    # meta
    pa.field("log_followers", pa.float64()), pa.field("hour_utc", pa.int64()), pa.field("age_days", pa.float64()),
    pa.field("creator_effect", pa.float64()),
    # how the file is rendered (actual coded size, after size_scale)
    pa.field("width", pa.int64()), pa.field("height", pa.int64()), pa.field("fps", pa.int64()),
    pa.field("frames", pa.int64()), pa.field("gop", pa.int64()), pa.field("render_seed", pa.int64()),
    # the rule's parts, so diagnostics can see what each modality contributed
    pa.field("effect_visual", pa.float64()), pa.field("effect_audio", pa.float64()),
    pa.field("effect_text", pa.float64()), pa.field("effect_meta", pa.float64()),
    pa.field("noise", pa.float64()), pa.field("log_views_expected", pa.float64()),
])


def reference_time(seed: int) -> datetime:
    """The end of the publish window for a seed: fixed, so the same seed gives the same catalog."""
    return REFERENCE_BASE + timedelta(days=seed % 100)


def _weighted_choice(rng: np.random.Generator, options: tuple, n: int) -> np.ndarray:
    """n indices into `options`, whose last element of each tuple is the weight."""
    weights = np.array([o[-1] for o in options], dtype=np.float64)
    return rng.choice(len(options), size=n, p=weights / weights.sum())


def _scaled_size(width: int, height: int, size_scale: float) -> tuple[int, int]:
    # yuv420p needs even sizes; multiples of 4 keep every decoder's chroma arithmetic exact.
    def scale(v: int) -> int:
        return max(16, int(round(v * size_scale / 4.0)) * 4)
    return scale(width), scale(height)


def age_growth(age_days: np.ndarray) -> np.ndarray:
    """Log of the share of its 30-day views a video has at `age_days`: ln(ln(1+age) / ln(31))."""
    return np.log(np.log1p(age_days) / math.log1p(AGE_RANGE_DAYS[1]))


def generate_rows(n: int, seed: int = 0, size_scale: float = 1.0) -> tuple[pa.Table, pa.Table]:
    """Draw n catalog rows and their latents, without writing any media (pure, deterministic).

    Args:
        n: number of videos (>= 1).
        seed: random seed; the same (n, seed, size_scale) always gives the same tables.
        size_scale: multiplies the rendered width/height recorded in the latents (1.0 = the real
            resolutions); it does not change any count or catalog column.

    Returns:
        (catalog, latents): catalog conforms to CATALOG_SCHEMA with video_uri null; latents has
        LATENTS_SCHEMA, one row per video in the same order.
    """
    if n < 1:
        raise ValueError(f"need at least one video, got n={n}")
    if not size_scale > 0:
        raise ValueError(f"size_scale must be > 0, got {size_scale}")
    rng = np.random.default_rng(seed)
    # Every step below draws from the one generator, so their order is part of the seed's catalog:
    # reordering them (or the draws inside them) changes every sample and the tests pinned to it.
    video_ids = _draw_video_ids(rng, n)
    creators = _draw_creators(rng, n)
    formats = _draw_formats(rng, n, size_scale)
    visual = _draw_visual(rng, n)
    audio = _draw_audio(rng, n)
    captions = _draw_captions(rng, creators.language_of_videos)
    music_ids = _draw_music_ids(rng, audio.kind)
    timing = _draw_timing(rng, n, seed)
    popularity = _draw_popularity(rng, visual, audio, captions, formats, timing, creators)
    render_seed = rng.integers(0, 2**31 - 1, n)
    # Unknown is not zero: a few counts (and languages) are missing.
    language = _with_nulls(rng, captions.language, NULL_RATES["language"])
    likes = _with_nulls(rng, popularity.likes, NULL_RATES["likes"])
    comments = _with_nulls(rng, popularity.comments, NULL_RATES["comments"])
    shares = _with_nulls(rng, popularity.shares, NULL_RATES["shares"])

    catalog = pa.table({
        "video_id": video_ids,
        "publish_time": timing.publish,
        "video_uri": [None] * n,
        "title": captions.titles,
        "hashtags": captions.hashtags,
        "duration_s": formats.duration.astype(np.float64),
        "author_id": [creators.ids[c] for c in creators.of_video],
        "author_followers": np.round(np.exp(popularity.log_followers)).astype(np.int64),
        "music_id": music_ids,
        "language": language,
        "category": pa.nulls(n, pa.string()),
        "observed_at": timing.observed,
        "views": popularity.views,
        "likes": likes,
        "comments": comments,
        "shares": shares,
    }, schema=CATALOG_SCHEMA)
    latents = pa.table({
        "video_id": video_ids,
        "vividness": visual.vividness, "motion": visual.motion, "hue": visual.hue,
        "brightness": visual.brightness, "saturation": visual.saturation,
        "audio_kind": audio.kind.tolist(), "has_audio": audio.has_audio, "loudness": audio.loudness,
        "bpm": audio.bpm, "sample_rate": audio.sample_rate,
        "topic": captions.topic.tolist(), "topic_effect": captions.topic_effect,
        "log_followers": popularity.log_followers, "hour_utc": timing.hour_utc, "age_days": timing.age_days,
        "creator_effect": popularity.creator_effect,
        "width": formats.widths, "height": formats.heights, "fps": formats.fps,
        "frames": formats.duration * formats.fps, "gop": formats.gop, "render_seed": render_seed,
        "effect_visual": popularity.effect_visual, "effect_audio": popularity.effect_audio,
        "effect_text": popularity.effect_text, "effect_meta": popularity.effect_meta,
        "noise": popularity.noise, "log_views_expected": popularity.log_views_expected,
    }, schema=LATENTS_SCHEMA)
    return catalog, latents


# The draws of generate_rows, one per concern. Each takes the shared generator and must keep the
# order of its own draws: that order is what makes a seed's catalog reproducible.

def _draw_video_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Ids that look like platform ids (19 digits), unique within the sample."""
    video_ids: list[str] = []
    seen: set[int] = set()
    while len(video_ids) < n:
        value = int(rng.integers(7_000_000_000_000_000_000, 7_499_999_999_999_999_999))
        if value not in seen:
            seen.add(value)
            video_ids.append(str(value))
    return video_ids


@dataclass(frozen=True)
class _Creators:
    ids: list[str]
    log_followers: np.ndarray   # per creator
    effects: np.ndarray         # hidden per-creator quality
    language: np.ndarray        # per creator: "vi" or "en"
    of_video: np.ndarray        # creator index of each video

    @property
    def language_of_videos(self) -> np.ndarray:
        return self.language[self.of_video]


def _draw_creators(rng: np.random.Generator, n: int) -> _Creators:
    """A few creators post many videos (Zipf-like), so "known creator" history exists."""
    n_creators = max(2, int(round(n / 3)))
    ids = [str(int(rng.integers(6_500_000_000_000_000_000, 6_999_999_999_999_999_999)))
           for _ in range(n_creators)]
    log_followers = rng.normal(FOLLOWERS_LOG_MEAN, FOLLOWERS_LOG_SD, n_creators)
    effects = rng.normal(0.0, CREATOR_EFFECT_SD, n_creators)
    language = np.where(rng.random(n_creators) < 0.6, "vi", "en")
    weights = 1.0 / np.arange(1, n_creators + 1) ** 0.8
    of_video = rng.choice(n_creators, size=n, p=weights / weights.sum())
    return _Creators(ids, log_followers, effects, language, of_video)


@dataclass(frozen=True)
class _Formats:
    fps: np.ndarray
    gop: np.ndarray
    duration: np.ndarray        # whole seconds, int64
    widths: np.ndarray          # rendered (after size_scale)
    heights: np.ndarray


def _draw_formats(rng: np.random.Generator, n: int, size_scale: float) -> _Formats:
    resolution_idx = _weighted_choice(rng, RESOLUTIONS, n)
    fps = np.array([FPS_CHOICES[i][0] for i in _weighted_choice(rng, FPS_CHOICES, n)], dtype=np.int64)
    gop = rng.choice(np.array(GOP_CHOICES, dtype=np.int64), size=n)
    band_idx = _weighted_choice(rng, DURATION_BANDS, n)
    duration = np.array([rng.integers(DURATION_BANDS[b][0], DURATION_BANDS[b][1] + 1) for b in band_idx],
                        dtype=np.int64)
    expensive = (resolution_idx == 1) | (fps >= 50)
    duration = np.where(expensive, np.minimum(duration, EXPENSIVE_MAX_DURATION_S), duration)
    widths, heights = zip(*(_scaled_size(RESOLUTIONS[i][0], RESOLUTIONS[i][1], size_scale)
                            for i in resolution_idx))
    return _Formats(fps, gop, duration, np.array(widths, dtype=np.int64), np.array(heights, dtype=np.int64))


@dataclass(frozen=True)
class _Visual:
    vividness: np.ndarray
    motion: np.ndarray
    hue: np.ndarray
    brightness: np.ndarray
    saturation: np.ndarray


def _draw_visual(rng: np.random.Generator, n: int) -> _Visual:
    """Vividness drives saturation and brightness (with a little independent jitter), so the rule's
    visual effect is visible in the rendered pixels."""
    vividness = rng.uniform(0.0, 1.0, n)
    motion = rng.uniform(0.0, 1.0, n)
    hue = rng.uniform(0.0, 1.0, n)
    brightness = np.clip(0.2 + 0.6 * vividness + rng.normal(0, 0.08, n), 0.1, 0.9)
    saturation = np.clip(0.1 + 0.8 * vividness + rng.normal(0, 0.08, n), 0.0, 1.0)
    return _Visual(vividness, motion, hue, brightness, saturation)


@dataclass(frozen=True)
class _Audio:
    kind: np.ndarray            # AUDIO_KINDS names
    loudness: np.ndarray
    bpm: np.ndarray             # 0 unless a beat
    sample_rate: np.ndarray
    has_audio: np.ndarray


def _draw_audio(rng: np.random.Generator, n: int) -> _Audio:
    kind = np.array([AUDIO_KINDS[i][0] for i in _weighted_choice(rng, AUDIO_KINDS, n)])
    silent = rng.random(n) < SILENT_SHARE_OF_QUIET
    loudness = np.where(kind == "beat", rng.uniform(0.45, 1.0, n),
                        np.where((kind == "quiet") & ~silent, rng.uniform(0.02, 0.15, n), 0.0))
    bpm = np.where(kind == "beat", np.round(rng.uniform(85, 150, n)), 0.0)
    sample_rate = rng.choice(np.array(AUDIO_SAMPLE_RATES, dtype=np.int64), size=n)
    return _Audio(kind, loudness, bpm, sample_rate, kind != "none")


@dataclass(frozen=True)
class _Captions:
    topic: np.ndarray           # TOPIC_NAMES
    topic_effect: np.ndarray
    language: np.ndarray        # "vi" or "en", before nulls
    titles: list[str]
    hashtags: list[list[str]]


def _draw_captions(rng: np.random.Generator, creator_language: np.ndarray) -> _Captions:
    """A topic per video, a language (mostly the creator's), then a caption in that language with
    topic words and hashtags."""
    n = len(creator_language)
    topic_idx = rng.integers(0, len(TOPIC_NAMES), n)
    topic = np.array([TOPIC_NAMES[i] for i in topic_idx])
    topic_effect = np.array([TOPICS[t][0] for t in topic])
    language = np.where(rng.random(n) < 0.9, creator_language,
                        np.where(creator_language == "vi", "en", "vi"))
    titles: list[str] = []
    hashtags: list[list[str]] = []
    for i in range(n):
        title, tags = _draw_caption(rng, str(language[i]), str(topic[i]))
        titles.append(title)
        hashtags.append(tags)
    return _Captions(topic, topic_effect, language, titles, hashtags)


def _draw_caption(rng: np.random.Generator, lang: str, topic: str) -> tuple[str, list[str]]:
    """(title, hashtags) of one video: opener, a topic word, closer, then the hashtags."""
    _, en_words, vi_words, topic_tags = TOPICS[topic]
    words = en_words if lang == "en" else vi_words
    opener = OPENERS[lang][rng.integers(len(OPENERS[lang]))]
    closer = CLOSERS[lang][rng.integers(len(CLOSERS[lang]))]
    tags = list(rng.choice(topic_tags, size=int(rng.integers(1, 3)), replace=False))
    tags += list(rng.choice(GENERIC_HASHTAGS, size=int(rng.integers(0, 3)), replace=False))
    tags = [str(t) for t in dict.fromkeys(tags)]
    title = f"{opener} {words[rng.integers(len(words))]}{closer} " + " ".join(f"#{t}" for t in tags)
    return title, tags


def _draw_music_ids(rng: np.random.Generator, audio_kind: np.ndarray) -> list[str | None]:
    """Beats use a shared pool of tracks (so music ids repeat, as on the platform); quiet tracks are
    each video's "original sound"; a video without an audio stream has no music id."""
    n = len(audio_kind)
    music_pool = [str(int(rng.integers(6_800_000_000_000_000_000, 6_899_999_999_999_999_999)))
                  for _ in range(max(3, n // 6))]
    music_ids: list[str | None] = []
    for i in range(n):
        if audio_kind[i] == "beat":
            music_ids.append(music_pool[int(rng.integers(len(music_pool)))])
        elif audio_kind[i] == "quiet":
            music_ids.append(str(int(rng.integers(6_900_000_000_000_000_000, 6_999_999_999_999_999_999))))
        else:
            music_ids.append(None)
    return music_ids


@dataclass(frozen=True)
class _Timing:
    hour_utc: np.ndarray
    age_days: np.ndarray
    publish: list[datetime]
    observed: list[datetime]


def _draw_timing(rng: np.random.Generator, n: int, seed: int) -> _Timing:
    """Publish over the window ending at the seed's reference date (not the wall clock, so a seed
    always gives the same catalog), most posts in the evening (Vietnam time); counts observed
    AGE_RANGE_DAYS later."""
    reference = reference_time(seed)
    day_offset = rng.integers(0, PUBLISH_WINDOW_DAYS, n)
    hour_utc = np.where(rng.random(n) < 0.6, np.round(rng.normal(PEAK_HOUR_UTC, 2.5, n)) % 24,
                        rng.integers(0, 24, n)).astype(np.int64)
    second_of_hour = rng.integers(0, 3600, n)
    reference_midnight = reference.replace(hour=0, minute=0, second=0, microsecond=0)
    publish = [reference_midnight - timedelta(days=int(day_offset[i]) + 1, hours=-int(hour_utc[i]),
                                              seconds=-int(second_of_hour[i])) for i in range(n)]
    age_days = rng.uniform(AGE_RANGE_DAYS[0], AGE_RANGE_DAYS[1], n)
    observed = [publish[i] + timedelta(days=float(age_days[i])) for i in range(n)]
    return _Timing(hour_utc, age_days, publish, observed)


@dataclass(frozen=True)
class _Popularity:
    """The rule's parts (kept for latents.parquet diagnostics) and the counts drawn from them."""
    log_followers: np.ndarray
    creator_effect: np.ndarray
    effect_visual: np.ndarray
    effect_audio: np.ndarray
    effect_text: np.ndarray
    effect_meta: np.ndarray
    noise: np.ndarray
    log_views_expected: np.ndarray
    views: np.ndarray
    likes: np.ndarray
    comments: np.ndarray
    shares: np.ndarray


def _draw_popularity(rng: np.random.Generator, visual: _Visual, audio: _Audio, captions: _Captions,
                     formats: _Formats, timing: _Timing, creators: _Creators) -> _Popularity:
    """The documented rule (describe_rule): expected log views per modality, then noisy counts."""
    n = len(visual.vividness)
    log_followers = creators.log_followers[creators.of_video]
    effect_visual = VISUAL_VIVIDNESS_COEF * (visual.vividness - 0.5) + VISUAL_MOTION_COEF * (visual.motion - 0.5)
    effect_audio = (AUDIO_LOUDNESS_COEF * (audio.loudness - 0.35)
                    + np.where(audio.has_audio, 0.0, AUDIO_NO_STREAM_EFFECT))
    effect_text = captions.topic_effect
    effect_meta = (FOLLOWERS_COEF * (log_followers - FOLLOWERS_LOG_MEAN)
                   + DURATION_COEF * np.log(formats.duration / 12.0)
                   + HOUR_COEF * np.cos(2 * np.pi * (timing.hour_utc - PEAK_HOUR_UTC) / 24.0)
                   + age_growth(timing.age_days))
    creator_effect = creators.effects[creators.of_video]
    noise = rng.normal(0.0, NOISE_SD, n)
    log_views_expected = INTERCEPT + effect_visual + effect_audio + effect_text + effect_meta + creator_effect
    views = rng.poisson(np.exp(log_views_expected + noise)).astype(np.int64)
    likes, comments, shares = _draw_engagement(rng, views, visual.vividness, captions.topic)
    return _Popularity(log_followers, creator_effect, effect_visual, effect_audio, effect_text, effect_meta,
                       noise, log_views_expected, views, likes, comments, shares)


def _draw_engagement(rng: np.random.Generator, views: np.ndarray, vividness: np.ndarray,
                     topic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(likes, comments, shares): per-topic rates with noise, each capped at views."""
    n = len(views)
    engagement = np.array([TOPIC_ENGAGEMENT[t] for t in topic])  # (n, 3)
    like_rate = np.exp(math.log(LIKE_RATE) + LIKE_VIVIDNESS_COEF * (vividness - 0.5) + engagement[:, 0]
                       + rng.normal(0, RATE_NOISE_SD[0], n))
    comment_rate = np.exp(math.log(COMMENT_RATE) + engagement[:, 1] + rng.normal(0, RATE_NOISE_SD[1], n))
    share_rate = np.exp(math.log(SHARE_RATE) + engagement[:, 2] + rng.normal(0, RATE_NOISE_SD[2], n))
    likes = np.minimum(rng.poisson(views * np.minimum(like_rate, 1.0)), views)
    comments = np.minimum(rng.poisson(views * np.minimum(comment_rate, 1.0)), views)
    shares = np.minimum(rng.poisson(views * np.minimum(share_rate, 1.0)), views)
    return likes, comments, shares


def _with_nulls(rng: np.random.Generator, values: np.ndarray, rate: float) -> list:
    """values as Python scalars, a `rate` share of them None (unknown, which is not zero)."""
    n = len(values)
    missing = rng.random(n) < rate
    return [None if missing[i] else values[i].item() for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Rendering: cheap numpy scenes written straight into YUV 4:2:0 planes (no RGB conversion).
# ---------------------------------------------------------------------------------------------
def _chroma(hue: float, saturation: float) -> tuple[float, float]:
    """(U, V) for a hue (0..1) at a saturation (0..1): a point on the chroma circle around 128."""
    radius = 110.0 * saturation
    angle = 2.0 * math.pi * hue
    return 128.0 + radius * math.cos(angle), 128.0 + radius * math.sin(angle)


def _triangle(position, span):
    """Bounce a coordinate moving without bound inside [0, span] (a triangle wave); span 0 pins it at 0."""
    span = np.maximum(np.asarray(span, dtype=np.float64), 1e-9)
    period = 2.0 * span
    p = np.mod(position, period)
    return np.where(p > span, period - p, p)


def render_video(path: str, spec: Mapping[str, Any]) -> None:
    """Encode one MP4 (libx264 yuv420p + AAC, or no audio stream) from a latents row.

    The scene is a textured colour field (hue, saturation, brightness from the latents) panned
    sideways, with 1-4 high-contrast rectangles moving across it; `motion` sets pan and shape speed
    and the number of shapes. The audio is a kick-and-tone beat at `bpm` (amplitude from
    `loudness`), faint noise, or digital silence. Everything is a function of `spec`, and x264 runs
    single-threaded, so the bytes are the same on every machine and run.
    """
    width, height, fps = int(spec["width"]), int(spec["height"]), int(spec["fps"])
    frames, gop = int(spec["frames"]), int(spec["gop"])
    rng = np.random.default_rng(int(spec["render_seed"]))
    motion, hue = float(spec["motion"]), float(spec["hue"])
    # Background, shapes, then audio draw from one generator: that order is part of the file's bytes.
    background = _draw_background(rng, width, height, motion, hue, float(spec["brightness"]),
                                  float(spec["saturation"]))
    shapes = _draw_shapes(rng, width, height, motion, hue)

    container = av.open(path, mode="w", format="mp4")
    try:
        video = _add_video_stream(container, width, height, fps, gop)
        audio = _InterleavedAudio(container, spec, frames / fps, rng) if bool(spec["has_audio"]) else None
        # One frame object, drawn into in place: x264 copies each picture during encode() (threads=1,
        # no lookahead thread), so reusing the buffer is safe and avoids a 1-2 ms copy per frame.
        frame = av.VideoFrame(width, height, "yuv420p")
        planes = _writable_planes(frame, width, height)
        for index in range(frames):
            t = index / fps
            background.paint(*planes, t)
            shapes.paint(*planes, t)
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
            if audio is not None:
                audio.write_until(container, (index + 1) / fps, last=index == frames - 1)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            audio.flush(container)
    finally:
        container.close()


@dataclass(frozen=True)
class _PannedBackground:
    """A textured colour field wider than the frame, so panning is a slice, not a recomputation."""
    canvas_y: np.ndarray
    canvas_u: np.ndarray
    canvas_v: np.ndarray
    width: int          # of the frame
    pan_span: int       # extra canvas width, even
    pan_speed: float    # pixels per second

    def paint(self, plane_y: np.ndarray, plane_u: np.ndarray, plane_v: np.ndarray, t: float) -> None:
        width = self.width
        offset = int(_triangle(self.pan_speed * t, self.pan_span)) // 2 * 2
        plane_y[:] = self.canvas_y[:, offset:offset + width]
        plane_u[:] = self.canvas_u[:, offset // 2:offset // 2 + width // 2]
        plane_v[:] = self.canvas_v[:, offset // 2:offset // 2 + width // 2]


def _draw_background(rng: np.random.Generator, width: int, height: int, motion: float, hue: float,
                     brightness: float, saturation: float) -> _PannedBackground:
    pan_span = (int(motion * 0.5 * width) // 2) * 2
    canvas_w = width + pan_span
    x = np.arange(canvas_w, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)[:, None]
    period = max(8.0, width / rng.uniform(2.0, 6.0))
    luma = (255.0 * brightness + 28.0 * np.sin(2 * np.pi * (x / period + y / (1.7 * period)))
            + 30.0 * (y / height - 0.5))
    canvas_y = np.clip(luma, 16, 235).astype(np.uint8)
    u0, v0 = _chroma(hue, saturation)
    u1, v1 = _chroma(hue + 0.08, saturation)  # a slight hue drift across the canvas
    ramp = (np.arange(canvas_w // 2, dtype=np.float32) / max(1, canvas_w // 2 - 1))[None, :]
    canvas_u = np.repeat((u0 + (u1 - u0) * ramp).astype(np.uint8), height // 2, axis=0)
    canvas_v = np.repeat((v0 + (v1 - v0) * ramp).astype(np.uint8), height // 2, axis=0)
    return _PannedBackground(canvas_y, canvas_u, canvas_v, width, pan_span,
                             pan_speed=motion * width * 0.25)


@dataclass(frozen=True)
class _MovingShapes:
    """Rectangles bouncing inside the frame; even positions and sizes keep them aligned with the
    half-resolution chroma planes."""
    frame_width: int
    frame_height: int
    widths: np.ndarray
    heights: np.ndarray
    start_x: np.ndarray
    start_y: np.ndarray
    speed: np.ndarray           # (n, 2) pixels per second
    luma: np.ndarray
    chroma: list[tuple[float, float]]

    def paint(self, plane_y: np.ndarray, plane_u: np.ndarray, plane_v: np.ndarray, t: float) -> None:
        shape_w, shape_h = self.widths, self.heights
        xs = _triangle(self.start_x + self.speed[:, 0] * t, self.frame_width - shape_w)
        ys = _triangle(self.start_y + self.speed[:, 1] * t, self.frame_height - shape_h)
        for s in range(len(shape_w)):
            x0, y0 = int(xs[s]) // 2 * 2, int(ys[s]) // 2 * 2
            plane_y[y0:y0 + shape_h[s], x0:x0 + shape_w[s]] = self.luma[s]
            cx, cy, cw, ch = x0 // 2, y0 // 2, shape_w[s] // 2, shape_h[s] // 2
            plane_u[cy:cy + ch, cx:cx + cw] = int(self.chroma[s][0])
            plane_v[cy:cy + ch, cx:cx + cw] = int(self.chroma[s][1])


def _draw_shapes(rng: np.random.Generator, width: int, height: int, motion: float, hue: float) -> _MovingShapes:
    n_shapes = 1 + int(round(3 * motion))
    shape_w = (rng.uniform(0.12, 0.3, n_shapes) * width).astype(int) // 2 * 2 + 2
    shape_h = (rng.uniform(0.08, 0.2, n_shapes) * height).astype(int) // 2 * 2 + 2
    start_x, start_y = rng.uniform(0, width, n_shapes), rng.uniform(0, height, n_shapes)
    # Speed in pixels per second, so the look of motion does not depend on fps.
    speed = motion * width * rng.uniform(0.2, 0.6, (n_shapes, 2)) * rng.choice([-1, 1], (n_shapes, 2))
    shape_luma = np.where(np.arange(n_shapes) % 2 == 0, 230, 25).astype(np.uint8)
    shape_chroma = [_chroma(hue + 0.5 + rng.uniform(-0.1, 0.1), 0.9) for _ in range(n_shapes)]
    return _MovingShapes(width, height, shape_w, shape_h, start_x, start_y, speed, shape_luma, shape_chroma)


def _add_video_stream(container, width: int, height: int, fps: int, gop: int):
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.codec_context.time_base = Fraction(1, fps)
    # threads=1 makes the bitstream independent of the machine's core count (parallelism comes
    # from encoding several videos at once); scenecut=0 keeps keyframes exactly every `gop`.
    video.options = {"preset": "ultrafast", "crf": "30", "threads": "1",
                     "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:threads=1"}
    return video


def _writable_planes(frame, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, U, V) numpy views onto a yuv420p frame's buffers, padding (line_size) cut off."""
    return tuple(
        np.frombuffer(plane, dtype=np.uint8).reshape(rows, plane.line_size)[:, :cols]
        for plane, rows, cols in zip(frame.planes, (height, height // 2, height // 2),
                                     (width, width // 2, width // 2)))


class _InterleavedAudio:
    """A mono AAC stream written in step with the video frames, so the file is laid out like a
    real upload (audio and video interleaved, not one after the other)."""
    CHUNK = 1024  # the AAC frame size

    def __init__(self, container, spec: Mapping[str, Any], seconds: float, rng: np.random.Generator):
        self.sample_rate = int(spec["sample_rate"])
        self.stream = container.add_stream("aac", rate=self.sample_rate, layout="mono")
        self.stream.bit_rate = 64000
        self.stream.options = {"aac_coder": "fast"}  # the default coder costs ~1.5x the time
        self.samples = _audio_signal(spec, seconds, rng)
        self.written = 0

    def write_until(self, container, end_s: float, last: bool) -> None:
        """Encode whole AAC frames up to end_s; on the last video frame, the remainder too."""
        until = min(len(self.samples), int(round(end_s * self.sample_rate)))
        while self.written + self.CHUNK <= until or (last and self.written < until):
            chunk = self.samples[self.written:self.written + self.CHUNK]
            _encode_audio(container, self.stream, chunk, self.written, self.sample_rate)
            self.written += len(chunk)

    def flush(self, container) -> None:
        for packet in self.stream.encode(None):
            container.mux(packet)


def _encode_audio(container, stream, samples: np.ndarray, pts: int, sample_rate: int) -> None:
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    for packet in stream.encode(frame):
        container.mux(packet)


def _audio_signal(spec: Mapping[str, Any], seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 samples for a latents row: a beat (kick + tone bursts), faint noise, or silence."""
    sample_rate = int(spec["sample_rate"])
    n = int(round(seconds * sample_rate))
    loudness = float(spec["loudness"])
    if spec["audio_kind"] != "beat":
        # Quiet room tone whose level follows `loudness` (0 = digital silence).
        return (rng.standard_normal(n) * loudness * 0.3).astype(np.float32)
    beat_s = 60.0 / float(spec["bpm"])
    signal = np.zeros(n, dtype=np.float32)
    kick_n = int(0.12 * sample_rate)
    kick_t = np.arange(kick_n) / sample_rate
    # A falling-pitch kick and a short tone on every beat, a softer tone on the off-beat.
    kick = np.sin(2 * np.pi * (55.0 * kick_t + 60.0 * (1 - np.exp(-kick_t * 30)) / 30)) * np.exp(-kick_t * 25)
    tone_freq = float(rng.choice([330.0, 440.0, 523.25, 659.25]))
    tone = np.sin(2 * np.pi * tone_freq * kick_t) * np.exp(-kick_t * 40)
    amplitude = 0.1 + 0.8 * loudness
    for k in range(int(seconds / beat_s) + 1):
        for start_s, burst, gain in ((k * beat_s, kick + 0.5 * tone, 1.0), ((k + 0.5) * beat_s, tone, 0.4)):
            start = int(start_s * sample_rate)
            if start >= n:
                continue
            stop = min(n, start + kick_n)
            signal[start:stop] += (amplitude * gain * burst[:stop - start]).astype(np.float32)
    return np.clip(signal, -1.0, 1.0)


def _render_to(path: str, spec: Mapping[str, Any]) -> str:
    """Render to a temporary name and rename, so an interrupted run never leaves a half file."""
    partial = f"{path}.partial.mp4"
    render_video(partial, spec)
    os.replace(partial, path)
    return path


def _render_cost(spec: Mapping[str, Any]) -> float:
    return float(spec["frames"]) * float(spec["width"]) * float(spec["height"])


def _render_in_subprocesses(jobs: list[tuple[str, dict]], workers: int) -> None:
    """Encode the jobs in `workers` fresh Python processes, each given a balanced share.

    Plain subprocesses rather than multiprocessing: fork is unsafe once the caller holds threads
    (pyarrow, torch), and spawn re-runs an unguarded calling script. x264 itself holds the GIL
    most of the time, so threads would not run encoders in parallel.
    """
    shares: list[list[tuple[str, dict]]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for job in sorted(jobs, key=lambda j: -_render_cost(j[1])):  # longest first onto the lightest
        lightest = loads.index(min(loads))
        shares[lightest].append(job)
        loads[lightest] += _render_cost(job[1])
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
    code = "from pipelines.sample_catalog import _render_jobs_from_stdin; _render_jobs_from_stdin()"
    processes = []
    for share in shares:
        if not share:
            continue
        process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        processes.append((process, json.dumps(share).encode()))
    for process, payload in processes:
        process.stdin.write(payload)
        process.stdin.close()
    last = time.time()
    while any(process.poll() is None for process, _ in processes):
        time.sleep(0.5)
        if time.time() - last >= PROGRESS_EVERY_S:
            _log_render_progress(sum(os.path.exists(path) for path, _ in jobs), len(jobs))
            last = time.time()
    failures = [process.stderr.read().decode(errors="replace")[-2000:]
                for process, _ in processes if process.returncode != 0]
    if failures:
        raise RuntimeError("rendering sample videos failed in a worker process:\n" + "\n".join(failures))


PROGRESS_EVERY_S = 5.0


def _log_render_progress(done: int, total: int) -> None:
    logging.getLogger("popcast").info("sample: %d/%d videos rendered", done, total)


def _render_jobs_from_stdin() -> None:
    """Worker entry point: render the [(path, spec), ...] list read as JSON from stdin."""
    for path, spec in json.loads(sys.stdin.buffer.read()):
        _render_to(path, spec)


def generate_sample(output_dir: str, videos: int, seed: int = 0, size_scale: float = 1.0,
                    workers: int | None = None, media_videos: int | None = None) -> pa.Table:
    """Write `videos` real MP4 files, catalog.parquet and latents.parquet under output_dir.

    Args:
        output_dir: local directory (or file:// URI); created if missing. Files go to
            output_dir/videos/<video_id>.mp4.
        videos: number of videos.
        seed: random seed; the same seed gives the same catalog (up to video_uri) and the same bytes.
        size_scale: shrink (or grow) the coded resolution, e.g. 0.25 in tests; 1.0 writes the real
            resolutions (720x1280, 1080x1920, 720x720, 1280x720).
        workers: encoder processes (default: one per CPU core, at most one per video).
        media_videos: render MP4 files for only the first `media_videos` rows (default: every row);
            the others are metadata + caption rows with a null video_uri, as in a catalog where some
            media is missing. The rows' order is unrelated to their publish times, so the rows with
            media are spread over the whole window (train and test alike). Counts, captions and
            latents are those of generate_rows(videos, seed) whatever this is.

    Returns:
        The catalog (CATALOG_SCHEMA) with video_uri = absolute path of each file (null for a row
        without media).
    """
    if scheme_of(output_dir) not in ("", "file"):
        raise ValueError(f"generate_sample writes local files only; got {output_dir!r}")
    media_videos = videos if media_videos is None else media_videos
    if not 0 <= media_videos <= videos:
        raise ValueError(f"media_videos must be in [0, videos={videos}], got {media_videos}")
    root = os.path.abspath(local_path(output_dir))
    video_dir = os.path.join(root, "videos")
    os.makedirs(video_dir, exist_ok=True)

    catalog, latents = generate_rows(videos, seed, size_scale)
    specs = latents.to_pylist()
    paths: list[str | None] = [os.path.join(video_dir, f"{spec['video_id']}.mp4") for spec in specs]
    paths[media_videos:] = [None] * (videos - media_videos)
    jobs = [(path, spec) for path, spec in zip(paths, specs) if path is not None]
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        last = time.time()
        for done, (path, spec) in enumerate(jobs, start=1):
            _render_to(path, spec)
            if time.time() - last >= PROGRESS_EVERY_S:
                _log_render_progress(done, len(jobs))
                last = time.time()
    elif jobs:
        _render_in_subprocesses(jobs, workers)

    catalog = catalog.set_column(catalog.schema.get_field_index("video_uri"),
                                 CATALOG_SCHEMA.field("video_uri"), pa.array(paths, pa.string()))
    pq.write_table(latents, os.path.join(root, "latents.parquet"))
    # The catalog is written last: its presence means every file it names exists.
    pq.write_table(catalog, os.path.join(root, "catalog.parquet"))
    return catalog


def describe_rule() -> str:
    """Markdown description of the synthetic rule behind the sample's counts (for the README)."""
    topics = ", ".join(f"{name} {effect:+.1f}" for name, (effect, *_rest) in TOPICS.items())
    return "\n".join([
        "### How the sample's counts are made",
        "",
        "`popcast sample` draws every video from seeded latent variables, renders its MP4 from them, and",
        "draws its counts from this rule (natural log; every modality carries signal, plus noise):",
        "",
        "```",
        f"ln(expected views) = {INTERCEPT}",
        f"  + visual: {VISUAL_VIVIDNESS_COEF} * (vividness - 0.5) + {VISUAL_MOTION_COEF} * (motion - 0.5)",
        f"  + audio:  {AUDIO_LOUDNESS_COEF} * (loudness - 0.35) + ({AUDIO_NO_STREAM_EFFECT} if no audio stream)",
        "  + text:   topic effect (below)",
        f"  + meta:   {FOLLOWERS_COEF} * (ln followers - {FOLLOWERS_LOG_MEAN}) + ({DURATION_COEF}) * ln(duration_s / 12)",
        f"            + {HOUR_COEF} * cos(2 pi (publish hour UTC - {PEAK_HOUR_UTC}) / 24)"
        f" + ln(ln(1 + age_days) / ln({1 + AGE_RANGE_DAYS[1]:g}))",
        f"  + creator quality ~ N(0, {CREATOR_EFFECT_SD}) (hidden, shared by a creator's videos)",
        f"views ~ Poisson(exp(ln(expected views) + N(0, {NOISE_SD})))",
        f"likes ~ Poisson(views * {LIKE_RATE} * exp({LIKE_VIVIDNESS_COEF} * (vividness - 0.5)"
        f" + topic like bump + N(0, {RATE_NOISE_SD[0]})))",
        f"comments ~ Poisson(views * {COMMENT_RATE} * exp(topic comment bump + N(0, {RATE_NOISE_SD[1]})))",
        f"shares ~ Poisson(views * {SHARE_RATE} * exp(topic share bump + N(0, {RATE_NOISE_SD[2]})))",
        "(likes, comments and shares are capped at views)",
        "```",
        "",
        "- **visual**: `vividness` ~ U(0, 1) raises the colour field's saturation and brightness; `motion`"
        " ~ U(0, 1) sets the camera pan speed and the number and speed of moving rectangles.",
        "- **audio**: half the videos carry a loud beat (kick + tone bursts at 85-150 bpm, `loudness`"
        " 0.45-1), 30% a quiet track (faint noise, a third of them digital silence, `loudness` <= 0.15),"
        " 20% no audio stream at all.",
        f"- **text**: the caption (English or Vietnamese) names one topic: {topics}.",
        f"- **meta**: followers are log-normal (ln mean {FOLLOWERS_LOG_MEAN}, sd {FOLLOWERS_LOG_SD}) per creator;"
        " durations 5-60 s (mostly under 10 s); posts peak in the Vietnamese evening; counts are observed"
        f" {AGE_RANGE_DAYS[0]:g}-{AGE_RANGE_DAYS[1]:g} days after publishing.",
        f"- A few counts are missing (null, not zero): likes {NULL_RATES['likes']:.0%},"
        f" comments {NULL_RATES['comments']:.0%}, shares {NULL_RATES['shares']:.0%}.",
        "",
        "The latent variables and each modality's contribution are written to `latents.parquet` beside the"
        " catalog (diagnostics only; models must not read it).",
    ])
