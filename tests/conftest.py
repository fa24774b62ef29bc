"""Shared pytest fixtures for seedsift.

Tiny pipelines are built once per session from configs with random weights: no download, a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

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


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PARTI = REPO_ROOT.parent / "shared" / "data" / "PartiPrompts.tsv"


@pytest.fixture(scope="session")
def parti_path() -> str:
    """The full PartiPrompts corpus where the development machines have it, else the bundled 48-prompt sample."""
    return str(SHARED_PARTI if SHARED_PARTI.exists() else REPO_ROOT / "examples" / "parti-sample.tsv")


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray instance for the whole session (ray.init costs about 6 s); the model cache is shared too."""
    import ray

    os.environ.setdefault("SEEDSIFT_CACHE", str(tmp_path_factory.mktemp("seedsift-cache")))
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"SEEDSIFT_CACHE": os.environ["SEEDSIFT_CACHE"]}})
    yield ray
    ray.shutdown()
