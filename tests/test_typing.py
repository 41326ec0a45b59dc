"""hqqlora passes ``mypy --strict`` with the project's config, and ships its ``py.typed``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hqqlora"
PYPROJECT = ROOT / "pyproject.toml"


def test_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
    if sys.version_info >= (3, 11):
        import tomllib

        config = tomllib.loads(PYPROJECT.read_text())
        assert "py.typed" in config["tool"]["setuptools"]["package-data"]["hqqlora"]


def test_mypy_strict_finds_no_errors(request, tmp_path):
    api = pytest.importorskip("mypy.api")
    # A persistent cache (inside pytest's own, git-ignored) keeps reruns to a few seconds;
    # without pytest's cache (-p no:cacheprovider), a fresh one.
    pytest_cache = getattr(request.config, "cache", None)
    cache = pytest_cache.mkdir("mypy") if pytest_cache is not None else tmp_path / "mypy"
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(PYPROJECT),
            "--strict",
            "--cache-dir",
            str(cache),
            "--no-error-summary",
            str(PACKAGE),
        ]
    )
    assert status == 0 and not stdout.strip(), f"mypy --strict reported:\n{stdout}{stderr}"
