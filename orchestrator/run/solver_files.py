"""Reading a searched solver schedule (`--scheduler schedule:PATH`) from storage, on the driver.

The schedule itself, its file format and its checks live with the solver that runs it
(actors/models/unified_solver.py). Here reading problems become configuration errors, before compute.
"""

from __future__ import annotations

import json

import fsspec

from actors.models.unified_solver import ScheduleFile
from orchestrator.run.config import ConfigError


def read_schedule_file(path: str, storage_options: dict | None = None) -> ScheduleFile:
    """A schedule.json from a local path or a URL (s3:// with `storage_options`), parsed and checked."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as handle:
            value = json.loads(handle.read())
    except FileNotFoundError as exc:
        raise ConfigError(f"--scheduler schedule:{path}: no such file") from exc
    except ValueError as exc:
        raise ConfigError(f"--scheduler schedule:{path}: not JSON ({exc})") from exc
    except Exception as exc:  # fsspec backends raise their own types
        raise ConfigError(f"--scheduler schedule:{path}: could not read it ({type(exc).__name__}: {exc})") from exc
    try:
        return ScheduleFile.from_dict(value, source=path)
    except ValueError as exc:
        raise ConfigError(f"--scheduler schedule:{path}: {exc}") from exc
