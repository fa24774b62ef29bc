"""Shared pytest fixtures for seedsift.

Tiny pipelines are built once per session from configs with random weights: no download, a few seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from actors.models.embedded import build_tiny_pixart, build_tiny_sd, build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("models") / "tiny-sd")
    build_tiny_sd(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    build_tiny_sdxl(folder)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, thread: threading.Thread | None = None, poll: float = 0.1,
             detail=None):
    """Poll `condition` until it gives a true value, and return that value. On a timeout, `detail()` (when given)
    says what was still in the way."""
    deadline = time.time() + timeout
    while not (value := condition()):
        if thread is not None and not thread.is_alive():
            pytest.fail(f"the run ended before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"; still there: {detail()}" if detail else ""))
        time.sleep(poll)
    return value


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's server), reached over HTTP exactly like real S3.

    The standard AWS variables point at it before Ray starts, so Ray workers find it through the usual chain.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing-key-id",
                      AWS_SECRET_ACCESS_KEY="testing-secret-value")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, s3_endpoint):
    """One local Ray instance for the whole session, started as a local run starts its own (the machine's cores
    plus two logical CPUs, no dashboard), so in-process jobs see what a user's local run sees; clusters smaller
    than that are tested explicitly. The model cache is shared too."""
    import ray

    from orchestrator.flow.resources import local_ray_options

    os.environ["SEEDSIFT_CACHE"] = str(tmp_path_factory.mktemp("seedsift-cache"))
    ray.init(address="local", **local_ray_options())
    yield ray
    ray.shutdown()


FINISHED_PROMPTS = [f"a {colour} {thing}" for colour in ("red", "blue") for thing in ("cube", "fox", "bowl", "kite")]
FINISHED_ROWS = 2 * len(FINISHED_PROMPTS)  # keep 2 of 4


def finished_settings(corpus: str, out: str):
    from orchestrator.run.config import GenerateConfig

    return GenerateConfig(prompts=corpus, out=out, candidates=4, keep=2, steps=1, guidance=3.0, batch_size=4,
                          generator_cpus=1, shard_size=4)


@pytest.fixture(scope="session")
def finished(ray_session, tmp_path_factory) -> dict:
    """One finished run of two complete shards (16 rows), pristine: a test that damages or grows it copies it.

    Built once for the whole test run: under pytest-xdist the first worker to need it builds it in the folder all
    workers share (a run costs about 10 CPU-seconds, and files using it land on both workers); the others wait on
    the lock and read it. The summary the run returned is kept beside it, as the run gave it."""
    import fcntl
    import json

    from jobs import verify
    from orchestrator.flow import pipeline

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "finished"
    corpus, out, returned = folder / "prompts.txt", folder / "pristine", folder / "returned-summary.json"
    with open(shared / "finished.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not returned.exists():
            folder.mkdir(exist_ok=True)
            corpus.write_text("\n".join(FINISHED_PROMPTS) + "\n")
            summary = pipeline.run(finished_settings(str(corpus), str(out)))
            assert verify.verify_output(str(out))["strict_clean"]
            returned.write_text(json.dumps(summary))
    return {"corpus": str(corpus), "out": out, "summary": json.loads(returned.read_text())}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback S3 endpoint, as an s3:// URI."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    return f"s3://{name}"
