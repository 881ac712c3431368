"""The floors of the code (README "Architecture"): featurizers/ and model/ stand without Beam, imports point
down only, no cycles, and no module reaches into another's private names."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurizers", "model", "pipelines", "runners")


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def test_import_linter_contracts_are_kept() -> None:
    # The same check `make test` runs first; here too so a plain `pytest` catches a back-edge.
    done = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                           "--no-cache", "--config", str(ROOT / ".importlinter")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("package", ["featurizers", "model"])
def test_lower_floors_import_without_beam(package: str) -> None:
    modules = _modules(package)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'pipelines', 'runners')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{package} pulled in: {done.stdout.strip()}"


def _private_imports() -> list[str]:
    found = []
    for package in PACKAGES + ("bench",):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            found.append(f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}")
    return found


def test_no_private_names_are_imported_across_modules() -> None:
    assert _private_imports() == []


def test_public_modules_declare_their_surface() -> None:
    missing = []
    for package in PACKAGES:
        for name in _modules(package):
            path = ROOT / Path(*name.split(".")).with_suffix(".py")
            if not path.exists():       # a package's __init__
                continue
            tree = ast.parse(path.read_text())
            has_all = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                          for n in tree.body)
            public_defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                           and not n.name.startswith("_")]
            if public_defs and not has_all and not name.endswith(("__main__",)):
                missing.append(name)
    assert missing == []


def test_job_drivers_and_the_model_card_import_without_torch() -> None:
    # A score driver only coordinates workers; importing torch there costs ~500 MB resident per run
    # (bench.score: the driver beside two workers is what keeps multi_processing under 3 GB).
    code = ("import sys\n"
            "import model.card, pipelines.score, pipelines.featurize, runners.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"torch imported by: {done.stdout.strip()}"
