"""Shared fixtures: every test gets its own maskhub home and an offline Hub setup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def maskhub_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """Point ``MASKHUB_HOME`` at a fresh temporary directory for each test."""
    home = tmp_path_factory.mktemp("maskhub-home")
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    return home
