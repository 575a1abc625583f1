"""A built wheel, installed outside the checkout, runs the user paths and the documented API examples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from installed_smoke import smoke

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without dependencies: this venv has them) into a directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy of the sources: a build/ directory left in the checkout would be reused by
    # setuptools and could hide a file missing from the package data.
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=600)
    (whl,) = (tmp / "dist").glob("qwen_edge-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "qwen_edge/py.typed" in names
    assert "qwen_edge/data/runtimes/cpu-x86_64.yaml" in names
    assert sum(n.startswith("qwen_edge/data/recipes/") for n in names) == len(list((ROOT / "export_recipes").glob("*.yaml")))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                   check=True, capture_output=True, timeout=600)
    return site


def test_installed_wheel_runs_user_paths_and_api_examples(wheel_site, tmp_path, monkeypatch):
    # The wheel's package shadows the editable one; its console script comes first on PATH.
    monkeypatch.setenv("PYTHONPATH", str(wheel_site))
    monkeypatch.setenv("PATH", f"{wheel_site / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("QWEN_EDGE_RECIPES_PATH", raising=False)
    monkeypatch.delenv("QWEN_EDGE_RUNTIMES_PATH", raising=False)
    steps: list[str] = []
    smoke(ROOT / "docs" / "api.md", ROOT, tmp_path / "outside", log=steps.append)
    assert steps[0].startswith("qwen_edge from ") and str(wheel_site) in steps[0]
    assert steps[-1].endswith("examples ran")
