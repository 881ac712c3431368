"""pipelines.transforms on Beam's TestPipeline: ReadAndDecode's outputs and counters, parallel vs serial."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.transforms import ERRORS_TAG, FeaturizeConfig, ReadAndDecode, popcast_counters
from tests.media_helpers import write_clip, write_corrupt, write_empty


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """Five decodable clips of different shapes, two broken files and one missing path."""
    media = tmp_path_factory.mktemp("transforms")
    paths = [write_clip(media / f"clip{i}.mp4", width=96 + 32 * i, height=160, seconds=0.8, gop=6,
                        audio=i % 2 == 0)
             for i in range(5)]
    paths += [write_corrupt(media / "corrupt.mp4"), write_empty(media / "empty.mp4"), media / "missing.mp4"]
    return [{"video_id": p.stem, "video_uri": str(p), "_needs": ("visual", "meta")} for p in paths]


# Filled by _keep_frames inside the in-process runner (same interpreter), keyed by run label.
_COLLECTED: dict[str, dict[str, np.ndarray]] = {}


def _keep_frames(decoded: dict, label: str) -> None:
    _COLLECTED.setdefault(label, {})[decoded["row"]["video_id"]] = decoded["frames"]


def _decode(rows: list[dict], parallelism: int):
    """Run ReadAndDecode; returns (frames by video_id, popcast counters)."""
    config = FeaturizeConfig(frames=4, frame_size=64, decode_parallelism=parallelism)
    pipeline = test_pipeline.TestPipeline(options=PipelineOptions(["--runner", "DirectRunner"]))
    label = f"parallelism {parallelism}"
    _COLLECTED.pop(label, None)
    with pipeline:
        outputs = (pipeline
                   | beam.Create(rows)
                   | beam.ParDo(ReadAndDecode(config)).with_outputs(ERRORS_TAG, "undecoded", main="decoded"))
        ids = outputs.decoded | "DecodedIds" >> beam.Map(lambda d: d["row"]["video_id"])
        assert_that(ids, equal_to([f"clip{i}" for i in range(5)]), label="decoded")
        assert_that(outputs[ERRORS_TAG] | beam.Map(lambda e: (e["video_id"], e["stage"])),
                    equal_to([("corrupt", "decode"), ("empty", "decode"), ("missing", "read")]),
                    label="errors")
        assert_that(outputs.undecoded | beam.Map(lambda r: r["video_id"]),
                    equal_to(["corrupt", "empty", "missing"]), label="undecoded")
        # Collected for the comparison between runs (the in-process runner shares the interpreter).
        outputs.decoded | "Keep" >> beam.Map(_keep_frames, label)
    return _COLLECTED.get(label, {}), popcast_counters(pipeline.result)


@pytest.mark.parametrize("parallelism", [1, 3])
def test_read_and_decode_accounts_for_every_row_and_counts(rows, parallelism) -> None:
    frames, counters = _decode(rows, parallelism)
    assert counters["videos_decoded"] == 5 and counters["videos_failed"] == 3
    assert counters["bytes_read"] > 0
    assert sorted(frames) == [f"clip{i}" for i in range(5)]
    assert all(f.shape == (4, 64, 64, 3) and f.dtype == np.uint8 for f in frames.values())


def test_parallel_decoding_gives_the_same_frames_as_serial(rows) -> None:
    serial, _ = _decode(rows, 1)
    parallel, _ = _decode(rows, 4)
    assert sorted(serial) == sorted(parallel)
    for video_id, stack in serial.items():
        np.testing.assert_array_equal(parallel[video_id], stack)
