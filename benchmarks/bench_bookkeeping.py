"""Bookkeeping at corpus scale: what a run costs on an output that already holds 10k to 10M committed rows.

For each size, an output is fabricated through the project's own writing code: the reader cuts a corpus of N
rows (plus a few new ones at its end) into shards, each shard's rows are committed as a part by
`Manifest.commit_part` and compacted by `Manifest.compact`, as a finished run leaves them. Then `python -m jobs.generate` runs in a fresh process
with its own Ray, and we measure:

- startup_extra_s: process start to the first new row committed, minus the same on an empty output with the
  same corpus (that run is stopped at its first commit);
- driver_peak_mb: the job process's peak RSS (VmHWM, reported by the job itself);
- actor_peak_mb: the largest RSS any of the run's Ray worker processes reached (sampled every 0.25 s);
- summary_s: the time the job spent folding its summary;
- manifest_objects: objects under OUT/manifest after the run.

Old design (seedsift 0.1): with --legacy-max N, sizes up to N also fabricate the old layout (one part per 16
rows, under manifest/) and time the old start-up read (every part's prompt_id/seed/source/status columns, read in
series into a set), so the ratio is measured in one run.

    .venv/bin/python benchmarks/bench_bookkeeping.py --rows 10000 100000 1000000 10000000 --s3-rows 1000000
    .venv/bin/python benchmarks/bench_bookkeeping.py --rows 100000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import PYTHON, REPO_ROOT, LoadSampler, machine, save

NEW_ROWS = 8  # prompts appended to the corpus after the output was written: what the measured run renders
SHARD_SIZE = 10_000
JOB_FLAGS = ["--candidates", "1", "--keep", "1", "--steps", "1", "--guidance", "1.0", "--batch-size", "4",
             "--generator-cpus", "1", "--shard-size", str(SHARD_SIZE), "--json"]


def corpus(work: Path, rows: int) -> Path:
    """rows + NEW_ROWS distinct prompts, one a line (written once per size)."""
    path = work / f"prompts-{rows}.txt"
    if not path.exists():
        subjects = ["cat", "lighthouse", "teapot", "astronaut", "forest", "robot", "castle", "violin", "market"]
        with open(f"{path}.partial", "w", encoding="utf-8") as handle:
            for i in range(rows + NEW_ROWS):
                handle.write(f"a photo of a {subjects[i % 9]}, number {i}\n")
        os.rename(f"{path}.partial", path)
    return path


def fabricate(corpus_path: Path, out: str, rows: int, storage_options: dict) -> dict:
    """A finished run's output holding the corpus's first `rows` rows, written by the project's own code."""
    import pyarrow as pa

    from orchestrator.corpus.listing import list_corpus
    from orchestrator.output.manifest import MANIFEST_SCHEMA, Manifest, ShardFrame
    from orchestrator.run.plan import build_plan
    from orchestrator.corpus.reader import ReadSettings, read_text_shards
    from actors.models.seeds import candidate_seeds
    from orchestrator.output.storage import Output

    started = time.time()
    config = job_config(corpus_path, out, storage_options)
    plan = build_plan(config)
    manifest = Manifest(Output(out, storage_options))
    manifest.begin_run(plan.run_file, collection=False)  # one corpus file
    run_fields = plan.run_fields
    (corpus_file,) = list_corpus(str(corpus_path))
    settings = ReadSettings(shard_size=SHARD_SIZE, limit=rows)
    shards = 0
    for table in read_text_shards(corpus_file, {}, settings):
        shard = table["shard"][0].as_py()
        frame = ShardFrame.from_json(table["shard_frame"][0].as_py())
        ids = table["prompt_id"].to_pylist()
        n = table.num_rows
        columns = {
            "prompt_id": table["prompt_id"], "prompt": table["prompt"], "source": table["source"],
            "seed": pa.array([candidate_seeds(config.seed, p, 1)[0] for p in ids], pa.int64()),
            "candidate_index": pa.array([0] * n, pa.int32()), "rank": pa.array([0] * n, pa.int32()),
            "planned": pa.array([1] * n, pa.int32()), "score": pa.array([50.0] * n, pa.float64()),
            "status": pa.array(["ok"] * n), "shard": table["shard"], "shard_row": table["shard_row"],
            "prompt_key": table["prompt_key"], "text_key": table["text_key"],
            **{name: pa.array([value] * n) for name, value in run_fields.items()},
        }
        committed = pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns else pa.nulls(n, f.type)
                              for f in MANIFEST_SCHEMA})
        manifest.commit_part(shard, committed, frame)
        manifest.compact(shard, frame)
        shards += 1
    return {"fabricate_s": round(time.time() - started, 1), "shards": shards}


def job_config(corpus_path: Path, out: str, storage_options: dict):
    from orchestrator.run.config import GenerateConfig

    return GenerateConfig(prompts=str(corpus_path), out=out, candidates=1, keep=1, steps=1, guidance=1.0,
                          batch_size=4, generator_cpus=1, shard_size=SHARD_SIZE, save_images=False,
                          storage_options=storage_options)


class WorkerPeaks:
    """The largest RSS reached by any Ray worker process of one private Ray (by its RAY_TMPDIR), sampled."""

    def __init__(self, ray_tmp: str, driver_pid: int):
        self.ray_tmp, self.driver_pid, self.peak_mb = ray_tmp, driver_pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.wait(0.25):
            for proc in psutil.process_iter():
                try:
                    if proc.pid == self.driver_pid or proc.environ().get("RAY_TMPDIR") != self.ray_tmp:
                        continue
                    if "ray::" in " ".join(proc.cmdline()[:1]) or "default_worker" in " ".join(proc.cmdline()):
                        self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
                except psutil.Error:
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def committed_now(out: str, storage_options: dict, before: set) -> bool:
    """Whether a manifest object that was not there before exists (the run's first commit)."""
    from orchestrator.output.storage import Output

    try:
        return bool(set(Output(out, storage_options).list_keys("manifest", ".parquet")) - before)
    except Exception:  # noqa: BLE001 - an empty output has no manifest folder yet
        return False


def run_job(corpus_path: Path, out: str, storage_options: dict, env: dict, stop_at_first_commit: bool) -> dict:
    """One `python -m jobs.generate` in a fresh process with a private Ray; times its first commit."""
    from orchestrator.output.storage import Output
    from tests.helpers_ray import kill_run, stop_private_ray

    before = set(Output(out, storage_options).list_keys("manifest", ".parquet"))
    ray_tmp = tempfile.mkdtemp(prefix="ssb-", dir="/tmp")
    env = {**env, "RAY_TMPDIR": ray_tmp}
    command = [PYTHON, "-m", "jobs.generate", "--prompts", str(corpus_path), "--out", out, *JOB_FLAGS,
               "--storage-options", json.dumps(storage_options)]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    first_commit = None
    with WorkerPeaks(ray_tmp, process.pid) as peaks:
        while process.poll() is None:
            if first_commit is None and committed_now(out, storage_options, before):
                first_commit = time.time() - started
                if stop_at_first_commit:
                    kill_run(process, ray_tmp)
                    break
            time.sleep(0.05)
        stdout, stderr = process.communicate()
    stop_private_ray(ray_tmp, roots=[process.pid])
    shutil.rmtree(ray_tmp, ignore_errors=True)
    result = {"first_commit_s": round(first_commit, 2) if first_commit is not None else None,
              "actor_peak_mb": round(peaks.peak_mb, 1), "wall_s": round(time.time() - started, 1)}
    if not stop_at_first_commit:
        if process.returncode != 0:
            raise RuntimeError(f"the job failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
        summary = json.loads(stdout.decode()[stdout.decode().index("{"):])
        result.update(summary_s=summary["this_run"]["summary_s"], driver_peak_mb=summary["this_run"]["driver_peak_mb"],
                      images=summary["this_run"]["images"], job_first_commit_s=summary["this_run"]["first_commit_s"])
    return result


def legacy_read(work: Path, rows: int) -> dict:
    """seedsift 0.1's start-up read on its own layout (one part per 16 rows): every part's columns, in series."""

    import pyarrow as pa
    import pyarrow.parquet as pq


    folder = work / f"legacy-{rows}"
    if not folder.exists():
        partial = work / f"legacy-{rows}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "manifest").mkdir(parents=True)
        for start in range(0, rows, 16):
            ids = [f"id-{i}" for i in range(start, min(rows, start + 16))]
            table = pa.table({"prompt_id": ids, "seed": list(range(len(ids))), "source": [f"p.txt:{i}" for i in ids],
                              "status": ["ok"] * len(ids), "prompt": ids, "score": [1.0] * len(ids)})
            pq.write_table(table, partial / "manifest" / f"part-{start:012d}.parquet")
        partial.rename(folder)
    code = f"""
import io, time, json, sys, os
import pyarrow.parquet as pq, pyarrow.compute as pc, pyarrow as pa
sys.path.insert(0, {str(REPO_ROOT)!r})
from orchestrator.output.manifest import row_key
started = time.time()
folder = {str(folder / 'manifest')!r}
keys = sorted(os.listdir(folder))
tables = [pq.read_table(io.BytesIO(open(os.path.join(folder, k), 'rb').read()), columns=['prompt_id','seed','source','status']) for k in keys]
table = pa.concat_tables(tables)
table = table.filter(pc.is_in(table['status'], value_set=pa.array(['ok', 'quarantined'])))
done = {{row_key(p, s, src) for p, s, src in zip(*(table[c].to_pylist() for c in ('prompt_id', 'seed', 'source')))}}
peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024
print(json.dumps({{'legacy_committed_pairs_s': round(time.time() - started, 2), 'legacy_peak_mb': round(peak, 1), 'pairs': len(done)}}))
"""
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def _remove(out: str, options: dict) -> None:
    if "://" in out:
        import fsspec

        fs, path = fsspec.core.url_to_fs(out, **options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


def measure(rows: int, storage: str, work: Path, legacy_max: int, endpoint: str | None, repeats: int) -> dict:
    from orchestrator.output.manifest import Manifest
    from orchestrator.output.storage import Output

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(SEEDSIFT_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    corpus_path = corpus(work, rows)
    if storage == "s3":
        import s3fs

        bucket = f"bench-{rows}-{int(time.time())}"
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(bucket)
        out, empty = f"s3://{bucket}/full", f"s3://{bucket}/empty"
        options = {"endpoint_url": endpoint}
    else:
        out, empty = str(work / f"out-{rows}"), str(work / f"empty-{rows}")
        for folder in (out, empty):
            shutil.rmtree(folder, ignore_errors=True)
        options = {}
    fabricated = fabricate(corpus_path, out, rows, options)
    baselines, fulls = [], []
    for repeat in range(repeats):  # interleaved, so both sides see the same load; the minimum of each is kept
        if repeat:
            with open(corpus_path, "a", encoding="utf-8") as handle:  # new prompts again for the next full run
                handle.writelines(f"a new prompt {repeat}-{i}\n" for i in range(NEW_ROWS))
            _remove(empty, options)
        baselines.append(run_job(corpus_path, empty, options, env, stop_at_first_commit=True))
        fulls.append(run_job(corpus_path, out, options, env, stop_at_first_commit=False))
    baseline = min(baselines, key=lambda r: r["first_commit_s"])
    full = min(fulls, key=lambda r: r["first_commit_s"])
    result = {
        "rows": rows, "storage": storage,
        "startup_extra_s": round(full["first_commit_s"] - baseline["first_commit_s"], 2),
        "startup_runs_s": [r["first_commit_s"] for r in fulls],
        "empty_output_startup_runs_s": [r["first_commit_s"] for r in baselines],
        "driver_peak_mb": max(r["driver_peak_mb"] for r in fulls),
        "actor_peak_mb": max(r["actor_peak_mb"] for r in fulls), "summary_s": max(r["summary_s"] for r in fulls), "manifest_objects": Manifest(Output(out, options)).object_count(),
        "startup_s": full["first_commit_s"], "empty_output_startup_s": baseline["first_commit_s"],
        "new_images": full["images"], "job_wall_s": full["wall_s"], **fabricated,
    }
    if storage == "local" and rows <= legacy_max:
        result.update(legacy_read(work, rows))
    if storage == "local":
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(empty, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--s3-rows", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--legacy-max", type=int, default=1_000_000, help="also time the 0.1 layout up to this size")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "seedsift-bench", "bookkeeping"))
    parser.add_argument("--repeats", type=int, default=2, help="start-up measured this many times each side")
    parser.add_argument("--json", action="store_true", help="print one JSON object per size, nothing else")
    parser.add_argument("--name", default="bookkeeping",
                        help="results/NAME.json and .md (a partial rerun: another name)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    with LoadSampler() as load:
        for rows in args.rows:
            results.append(measure(rows, "local", work, args.legacy_max, None, args.repeats))
            if args.json:
                print(json.dumps({k: results[-1][k] for k in KEYS}), flush=True)
        if args.s3_rows:
            from moto.server import ThreadedMotoServer

            from tests.conftest import free_port

            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            server.start()
            endpoint = f"http://127.0.0.1:{port}"
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint)
            try:
                for rows in args.s3_rows:
                    results.append(measure(rows, "s3", work, 0, endpoint, args.repeats))
                    if args.json:
                        print(json.dumps({k: results[-1][k] for k in KEYS}), flush=True)
            finally:
                server.stop()
    if not args.json:
        lines = ["| rows | storage | startup extra s | driver peak MB | largest actor MB | summary s | manifest objects | "
                 "0.1 start-up read s (MB) |", "|---|---|---|---|---|---|---|---|"]
        for r in results:
            legacy = f"{r['legacy_committed_pairs_s']} ({r['legacy_peak_mb']})" if "legacy_committed_pairs_s" in r else "-"
            lines.append(f"| {r['rows']:,} | {r['storage']} | {r['startup_extra_s']} ({r['empty_output_startup_s']} -> "
                         f"{r['startup_s']}) | {r['driver_peak_mb']} | {r['actor_peak_mb']} | {r['summary_s']} | "
                         f"{r['manifest_objects']:,} | {legacy} |")
        print("\n".join(lines))
        save(args.name, {"machine": machine(), "load": load.summary(), "results": results}, "\n".join(lines))


KEYS = ("rows", "storage", "startup_extra_s", "driver_peak_mb", "actor_peak_mb", "summary_s", "manifest_objects")

if __name__ == "__main__":
    main()
