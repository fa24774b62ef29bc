"""Bookkeeping that scales: shards, compaction, the ledger, folded statistics, the lease, and both image layouts.

Unit tests use real Parquet on real local folders (and the loopback S3 endpoint for the lease); the end-to-end
tests run the real pipeline on the session's Ray with the tiny SD pipeline.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.verify import verify_output
from orchestrator.corpus.listing import list_corpus
from orchestrator.corpus.reader import ReadSettings, read_text_shards
from orchestrator.output.images import encode_image, pack_images, sample_key
from orchestrator.output.lease import LEASE_FILE, Lease, LeaseLost, OutputBusy
from orchestrator.output.ledger import ShardLedger
from orchestrator.output.manifest import Manifest, ShardFrame, complete_key, manifest_table, part_key, row_key, row_keys
from orchestrator.output.storage import Output
from orchestrator.output.summary import merge_stats, quantile, shard_stats
from tests.conftest import REPO_ROOT
from tests.helpers_ray import session_ray_env

SHARD = "p.txt/000000"
FRAME = ShardFrame(file="p.txt", index=0, rows=40, start=0, end=400, first_line=1, end_line=40, digest="d")


def rows_for(shard_rows: range, status: str = "ok", seed_offset: int = 0, image_keys: bool = False) -> list[dict]:
    rows = []
    for r in shard_rows:
        rows.append({"prompt_id": f"p{r}", "prompt": f"prompt {r}", "source": f"p.txt:{r + 1}", "seed": 100 + r +
                     seed_offset, "status": status, "shard": SHARD, "shard_row": r, "rank": 0, "candidate_index": 0,
                     "planned": 1, "score": float(r), "prompt_predicted_mean": r / 10, "prompt_predicted_std": 1.0,
                     "prompt_key": 1000 + r, "text_key": 2000 + r,
                     "image_key": f"images/x/p{r}.png" if image_keys and status == "ok" else None})
    return rows


# --- the manifest: commit, read, compact ---------------------------------------------------------------------


def test_parts_compact_into_one_object_and_every_state_reads_each_row_once(tmp_path):
    manifest = Manifest(Output(str(tmp_path / "out")))
    manifest.commit_part(SHARD, manifest_table(rows_for(range(0, 16))), FRAME)
    manifest.commit_part(SHARD, manifest_table(rows_for(range(16, 32), status="failed")), FRAME)
    # A later run delivered the failed rows, and a retried unit rewrote the first part (same name, same rows).
    manifest.commit_part(SHARD, manifest_table(rows_for(range(16, 40))), FRAME)
    manifest.commit_part(SHARD, manifest_table(rows_for(range(0, 16))), FRAME)
    open_state = manifest.read_all()
    assert open_state.num_rows == 40 and set(open_state["status"].to_pylist()) == {"ok"}
    assert len(manifest.open_parts()[SHARD]) == 3

    record = manifest.compact(SHARD, FRAME)
    assert record.stats["rows"] == 40 and record.stats["images"] == 40 and record.stats["failures"] == 0
    assert manifest.open_parts() == {} and list(manifest.complete_sizes()) == [SHARD]
    assert manifest.object_count() == 1  # one manifest object per complete shard
    complete = manifest.read_all()
    assert complete["shard_row"].to_pylist() == list(range(40))  # corpus order
    assert sorted(row_keys(complete)) == sorted(row_keys(open_state))
    # The footer carries the record: the summary and the next run's reader never read the rows.
    assert manifest.complete_records()[SHARD].frame == FRAME
    before = (tmp_path / "out" / complete_key(SHARD)).read_bytes()
    assert manifest.compact(SHARD, FRAME).stats == record.stats  # idempotent
    assert (tmp_path / "out" / complete_key(SHARD)).read_bytes() == before


def test_shard_statistics_fold_like_the_rows_they_summarise():
    rng = np.random.default_rng(0)
    tables = []
    for shard in range(5):
        rows = rows_for(range(shard * 50, shard * 50 + 50))
        for row in rows:
            row["score"] = float(rng.normal())
            row["prompt_predicted_mean"] = float(rng.normal())
        rows += [{"prompt_id": f"q{shard}", "source": f"p.txt:q{shard}", "status": "quarantined",
                  "error": f"duplicate of p.txt:{shard}"}]
        tables.append(manifest_table(rows))
    folded = merge_stats([shard_stats(t) for t in tables])
    whole = shard_stats(pa.concat_tables(tables))
    for name in ("rows", "prompts", "images", "failures", "by_status", "quarantine_reasons"):
        assert folded[name] == whole[name], name
    assert folded["quarantine_reasons"] == {"duplicate of an earlier row": 5}
    assert folded["difficulty"]["hardest"] == whole["difficulty"]["hardest"]
    for q in (0.1, 0.5, 0.9):
        assert abs(quantile(folded["score"], q) - quantile(whole["score"], q)) < 0.1


def test_ledger_completes_a_shard_when_every_corpus_row_is_delivered():
    ledger = ShardLedger()
    frame = ShardFrame(file="p.txt", index=0, rows=3, start=0, end=30, first_line=1, end_line=3, digest="d").to_json()

    def accounts(rows, planned, tally, status):
        n = len(rows)
        return {"shard": np.array([SHARD] * n, object), "shard_row": np.array(rows), "shard_rows": np.array([3] * n),
                "shard_base": np.array([0] * n), "shard_frame": np.array([frame] * n, object),
                "planned": np.array(planned), "tally": np.array(tally), "status": np.array(status, object)}

    assert ledger.add(accounts([0, 0], [2, 2], [0, 0], ["ok", "failed"])) == []  # row 0: one of two delivered
    assert ledger.add(accounts([1, 2], [1, 2], [0, 2], ["quarantined", "skipped"])) == []  # 2: an earlier run's
    done = ledger.add(accounts([0], [2], [0], ["ok"]))  # the retry of row 0's failed render
    assert [shard for shard, _ in done] == [SHARD] and SHARD not in ledger.open
    assert ledger.totals == {"rows": 4, "images": 2, "failed": 1, "quarantined": 1, "skipped": 2}


# --- the reader: shards skipped unread, edits noticed, growth continued ----------------------------------------


def test_complete_shards_are_skipped_unread_and_a_grown_tail_continues(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(25)) + "\n")
    (corpus_file,) = list_corpus(str(path))
    settings = ReadSettings(shard_size=10)
    first = list(read_text_shards(corpus_file, {}, settings))
    frames = {i: ShardFrame.from_json(t["shard_frame"][0].as_py()) for i, t in enumerate(first)}
    assert [t.num_rows for t in first] == [10, 10, 5]
    assert [f.rows for f in frames.values()] == [10, 10, 5]
    assert list(read_text_shards(corpus_file, frames, settings)) == []  # everything complete: nothing read

    with open(path, "a") as handle:
        handle.write("new a\nnew b\n")
    grown = list(read_text_shards(corpus_file, frames, settings))
    assert len(grown) == 1 and grown[0]["source"].to_pylist() == ["p.txt:27", "p.txt:28"]
    assert grown[0]["shard_row"].to_pylist() == [5, 6] and grown[0]["shard_base"][0].as_py() == 5
    assert ShardFrame.from_json(grown[0]["shard_frame"][0].as_py()).rows == 7

    path.write_text(path.read_text().replace("prompt 13", "prompt thirteen"))  # an edit inside shard 1
    edited = list(read_text_shards(corpus_file, frames, settings))
    assert [t["shard"][0].as_py() for t in edited] == ["p.txt/000001", "p.txt/000002"]
    assert "prompt thirteen" in edited[0]["prompt"].to_pylist()


def test_csv_shards_keep_multiline_rows_whole_across_a_resume(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt\n1,one\n2,"two\nlines"\n3,three\n4,four\n5,"five\nlines"\n6,six\n')
    (corpus_file,) = list_corpus(str(path))
    settings = ReadSettings(shard_size=2)
    whole = [row for t in read_text_shards(corpus_file, {}, settings) for row in t.to_pylist()]
    assert [r["prompt_id"] for r in whole] == ["1", "2", "3", "4", "5", "6"]
    frames = {0: ShardFrame.from_json(whole[0]["shard_frame"])}
    resumed = [row for t in read_text_shards(corpus_file, frames, settings) for row in t.to_pylist()]
    assert [(r["prompt_id"], r["prompt"], r["source"]) for r in resumed] == \
        [(r["prompt_id"], r["prompt"], r["source"]) for r in whole[2:]]


# --- the lease ---------------------------------------------------------------------------------------------


def test_a_held_output_is_refused_naming_the_holder_then_released(tmp_path):
    output = Output(str(tmp_path / "out"))
    first = Lease(output, seconds=60)
    first.acquire()
    with pytest.raises(OutputBusy, match=rf"host {first.holder.host}, pid {os.getpid()}, started "):
        Lease(output, seconds=60).acquire()
    first.renew()  # its own renewals keep working
    first.release()
    second = Lease(output, seconds=60)
    second.acquire()
    # A run whose lease was taken over learns it at its next renewal and stops.
    with pytest.raises(LeaseLost):
        first._version = "stale"
        first.renew()
    second.release()


def test_dead_and_expired_holders_are_taken_over(tmp_path):
    output = Output(str(tmp_path / "out"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = Lease(output, seconds=60)
    record = json.loads(holder._encode(holder.holder))
    record.update(pid=int(dead.stdout), pid_started=1.0)  # a run on this machine whose process is gone
    output.write_bytes(LEASE_FILE, json.dumps(record).encode())
    Lease(output, seconds=60).acquire()  # at once, no waiting for the expiry

    record.update(machine="another-machine", seconds=1)  # elsewhere: only the expiry can tell
    output.write_bytes(LEASE_FILE, json.dumps(record).encode())
    with pytest.raises(OutputBusy):
        Lease(output, seconds=60).acquire()
    time.sleep(1.2)
    Lease(output, seconds=60).acquire()


def test_lease_on_s3_uses_conditional_writes(s3_bucket):
    output = Output(f"{s3_bucket}/out")
    import threading

    results = []

    def take():
        try:
            Lease(output, seconds=60).acquire()
            results.append("held")
        except OutputBusy:
            results.append("busy")

    threads = [threading.Thread(target=take) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["busy"] * 5 + ["held"]  # If-None-Match: exactly one winner


# --- end to end ----------------------------------------------------------------------------------------------

PROMPTS = [f"a {colour} {thing}" for colour in ("red", "blue", "green") for thing in ("cube", "fox", "owl")]


def small(prompts: str, out: str, **overrides):
    from orchestrator.run.config import GenerateConfig

    values = dict(prompts=prompts, out=out, candidates=3, keep=1, steps=2, batch_size=4, guidance=3.0,
                  generator_cpus=1, shard_size=4)
    values.update(overrides)
    return GenerateConfig(**values)


@pytest.fixture(scope="module")
def sharded_run(ray_session, tmp_path_factory):
    """One run in WebDataset tars: 9 prompts, a blank line and a duplicate in shards of 4 corpus rows, 2 seeds each,
    tars of 3 images."""
    from orchestrator.flow import pipeline

    folder = tmp_path_factory.mktemp("sharded")
    corpus = folder / "p.txt"
    corpus.write_text("\n".join(PROMPTS + ["   ", "A red  cube"]) + "\n")
    out = str(folder / "out")
    summary = pipeline.run(small(str(corpus), out, keep=2, image_output="shards", shard_images=3))
    return {"out": out, "summary": summary}


def test_a_run_leaves_one_object_per_shard_and_its_summary_folds_them(sharded_run):
    from tests.helpers_manifest import manifest_frame

    out, summary = sharded_run["out"], sharded_run["summary"]
    manifest = Manifest(Output(out))
    assert summary["shards"] == {"complete": 3, "open": 0, "shard_size": 4}
    assert manifest.object_count() == 3 and manifest.open_parts() == {}
    rows = manifest_frame(out)
    assert summary["images"] == (rows.status == "ok").sum() == 18
    assert summary["prompts_quarantined"] == 2 and summary["quarantine_reasons"] == {
        "duplicate of an earlier row": 1, "prompt is empty or whitespace only": 1}
    assert summary["this_run"]["driver_peak_mb"] > 0 and summary["this_run"]["first_commit_s"] > 0
    report = verify_output(out)
    assert report["strict_clean"] and report["complete_shards"] == 3, report


def test_webdataset_shards_round_trip_through_verify_reproduce_and_export(sharded_run, tmp_path):
    """(Last of the module's tests on sharded_run: it removes a tar at its end.)"""
    import webdataset as wds

    from jobs import manifest as manifest_job
    from jobs import reproduce

    out = sharded_run["out"]
    manifest = Manifest(Output(out))
    rows = [row for row in manifest.read_all().to_pylist() if row["status"] == "ok"]
    tars = sorted({row["image_key"] for row in rows})
    assert all(key.startswith("images/p.txt/") and key.endswith(".tar") for key in tars)
    assert len(tars) == 7  # shards 0 and 1: 8 images each in tars of 3 (3 + 3 + 2); shard 2: 2 images
    assert not any(name.endswith(".png") for name in os.listdir(os.path.join(out, "images")))  # no loose files

    # Readable by the WebDataset library itself: every sample has its image, prompt and manifest row.
    samples = list(wds.WebDataset([os.path.join(out, key) for key in tars], shardshuffle=False))
    assert len(samples) == 18
    by_key = {row["image_member"].rsplit(".", 1)[0]: row for row in rows}
    for sample in samples:
        row = by_key[sample["__key__"]]
        assert sample["txt"].decode() == row["prompt"]
        assert json.loads(sample["json"])["seed"] == row["seed"]
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
        assert sample["png"] == manifest.read_image(row)  # one ranged read finds the same bytes

    report = verify_output(out)
    assert report["strict_clean"], report
    row = rows[3]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", out, "--prompt-id", row["prompt_id"], "--seed", str(row["seed"]),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(io.BytesIO(manifest.read_image(row))), np.int16)
    assert np.abs(original - np.asarray(Image.open(target), np.int16)).max() <= 1

    exported = tmp_path / "rows.parquet"
    assert manifest_job.main(["--out", out, "--to", str(exported)]) == 0
    table = pq.read_table(exported)
    table = table.filter(pc.equal(table["status"], "ok"))
    assert table.num_rows == 18 and len(set(zip(*[table[c].to_pylist() for c in ("prompt_id", "seed")]))) == 18
    assert all(uri.startswith(out) for uri in table["image_uri"].to_pylist())

    # A moved copy, reached by another spelling of its path (relative, with a trailing slash), is the same output:
    # rows locate images relative to the output root, so verify finds no missing or orphaned image there.
    import shutil

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    relative = os.path.relpath(moved) + "/"
    copy_report = verify_output(relative)
    assert copy_report["strict_clean"] and copy_report["missing_images"] == 0, copy_report
    again = tmp_path / "again-from-copy.png"
    assert reproduce.main(["--manifest", relative, "--prompt-id", row["prompt_id"], "--seed", str(row["seed"]),
                           "--out", str(again)]) == 0
    assert np.abs(np.asarray(Image.open(again), np.int16) - original).max() <= 1

    # A missing tar is noticed.
    os.remove(os.path.join(out, tars[0]))
    damaged = verify_output(out)
    assert not damaged["clean"] and damaged["missing_images"] == 3


def test_an_output_of_seedsift_0_1_is_refused_and_stays_readable(ray_session, tmp_path):
    from jobs import manifest as manifest_job
    from orchestrator.flow import pipeline
    from orchestrator.run.config import ConfigError

    out = tmp_path / "old"
    (out / "manifest").mkdir(parents=True)
    (out / "images" / "ab").mkdir(parents=True)
    (out / "images" / "ab" / "x_1.png").write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "png"))
    (out / "run.json").write_text(json.dumps({"fingerprint": "f", "fingerprint_fields": {}}))
    old_rows = pa.table({"prompt_id": ["x"], "prompt": ["a cat"], "source": ["p.txt:1"], "seed": [1],
                         "status": ["ok"], "image_uri": [str(out / "images" / "ab" / "x_1.png")]})
    pq.write_table(old_rows, out / "manifest" / "part-0123.parquet")
    corpus = tmp_path / "p.txt"
    corpus.write_text("a cat\n")
    with pytest.raises(ConfigError, match="written by seedsift 0.1.*Write to a new --out"):
        pipeline.run(small(str(corpus), str(out)))
    assert verify_output(str(out))["strict_clean"]
    assert manifest_job.main(["--out", str(out), "--to", str(tmp_path / "old.parquet")]) == 0
    assert pq.read_table(tmp_path / "old.parquet")["image_key"].to_pylist() == ["images/ab/x_1.png"]


# --- kills during compaction --------------------------------------------------------------------------------

COMPACT_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from orchestrator.output.manifest import Manifest
from orchestrator.output.storage import Output
manifest = Manifest(Output({out!r}))
print("start", flush=True)
started = time.time()
manifest.compact({shard!r}, image_format="png", shard_images=50)
print("done", time.time() - started, flush=True)
"""


def fabricate_open_shard(out: str, parts: int) -> set:
    """A shard in progress with `parts` 16-row parts and their images in small tars (--image-output shards)."""
    manifest = Manifest(Output(out))
    pixels = np.zeros((16, 16, 3), np.uint8)
    expected = set()
    for p in range(parts):
        rows = rows_for(range(p * 16, p * 16 + 16))
        keys = [row_key(r["prompt_id"], r["seed"], r["source"]) for r in rows]
        names = [f"{sample_key(r['prompt_id'], r['seed'])}.png" for r in rows]
        data, members = pack_images(names, [encode_image(pixels + (i % 7), "png") for i in range(16)])
        tar = part_key(SHARD, keys, suffix="tar")
        manifest.output.write_bytes(tar, data)
        for row, member in zip(rows, members):
            row.update(image_key=tar, image_member=member.name, image_offset=member.offset, image_size=member.size)
        manifest.commit_part(SHARD, manifest_table(rows), FRAME)
        expected |= set(keys)
    return expected


@pytest.mark.slow
def test_sigkill_at_any_moment_of_a_compaction_loses_and_duplicates_nothing(tmp_path):
    out = str(tmp_path / "out")
    expected = fabricate_open_shard(out, parts=120)
    code = COMPACT_CHILD.format(repo=str(REPO_ROOT), out=out, shard=SHARD)
    # One uninterrupted compaction of a copy gives the duration the kills are spread over.
    import shutil

    shutil.copytree(out, tmp_path / "probe")
    probe = subprocess.run([sys.executable, "-c", code.replace(out, str(tmp_path / "probe"))], capture_output=True,
                           text=True, check=True)
    duration = float(probe.stdout.split()[-1])
    kills, states = 0, set()
    for fraction in np.linspace(0.05, 1.2, 8):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "start"
        time.sleep(duration * fraction)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        manifest = Manifest(Output(out))
        states.add((bool(manifest.complete_sizes()), bool(manifest.open_parts())))
        rows = manifest.read_all()
        keys = row_keys(rows)
        assert len(keys) == len(set(keys)) and set(keys) == expected  # nothing lost, nothing twice
        report = verify_output(out)
        assert report["clean"], report  # every row's image readable, whatever moment the kill hit
        if manifest.complete_sizes() and not manifest.open_parts():
            break
    assert kills >= 2, "the kills never landed during a compaction"
    # What the next run does first: sweep the killed writers' temporaries, then tidy the shard.
    Output(out).sweep_temporaries()
    Manifest(Output(out)).compact(SHARD, image_format="png", shard_images=50)
    final = verify_output(out)
    assert final["strict_clean"] and final["committed_rows"] == len(expected), json.dumps(final)


# --- two runs into one output ---------------------------------------------------------------------------------
# The subject is the output's lease between job processes, not Ray's start-up: the jobs are CLI processes that join
# the session's Ray (as `--address` and `ray job submit` runs join a cluster). The lease is taken before Ray, so a
# run holds it from its first second.

OVERLAP_PROMPTS = 8  # two shards: the first run still renders while the second is refused and the third waits
RACE_PROMPTS = 4


def job(corpus: str, out: str, *extra: str, storage_options: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "jobs.generate", "--prompts", corpus, "--out", out, "--candidates", "2", "--keep",
            "2", "--steps", "2", "--guidance", "3.0", "--batch-size", "4", "--generator-cpus", "1", "--shard-size",
            "4", "--json", "--storage-options", json.dumps(storage_options or {}), *extra]


def start_job(command: list[str]) -> subprocess.Popen:
    """A job process joined to the session's Ray, in a process group of its own."""
    return subprocess.Popen(command, cwd=REPO_ROOT, env=session_ray_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def stop_job(process: subprocess.Popen | None) -> None:
    """SIGKILL a job process's group, if it still runs: only its driver (it joined the session's Ray, which ends
    the job's actors); tests/helpers_ray.kill_run is for jobs with a private Ray."""
    if process is None:
        return
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_overlapping_runs_refuse_or_wait_and_leave_a_clean_output(ray_session, tmp_path, s3_bucket, where):
    corpus = tmp_path / "p.txt"
    corpus.write_text("\n".join(f"prompt {i} of the overlap test" for i in range(OVERLAP_PROMPTS)) + "\n")
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    output = Output(out)
    first = start_job(job(str(corpus), out))
    waiting = None
    try:
        deadline = time.time() + 120
        while not output.exists(LEASE_FILE) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        # The refused run and the waiting one start together, both while the first holds the output.
        started = time.time()
        waiting = start_job(job(str(corpus), out, "--wait"))
        second = subprocess.run(job(str(corpus), out), cwd=REPO_ROOT, env=session_ray_env(), capture_output=True,
                                text=True, timeout=120)
        refused_in = time.time() - started
        assert second.returncode == 4, second.stderr[-2000:]
        message = second.stderr.strip().splitlines()[-1]
        assert f"pid {first.pid}" in message and "--wait" in message and "started" in message, message
        assert refused_in < 30, refused_in  # before Ray starts
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err.decode()[-3000:]
        stdout, stderr = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, stderr.decode()[-3000:]
        summary = json.loads(stdout.decode()[stdout.decode().index("{"):])
        assert summary["this_run"]["images"] == 0  # it waited, then found everything done
    finally:
        stop_job(first)
        stop_job(waiting)
    report = verify_output(output)
    assert report["strict_clean"] and report["delivered_rows"] == 2 * OVERLAP_PROMPTS, report


@pytest.mark.slow
# Each store once and each order once (the lease's create-only write is the store's; who starts first is the
# command's): two processes a case, so the full cross of four cases would cost two more CLI pairs for no new path.
@pytest.mark.parametrize(("where", "first"), [("local", "plain"), ("s3", "waiting")],
                         ids=["local-plain-first", "s3-waiting-first"])
def test_two_runs_started_together_in_either_order_render_each_row_once(ray_session, tmp_path, s3_bucket, where,
                                                                         first):
    """A plain run and a `--wait` run of the same command, started a few milliseconds apart in either order, both
    racing for the lease's create-only write: one renders everything; the other is refused in one line (exit 4) or
    waits and then finds nothing to do. Nothing is rendered twice; the output ends strict-clean."""
    corpus = tmp_path / "p.txt"
    corpus.write_text("\n".join(f"prompt {i} of the race test" for i in range(RACE_PROMPTS)) + "\n")
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/race-{first}"
    commands = {"plain": job(str(corpus), out), "waiting": job(str(corpus), out, "--wait")}
    order = [first, "waiting" if first == "plain" else "plain"]
    runs = {}
    try:
        for name in order:
            runs[name] = start_job(commands[name])
            time.sleep(0.005)
        results = {name: (run.wait(timeout=300), *(s.decode() for s in run.communicate())) for name, run in
                   runs.items()}
    finally:
        for run in runs.values():
            stop_job(run)
    rendered = 0
    for name, (status, stdout, stderr) in results.items():
        if status == 4:  # refused: only the plain run can be, and only in one line naming the holder
            assert name == "plain", stderr[-2000:]
            assert "--wait" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr, stderr[-2000:]
            continue
        assert status == 0, f"{name}: {stderr[-3000:]}"
        rendered += json.loads(stdout[stdout.index("{"):])["this_run"]["images"]
    assert rendered == 2 * RACE_PROMPTS, results  # every row rendered by exactly one of the two
    report = verify_output(Output(out))
    assert report["strict_clean"] and report["delivered_rows"] == 2 * RACE_PROMPTS, report


def test_outdated_corpus_lines_are_named_and_moved_ones_are_not():
    """Which earlier rows of a re-read shard are outdated: an edited line and a removed one are; a line that only
    moved up (a deletion above it: the reader delivers it again, as a quarantined duplicate of itself) is not, and
    neither is an unchanged one the reader delivered nothing new for."""
    import pyarrow as pa

    from orchestrator.output.manifest import outdated_sources

    def rows(*entries):
        names = ("shard_row", "prompt_id", "prompt", "status", "source")
        return pa.table({name: [entry[i] for entry in entries] for i, name in enumerate(names)})

    earlier = rows((0, "a", "a cat", "ok", "p.txt:1"), (1, "b", "a dog", "ok", "p.txt:2"),
                   (2, "c", "a cow", "ok", "p.txt:3"), (3, "d", "a hen", "ok", "p.txt:4"))
    # Line 2 deleted: "a cow" and "a hen" move up one line, and the shard has 3 rows now.
    moved = rows((1, "c", "a cow", "quarantined", "p.txt:2"), (2, "d", "a hen", "quarantined", "p.txt:3"))
    assert outdated_sources(earlier, moved, 3) == {"p.txt:2"}
    # Line 3 edited in place, line 4 removed, nothing else delivered again.
    edited = rows((2, "e", "a goat", "ok", "p.txt:3"))
    assert outdated_sources(earlier, edited, 3) == {"p.txt:3", "p.txt:4"}
    assert outdated_sources(earlier, None, 4) == set()  # a tail that grew, or nothing changed
