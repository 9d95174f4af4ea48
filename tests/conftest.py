"""Shared fixtures: the repository root and mini datasets written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def mini_mvtec(tmp_path_factory) -> Path:
    from datamodules.mini.mvtec import write_mvtec

    return write_mvtec(tmp_path_factory.mktemp("mini") / "mvtec", seed=0)
