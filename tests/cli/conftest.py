"""Tiny synthetic sites for the CLI tests (generated once per session; copy before damaging)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clinfed.data.synth import synthesise


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_sites")
    synthesise(root, 3, 4, (16, 16, 8), 5)
    return root


@pytest.fixture
def sites(tiny_sites, tmp_path) -> Path:
    """A private copy of the three sites, for tests that damage one."""
    target = tmp_path / "sites"
    shutil.copytree(tiny_sites, target)
    return target
