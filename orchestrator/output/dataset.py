"""A collect output's training set (dataset.parquet): read, identified and checked for one pipeline setting.

Written by the collect job; read by train and evaluate, which must agree on what a dataset is.
"""

from __future__ import annotations

from orchestrator.output.manifest import Manifest
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError

DATASET_FILE = "dataset.parquet"


def read_dataset(uri: str):
    """dataset.parquet of a collect output (the folder or the file itself), local or s3://."""
    if uri.endswith(".parquet"):
        folder, name = uri.rsplit("/", 1)
    else:
        folder, name = uri, DATASET_FILE
    output = Output(folder)
    if not output.exists(name):
        raise ConfigError(f"--dataset {uri}: no {name} there; run `seedsift collect` first")
    return output.read_table(name)


def dataset_digest(table) -> str:
    """What identifies a collected set: a hash of its (prompt_id, seed, score) rows, whatever file holds them."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for prompt_id, seed, score in sorted(zip(*(table[c].to_pylist() for c in ("prompt_id", "seed", "score")))):
        digest.update(f"{prompt_id}\x1f{seed}\x1f{score!r}\x1e".encode("utf-8"))
    return digest.hexdigest()


def dataset_solver_schedule(uri: str, identity: dict) -> dict | None:
    """The searched solver schedule a dataset's rows were rendered with (their scheduler `schedule:<digest>`), from
    its collect output's run.json; None for rows of a named solver."""
    from actors.models.solvers import SCHEDULE_PREFIX
    from actors.models.unified_solver import ScheduleFile

    if not str(identity["scheduler"]).startswith(SCHEDULE_PREFIX):
        return None
    folder = uri.rsplit("/", 1)[0] if uri.endswith(".parquet") else uri
    try:
        return ScheduleFile.recorded_for(identity["scheduler"], Manifest(Output(folder)).read_run())
    except ValueError as exc:
        raise ConfigError(f"--dataset {uri}: {exc}") from exc


def dataset_identity(table) -> dict:
    """The one pipeline setting a dataset was collected with; a mixed dataset is refused."""
    identity = {}
    for column in ("model", "scheduler", "attention", "steps", "guidance", "width", "height", "rater"):
        if column == "attention":  # sets collected before it was recorded, and its rows' nulls: full attention
            values = {value or "full" for value in table[column].to_pylist()} if column in table.column_names \
                else {"full"}
        else:
            values = set(table[column].to_pylist())
        if len(values) != 1:
            raise ConfigError(f"the dataset mixes {column} values {sorted(map(str, values))}; "
                              "train one predictor per pipeline setting")
        identity[column] = values.pop()
    return identity
