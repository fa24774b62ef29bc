"""Shared pytest fixtures for seedsift.

Tiny pipelines are built once per session from configs with random weights: no download, a few seconds.
"""

from __future__ import annotations

import pytest

from orchestrator.embedded import build_tiny_pixart, build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("models") / "tiny-sd")
    build_tiny_sd(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pixart_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("models") / "tiny-pixart")
    build_tiny_pixart(folder)
    return folder
