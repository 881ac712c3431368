"""The popcast command line: help for every subcommand, validate's verdicts."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.sample_catalog import generate_rows
from runners.cli import COMMANDS, main
from tests.conftest import REAL_CATALOGS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("path", REAL_CATALOGS, ids=lambda p: p.parent.name)
def test_validate_accepts_real_catalogs(path):
    result = subprocess.run([sys.executable, "-m", "runners.cli", "validate", "--catalog", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"rows"' in result.stdout and "label_coverage" in result.stdout


def test_validate_rejects_duplicate_video_id_naming_it(tmp_path):
    table, _ = generate_rows(20, seed=4)   # a catalog any clone has (../shared is optional)
    duplicated = pa.concat_tables([table, table.slice(3, 1)])
    path = tmp_path / "dup.parquet"
    pq.write_table(duplicated, path)
    result = subprocess.run([sys.executable, "-m", "runners.cli", "validate", "--catalog", str(path)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f"video_id={table.column('video_id')[3].as_py()}: duplicate observation" in result.stderr


def test_validate_accepts_an_observation_log_and_warns_of_edited_captions(tmp_path):
    table, _ = generate_rows(5, seed=4)
    later = table.slice(0, 2)
    later = later.set_column(later.schema.get_field_index("observed_at"), "observed_at",
                             pc.add(later.column("observed_at"), pa.scalar(86_400_000_000, pa.duration("us"))))
    later = later.set_column(later.schema.get_field_index("title"), "title", pa.array(["edited", None]))
    path = tmp_path / "log.parquet"
    pq.write_table(pa.concat_tables([table, later]), path)
    result = subprocess.run([sys.executable, "-m", "runners.cli", "validate", "--catalog", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"videos_observed_twice_or_more": 2' in result.stdout
    assert f"warning: title: video_id={table.column('video_id')[0].as_py()}: conflicting values" in result.stderr
