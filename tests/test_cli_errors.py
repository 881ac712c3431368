"""Ordinary user mistakes end with one clear line naming what is wrong and a documented exit code, never a
traceback; flags that are neither popcast's nor Beam's are refused; dead letters over the threshold exit 4."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurizers.core.contracts import CATALOG_SCHEMA
from pipelines.job import EXIT_TOO_MANY_ERRORS, EXIT_USAGE
from runners.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    now = datetime(2025, 5, 1, tzinfo=timezone.utc)
    rows = [{"video_id": f"v{i}", "publish_time": now, "title": f"caption {i}", "views": 10 * i,
             "observed_at": now, "video_uri": str(root / f"missing-{i}.mp4") if i % 2 else None}
            for i in range(4)]
    catalog = root / "catalog.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), catalog)
    return {"root": root, "catalog": str(catalog)}


def usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, names", [
    (["featurize", "--output", "{root}/f", "--catalog", "{root}/nope.parquet"], "--catalog"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--modality", "meta"], "did you mean --modalities"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--modalities", "meta,sound"], "sound"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--frames", "0"], "--frames"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--max-bytes", "lots"], "--max-bytes"),
    (["featurize", "--catalog", "{catalog}", "--output", "/proc/popcast-cannot-write", "--modalities", "meta"],
     "--output"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--profile", "sprak"], "--profile"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--runer=DirectRunner"], "did you mean --runner"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--device", "gpu"], "--device"),
    (["score", "--catalog", "{catalog}", "--features", "{root}", "--model", "{root}", "--output", "{root}/s",
      "--horizon-days", "-5"], "--horizon-days"),
    (["score", "--catalog", "{catalog}", "--features", "{root}", "--model", "{root}", "--output", "{root}/s",
      "--date", "2025-13-01"], "--date"),
    (["score", "--catalog", "{catalog}", "--features", "{root}", "--model", "{root}", "--output", "{root}/s",
      "--start", "2025-05-02", "--end", "2025-05-01"], "--end"),
    (["score", "--catalog", "{catalog}", "--features", "{root}", "--model", "{root}/no-model", "--output",
      "{root}/s"], "--model"),
    (["train", "--catalog", "{catalog}", "--features", "{root}", "--output", "{root}/m", "--split-quantile", "1.5"],
     "--split-quantile"),
    (["train", "--catalog", "{catalog}", "--features", "{root}", "--output", "{root}/m", "--young-age-growth",
      "views=0.5"], "--young-age-growth"),
    (["train", "--catalog", "{catalog}", "--features", "{root}/none", "--output", "{root}/m"], "--features"),
    (["featurize", "--catalog", "{catalog}", "--output", "{root}/f", "--max-error-fraction", "2"],
     "--max-error-fraction"),
])
def test_a_usage_mistake_is_one_line_naming_it(files, capsys, argv, names):
    err = usage_error([a.format(**files) for a in argv], capsys)
    assert names in err


def test_an_unknown_command_suggests_the_closest(capsys):
    assert main(["scroe"]) == EXIT_USAGE
    assert "did you mean score" in capsys.readouterr().err


def test_help_says_beam_options_pass_through_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["featurize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Beam pipeline options" in out and "(default: 16)" in out


@pytest.mark.parametrize("command", ["featurize", "score"])
def test_a_fresh_command_writes_nothing_to_stderr_before_its_own_output(command):
    # Importing Beam's GCP stack made every command open with grpcio FutureWarnings and a root-logger
    # "crcmod package not found" line, none of which a user can act on.
    done = subprocess.run([sys.executable, "-m", "runners.cli", command, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: popcast" in done.stdout
    assert done.stderr == ""


def test_bad_input_data_is_exit_1_without_traceback(files):
    not_a_catalog = files["root"] / "notes.csv"
    not_a_catalog.write_text("hello,world\n1,2\n")
    done = subprocess.run([sys.executable, "-m", "runners.cli", "featurize", "--catalog", str(not_a_catalog),
                           "--output", str(files["root"] / "f2"), "--modalities", "meta"],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "video_id" in done.stderr


def test_dead_letters_over_the_threshold_publish_and_exit_4(files, capsys):
    # Two of four rows point at files that do not exist: 50% dead letters.
    base = ["featurize", "--catalog", files["catalog"], "--modalities", "meta", "--runner", "DirectRunner"]
    assert main([*base, "--output", str(files["root"] / "f4")]) == EXIT_TOO_MANY_ERRORS
    out = capsys.readouterr().out
    assert "too many errors: 2 of 4 rows" in out
    # What succeeded is published: meta falls back to catalog fields for the rows whose media failed.
    assert pq.read_table(files["root"] / "f4" / "meta").num_rows == 4
    assert sorted(pq.read_table(files["root"] / "f4" / "_errors").column("video_id").to_pylist()) == ["v1", "v3"]
    assert main([*base, "--output", str(files["root"] / "f5"), "--max-error-fraction", "0.5"]) == 0


def test_a_gs_path_without_credentials_fails_fast_saying_what_to_set(files, capsys, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("POPCAST_GCS_RETRY_SECONDS", "3")
    err = usage_error(["featurize", "--catalog", "gs://popcast-no-such-bucket/catalog.parquet", "--output",
                       str(files["root"] / "f6")], capsys)
    assert "--catalog" in err and "GOOGLE_APPLICATION_CREDENTIALS" in err and "STORAGE_EMULATOR_HOST" in err


@pytest.mark.parametrize("uri, inside", [
    ("{root}/media/a.mp4", True),
    ("{root}/media/sub/../a.mp4", True),
    ("{root}/media/../secret.mp4", False),
    ("{root}/media2/a.mp4", False),              # a sibling sharing the prefix's letters
    ("{root}/media/link-out/x.mp4", False),      # a symlink leading out of the root
    ("file://{root}/media/a.mp4", True),
    ("gs://bucket/videos/a.mp4", True),
    ("gs://bucket/videos/../private/a.mp4", False),
    ("gs://bucket/videos-old/a.mp4", False),
    ("gs://other/videos/a.mp4", False),
])
def test_media_roots_resolve_dots_and_symlinks(tmp_path, uri, inside):
    from featurizers.core.storage import within_roots

    (tmp_path / "media").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "media" / "link-out").symlink_to(tmp_path / "outside")
    roots = (str(tmp_path / "media"), "gs://bucket/videos/")
    assert within_roots(uri.format(root=tmp_path), roots) is inside


def test_a_video_outside_the_media_root_is_a_dead_letter_not_a_read(files, capsys):
    media = files["root"] / "media"
    media.mkdir(exist_ok=True)
    out = files["root"] / "f7"
    # Rows v1 and v3 point at files beside the catalog, outside `media`: refused before any read.
    assert main(["featurize", "--catalog", files["catalog"], "--output", str(out), "--modalities", "meta",
                 "--media-root", str(media), "--max-error-fraction", "1", "--runner", "DirectRunner"]) == 0
    errors = pq.read_table(out / "_errors").to_pylist()
    assert sorted((e["video_id"], e["stage"], e["error_class"]) for e in errors) == [
        ("v1", "read", "outside_media_root"), ("v3", "read", "outside_media_root")]


def test_featurize_then_train_with_default_flags_on_a_catalog_without_media(tmp_path, capsys):
    # featurize's defaults leave empty visual/ and audio/ folders here; train's defaults use what is there.
    from pipelines.sample_catalog import generate_rows

    catalog, _ = generate_rows(80, seed=5)
    path = tmp_path / "catalog.parquet"
    pq.write_table(catalog.set_column(catalog.schema.get_field_index("video_uri"), "video_uri",
                                      pa.nulls(catalog.num_rows, pa.string())), path)
    assert main(["featurize", "--catalog", str(path), "--output", str(tmp_path / "f"), "--runner", "DirectRunner"]) == 0
    assert main(["train", "--catalog", str(path), "--features", str(tmp_path / "f"), "--output", str(tmp_path / "m"),
                 "--epochs", "2", "--ensemble", "1"]) == 0
    config = (tmp_path / "m" / "config.json").read_text()
    assert '"text"' in config and '"meta"' in config and '"visual"' not in config


@pytest.mark.parametrize("damage", ["truncate weights", "edit config", "drop weights"])
def test_a_damaged_model_directory_is_refused_naming_it(tmp_path, capsys, damage):
    import shutil

    from model.artifact import ModelIntegrityError, load_model
    from pipelines.sample_catalog import generate_rows

    catalog, _ = generate_rows(60, seed=6)
    path = tmp_path / "catalog.parquet"
    pq.write_table(catalog.set_column(catalog.schema.get_field_index("video_uri"), "video_uri",
                                      pa.nulls(catalog.num_rows, pa.string())), path)
    assert main(["featurize", "--catalog", str(path), "--output", str(tmp_path / "f"), "--modalities", "meta",
                 "--runner", "DirectRunner"]) == 0
    model = tmp_path / "m"
    assert main(["train", "--catalog", str(path), "--features", str(tmp_path / "f"), "--output", str(model),
                 "--epochs", "1", "--ensemble", "1"]) == 0
    load_model(str(model))                                 # whole: loads
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights, config = broken / "model.safetensors", broken / "config.json"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "edit config":
        config.write_text(config.read_text().replace('"epochs": 1', '"epochs": 2'))
    else:
        weights.unlink()
    with pytest.raises(ModelIntegrityError, match=str(broken)):
        load_model(str(broken))
    capsys.readouterr()
    assert main(["score", "--catalog", str(path), "--features", str(tmp_path / "f"), "--model", str(broken),
                 "--output", str(tmp_path / "s"), "--runner", "DirectRunner"]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and "Traceback" not in err
