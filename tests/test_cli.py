"""The popcast command line: help for every subcommand, validate's verdicts."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
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
