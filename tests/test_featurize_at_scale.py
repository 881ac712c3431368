"""Featurize's bar on a realistic batch (slow: `make test-slow`): 40 sample videos at their real
resolutions, 3 corrupt files and 2 rows without media."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA
from featurizers.core.feature_table import read_feature_table
from pipelines.featurize import run as featurize
from pipelines.sample_catalog import generate_sample
from tests.media_helpers import write_corrupt, write_text, write_truncated

pytestmark = pytest.mark.slow
DIRECT = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory"]


def test_forty_videos_three_corrupt_two_without_media(tmp_path):
    sample = generate_sample(str(tmp_path / "sample"), 40, seed=11)
    broken = [write_corrupt(tmp_path / "corrupt.mp4"), write_truncated(tmp_path / "truncated.mp4"),
              write_text(tmp_path / "not_a_video.mp4")]
    t0 = datetime(2025, 6, 1, tzinfo=timezone.utc)
    extra = [dict(video_id=f"broken-{i}", publish_time=t0, video_uri=str(p), title="broken")
             for i, p in enumerate(broken)]
    extra += [dict(video_id=f"no-media-{i}", publish_time=t0, video_uri=None, title="chỉ có chữ")
              for i in range(2)]
    catalog = pa.concat_tables([sample, pa.Table.from_pylist(extra, schema=CATALOG_SCHEMA)])
    pq.write_table(catalog, tmp_path / "catalog.parquet")
    out = str(tmp_path / "features")

    first = featurize(["--catalog", str(tmp_path / "catalog.parquet"), "--output", out, *DIRECT])

    videos = set(sample.column("video_id").to_pylist())
    everyone = videos | {r["video_id"] for r in extra}
    assert first.rows_in == 45 and first.rows_unaccounted == 0
    for modality in ("visual", "audio"):
        assert set(read_feature_table(out, modality).video_ids) == videos
    for modality in ("text", "meta"):
        assert set(read_feature_table(out, modality).video_ids) == everyone
    errors = pq.read_table(tmp_path / "features" / "_errors").to_pylist()
    assert sorted(e["video_id"] for e in errors) == ["broken-0", "broken-1", "broken-2"]
    assert all(e["error_class"] and e["message"] for e in errors)

    second = featurize(["--catalog", str(tmp_path / "catalog.parquet"), "--output", out, *DIRECT])
    assert second.skipped_already_featurized == 42  # 40 videos + 2 rows without media; broken ones retried
    for modality in ("visual", "audio", "text", "meta"):
        ids = read_feature_table(out, modality).video_ids.tolist()
        assert len(ids) == len(set(ids)) == (40 if modality in ("visual", "audio") else 45)
