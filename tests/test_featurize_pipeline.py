"""The featurize job end to end on real MP4 files, on Beam's in-process and multi-process runners."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA, ERRORS_SCHEMA
from featurizers.core.feature_table import read_feature_table
from pipelines.featurize import run
from tests.media_helpers import write_clip, write_corrupt, write_empty, write_text, write_truncated

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
FAST = ["--frames", "4", "--frame-size", "96", "--runner", "DirectRunner",
        "--direct_running_mode", "in_memory"]


def make_catalog(root: Path) -> tuple[str, dict[str, str]]:
    """3 good clips (one without audio), 3 broken files, 2 rows without media."""
    media = root / "media"
    media.mkdir()
    kinds = {
        "vertical": write_clip(media / "vertical.mp4", width=180, height=320, seconds=1.5, gop=10),
        "silent": write_clip(media / "silent.mp4", width=160, height=160, seconds=1.0, audio=False),
        "landscape": write_clip(media / "landscape.mp4", width=320, height=180, seconds=1.0, fps=25, gop=5),
        "corrupt": write_corrupt(media / "corrupt.mp4"),
        "truncated": write_truncated(media / "truncated.mp4"),
        "empty": write_empty(media / "empty.mp4"),
        "text": write_text(media / "notes.mp4"),
    }
    expected = {"vertical": "ok", "silent": "ok", "landscape": "ok"}
    rows = []
    for i, (name, path) in enumerate(kinds.items()):
        rows.append(dict(video_id=name, publish_time=T0 + timedelta(hours=i), video_uri=str(path),
                         title=f"clip {name} #test", hashtags=["test"], author_id="a"))
    rows.append(dict(video_id="no-media-1", publish_time=T0, video_uri=None, title="khách sạn đẹp", hashtags=[]))
    rows.append(dict(video_id="no-media-2", publish_time=T0, video_uri=None, title=None, hashtags=None))
    path = root / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return str(path), expected


@pytest.fixture(scope="module")
def featurized(tmp_path_factory):
    root = tmp_path_factory.mktemp("featurize")
    catalog, expected = make_catalog(root)
    out = str(root / "features")
    summary = run(["--catalog", catalog, "--output", out, *FAST])
    return catalog, out, summary


def ids(out: str, modality: str) -> list[str]:
    return sorted(read_feature_table(out, modality).video_ids.tolist())


def test_every_row_is_accounted_for(featurized):
    catalog, out, summary = featurized
    assert summary.rows_in == 9 and summary.rows_unaccounted == 0
    assert ids(out, "visual") == ["landscape", "silent", "vertical"]
    assert ids(out, "audio") == ["landscape", "silent", "vertical"]
    all_ids = sorted(pq.read_table(catalog).column("video_id").to_pylist())
    assert ids(out, "text") == all_ids
    assert ids(out, "meta") == all_ids


def test_broken_files_become_dead_letters_with_reasons(featurized):
    _, out, summary = featurized
    errors = pq.read_table(Path(out) / "_errors")
    assert errors.schema.equals(ERRORS_SCHEMA)
    by_id = {r["video_id"]: r for r in errors.to_pylist()}
    assert set(by_id) >= {"truncated", "empty", "text"}
    assert by_id["empty"]["error_class"] == "empty_file"
    assert by_id["text"]["error_class"] == "not_a_video"
    assert all(r["message"] for r in by_id.values())
    assert "silent" not in by_id  # no audio stream is not an error


def test_feature_shapes_and_missing_audio(featurized):
    _, out, _ = featurized
    visual = read_feature_table(out, "visual")
    assert visual.vectors["frames"].shape == (3, 4, 1280)
    audio = read_feature_table(out, "audio")
    has_audio = dict(zip(audio.video_ids, audio.scalars["has_audio"]))
    assert has_audio == {"vertical": 1.0, "silent": 0.0, "landscape": 1.0}


def test_rerun_adds_no_rows_and_force_adds_no_duplicates(featurized):
    catalog, out, _ = featurized
    before = {m: len(ids(out, m)) for m in ("visual", "audio", "text", "meta")}
    again = run(["--catalog", catalog, "--output", out, *FAST])
    assert again.skipped_already_featurized == 5  # the 4 undecodable rows are retried
    assert {m: len(ids(out, m)) for m in before} == before
    forced = run(["--catalog", catalog, "--output", out, "--force", "--modalities", "text,meta", *FAST])
    assert forced.rows_featurized == 9
    for modality in ("text", "meta"):
        got = ids(out, modality)
        assert len(got) == len(set(got)) == before[modality]


def test_multi_processing_runner_gives_the_same_features(featurized, tmp_path):
    catalog, out, _ = featurized
    other = str(tmp_path / "features")
    summary = run(["--catalog", catalog, "--output", other, "--modalities", "visual,text", "--frames", "4",
                   "--frame-size", "96", "--runner", "DirectRunner", "--direct_running_mode", "multi_processing",
                   "--direct_num_workers", "2"])
    assert summary.rows_unaccounted == 0
    for modality, column in (("visual", "frames"), ("text", "embedding")):
        a, b = read_feature_table(out, modality), read_feature_table(other, modality)
        order_a, order_b = a.video_ids.argsort(), b.video_ids.argsort()
        assert (a.video_ids[order_a] == b.video_ids[order_b]).all()
        assert abs(a.vectors[column][order_a] - b.vectors[column][order_b]).max() < 1e-4


def test_gcs_in_and_out_on_the_emulator(gcs_bucket, tmp_path):
    """Catalog, videos and features all on gs:// (a real GCS emulator, Beam's GCS filesystem)."""
    from featurizers.core import storage
    from pipelines.catalog import write_catalog

    clip = write_clip(tmp_path / "v.mp4", width=160, height=288, seconds=1.0)
    storage.write_bytes(f"{gcs_bucket}/media/v.mp4", clip.read_bytes())
    rows = [dict(video_id="gs-video", publish_time=T0, video_uri=f"{gcs_bucket}/media/v.mp4", title="on gcs"),
            dict(video_id="gs-missing", publish_time=T0, video_uri=f"{gcs_bucket}/media/nope.mp4", title="x")]
    write_catalog(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), f"{gcs_bucket}/catalog.parquet")
    out = f"{gcs_bucket}/features"
    summary = run(["--catalog", f"{gcs_bucket}/catalog.parquet", "--output", out, "--modalities", "visual,meta",
                   *FAST])
    assert summary.rows_unaccounted == 0
    assert read_feature_table(out, "visual").video_ids.tolist() == ["gs-video"]
    assert sorted(read_feature_table(out, "meta").video_ids.tolist()) == ["gs-missing", "gs-video"]
    assert summary.errors_by_reason == {"read:FileNotFoundError": 1}
    assert not storage.exists(f"{out}/_staging/{summary.run_id}")
