"""Safe by default: seedsift never touches a user's files, never calls nothing "clean", never hangs without a word.

One test per break an adversarial run against 0.2 found (each failed there); the small-cluster placement tests,
which need a Ray head of their own, are in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator.output.lease import LEASE_FILE, Lease
from orchestrator.output.storage import Output
from tests.conftest import REPO_ROOT, wait_for


def test_a_killed_runs_zombie_does_not_hold_the_output(tmp_path):
    """A SIGKILLed driver stays a zombie until its parent reaps it (for ever under an init that never reaps): its
    lease is taken over at once, as a dead process's is."""
    output = Output(str(tmp_path / "out"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        started = psutil.Process(child.pid).create_time()
        os.kill(child.pid, signal.SIGKILL)
        # Not reaped: this process, its parent, calls no wait until the end.
        deadline = time.time() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.01)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        holder = Lease(output, seconds=600)
        record = json.loads(holder._encode(holder.holder))
        record.update(pid=child.pid, pid_started=started)  # the killed run, exactly as it recorded itself
        output.write_bytes(LEASE_FILE, json.dumps(record).encode())
        Lease(output, seconds=600).acquire()  # at once, not after --lease-seconds
    finally:
        child.wait()


def cli(*args: str) -> subprocess.CompletedProcess:
    from tests.helpers_ray import private_ray_env

    env = private_ray_env()
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    result.ray_started = bool(os.listdir(env["RAY_TMPDIR"]))
    return result


FAST = ["--candidates", "2", "--keep", "1", "--steps", "1", "--guidance", "3.0", "--generator-cpus", "1"]


def test_a_folder_of_someone_elses_files_is_refused_and_left_untouched(tmp_path):
    """0.2 replaced the user's summary.json and report.html, then called their photo an orphan."""
    folder = tmp_path / "theirs"
    (folder / "images" / "zz").mkdir(parents=True)
    files = {"summary.json": b'{"mine": 1}', "report.html": b"<p>my report</p>", "thesis.txt": b"chapter 1",
             "images/zz/photo.png": b"\x89PNG not really"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    corpus = tmp_path / "p.txt"
    corpus.write_text("a red cube\n")
    result = cli("generate", "--prompts", str(corpus), "--out", str(folder), *FAST)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds files seedsift did not write" in lines[0] and "thesis.txt" in lines[0], lines
    assert not result.ray_started
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written, nothing replaced
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    # verify does not call it an output with an orphan either
    checked = cli("verify", "--out", str(folder))
    assert checked.returncode == 2 and "holds no seedsift run" in checked.stderr, checked.stderr


def test_another_run_starting_at_the_same_moment_is_not_taken_for_a_users_files(tmp_path):
    """Two runs started together into a new output: the first has taken the lease and is probing the store, its
    run.json not written yet. The second must see seedsift's own names there (and then wait for or be refused the
    lease), not a folder of someone else's files: the race test on S3 found this."""
    from orchestrator.output.manifest import Manifest
    from orchestrator.output.storage import LOCK_SUFFIX, PROBE_PREFIX

    out = tmp_path / "out"
    out.mkdir()
    for name in (LEASE_FILE, LEASE_FILE + LOCK_SUFFIX, f"{PROBE_PREFIX}0123abcd"):
        (out / name).write_bytes(b"{}")
    output = Output(str(out))
    Manifest(output).check_may_write(output.top_level())  # no error
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="holds files seedsift did not write .notes.txt."):
        Manifest(output).check_may_write(output.top_level())


@pytest.mark.parametrize("flags", [[], ["--strict"], ["--repair"]])
def test_verify_of_something_that_is_no_output_says_so_and_creates_nothing(tmp_path, flags):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "p.txt").write_text("a red cube\n")
    for target in (tmp_path / "no" / "such" / "path", tmp_path / "typo", corpus):
        result = cli("verify", "--out", str(target), *flags)
        assert result.returncode == 2, (target, result.stdout, result.stderr)
        assert "holds no seedsift run" in result.stderr and '"clean": true' not in result.stdout
    assert not (tmp_path / "typo").exists() and not (tmp_path / "no").exists()
    assert sorted(p.name for p in corpus.iterdir()) == ["p.txt"]  # no lease.json, no damaged/


def test_verify_of_a_missing_bucket_says_so(s3_endpoint):
    from jobs import verify

    assert verify.main(["--out", "s3://no-such-bucket-here/x"]) == 2


def test_verify_repair_while_a_run_holds_the_output_says_what_to_do(finished, tmp_path, capsys):
    import shutil

    from jobs import verify

    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    holder = Lease(Output(str(out)), seconds=600)
    holder.acquire()
    try:
        assert verify.main(["--out", str(out), "--repair"]) == 4
        message = capsys.readouterr().err
        assert "seedsift verify --repair` again" in message and "--wait" not in message, message
    finally:
        holder.release()


def test_an_output_inside_its_corpus_folder_is_never_read_as_corpus(ray_session, tmp_path):
    """0.2 read its own manifest back as corpus on every rerun: more sources, more quarantined rows each time."""
    from orchestrator.flow import pipeline
    from tests.conftest import finished_settings

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "prompts.txt").write_text("a red cube\na blue fox\n")
    out = corpus / "out"
    for _ in range(2):
        summary = pipeline.run(finished_settings(str(corpus), str(out)))
    assert summary["prompts"] == 2 and summary["prompts_quarantined"] == 0 and summary["this_run"]["rows"] == 0
    from tests.helpers_manifest import manifest_frame

    assert set(manifest_frame(str(out)).source.str.rsplit(":", n=1).str[0]) == {"prompts.txt"}
    only_output = cli("generate", "--prompts", str(out), "--out", str(out), *FAST)
    assert only_output.returncode == 2 and "inside --out" in only_output.stderr, only_output.stderr


def test_ids_are_scoped_per_file_in_new_outputs_and_as_written_in_older_ones(tmp_path):
    """A folder corpus: a new output records `ids: per file` and qualifies ids by file (the run itself is in
    tests/test_malformed_rows.py); one begun by 0.2 (no such record) keeps its ids as written, so its committed rows
    still match what the corpus reads as; a single-file corpus keeps bare ids."""
    from orchestrator.corpus.listing import is_collection
    from orchestrator.output.manifest import RUN_FILE, Manifest
    from orchestrator.run.config import GenerateConfig
    from orchestrator.run.plan import build_plan

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "1", "prompt": "a red cube"}) + "\n")

    def scope(prompts: str, out: str) -> bool:
        config = GenerateConfig(prompts=prompts, out=out, candidates=2, keep=1, steps=2)
        return Manifest(Output(out)).begin_run(build_plan(config).run_file, is_collection(prompts))

    assert scope(str(folder), str(tmp_path / "new")) is True
    assert json.loads((tmp_path / "new" / RUN_FILE).read_text())["layout"]["ids"] == "per file"
    assert scope(str(folder), str(tmp_path / "new")) is True  # the rerun reads the record
    assert scope(str(folder / "*.jsonl"), str(tmp_path / "glob")) is True
    assert scope(str(folder / "a.jsonl"), str(tmp_path / "single")) is False
    old = json.loads((tmp_path / "new" / RUN_FILE).read_text())
    del old["layout"]["ids"]  # as 0.2 wrote it
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RUN_FILE).write_text(json.dumps(old))
    assert scope(str(folder), str(tmp_path / "old")) is False


@pytest.mark.parametrize("cpus", [1, 2, 4])
@pytest.mark.parametrize("one_actor", [False, True], ids=["scorer-apart", "one-actor"])
def test_a_run_asks_for_no_more_cpus_than_the_cluster_has(cpus, one_actor):
    """A fresh 2-CPU `ray start --head` deadlocked 0.2 (generator 1 + scorer 0.5 + rater 0.25 + index 0.25 held both
    CPUs, and the read task could never be placed): the requests, tasks included, now fit whatever the cluster has;
    threads stay as configured. (A real 1-CPU head with 12 prompts: tests/test_cluster.py.)"""
    from orchestrator.flow.resources import TASK_SLOTS, plan_resources
    from orchestrator.run.config import GenerateConfig

    config = GenerateConfig(prompts="p.txt", out="o", one_actor=one_actor)
    resources = plan_resources(config, {"CPU": float(cpus)}, buckets=1, model_rater=True)
    assert resources.one_actor == one_actor and (resources.scorer_cpus == 0) == one_actor
    asked = (resources.generator_cpus + resources.scorer_cpus + resources.rater_cpus
             + (1 + 1 + TASK_SLOTS) * resources.light_cpus)
    assert asked <= cpus + 1e-9 and resources.generator_threads >= 1
    assert (resources.scale < 1) == (cpus < 3), resources  # a local Ray (cores + 2 = 4 here) needs no scaling
    assert min(resources.generator_cpus, resources.light_cpus) > 0


@pytest.mark.parametrize(("nodes", "gpus", "generators", "one_actor"),
                         [(1, 0, 1, True), (2, 0, 1, False), (1, 1, 1, False), (1, 0, 2, False)])
def test_one_actor_scores_and_renders_only_on_one_node_without_a_gpu(nodes, gpus, generators, one_actor):
    """A laptop or a single CPU head: one actor scores and renders (one process imports the libraries and loads the
    model, actors/stages/local.py). Clusters, GPUs and several generators keep the scorer apart."""
    from orchestrator.flow.resources import plan_resources
    from orchestrator.run.config import GenerateConfig

    config = GenerateConfig(prompts="p.txt", out="o", generators=generators)
    resources = plan_resources(config, {"CPU": 16.0, "GPU": float(gpus)}, buckets=1, model_rater=False, nodes=nodes)
    assert resources.one_actor == one_actor
    assert ("scoring in the generator" in resources.describe()) == one_actor


def test_a_stage_that_cannot_be_placed_is_named_with_what_the_cluster_has(ray_session):
    import ray

    from orchestrator.flow.resources import plan_resources
    from orchestrator.flow.stall import StallWatch
    from orchestrator.output.ledger import ShardLedger
    from orchestrator.run.config import GenerateConfig

    @ray.remote(num_cpus=1000)
    class TooBigStage:
        pass

    @ray.remote(num_cpus=999)
    def too_big_task():  # what 0.2's 2-CPU head waited on: a task (Ray Data's repartition) asking for a whole CPU
        return None

    @ray.remote(num_cpus=0.01)
    class SlowToBuildStage:  # placed, its constructor still running (a model loading on a busy machine)
        def __init__(self):
            time.sleep(60)

    building = SlowToBuildStage.remote()
    wait_for(lambda: any(info["ActorClassName"].endswith("SlowToBuildStage") and info.get("Pid")
                         for info in ray._private.state.actors().values()), 60, "the slow actor's process")
    actor = TooBigStage.remote()
    task = too_big_task.remote()
    said = []
    watch = StallWatch(ShardLedger(), plan_resources(GenerateConfig(prompts="p.txt", out="o"),
                                                     ray.cluster_resources(), 1, False), said.append, every=0.2)
    try:  # Ray reports pending demands a moment after the actor table shows the actor: wait for a line with both
        deadline = time.time() + 60
        while not any("CPU 999" in line and "CPU 1000" in line for line in said) and time.time() < deadline:
            time.sleep(0.1)
        seen = list(said)  # before anything is killed: a line the watch writes after that describes another state
    finally:
        watch.stop()
        ray.kill(actor)
        ray.kill(building)
        ray.cancel(task, force=True)
    assert seen and all("waiting for the cluster to place" in line and "TooBigStage" in line for line in seen), seen
    assert not any("SlowToBuildStage" in line for line in seen), seen  # placed and building: not a stall
    line = seen[-1]
    assert "1 x CPU 999" in line and "1 x CPU 1000" in line, seen  # Ray's pending demands, tasks too
    assert "CPU" in line and "free" in line, seen


def test_candidates_are_scored_in_memory_that_does_not_grow_with_n(ray_session, monkeypatch):
    """-n 100000 with the predictor ran 0.2's scorer out of memory (every noise drawn at once) and Ray restarted
    it for ever. Now noises are drawn and scored SCORE_CHUNK at a time, so memory does not grow with N, and the
    chunks give the scores of one batch. (A process's peak RSS is too noisy to assert on here; N = 100,000 end to
    end, with its memory, is in docs/reliability.md.)"""
    import numpy as np

    from actors.models.embedded import resolve_model
    from actors.models.families import latent_shape
    from actors.models.seeds import batch_noise, candidate_seeds
    from actors.stages import scorer as scorer_module
    from actors.stages.scorer import SCORE_CHUNK, ScorerStage
    from actors.stages.settings import ScoringPlan
    from orchestrator.run.predictor_files import EMBEDDED_PREDICTORS, read_predictor_files

    location = str(EMBEDDED_PREDICTORS["tiny-sd"])
    plan = ScoringPlan(model=resolve_model("embedded:tiny-sd"), run_seed=0, candidates=6 * SCORE_CHUNK, keep=1,
                       policy="predictor", guidance=7.5, height=64, width=64,
                       latent_shape=latent_shape(resolve_model("embedded:tiny-sd"), 64, 64), prompts_per_call=1,
                       predictor_source=location)
    files = ray_session.put(read_predictor_files(location, "embedded:tiny-sd", {}))
    scorer = ScorerStage(plan, predictor_files=[files])
    embeds = scorer.adapter.encode(["a red cube"], 7.5)
    seeds = candidate_seeds(0, "p", 6 * SCORE_CHUNK + 7)
    drawn = []

    def spy(chunk, shape):
        drawn.append(len(chunk))
        return batch_noise(chunk, shape)

    monkeypatch.setattr(scorer_module, "batch_noise", spy)
    scores = scorer._predict(seeds, embeds, 0)
    assert scores.shape == (len(seeds),) and np.isfinite(scores).all()
    assert drawn == [SCORE_CHUNK] * 6 + [7], drawn  # never more than one chunk of noise in memory
    head = seeds[:SCORE_CHUNK + 5]
    whole = scorer.predictor.score_candidates(batch_noise(head, scorer.latent_shape),
                                              {k: v[0] for k, v in embeds.items() if k != "truncated"})
    np.testing.assert_allclose(scores[:len(head)], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_named_id_column_that_is_not_there_is_refused_like_a_prompt_column(tmp_path, fmt):
    """0.2 ignored --id-column nope and hashed the texts into ids without a word."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / f"p.{fmt}"
    if fmt == "csv":
        corpus.write_text("prompt,key\na red cube,1\n")
    elif fmt == "jsonl":
        corpus.write_text(json.dumps({"prompt": "a red cube", "key": "1"}) + "\n")
    else:
        pq.write_table(pa.table({"prompt": ["a red cube"], "key": ["1"]}), corpus)
    result = cli("generate", "--prompts", str(corpus), "--out", str(tmp_path / "out"), "--id-column", "nope", *FAST)
    assert result.returncode == 2 and not result.ray_started, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no column 'nope' (--id-column; found:" in lines[0] and "key" in lines[0], lines


def test_a_file_named_compressed_that_is_not_is_refused_before_ray(tmp_path):
    corpus = tmp_path / "p.txt.gz"
    corpus.write_text("a red cube\n")
    result = cli("generate", "--prompts", str(corpus), "--out", str(tmp_path / "out"), *FAST)
    assert result.returncode == 2 and not result.ray_started, result.stderr  # 0.2: exit 3, the storage code
    assert "p.txt.gz: not gzip data" in result.stderr.strip().splitlines()[-1]


def test_a_truncated_compressed_file_delivers_its_rows_before_the_damage_and_names_the_file(finished, tmp_path):
    """0.2 failed late (exit 1 after Ray started, no file named, 'rerun to resume', and the rerun failed the same
    way). The readable rows are delivered; the file is named in one line with the input exit code."""
    import gzip

    from jobs import generate
    from tests.helpers_manifest import manifest_frame

    whole = gzip.compress("".join(f"a paper boat number {i}\n" for i in range(16)).encode())
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "cut.txt.gz").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "corpus" / "fine.txt").write_text("a red cube\n")
    out = tmp_path / "out"
    argv = ["--prompts", str(tmp_path / "corpus"), "--out", str(out), *FAST]
    assert generate.main(argv) == 2
    rows = manifest_frame(str(out))
    failed = rows[rows.status == "failed"]
    assert len(failed) == 1 and "cut.txt.gz: compressed data damaged after line" in failed.error.iloc[0]
    delivered = rows[rows.status == "ok"]
    assert (delivered.source == "fine.txt:1").sum() == 1 and delivered.source.str.startswith("cut.txt.gz").sum() > 0
    assert not rows.duplicated(["prompt_id", "seed"]).any()
    assert generate.main(argv) == 2  # the same answer, nothing rendered twice
    assert len(manifest_frame(str(out))) == len(rows)


def test_an_unknown_job_name_says_so_and_suggests_one():
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "generat"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "seedsift: unknown job 'generat'; did you mean 'generate'?"
    assert "usage: seedsift JOB" in result.stderr and not result.stdout


def test_storage_failures_say_which_of_full_unreachable_or_refused(tmp_path, monkeypatch):
    """A store full at start exits 3 as documented (0.2: 2); each message gives one cause and its one fix."""
    import errno

    from orchestrator.output.storage import StorageError
    from orchestrator.run.config import ConfigError

    output = Output(str(tmp_path / "out"))
    for raised, kind, words in ((OSError(errno.ENOSPC, "No space left on device"), StorageError, "is full"),
                                (ConnectionError("connection refused"), StorageError, "cannot be reached"),
                                (PermissionError(errno.EACCES, "Permission denied"), ConfigError, "is not writable")):
        monkeypatch.setattr(Output, "write_bytes", lambda self, key, data, raised=raised: (_ for _ in ()).throw(raised))
        with pytest.raises(kind) as caught:
            output.check_writable()
        message = str(caught.value)
        assert words in message, message
        assert ("credentials" in message) == (kind is ConfigError) and ("store is back" in message) == (
            words == "cannot be reached"), message
        mid_run = str(output._storage_error("writing x", raised))
        assert sum(advice in mid_run for advice in ("is full", "cannot be reached", "refused it")) == 1, mid_run


def test_reading_an_output_on_s3_prints_no_library_chatter(s3_endpoint, s3_bucket, tmp_path):
    """0.2's `seedsift manifest` on S3 printed botocore's INFO lines (its credential chain) around its answer."""
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "manifest", "--out", f"{s3_bucket}/nothing", "--to",
                             str(tmp_path / "rows.parquet")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ))
    assert result.returncode == 2 and "holds no seedsift run" in result.stderr, result.stderr
    assert "INFO" not in result.stderr and "credentials" not in result.stderr.lower(), result.stderr
