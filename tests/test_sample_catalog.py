"""The synthetic sample: real decodable MP4 files that match their catalog, determinism, and a rule
in which every modality carries signal."""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import decord
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from featurizers.core.contracts import CATALOG_SCHEMA, TARGETS
from pipelines.sample_catalog import (
    AGE_RANGE_DAYS,
    GOP_CHOICES,
    LATENTS_SCHEMA,
    PUBLISH_WINDOW_DAYS,
    RESOLUTIONS,
    describe_rule,
    generate_rows,
    generate_sample,
    reference_time,
    render_video,
)

SEED = 3  # among its 6 videos are both videos with and without an audio stream (asserted below)
SCALE = 0.25


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, pa.Table, pa.Table]:
    """Six small videos rendered in worker processes (the default path), plus their latents."""
    root = tmp_path_factory.mktemp("sample")
    catalog = generate_sample(str(root), 6, seed=SEED, size_scale=SCALE, workers=2)
    return root, catalog, pq.read_table(root / "latents.parquet")


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _has_audio_stream(path: str) -> bool:
    try:
        decord.AudioReader(path, mono=True, sample_rate=16000)
    except (RuntimeError, decord.DECORDError) as err:
        if "audio stream" not in str(err):
            raise
        return False
    return True


def test_catalog_conforms_and_points_at_real_files(sample):
    root, catalog, latents = sample
    assert catalog.schema == CATALOG_SCHEMA
    assert pq.read_table(root / "catalog.parquet").equals(catalog)
    assert latents.schema == LATENTS_SCHEMA
    assert latents["video_id"].to_pylist() == catalog["video_id"].to_pylist()
    assert len(set(catalog["video_id"].to_pylist())) == catalog.num_rows == 6
    for uri in catalog["video_uri"].to_pylist():
        assert os.path.isabs(uri) and os.path.isfile(uri) and uri.startswith(str(root / "videos"))
    # No half-written leftovers from the temp-then-rename writes.
    assert sorted(p.name for p in (root / "videos").iterdir()) == sorted(
        f"{v}.mp4" for v in catalog["video_id"].to_pylist())


def test_every_file_decodes_and_matches_catalog_and_latents(sample):
    _, catalog, latents = sample
    audio_flags = []
    for row, latent in zip(catalog.to_pylist(), latents.to_pylist()):
        path = row["video_uri"]
        reader = decord.VideoReader(path)
        height, width, _ = reader[0].shape
        assert (width, height) == (latent["width"], latent["height"])
        assert reader.get_avg_fps() == pytest.approx(latent["fps"])
        assert len(reader) == latent["frames"]
        assert len(reader) / reader.get_avg_fps() == pytest.approx(row["duration_s"])
        # Keyframes exactly every `gop` frames (scene-cut detection is off).
        assert list(reader.get_key_indices()) == list(range(0, latent["frames"], latent["gop"]))
        has_audio = _has_audio_stream(path)
        assert has_audio == latent["has_audio"] == (latent["audio_kind"] != "none")
        assert (row["music_id"] is not None) == has_audio
        if has_audio:
            audio = decord.AudioReader(path, mono=True, sample_rate=16000)
            assert audio.shape[1] / 16000 == pytest.approx(row["duration_s"], abs=0.1)
        audio_flags.append(has_audio)
    assert True in audio_flags and False in audio_flags, "the test sample should cover both cases"


def test_same_seed_gives_same_catalog_and_bytes(sample, tmp_path):
    _, first, first_latents = sample
    # One in-process worker this time: the bytes must not depend on how the work is split.
    second = generate_sample(str(tmp_path / "again"), 6, seed=SEED, size_scale=SCALE, workers=1)
    assert second.drop(["video_uri"]).equals(first.drop(["video_uri"]))
    assert pq.read_table(tmp_path / "again" / "latents.parquet").equals(first_latents)
    for a, b in zip(first["video_uri"].to_pylist(), second["video_uri"].to_pylist()):
        assert a != b and _sha256(a) == _sha256(b)


def test_generate_sample_uses_generate_rows(sample):
    _, catalog, latents = sample
    rows, row_latents = generate_rows(6, SEED, SCALE)
    assert rows["video_uri"].null_count == rows.num_rows
    assert rows.drop(["video_uri"]).equals(catalog.drop(["video_uri"]))
    assert row_latents.equals(latents)


def test_different_seed_gives_different_catalog():
    a, _ = generate_rows(6, 0)
    b, _ = generate_rows(6, 1)
    assert a.schema == b.schema == CATALOG_SCHEMA
    assert set(a["video_id"].to_pylist()).isdisjoint(b["video_id"].to_pylist())
    assert a["views"].to_pylist() != b["views"].to_pylist()
    assert a["title"].to_pylist() != b["title"].to_pylist()


def test_size_scale_changes_only_the_rendered_size():
    full_catalog, full = generate_rows(20, 5)
    small_catalog, small = generate_rows(20, 5, size_scale=0.25)
    assert full_catalog.equals(small_catalog)
    assert all(w < fw for w, fw in zip(small["width"].to_pylist(), full["width"].to_pylist()))
    assert full.drop(["width", "height"]).equals(small.drop(["width", "height"]))


def test_counts_and_times_are_plausible():
    catalog, latents = generate_rows(400, 7)
    views = catalog["views"].to_numpy()
    assert catalog["views"].null_count == 0 and (views >= 0).all()
    for target in TARGETS[1:]:
        column = catalog[target]
        assert column.null_count <= 0.1 * catalog.num_rows  # >= 90% of labels present
        present = ~np.asarray(column.is_null())
        counts = column.fill_null(0).to_numpy()
        assert (counts >= 0).all() and (counts[present] <= views[present]).all()
    assert catalog["likes"].null_count > 0 and catalog["shares"].null_count > 0  # unknown, not zero
    publish = catalog["publish_time"].to_pylist()
    observed = catalog["observed_at"].to_pylist()
    reference = reference_time(7)
    for p, o in zip(publish, observed):
        assert o > p
        assert timedelta(days=AGE_RANGE_DAYS[0]) <= o - p <= timedelta(days=AGE_RANGE_DAYS[1])
        assert reference - timedelta(days=PUBLISH_WINDOW_DAYS + 1) <= p <= reference
    followers = catalog["author_followers"].to_numpy()
    assert (followers >= 0).all() and np.std(np.log1p(followers)) > 1.0  # spread over orders of magnitude
    assert len(catalog["author_id"].unique()) < catalog.num_rows / 2  # creators post repeatedly


def test_formats_vary_like_real_short_videos():
    catalog, latents = generate_rows(400, 11)
    sizes = list(zip(latents["width"].to_pylist(), latents["height"].to_pylist()))
    assert set(sizes) == {(w, h) for w, h, _ in RESOLUTIONS}
    assert max(set(sizes), key=sizes.count) == (720, 1280)  # mostly vertical 720p
    assert set(latents["fps"].to_pylist()) == {24, 25, 30, 50, 60}
    assert set(latents["gop"].to_pylist()) <= set(GOP_CHOICES) and len(set(latents["gop"].to_pylist())) > 3
    duration = catalog["duration_s"].to_numpy()
    assert duration.min() >= 5 and duration.max() <= 60 and np.median(duration) <= 12
    no_audio = 1 - np.mean(latents["has_audio"].to_numpy(zero_copy_only=False))
    assert 0.12 < no_audio < 0.28
    assert {"en", "vi"} <= set(catalog["language"].drop_null().to_pylist())
    assert any("#" in t for t in catalog["title"].to_pylist())
    assert all(h and all(not tag.startswith("#") for tag in h) for h in catalog["hashtags"].to_pylist())


@pytest.mark.parametrize("seed", [0, 1])
def test_every_modality_latent_correlates_with_log_views(seed: int):
    catalog, latents = generate_rows(300, seed)
    log_views = np.log1p(catalog["views"].to_numpy())
    expected_sign = {"vividness": 1, "motion": 1, "loudness": 1, "topic_effect": 1, "log_followers": 1}
    for name, sign in expected_sign.items():
        r, p = stats.pearsonr(latents[name].to_numpy(), log_views)
        assert np.sign(r) == sign and p < 1e-3, (name, r, p)
    r, p = stats.pearsonr(np.log(catalog["duration_s"].to_numpy()), log_views)
    assert r < 0 and p < 1e-2, ("duration", r, p)


def test_each_modality_improves_a_held_out_fit_over_meta_only():
    """A least-squares model on meta latents gains held-out accuracy from each other modality."""
    catalog, latents = generate_rows(400, 21)
    y = np.log1p(catalog["views"].to_numpy())
    meta = np.column_stack([latents["log_followers"].to_numpy(), np.log(catalog["duration_s"].to_numpy()),
                            latents["age_days"].to_numpy()])
    extra = {"visual": ["vividness", "motion"], "audio": ["loudness"], "text": ["topic_effect"]}

    def held_out_mse(x: np.ndarray) -> float:
        x = np.column_stack([np.ones(len(x)), x])
        coef, *_ = np.linalg.lstsq(x[:200], y[:200], rcond=None)
        return float(np.mean((x[200:] @ coef - y[200:]) ** 2))

    baseline = held_out_mse(meta)
    for modality, columns in extra.items():
        with_modality = held_out_mse(np.column_stack([meta] + [latents[c].to_numpy() for c in columns]))
        assert with_modality < 0.92 * baseline, (modality, with_modality, baseline)


def _spec(**overrides) -> dict:
    """A latents row for render_video, small and short."""
    spec = dict(width=96, height=160, fps=25, frames=25, gop=25, render_seed=1, vividness=0.5, motion=0.5,
                hue=0.3, brightness=0.5, saturation=0.5, has_audio=True, audio_kind="beat", loudness=0.8,
                bpm=120.0, sample_rate=44100)
    spec.update(overrides)
    return spec


def _frames(path: Path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.float32)


def test_rendered_pixels_carry_the_visual_latents(tmp_path):
    vivid, dull = tmp_path / "vivid.mp4", tmp_path / "dull.mp4"
    render_video(str(vivid), _spec(brightness=0.85, saturation=0.95))
    render_video(str(dull), _spec(brightness=0.25, saturation=0.1))

    def saturation(frames: np.ndarray) -> float:
        return float(np.mean(frames.max(axis=-1) - frames.min(axis=-1)))
    assert _frames(vivid).mean() > _frames(dull).mean() + 40
    assert saturation(_frames(vivid)) > saturation(_frames(dull)) + 40

    moving, still = tmp_path / "moving.mp4", tmp_path / "still.mp4"
    render_video(str(moving), _spec(motion=0.9))
    render_video(str(still), _spec(motion=0.0))

    def frame_change(frames: np.ndarray) -> float:
        return float(np.mean(np.abs(np.diff(frames, axis=0))))
    assert frame_change(_frames(moving)) > 3 * frame_change(_frames(still)) + 1


def test_rendered_audio_carries_the_loudness_latent(tmp_path):
    rms = {}
    for name, kind, loudness in (("beat", "beat", 0.9), ("quiet", "quiet", 0.1), ("silent", "quiet", 0.0)):
        path = tmp_path / f"{name}.mp4"
        render_video(str(path), _spec(audio_kind=kind, loudness=loudness, frames=50))
        samples = decord.AudioReader(str(path), mono=True, sample_rate=16000)[:].asnumpy()
        rms[name] = float(np.sqrt(np.mean(samples ** 2)))
    assert rms["beat"] > 5 * rms["quiet"] and rms["quiet"] > 5 * rms["silent"] + 1e-4
    assert rms["silent"] < 1e-3
    render_video(str(tmp_path / "none.mp4"), _spec(has_audio=False, audio_kind="none", loudness=0.0))
    assert not _has_audio_stream(str(tmp_path / "none.mp4"))


def test_describe_rule_names_every_modality_and_its_coefficients():
    text = describe_rule()
    for word in ("visual", "audio", "text", "meta", "vividness", "motion", "loudness", "followers", "topic",
                 "Poisson", "null"):
        assert word in text
    assert "2.0 * (vividness - 0.5)" in text and "sale -1.2" in text


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one video"):
        generate_rows(0, 0)
    with pytest.raises(ValueError, match="size_scale"):
        generate_rows(3, 0, size_scale=0)
    with pytest.raises(ValueError, match="local files only"):
        generate_sample("gs://bucket/sample", 2)


def test_media_videos_renders_only_the_first_rows(tmp_path):
    """A mixed catalog (popcast demo): the first rows have MP4 files, the rest are metadata + caption rows;
    everything else is generate_rows' catalog, whatever the number of rendered rows."""
    catalog = generate_sample(str(tmp_path / "mixed"), 5, seed=SEED, size_scale=SCALE, workers=1, media_videos=1)
    rows, latents = generate_rows(5, SEED, SCALE)
    assert catalog.drop(["video_uri"]).equals(rows.drop(["video_uri"]))
    assert pq.read_table(tmp_path / "mixed" / "catalog.parquet").equals(catalog)
    assert pq.read_table(tmp_path / "mixed" / "latents.parquet").equals(latents)
    uris = catalog["video_uri"].to_pylist()
    assert os.path.isfile(uris[0]) and uris[1:] == [None] * 4
    assert [p.name for p in (tmp_path / "mixed" / "videos").iterdir()] == [os.path.basename(uris[0])]
    assert decord.VideoReader(uris[0])[0].shape[:2] == (latents["height"][0].as_py(), latents["width"][0].as_py())

    none = generate_sample(str(tmp_path / "none"), 3, seed=SEED, media_videos=0)
    assert none["video_uri"].null_count == 3 and not list((tmp_path / "none" / "videos").iterdir())
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="media_videos"):
            generate_sample(str(tmp_path / "bad"), 3, seed=SEED, media_videos=bad)
