"""Figure 1, orchestration overhead: `seedsift generate` (local Ray, one generator) vs a plain diffusers loop.

Both render the same (prompt, seed) list with the same pipeline, batch size, steps, guidance and torch threads
(`--policy random --candidates 1 --keep 1`, so the images are the same) and save PNGs. Each run is its own process;
the parent interleaves them per size, so both see the same machine load. Reports steady-state and end-to-end
throughput ratios, the fixed start-up costs, the images needed to amortise them, and Ray Data's ds.stats().
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()  # before any heavy import: start-up includes imports

import _common  # noqa: E402,F401
from _common import PYTHON, REPO_ROOT, LoadSampler, emit, machine, run_child, save, table  # noqa: E402

# Images excluded from the steady-state window (warm-up: first two batches of 4). Both sides are timed where images
# are produced: the plain loop after each batch, seedsift's generator after each batch (a GeneratorStage subclass
# that appends a timestamp to a file). The driver cannot time it: a generator task renders a whole scorer output
# block (scorer_batch_size = 32 rows) before its rows move on, so committed rows reach the driver 32 at a time.
STEADY_AFTER = 8


def make_corpus(path: str, count: int) -> list[str]:
    """`count` distinct prompts (the PartiPrompts sample, cycled with a suffix so the dedup stage keeps them all)."""
    with open(REPO_ROOT / "examples" / "parti-sample.tsv", encoding="utf-8") as handle:
        base = [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t")]
    prompts = [base[i % len(base)] + ("" if i < len(base) else f", variation {i // len(base)}") for i in range(count)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(prompts) + "\n")
    return prompts


def steady_rate(marks: list[tuple[float, int]], after: int) -> float | None:
    """Images per second between the mark where `after` images were done and the last mark."""
    start = next(((t, n) for t, n in marks if n >= after), None)
    if start is None or marks[-1][1] <= start[1]:
        return None
    return (marks[-1][1] - start[1]) / (marks[-1][0] - start[0])


def child_plain(args) -> None:
    """The plain diffusers loop: load once, then pipe(prompt=..., latents=...) per batch, PNGs saved."""
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    from diffusers import DiffusionPipeline

    from orchestrator.corpus import prompt_id_for
    from orchestrator.embedded import resolve_model
    from orchestrator.seeds import batch_noise, candidate_seeds
    from actors import diffusion

    t_imported = time.perf_counter()
    path = resolve_model(args.model)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    shape = diffusion.latent_shape(path, args.size, args.size)
    t_loaded = time.perf_counter()
    prompts = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
    os.makedirs(args.out, exist_ok=True)
    marks, done = [], 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [prompt_id_for(p) for p in batch]
        seeds = [candidate_seeds(args.seed, pid, 1)[0] for pid in ids]
        result = pipe(prompt=batch, latents=batch_noise(seeds, shape), num_inference_steps=args.steps,
                      guidance_scale=args.guidance, height=args.size, width=args.size, output_type="np")
        images = (np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8)
        for pid, seed, image in zip(ids, seeds, images):
            Image.fromarray(image).save(os.path.join(args.out, f"{pid}_{seed}.png"))
        done += len(batch)
        marks.append((time.perf_counter(), done))
    emit({"imports_s": t_imported - T_PROCESS, "load_s": t_loaded - t_imported,
          "first_batch_s": marks[0][0] - t_loaded, "total_in_process_s": marks[-1][0] - T_PROCESS,
          "marks": [(t - T_PROCESS, n) for t, n in marks], "images": done, "threads": torch.get_num_threads()})


def child_seedsift(args) -> None:
    """pipeline.run's steps, with a timestamp at each committed unit and Ray Data's stats at the end."""
    from actors.generator import GeneratorStage
    from orchestrator import pipeline
    from orchestrator.config import GenerateConfig

    marks_file = args.out + ".generator-marks"

    class TimedGenerator(GeneratorStage):
        """GeneratorStage plus one line per rendered batch: wall-clock time and image count (same machine)."""

        def __call__(self, batch):
            out = super().__call__(batch)
            with open(marks_file, "a") as handle:
                handle.write(f"{time.time()} {int((out['status'] == 'ok').sum())}\n")
            return out

    pipeline.GeneratorStage = TimedGenerator  # build_dataset reads the name from its module
    t_imported = time.perf_counter()
    config = GenerateConfig(prompts=args.prompts, out=args.out, model=args.model, policy="random", candidates=1,
                            keep=1, steps=args.steps, guidance=args.guidance, width=args.size, height=args.size,
                            batch_size=args.batch_size, seed=args.seed, generators=args.generators,
                            generator_cpus=args.generator_cpus or None,
                            scorer_batch_size=args.scorer_batch_size or GenerateConfig.scorer_batch_size)
    plan, files, manifest = pipeline.prepare(config)
    pipeline.check_run_file(manifest, plan)
    state = pipeline.OutputState.read(manifest)
    pipeline.connect_ray(None)
    t_ray = time.perf_counter()
    import dataclasses

    import ray

    resources = dataclasses.asdict(pipeline.plan_resources(config))
    ds, indexes = pipeline.start_stream(plan, files, manifest, state)
    marks, images = [], 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        images += batch["status"].to_pylist().count("ok")
        marks.append((time.perf_counter(), images))
    t_end = time.perf_counter()
    stats = ds.stats()
    ray.shutdown()
    # time.time() in the actor -> this process's perf_counter scale.
    offset = time.perf_counter() - time.time()
    generator_marks, rendered = [], 0
    for line in sorted(open(marks_file).read().split("\n")[:-1], key=lambda text: float(text.split()[0])):
        stamp, count = line.split()
        rendered += int(count)
        generator_marks.append((float(stamp) + offset - T_PROCESS, rendered))
    emit({"imports_s": t_imported - T_PROCESS, "ray_start_s": t_ray - t_imported,
          "first_unit_s": marks[0][0] - t_ray, "total_in_process_s": t_end - T_PROCESS,
          "driver_marks": [(t - T_PROCESS, n) for t, n in marks], "marks": generator_marks, "images": images,
          "stats": stats,
          "generator_threads": max(1, int(resources["generator_cpus"])), "resources": resources,
          "generators": args.generators})


def compare_images(plain_dir: str, seedsift_dir: str) -> dict:
    """Pixel comparison of the two runs' PNGs, matched by (prompt id, seed)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(os.path.join(seedsift_dir, "manifest", "shards")).to_pylist()
    diffs, matched = [], 0
    for row in rows:
        if row["status"] != "ok":
            continue
        a = np.asarray(Image.open(os.path.join(seedsift_dir, row["image_key"])), dtype=np.int16)
        b = np.asarray(Image.open(os.path.join(plain_dir, f"{row['prompt_id']}_{row['seed']}.png")), dtype=np.int16)
        diffs.append(int(np.abs(a - b).max()))
        matched += 1
    return {"matched": matched, "identical": sum(d == 0 for d in diffs), "max_abs_uint8_diff": max(diffs or [0])}


def operator_wall_s(stats: str, name: str) -> float | None:
    """Total remote wall time of one operator in ds.stats() text (the seconds its tasks were running)."""
    lines = stats.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Operator") and name in line:
            for follow in lines[i + 1:i + 4]:
                if "Remote wall time" in follow:
                    total = follow.rsplit(",", 1)[1].strip().removesuffix(" total")
                    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
                        if total.endswith(unit):
                            return float(total.removesuffix(unit)) * scale
    return None


def generator_stats(stats: str) -> str:
    """The per-operator lines of ds.stats() worth reading: each operator's header and its wall/CPU time rows."""
    keep = []
    for line in stats.splitlines():
        text = line.strip()
        if text.startswith(("Operator", "* Remote wall time", "* Remote cpu time", "* Operator throughput",
                            "* Total input num rows", "* Ray Data throughput", "Dataset iterator time",
                            "* Total time overall", "* Total time in")):
            keep.append(text)
    return "\n".join(keep)


def leftover_processes(ray_tmpdir: str, wait_s: float = 3.0) -> list[dict]:
    """Processes of a finished run still alive `wait_s` after its driver exited (found by their RAY_TMPDIR); they are
    this benchmark's own processes, so they are ended (by pid) after being recorded."""
    time.sleep(wait_s)
    found = []
    marker = f"RAY_TMPDIR={ray_tmpdir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                name = handle.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            found.append({"pid": int(pid), "name": name, "state": fields[0], "cpu_s": (int(fields[11]) + int(fields[12])) / 100})
        except OSError:
            continue
    for proc in found:
        if proc["state"] != "Z":
            try:
                os.kill(proc["pid"], 15)
            except OSError:
                pass
    return found


VARIANTS = {  # name -> extra environment of the seedsift run
    "seedsift": {},
    # Ray starts worker processes at nice 15; on a shared machine they then lose the CPU to everyone else.
    "seedsift, RAY_worker_niceness=0": {"RAY_worker_niceness": "0"},
}


def parent(args) -> None:
    sizes = [tuple(int(x) for x in spec.split(":")) for spec in args.sizes]  # size:steps:images
    rows, raw = [], []
    start_machine = machine()
    with LoadSampler() as load:
        for repeat in range(args.repeats):
            for size, steps, count in sizes:
                with tempfile.TemporaryDirectory(prefix="seedsift-overhead-") as tmp:
                    prompts = os.path.join(tmp, "prompts.txt")
                    make_corpus(prompts, count)
                    common = ["--prompts", prompts, "--size", str(size), "--steps", str(steps), "--batch-size",
                              str(args.batch_size), "--guidance", str(args.guidance), "--model", args.model]
                    # The generator gets generator_cpus threads: locally max(1, (cores + 2 - 2) // generators)
                    # unless --generator-cpus says otherwise; the plain loop gets the same number.
                    threads = args.generator_cpus or max(1, (os.cpu_count() or 1))
                    if args.generator_cpus:
                        common += ["--generator-cpus", str(args.generator_cpus)]
                    load_before = os.getloadavg()[0]
                    plain, plain_wall = run_child([PYTHON, __file__, "--child", "plain", "--out", f"{tmp}/plain",
                                                   "--threads", str(threads)] + common)
                    p_rate = steady_rate(plain["marks"], STEADY_AFTER)
                    p_fixed = plain_wall - count / p_rate
                    for variant, extra_env in VARIANTS.items():
                        if variant != "seedsift" and not args.niceness_variant:
                            continue
                        ray_tmp = os.path.join(tmp, f"ray{len(raw)}")
                        os.makedirs(ray_tmp)
                        out = os.path.join(tmp, f"seedsift{len(raw)}")
                        seedsift, seedsift_wall = run_child([PYTHON, __file__, "--child", "seedsift", "--out", out]
                                                            + common, env={"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "",
                                                                           **extra_env})
                        leftovers = leftover_processes(ray_tmp)
                        load_after = os.getloadavg()[0]
                        same = compare_images(f"{tmp}/plain", out)
                        s_rate = steady_rate(seedsift["marks"], STEADY_AFTER)
                        if p_rate is None or s_rate is None:
                            raise SystemExit(f"{count} images is too few for a steady window after {STEADY_AFTER}")
                        busy = operator_wall_s(seedsift["stats"], "TimedGenerator")
                        # Fixed cost = wall time not explained by steady-state throughput.
                        s_fixed = seedsift_wall - count / s_rate
                        steady_ratio = s_rate / p_rate
                        # Images n at which (n/p_rate + p_fixed) / (n/s_rate + s_fixed) reaches 95% of the steady ratio.
                        target = 0.95 * steady_ratio
                        denominator = target / s_rate - 1 / p_rate
                        amortise = (p_fixed - target * s_fixed) / denominator if denominator else float("inf")
                        row = {
                            "size": f"{size}x{size}", "steps": steps, "images": count, "run": variant,
                            "plain s/img": 1 / p_rate, "seedsift s/img": 1 / s_rate, "steady ratio": steady_ratio,
                            "generator busy s/img": busy / count if busy else "",
                            "plain wall s": plain_wall, "seedsift wall s": seedsift_wall,
                            "end-to-end ratio": plain_wall / seedsift_wall,
                            "plain fixed s": p_fixed, "seedsift fixed s": s_fixed,
                            "images to amortise": max(amortise, 0.0),
                            "identical images": f"{same['identical']}/{same['matched']} (max diff {same['max_abs_uint8_diff']})",
                            "leftover processes": len([p for p in leftovers if p["state"] != "Z"]),
                            "load1 before/after": f"{load_before:.1f}/{load_after:.1f}",
                        }
                        rows.append(row)
                        raw.append({"row": row, "plain": plain, "leftovers": leftovers,
                                    "seedsift": {k: v for k, v in seedsift.items() if k != "stats"},
                                    "seedsift_stats": seedsift["stats"]})
                        print(json.dumps(row), flush=True)
    load_summary = load.summary()
    columns = ["size", "steps", "images", "run", "plain s/img", "seedsift s/img", "steady ratio",
               "generator busy s/img", "plain wall s", "seedsift wall s", "end-to-end ratio", "plain fixed s",
               "seedsift fixed s", "images to amortise", "identical images", "leftover processes",
               "load1 before/after"]
    text = (f"Orchestration overhead: seedsift generate (local Ray, 1 generator, {args.batch_size}/batch, guidance "
            f"{args.guidance}) vs plain diffusers loop, both {args.generator_cpus or os.cpu_count()} torch threads; load avg "
            "1-min during "
            f"run {load_summary}\n\n" + table(rows, columns)
            + f"\n\nsteady = images/s after the first {STEADY_AFTER} images, timed where images are produced (plain: after"
            " each batch; seedsift: in the generator actor after each batch); 'generator busy' = the generator"
            " operator's remote wall time per image from ds.stats() (equal to seedsift s/img: never idle); fixed = wall - images / steady rate (imports, model loads, Ray and actor start-up); 'images to"
            " amortise' = corpus size at which the end-to-end ratio reaches 95% of the steady ratio; 'leftover"
            " processes' = Ray processes of the run still alive 3 s after its driver exited."
            + "\n\nRay Data stats of the last seedsift run (per operator):\n\n```\n"
            + generator_stats(raw[-1]["seedsift_stats"]) + "\n```")
    save("overhead", {"args": vars(args), "machine_at_start": start_machine, "load_during": load_summary,
                      "rows": rows, "raw": raw}, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["plain", "seedsift"])
    parser.add_argument("--sizes", nargs="+", default=["64:4:48", "128:4:48"],
                        help="SIZE:STEPS:IMAGES per configuration (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--niceness-variant", type=int, default=1, help="also run seedsift with RAY_worker_niceness=0")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--model", default="embedded:tiny-sd")
    parser.add_argument("--seed", type=int, default=0)
    # child arguments
    parser.add_argument("--prompts")
    parser.add_argument("--out")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--generators", type=int, default=1)
    parser.add_argument("--scorer-batch-size", type=int, default=0, help="child only: override scorer_batch_size")
    parser.add_argument("--generator-cpus", type=int, default=0,
                        help="generator CPUs = torch threads of both sides (0: the pipeline's local default, the cores)")
    args = parser.parse_args()
    if args.child == "plain":
        child_plain(args)
    elif args.child == "seedsift":
        child_seedsift(args)
    else:
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
