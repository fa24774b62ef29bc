"""Figure 4, scale: driver memory and rows/s from 10 thousand to 1 million prompts, and generator placement/scaling.

Part A builds the first stages exactly as orchestrator.flow.graph.build_dataset does (read_corpus -> drop_duplicates
-> ScorerStage with the random policy, which still runs the text encoder), drops the embedding columns (the
generator does that in the real flow, so the driver never sees them) and consumes with iter_batches counting rows,
while a thread samples the driver's VmRSS. One fresh driver process per run. Part B runs the whole pipeline on a
ray.cluster_utils.Cluster (CPU head + GPU-labelled workers) to see where generators land, and 1 vs 2 local generators.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _common  # noqa: F401
from _common import PYTHON, REPO_ROOT, LoadSampler, RssSampler, emit, machine, run_child, save, table

CORPUS_DIR = os.path.join(tempfile.gettempdir(), "seedsift-bench", "corpora")
SIZES = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000}
EMBEDDING_COLUMNS = ["prompt_embeds", "negative_prompt_embeds"]  # what the tiny SD scorer emits at guidance > 1


def corpus(size: int) -> str:
    """A txt corpus of `size` distinct prompts (about 40 bytes a line), written once."""
    os.makedirs(CORPUS_DIR, exist_ok=True)
    path = os.path.join(CORPUS_DIR, f"prompts-{size}.txt")
    if not os.path.exists(path):
        subjects = ["cat", "lighthouse", "teapot", "astronaut", "forest", "robot", "castle", "violin", "market"]
        styles = ["oil painting", "photo", "watercolor", "sketch", "3d render", "pixel art", "woodcut"]
        with open(path + ".partial", "w", encoding="utf-8") as handle:
            for i in range(size):
                handle.write(f"a {styles[i % 7]} of a {subjects[i % 9]} no. {i}\n")
        os.rename(path + ".partial", path)
    return path


def child_stream(args) -> None:
    """One driver: read -> dedup [-> scorer] -> drop embeddings, consumed by iter_batches; RSS sampled."""
    import ray

    from orchestrator.corpus.listing import list_corpus
    from orchestrator.corpus.dedup import Owners, drop_duplicates, start_index
    from orchestrator.output.manifest import Manifest
    from orchestrator.flow.resources import connect_ray
    from orchestrator.corpus.reader import ReadSettings, file_key, read_corpus
    from orchestrator.output.storage import Output

    with RssSampler() as rss:
        started = time.perf_counter()
        connect_ray(None)  # the job's own local Ray: cores + 2 logical CPUs
        ray_s = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as out:
            manifest = Manifest(Output(out, {}))
            files = list_corpus(args.prompts)
            owners = Owners([file_key(f.name) for f in files])
            indexes = start_index(manifest, owners, [], {}, buckets=1)
            ds = read_corpus(files, ReadSettings(shard_size=10_000))
            ds = drop_duplicates(ds, indexes, manifest, owners)
            if args.mode == "score":
                from actors.stages.scorer import ScorerStage
                from orchestrator.run.config import GenerateConfig
                from orchestrator.run.plan import build_plan

                config = GenerateConfig(prompts=args.prompts, out=out, scorers=args.scorers[0])
                ds = ds.map_batches(
                    ScorerStage, fn_constructor_args=(build_plan(config).scoring,),
                    fn_constructor_kwargs=dict(num_threads=max(1, int(config.scorer_cpus))),
                    batch_format="numpy", batch_size=config.scorer_batch_size,
                    compute=ray.data.ActorPoolStrategy(size=config.scorers), num_cpus=config.scorer_cpus)
                ds = ds.drop_columns(EMBEDDING_COLUMNS)
            rows, first_row_at, timeline, capped = 0, None, [], False
            stream_started = time.perf_counter()
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows += batch.num_rows
                now = time.perf_counter()
                first_row_at = first_row_at or now
                if not timeline or now - timeline[-1][0] > 5:
                    timeline.append((now, rows, rss.peak_mb))
                if args.time_cap and now - stream_started > args.time_cap:
                    capped = True
                    break
            ended = time.perf_counter()
            stats = ds.stats() if not capped else ""
        ray.shutdown()
    emit({"rows": rows, "capped": capped, "ray_start_s": ray_s, "stream_s": ended - stream_started,
          "first_row_s": (first_row_at or ended) - stream_started,
          "rows_per_s": rows / (ended - stream_started),
          "rows_per_s_after_first": (rows / (ended - first_row_at)) if first_row_at and ended > first_row_at else None,
          "driver_peak_rss_mb": rss.peak_mb, "rss_samples": rss.samples,
          "timeline": [(t - stream_started, n, m) for t, n, m in timeline], "stats": stats})


def child_cluster(args) -> None:
    """tests/cluster_placement.py's pattern with more GPU-labelled nodes: where do the generators run?"""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from cluster_placement import free_port
    from orchestrator.flow import pipeline
    from orchestrator.run.config import GenerateConfig

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    try:
        gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(args.gpu_nodes)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address,
                 runtime_env={"env_vars": {"SEEDSIFT_CACHE": os.environ.get("SEEDSIFT_CACHE", "")}})
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            summary = pipeline.run(GenerateConfig(
                prompts=str(REPO_ROOT / "examples" / "parti-sample.tsv"), out=out, generators=args.gpu_nodes,
                generator_cpus=1, limit=4 * args.gpu_nodes, candidates=2, keep=1, steps=2, address=cluster.address))
            wall = time.perf_counter() - started
        actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
        generators = [a for a in actors if "GeneratorStage" in (a.class_name or "") + (a.repr_name or "")]
        gpu_ids = {node.node_id for node in gpu_nodes}
        per_node = {}
        for a in generators:
            per_node[a.node_id] = per_node.get(a.node_id, 0) + 1
        emit({"gpu_nodes": args.gpu_nodes, "generators": len(generators), "images": summary["images"], "wall_s": wall,
              "generators_on_head": sum(a.node_id == cluster.head_node.node_id for a in generators),
              "generators_per_gpu_node": sorted(per_node.get(n, 0) for n in gpu_ids),
              "logical_gpus": ray.cluster_resources().get("GPU", 0)})
    finally:
        ray.shutdown()
        cluster.shutdown()


def parent(args) -> None:
    start_machine = machine()
    stream_rows, raw = [], {}
    tmp = tempfile.mkdtemp(prefix="seedsift-scale-")
    env = {"RAY_TMPDIR": os.path.join(tmp, "ray"), "RAY_ADDRESS": ""}
    os.makedirs(env["RAY_TMPDIR"])
    with LoadSampler() as load:
        for mode in args.modes:
            for label in args.sizes:
                path = corpus(SIZES[label])
                cap = args.score_time_cap if mode == "score" else 0
                scorers = [1] if mode == "read" else args.scorers
                for count in scorers:
                    load_before = os.getloadavg()[0]
                    result, wall = run_child([PYTHON, __file__, "--child", "stream", "--mode", mode, "--prompts", path,
                                              "--time-cap", str(cap), "--scorers", str(count)], env=env)
                    row = {"stages": "read+dedup" if mode == "read" else "read+dedup+score (random, tiny CLIP)",
                           "corpus": label, "scorers": count if mode == "score" else "",
                           "rows done": result["rows"], "capped": "yes" if result["capped"] else "",
                           "rows/s": result["rows_per_s"],
                           "rows/s after first row": result["rows_per_s_after_first"] or "",
                           "rows/s per scorer (after first)": ((result["rows_per_s_after_first"] or 0) / count
                                                               if mode == "score" else ""),
                           "driver peak RSS MB": result["driver_peak_rss_mb"], "process wall s": wall,
                           "load1 before/after": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"}
                    stream_rows.append(row)
                    raw[f"{mode}-{label}-{count}"] = result
                    print(row, flush=True)
        cluster_row = None
        if args.cluster_nodes:
            result, wall = run_child([PYTHON, __file__, "--child", "cluster", "--gpu-nodes", str(args.cluster_nodes)],
                                     env={**env, "RAY_AUTH_MODE": "disabled"})
            cluster_row = result | {"process_wall_s": wall}
            print(cluster_row, flush=True)
        generator_rows = []
        overhead = str(REPO_ROOT / "benchmarks" / "bench_overhead.py")
        if args.generator_images:
            sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
            import bench_overhead

            for generators in (1, 2):
                with tempfile.TemporaryDirectory() as gtmp:
                    prompts = os.path.join(gtmp, "prompts.txt")
                    bench_overhead.make_corpus(prompts, args.generator_images)
                    load_before = os.getloadavg()[0]
                    result, wall = run_child([PYTHON, overhead, "--child", "seedsift", "--prompts", prompts, "--out",
                                              f"{gtmp}/out", "--size", "64", "--steps", "4", "--batch-size", "4",
                                              "--generators", str(generators)], env=env)
                rate = bench_overhead.steady_rate(result["marks"], bench_overhead.STEADY_AFTER)
                generator_rows.append({
                    "generators": generators, "threads each": result["generator_threads"],
                    "images": result["images"], "steady img/s": rate or "",
                    "end-to-end img/s": result["images"] / wall, "process wall s": wall,
                    "load1 before/after": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"})
                raw[f"generators-{generators}"] = {k: v for k, v in result.items() if k != "stats"}
                print(generator_rows[-1], flush=True)
            base = generator_rows[0]
            for row in generator_rows:
                row["speed-up vs 1 (steady)"] = (row["steady img/s"] / base["steady img/s"]
                                                 if row["steady img/s"] and base["steady img/s"] else "")
    load_summary = load.summary()
    text = (f"Scale: driver memory and throughput by corpus size (one fresh driver per row, local Ray with "
            f"{os.cpu_count()}+2 logical CPUs); load avg 1-min during run {load_summary}\n\n"
            + table(stream_rows, ["stages", "corpus", "scorers", "rows done", "capped", "rows/s", "rows/s after first row",
                                  "rows/s per scorer (after first)",
                                  "driver peak RSS MB", "process wall s", "load1 before/after"]))
    if cluster_row:
        text += ("\n\nPlacement on ray.cluster_utils.Cluster (CPU head + "
                 f"{cluster_row['gpu_nodes']} nodes with 1 logical GPU each), generate with --generators "
                 f"{cluster_row['gpu_nodes']}:\n\n" + table([cluster_row], [
                     "gpu_nodes", "logical_gpus", "generators", "generators_on_head", "generators_per_gpu_node",
                     "images", "wall_s"]))
    if generator_rows:
        text += ("\n\nLocal generators on this 2-core machine (64x64, 4 steps, batch 4; generator_cpus auto = "
                 "(cores + 2 - 2) // generators):\n\n" + table(generator_rows, [
                     "generators", "threads each", "images", "steady img/s", "speed-up vs 1 (steady)",
                     "end-to-end img/s", "process wall s", "load1 before/after"]))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    save("scale", {"args": vars(args), "machine_at_start": start_machine, "load_during": load_summary,
                   "stream": stream_rows, "cluster": cluster_row, "generators": generator_rows, "raw": raw}, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["stream", "cluster"])
    parser.add_argument("--modes", nargs="+", default=["read", "score"])
    parser.add_argument("--sizes", nargs="+", default=["10k", "100k", "1M"], choices=list(SIZES))
    parser.add_argument("--scorers", nargs="+", type=int, default=[1], help="scorer actor counts to try")
    parser.add_argument("--score-time-cap", type=float, default=150,
                        help="stop a scoring run after this many seconds and report the rate so far (0: no cap)")
    parser.add_argument("--cluster-nodes", type=int, default=3, help="GPU-labelled nodes (0: skip)")
    parser.add_argument("--generator-images", type=int, default=96, help="images for the 1 vs 2 generators run")
    # child arguments
    parser.add_argument("--mode", choices=["read", "score"])
    parser.add_argument("--prompts")
    parser.add_argument("--time-cap", type=float, default=0)
    parser.add_argument("--gpu-nodes", type=int, default=3)
    args = parser.parse_args()
    if args.child == "stream":
        child_stream(args)
    elif args.child == "cluster":
        child_cluster(args)
    else:
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
