"""Finding and reading a run's predictor in storage (a folder, a URL, or the embedded default), on the driver.

The model itself, its files' format and its compatibility checks live with the actors that score with it
(actors/predictor/model.py). Here its problems become configuration errors: one line before compute starts.
"""

from __future__ import annotations

import contextlib
import os

from actors.models.embedded import EMBEDDED_PREDICTORS
from actors.predictor.model import (CONFIG_FILE, EVALUATION_FILE, PREDICTOR_FILES, WEIGHTS_FILE, Predictor,
                                    PredictorMismatch, predictor_from_files)
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError


@contextlib.contextmanager
def as_config_error():
    """A predictor that does not fit, reported as the configuration error it is."""
    try:
        yield
    except PredictorMismatch as exc:
        raise ConfigError(str(exc)) from exc


def resolve_predictor(spec: str | None, model: str) -> str:
    """A predictor folder from `--predictor` (a folder), or the embedded default for an embedded model."""
    if spec:
        return os.path.expanduser(spec)
    name = model.split(":", 1)[1] if model.startswith("embedded:") else None
    if name not in EMBEDDED_PREDICTORS:
        raise ConfigError(f"--policy predictor: no default predictor for {model}; pass --predictor PATH "
                          "(train one with `seedsift collect` then `seedsift train`)")
    return str(EMBEDDED_PREDICTORS[name])


def read_predictor_files(spec: str | None, model: str, storage_options: dict | None = None) -> dict[str, bytes]:
    """A predictor's config.json and model.safetensors as bytes, from a local folder, a URL or the embedded default.

    Jobs read them once on the driver and hand the bytes to their actors, so every node of a cluster scores with
    the same predictor without a shared filesystem. `storage_options` go to fsspec for URLs such as s3://.
    """
    location = resolve_predictor(spec, model)
    folder = Output(location, storage_options or {})  # fsspec: local folders and s3:// alike
    try:
        missing = [name for name in PREDICTOR_FILES if not folder.exists(name)]
        files = {name: folder.read_bytes(name) for name in PREDICTOR_FILES if name not in missing}
    except Exception as exc:  # fsspec backends raise their own types (OSError, botocore's credential errors, ...)
        raise ConfigError(f"--predictor {location}: could not read it ({type(exc).__name__}: {exc})") from exc
    if missing:
        raise ConfigError(f"--predictor {location}: no {' or '.join(missing)} there; expected {CONFIG_FILE} "
                          f"and {WEIGHTS_FILE}, as a train job's --out folder holds")
    return files


def read_evaluation(location: str, storage_options: dict | None = None) -> dict | None:
    """The evaluation.json beside a predictor (held-out figures), or None: it is optional, and only informs."""
    folder = Output(location, storage_options or {})
    try:
        return folder.read_json(EVALUATION_FILE) if folder.exists(EVALUATION_FILE) else None
    except (OSError, ValueError):
        return None


def load_predictor(folder: str, model_path: str | None = None, height: int | None = None,
                   width: int | None = None) -> Predictor:
    """Load a predictor folder (local or URL) and, given the pipeline, check that it fits; see predictor_from_files."""
    return predictor_from_files(read_predictor_files(folder, ""), model_path, height, width, source=folder)


