"""Exactly-once under faults: a killed driver, killed actors, a removed node, an S3 outage and a duplicated corpus.

Each test ends with jobs.verify.verify_output: every committed row once, every ok row's image present, no orphan.
The multi-process ones are marked slow; sizes stay tiny (2 steps, 64x64, a few prompts) for 2-core machines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs.verify import verify_output
from orchestrator.corpus.dedup import DuplicateFilter
from orchestrator.flow import pipeline
from orchestrator.output.storage import Output
from orchestrator.run.config import GenerateConfig
from tests.conftest import REPO_ROOT, free_port, wait_for
from tests.helpers_manifest import manifest_frame
from tests.helpers_ray import kill_run, private_ray_env, private_ray_processes, session_ray_env

PROMPTS = [f"a {colour} {thing} at dawn" for colour in ("red", "blue", "green", "yellow")
           for thing in ("cube", "fox", "lighthouse", "bowl of ramen")]  # 16 distinct prompts
TIMEOUT_S = 180


def write_txt(path: Path, prompts: list[str]) -> str:
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def small_config(prompts: str, out: str, **overrides) -> GenerateConfig:
    values = dict(prompts=prompts, out=out, candidates=4, keep=2, steps=2, batch_size=4, guidance=3.0,
                  generator_cpus=1)
    values.update(overrides)
    return GenerateConfig(**values)


def manifest(output: Output) -> pd.DataFrame:
    return manifest_frame(output)


def comparable(rows: pd.DataFrame) -> pd.DataFrame:
    """The columns an interrupted and an uninterrupted run must agree on (timing and paths aside)."""
    columns = ["prompt_id", "seed", "candidate_index", "status", "error", "score"]
    return rows[columns].sort_values(["prompt_id", "candidate_index"]).reset_index(drop=True)


def assert_clean(output: Output, rows: int) -> dict:
    report = verify_output(output)
    assert report["strict_clean"], json.dumps(report, indent=2)
    assert report["committed_rows"] == rows, json.dumps(report, indent=2)
    return report


class Background:
    """pipeline.run in a thread of the test process (the session's Ray), keeping its result or exception."""

    def __init__(self, config: GenerateConfig):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config):
        try:
            self.result = pipeline.run(config)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def join(self, timeout: float = TIMEOUT_S):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish in time"
        return self


def images_written(output: Output) -> int:
    """Image files under a local output: a count that only grows while a run goes on."""
    folder = Path(output.uri) / "images"
    return sum(1 for path in folder.rglob("*.png")) if folder.exists() else 0


def parts(output: Output) -> int:
    try:
        return len(output.list_keys("manifest", ".parquet"))
    except Exception:  # an S3 outage in progress
        return 0


def run_here(module: str, argv: list[str], capture) -> tuple[int, str, str]:
    """`python -m jobs.MODULE ARGV` through that module's entry, jobs.MODULE.main(ARGV), in this process and on the
    session's Ray; returns (status, stdout, stderr) as captured by capsys or capfd."""
    import importlib

    capture.readouterr()
    status = importlib.import_module(f"jobs.{module}").main(argv)
    out, err = capture.readouterr()
    return status, out, err


def json_summary(stdout: str) -> dict:
    """The --json summary (`json.dumps(indent=2)`: from a line `{`), whatever Ray printed around it."""
    lines = stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "{")
    return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]


def start_job(module: str, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`python -m jobs.MODULE ARGV` as its own process, in a process group of its own, its output to `log`."""
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", f"jobs.{module}", *argv], cwd=REPO_ROOT, env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a job's process group, for a job that joined the session's Ray: that is only its driver.
    (tests/helpers_ray.kill_run is for a private Ray: with no RAY_TMPDIR it would stop every process without one.)"""
    if process.poll() is None:  # (an ended one's pid may name another group by now)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def wait_for_job_end(driver_pid: int, timeout: float = 150) -> None:
    """Once a driver that joined the session's Ray is gone (killed, or exited): wait until Ray has marked its job
    dead and ended its actors and the workers running its tasks (the raylet kills them), so nothing of that run
    writes to its output any more. Only this session's raylet's workers are looked at: other Rays may share the
    machine. The wait is long because it timed out at 60 s once in a CI slow tier (two cases, both passing on a
    rerun; the cause was not found): a pass returns as soon as the job has ended, and a failure names what was
    still there."""
    import psutil
    from ray._private import state, worker

    raylet = psutil.Process(worker._global_node.all_processes["raylet"][0].process.pid)
    services = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

    waiting_on: list[str] = []  # what the last look still saw, named in the failure

    def ended() -> bool:
        waiting_on.clear()
        jobs = [job for job in state.jobs() if job["DriverPid"] == driver_pid]
        waiting_on.extend(f"job {job['JobID']} not dead" for job in jobs if not job["IsDead"])
        ids = {job["JobID"] for job in jobs}
        actors = list(state.actors().values())
        # Detached actors outlive their job by design (Ray Data's shared singletons, whichever job started them).
        waiting_on.extend(f"actor {actor.get('ActorClassName')} {actor['State']}" for actor in actors
                          if actor["JobID"] in ids and not actor["IsDetached"] and actor["State"] != "DEAD")
        others = {actor["Pid"] for actor in actors if actor["State"] == "ALIVE"}  # detached, or other jobs'
        for child in raylet.children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and title.split()[0] not in services and child.pid not in others:
                # a worker still running a task (of the ended job: this session runs nothing else now)
                waiting_on.append(f"worker {child.pid} {title[:80]!r}")
        return not waiting_on

    wait_for(ended, timeout, f"Ray to end the job of driver {driver_pid}", detail=lambda: "; ".join(waiting_on))


# --- duplicates -----------------------------------------------------------------------------------------------


def corpus_block(rows: list[tuple], shard: str = "c.jsonl/000000"):
    """Rows as the reader emits them: one shard's block with its bookkeeping columns."""
    from orchestrator.corpus.reader import _shard_table
    from orchestrator.output.manifest import ShardFrame

    records = [{"prompt_id": p, "prompt": text, "source": src, "status": status, "error": None if status == "ok" else "x"}
               for p, text, src, status in rows]
    frame = ShardFrame(file="c.jsonl", index=0, rows=len(rows), start=0, end=1, first_line=1, end_line=len(rows),
                       digest="d")
    return _shard_table(records, shard, 0, frame)


@pytest.mark.parametrize("buckets", [1, 2], ids=["held-by-the-filter", "index-actors"])
def test_duplicate_filter_keeps_the_first_and_honours_committed_rows(ray_session, tmp_path, buckets):
    from orchestrator.corpus.dedup import Owners, start_index
    from orchestrator.output.manifest import Manifest, ShardFrame, manifest_table

    batch = corpus_block([("a", "a red cube", "c.jsonl:1", "ok"), ("b", "a blue cube", "c.jsonl:2", "ok"),
                          ("a", "something else", "c.jsonl:3", "ok"), ("c", "A  red cube ", "c.jsonl:4", "ok"),
                          ("q", None, "c.jsonl:5", "quarantined")])
    manifest = Manifest(Output(str(tmp_path / "o")))
    owners = Owners(["c.jsonl"])
    fresh = DuplicateFilter(start_index(manifest, owners, [], {}, buckets=buckets), manifest, owners)
    out = fresh(batch).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "quarantined", "quarantined", "quarantined"]
    assert [r["error"] for r in out][2:] == ["duplicate of c.jsonl:1", "duplicate of c.jsonl:1", "x"]
    # Rows committed by an earlier run are first occurrences, whatever arrives first now (multi-file corpora):
    # here an earlier run rendered id "a" from line 3 (shard row 2).
    shard = "c.jsonl/000000"
    committed = batch.slice(2, 1).to_pylist()[0]
    row = {k: committed[k] for k in ("prompt_id", "prompt", "source", "shard", "shard_row", "prompt_key", "text_key")}
    frame = ShardFrame.from_json(committed["shard_frame"])
    part = manifest.commit_part(shard, manifest_table([{**row, "seed": 1, "status": "ok"}]), frame)
    again = DuplicateFilter(start_index(manifest, owners, [], {shard: [part]}, buckets=buckets), manifest, owners)
    rows = again(batch).to_pylist()
    assert [r["status"] for r in rows][:4] == ["quarantined", "ok", "ok", "ok"]
    assert rows[0]["error"] == "duplicate of c.jsonl:3"
    # A filter that holds the index must not be restarted (it would come back with only what the output held at
    # start); one in front of index actors holds nothing and may be.
    import ray

    from orchestrator.corpus.dedup import drop_duplicates

    stage = drop_duplicates(ray.data.from_items([{"x": 1}]), start_index(manifest, owners, [], {}, buckets=buckets),
                            manifest, owners)._logical_plan.dag
    assert type(stage).__name__ == "MapBatches"
    assert stage.ray_remote_args.get("max_restarts") == (0 if buckets == 1 else None), stage.ray_remote_args


def test_waiting_for_the_index_loads_returns_counts_not_the_held_bucket_and_raises_what_a_load_met(ray_session,
                                                                                                    tmp_path):
    """The driver waits on the index loads on its error path, to say what a load met (a damaged manifest object,
    the store): it gets each load's key count, while the one bucket (every committed key of the output) goes to the
    filter alone; 0.2 copied the whole bucket into the driver there. A damaged part fails the load, and both the
    wait and the filter's bucket raise its error."""
    import ray

    from orchestrator.corpus.dedup import DuplicateIndex, Owners, start_index
    from orchestrator.output.manifest import Manifest, ShardFrame, manifest_table

    batch = corpus_block([("a", "a red cube", "c.jsonl:1", "ok")])
    output = Output(str(tmp_path / "o"))
    manifest, owners, shard = Manifest(output), Owners(["c.jsonl"]), "c.jsonl/000000"
    committed = batch.to_pylist()[0]
    row = {k: committed[k] for k in ("prompt_id", "prompt", "source", "shard", "shard_row", "prompt_key", "text_key")}
    part = manifest.commit_part(shard, manifest_table([{**row, "seed": 1, "status": "ok"}]),
                                ShardFrame.from_json(committed["shard_frame"]))
    indexes = start_index(manifest, owners, [], {shard: [part]}, buckets=1)
    assert indexes.wait_loaded() == [2]  # its prompt key and its text key: a count, not the bucket
    assert isinstance(ray.get(indexes.held), DuplicateIndex) and ray.get(indexes.held).size() == 2
    (Path(output.uri) / part).write_bytes(b"not parquet")  # a damaged part object
    damaged = start_index(manifest, owners, [], {shard: [part]}, buckets=1)
    with pytest.raises(Exception, match=part.rsplit("/", 1)[-1]):
        damaged.wait_loaded()
    with pytest.raises(Exception, match=part.rsplit("/", 1)[-1]):
        ray.get(damaged.held)


# --- driver SIGKILL -------------------------------------------------------------------------------------------


def job_argv(job: str, corpus: str, out: str) -> tuple[str, list[str]]:
    """(module, flags) of one case's command, `python -m jobs.MODULE FLAGS`. generate keeps all 4 candidates, and
    collect renders all 4 by definition: 64 rows for 16 prompts, in shards of 4 prompts, so that shards complete (and
    are compacted) while the run goes on. generate-preview previews all 4 candidates for one step and keeps the
    best: 16 rows. collect-shards writes WebDataset tars of 5 images."""
    module = job.split("-")[0]
    keep = ["--keep", "4"] if module == "generate" else []
    if job == "generate-preview":
        keep = ["--keep", "1", "--policy", "preview", "--preview", "4", "--preview-steps", "1"]
    layout = ["--image-output", "shards", "--shard-images", "5"] if job.endswith("shards") else []
    return module, ["--prompts", corpus, "--out", out, "--candidates", "4", *keep, "--steps", "2", "--guidance", "3.0",
                    "--batch-size", "4", "--generator-cpus", "1", "--shard-size", "4", "--json", *layout]


# The same configurations as small_config overrides (shard_size 4 for all), for the uninterrupted references.
REFERENCE_SETTINGS = {
    "generate": {"keep": 4},
    "generate-preview": {"keep": 1, "policy": "preview", "preview": 4, "preview_steps": 1},
    "collect-shards": {"keep": 4, "all_candidates": True, "image_output": "shards", "shard_images": 5},
}


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """reference(job): the uninterrupted run of that job's configuration, in the session's Ray; a configuration runs
    once per module, however many tests compare against it."""
    folder = tmp_path_factory.mktemp("reference")
    corpus = write_txt(folder / "prompts.txt", PROMPTS)  # prompt ids are hashes of the text, as in each test's copy
    outputs: dict[tuple, Output] = {}

    def of(job: str) -> Output:
        settings = {"shard_size": 4, **REFERENCE_SETTINGS[job]}
        key = tuple(sorted(settings.items()))
        if key not in outputs:
            output = Output(str(folder / f"run{len(outputs)}"))
            pipeline.run(small_config(corpus, output.uri, **settings))
            outputs[key] = output
        return outputs[key]

    return of


@pytest.mark.slow
@pytest.mark.parametrize("job,ray_of_its_own", [
    ("generate-preview", False),  # preview rows and image files; joins a running Ray: a cluster's job
    ("collect-shards", False),  # collect's dataset rebuild, WebDataset tars; joins a running Ray
    ("generate", True),  # plain generate, image files, its own Ray (a local user's run): the kill takes Ray down too
], ids=["generate-preview", "collect-shards", "generate-private-ray"])
def test_driver_sigkill_then_rerun_matches_an_uninterrupted_run(ray_session, reference, tmp_path, capsys, job,
                                                                 ray_of_its_own):
    """A SIGKILL of the job's whole process group mid-run leaves a clean partial output; the same command, rerun (in
    this process, on the session's Ray), skips exactly what was committed and ends equal to an uninterrupted run.

    A local user's run (its own Ray) is rerun at once, beside its killed driver left an unreaped zombie that still
    names the output's lease (0.2 refused that rerun with exit 4 for up to --lease-seconds); the kill takes its Ray's
    daemons with the driver, and the test waits only until that Ray's workers are gone, so nothing still writes."""
    from actors.models.embedded import resolve_model

    resolve_model("embedded:tiny-sd")  # built into the session cache before the job uses it
    corpus = write_txt(tmp_path / "prompts.txt", PROMPTS)
    killed = Output(str(tmp_path / "killed"))
    module, argv = job_argv(job, corpus, killed.uri)
    cache = os.environ["SEEDSIFT_CACHE"]
    env = private_ray_env(SEEDSIFT_CACHE=cache) if ray_of_its_own else session_ray_env(SEEDSIFT_CACHE=cache)
    log = tmp_path / "job.log"
    process = start_job(module, argv, env, log)

    def kill() -> None:
        if ray_of_its_own:  # the driver's group (Ray's daemons are in it), not reaped: a zombie holding the lease
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_for(lambda: zombie(process.pid) and all(zombie(proc.pid) for proc in
                                                         private_ray_processes(env["RAY_TMPDIR"])),
                     60, "the killed driver a zombie and its Ray's workers gone")
        else:
            kill_group(process)  # the driver only: the session's Ray ends the job's actors and tasks
            wait_for_job_end(process.pid)

    try:
        wait_for(lambda: parts(killed) >= 1 or process.poll() is not None, TIMEOUT_S, "the first manifest part")
        assert process.poll() is None, "the job finished before it could be killed: " + log.read_text()[-2000:]
        time.sleep(random.Random(job).uniform(0, 1.5))  # past the first commit: parts, completions, compactions
        if process.poll() is not None:
            pytest.fail("the job finished before it could be killed: " + log.read_text()[-2000:])
    finally:
        kill()
    partial = verify_output(killed)
    rows = 16 if job == "generate-preview" else 64
    assert partial["clean"] and 0 < partial["committed_rows"] <= rows, partial  # mid-run, nothing duplicated
    try:
        if ray_of_its_own:
            assert zombie(process.pid), "the rerun must start beside the unreaped driver"
        status, out, err = run_here(module, argv, capsys)
    finally:
        if ray_of_its_own:
            kill_run(process, env["RAY_TMPDIR"])  # reap the zombie; stop anything of its Ray still there
    assert status == 0, err[-3000:]
    summary = json_summary(out)
    assert summary["this_run"]["skipped_already_committed"] == partial["committed_rows"]
    clean = reference(job)
    assert_clean(killed, rows=rows)
    assert_clean(clean, rows=rows)
    a, b = comparable(manifest(killed)), comparable(manifest(clean))
    assert a.drop(columns="score").equals(b.drop(columns="score"))
    assert (a.score.astype(float) - b.score.astype(float)).abs().max() < 1e-3
    if module == "collect":  # the training set is rebuilt from every committed row: each (prompt, seed) once
        dataset = pd.read_parquet(Path(killed.uri) / "dataset.parquet")
        assert len(dataset) == rows and not dataset.duplicated(["prompt_id", "seed"]).any()


def zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- actor kills ------------------------------------------------------------------------------------------------


def stage_actor_pids(stage: str) -> list[int]:
    """Pids of this test process's alive Ray Data actors of one stage (GCS actor table, no dashboard needed)."""
    import psutil
    import ray

    pids = []
    job = ray.get_runtime_context().job_id
    # Filtered by the GCS: this session's table holds every actor of every earlier run, most of them dead.
    for info in ray._private.state.actors(job_id=job, actor_state_name="ALIVE").values():
        if not info.get("Pid"):
            continue
        try:
            title = " ".join(psutil.Process(info["Pid"]).cmdline())
        except psutil.Error:
            continue
        if stage in title or stage in (info.get("ActorClassName") or ""):
            pids.append(info["Pid"])
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ScoreAndRenderStage", "ScorerStage"])
def test_killed_actor_is_restarted_and_every_row_lands_once(ray_session, tmp_path, stage):
    """One stage's actor SIGKILLed mid-run: Ray restarts it and every row lands once. The actor that renders
    (here, on one machine, it also scores: actors/stages/local.py) is killed once rows are committed; the scorer of the
    graph that keeps it apart (clusters, GPUs) as it loads. (Generators on a killed node: tests/test_cluster.py.)
    Pixel raters run inside the actor that renders, so no rater actor is left to kill."""
    corpus = write_txt(tmp_path / "prompts.txt", PROMPTS[:16])
    output = Output(str(tmp_path / "out"))
    run = Background(small_config(corpus, output.uri, scorer_batch_size=2, one_actor=stage == "ScoreAndRenderStage"))
    victims = wait_for(lambda: stage_actor_pids(stage), TIMEOUT_S, f"a {stage} actor", run.thread)
    if stage == "ScoreAndRenderStage":
        # Mid-run: some rows committed, others on their way. The pids are looked up once, before the first image
        # (a GCS query is slow next to a batch of the tiny pipeline, and the landing machine once finished every
        # batch between the first image and the lookup); from the first image on only a file count stands
        # between the test and the kill.
        wait_for(lambda: images_written(output) >= 1, TIMEOUT_S, "the first committed images", run.thread, poll=0.01)
    for pid in victims:  # an honest actor death: the worker process is gone
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"the {stage} actor had ended before the kill: the run outran the test")
    written_at_kill = images_written(output)
    run.join()
    assert run.error is None, repr(run.error)
    assert written_at_kill < 32, "every image was written before the kill: the test killed nothing that mattered"
    assert run.result["images"] == 32
    assert_clean(output, rows=32)


# Node removal lives in tests/test_cluster.py: one cluster run (tests/cluster_failover.py) serves placement and
# failover.


# --- S3 outages -------------------------------------------------------------------------------------------------


class Endpoint:
    """A moto S3 server of this test's own on a fixed port, which can be stopped and started again.

    moto keeps its buckets in the process, so a restarted server serves what was written before the outage.
    """

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture
def own_endpoint(s3_endpoint):
    endpoint = Endpoint()
    yield endpoint
    endpoint.stop()


def s3_output(endpoint: Endpoint, **extra) -> Output:
    import uuid

    import s3fs

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=endpoint.url).mkdir(bucket)
    return Output(f"s3://{bucket}/run", {"endpoint_url": endpoint.url, **extra})


@pytest.mark.slow
def test_s3_outage_is_ridden_out_by_retries(ray_session, own_endpoint, tmp_path):
    """A 4 s outage after the first committed part, while the run goes on (8 prompts, 16 rows: 4 generator batches,
    so 3 are still to be committed), is ridden out by the store's retries: the run finishes strict-clean."""
    corpus = write_txt(tmp_path / "prompts.txt", PROMPTS[:8])
    output = s3_output(own_endpoint)
    run = Background(small_config(corpus, output.uri, storage_options=output.storage_options))
    wait_for(lambda: parts(output) >= 1, TIMEOUT_S, "the first manifest part", run.thread)
    own_endpoint.stop()
    mid_run = run.thread.is_alive()
    time.sleep(4)  # the outage: shorter than the retries last
    own_endpoint.start()
    assert mid_run, "the run ended before the outage began"
    run.join()
    assert run.error is None, repr(run.error)
    assert_clean(output, rows=16)


@pytest.mark.slow
def test_s3_outage_longer_than_retries_fails_clearly_and_the_rerun_resumes(ray_session, own_endpoint, tmp_path):
    """An outage from the first committed part on, longer than the (shortened) retries: the run fails naming the
    output and the rerun; once the store is back, the same run resumes, skipping what was committed."""
    corpus = write_txt(tmp_path / "prompts.txt", PROMPTS[:8])
    short = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1}}
    output = s3_output(own_endpoint, **short)
    run = Background(small_config(corpus, output.uri, storage_options=output.storage_options))
    wait_for(lambda: parts(output) >= 1, TIMEOUT_S, "the first manifest part", run.thread)
    own_endpoint.stop()
    mid_run = run.thread.is_alive()
    try:
        run.join()
    finally:
        own_endpoint.start()
    assert mid_run, "the run ended before the outage began"
    assert run.error is not None, "the run finished although the store was down"
    assert output.uri in str(run.error) and "rerun the same command" in str(run.error), str(run.error)[-2000:]

    summary = pipeline.run(small_config(corpus, output.uri, storage_options=output.storage_options))
    assert summary["images"] == 16 and summary["this_run"]["skipped_already_committed"] > 0
    assert_clean(output, rows=16)


# --- a full disk --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_disk_fails_in_one_line_and_the_rerun_finishes_clean(ray_session, tmp_path, capfd):
    """The output on a small tmpfs that fills mid-run: exit 3 with one line naming the output and the rerun; once
    the disk is larger, the same command finishes, sweeping the failed writers' temporaries: strict-clean. The
    failing run is the CLI in its own process, joined to the session's Ray as a cluster's job is; the rerun is the
    same command through jobs.cli.main in this process."""
    from actors.models.embedded import resolve_model

    resolve_model("embedded:tiny-sd")  # built into the session cache before the job uses it
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    env = session_ray_env(SEEDSIFT_CACHE=os.environ["SEEDSIFT_CACHE"])
    try:
        corpus = write_txt(tmp_path / "prompts.txt", PROMPTS)
        out = str(disk / "out")
        command = ["generate", "--prompts", corpus, "--out", out, "--candidates", "4", "--keep", "2", "--steps", "2",
                   "--guidance", "3.0", "--batch-size", "4", "--generator-cpus", "1", "--shard-size", "4"]
        full = subprocess.Popen([sys.executable, "-m", "jobs.cli", *command], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = full.communicate(timeout=TIMEOUT_S)
        finally:
            kill_group(full)  # only if it is still there (a timeout): its driver
        wait_for_job_end(full.pid)  # nothing of the failed run writes any more
        assert full.returncode == 3, stderr[-3000:]
        last = [line for line in stderr.splitlines() if line.strip()][-1]
        assert out in last and "rerun the same command" in last, stderr[-3000:]
        assert "Traceback" not in stderr + stdout, stderr[-3000:]
        partial = verify_output(out)
        assert partial["clean"] and partial["committed_rows"] < 32, partial  # nothing doubled or half-written
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        status, _, err = run_here("cli", command, capfd)
        assert status == 0, err[-3000:]
        assert_clean(Output(out), rows=32)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --- a finished read-only job ends with its own status ------------------------------------------------------------


def test_verify_ends_with_its_status_and_skips_the_teardown_that_could_abort(finished, tmp_path):
    """`verify` once aborted with status 134 after printing a clean report ("terminate called without an active
    exception": Arrow's thread pools torn down at interpreter exit). A finished read-only job now leaves with
    os._exit after flushing: no exit-time hook runs (the marker below is never written) and the report is complete.
    The abort was a race (seen once in 19 runs, then not in 80): this checks the mechanism that rules it out. A sample
    of the race (twelve runs in a row, 17 CPU-seconds of the slow tier) was dropped: it would have caught the abort
    with a chance of one in two, and only while the mechanism above was already broken."""
    out = str(finished["out"])
    marker = tmp_path / "interpreter-teardown-ran"
    probe = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w').close()); "
             f"sys.argv = ['seedsift', 'verify', '--out', {out!r}, '--strict']; from jobs.cli import entry; entry()")
    ended = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                           check=False)
    assert ended.returncode == 0, ended.stderr[-2000:]
    assert json.loads(ended.stdout)["strict_clean"] and not marker.exists()
