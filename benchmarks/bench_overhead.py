"""Figure 1, start-up and throughput: `seedsift generate` (the CLI, local Ray) vs a plain diffusers loop.

Both render the same (prompt, seed) list with the same pipeline, size, steps, guidance, batch and torch threads
(`--policy random -n 1 -k 1`, so the images are the same) and save PNGs. Each side is its own process, interleaved
per configuration so both see the same machine; the parent times both from outside by watching the output folder
for image files. Reports the time from process start to the first image written, the steady (marginal) throughput
ratio, the fixed costs, and, from SEEDSIFT_TRACE, where seedsift's seconds to the first image go.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import time

T_PROCESS = time.perf_counter()  # before any heavy import: start-up includes imports

import _common  # noqa: E402,F401
from _common import PYTHON, REPO_ROOT, LoadSampler, emit, machine, run_watched, save, table  # noqa: E402

# Images excluded from the steady-state window (warm-up: the first two batches of 4).
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

    from orchestrator.corpus.listing import prompt_id_for
    from actors.models.embedded import resolve_model
    from actors.models.seeds import batch_noise, candidate_seeds
    from actors.models import families

    t_imported = time.perf_counter()
    path = resolve_model(args.model)
    dtype = torch.float16 if args.device == "cuda" else torch.float32  # as seedsift's generator on each device
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    shape = families.latent_shape(path, args.size, args.size)
    t_loaded = time.perf_counter()
    prompts = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
    os.makedirs(args.out, exist_ok=True)
    marks, done = [], 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [prompt_id_for(p) for p in batch]
        seeds = [candidate_seeds(args.seed, pid, 1)[0] for pid in ids]
        latents = batch_noise(seeds, shape).to(args.device, dtype)
        result = pipe(prompt=batch, latents=latents, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, height=args.size, width=args.size, output_type="np")
        images = (np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8)
        for pid, seed, image in zip(ids, seeds, images):
            Image.fromarray(image).save(os.path.join(args.out, f"{pid}_{seed}.png"))
        done += len(batch)
        marks.append((time.perf_counter(), done))
    emit({"imports_s": t_imported - T_PROCESS, "load_s": t_loaded - t_imported,
          "first_batch_s": marks[0][0] - t_loaded, "total_in_process_s": marks[-1][0] - T_PROCESS,
          "marks": [(t - T_PROCESS, n) for t, n in marks], "images": done, "threads": torch.get_num_threads(),
          "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None})


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


def read_trace(path: str, since: float) -> dict[str, dict[str, float]]:
    """{who: {event: seconds since `since`}} from a SEEDSIFT_TRACE file (the first time of each event)."""
    events: dict[str, dict[str, float]] = {}
    if os.path.exists(path):
        for line in open(path):
            event = json.loads(line)
            events.setdefault(event["who"], {}).setdefault(event["event"], round(event["t"] - since, 2))
    return events


def breakdown(trace: dict, plain: dict, first_image: dict) -> list[dict]:
    """Where the seconds to the first image go, seedsift beside the plain loop (seconds from process start)."""
    driver = trace.get("driver", {})
    rows = [{"step": "driver: imports", "seedsift": driver.get("imports done"), "plain": round(plain["imports_s"], 2)},
            {"step": "driver: configuration, corpus, plan and output checked", "seedsift": driver.get("checked")},
            {"step": "Ray started (local)", "seedsift": driver.get("ray up")},
            {"step": "dataset built, duplicate index loaded", "seedsift": driver.get("stream built")}]
    for stage in ("scorer", "generator", "rater"):
        events = trace.get(stage, {})
        rows += [{"step": f"{stage}: process started", "seedsift": events.get("process")},
                 {"step": f"{stage}: constructor starts (class loaded)", "seedsift": events.get("init")},
                 {"step": f"{stage}: torch imported (diffusers comes with the load)",
                  "seedsift": events.get("imports")},
                 {"step": f"{stage}: model loaded (ready)", "seedsift": events.get("ready")},
                 {"step": f"{stage}: first batch in / out", "seedsift": f"{events.get('first call')} / "
                                                                       f"{events.get('first call done')}"}]
    rows += [{"step": "model loaded", "plain": round(plain["imports_s"] + plain["load_s"], 2)},
             {"step": "first batch rendered", "plain": round(plain["marks"][0][0], 2)},
             {"step": "sink: first unit committed", "seedsift": trace.get("sink", {}).get("unit committed")},
             {"step": "first image file seen", "seedsift": first_image["seedsift"], "plain": first_image["plain"]},
             {"step": "driver: first rows counted", "seedsift": driver.get("first rows committed")},
             {"step": "summary written", "seedsift": driver.get("summary written")}]
    return rows


def local_generator_threads() -> int:
    """A local generator's torch threads when --generator-cpus is not given: all cores but one (pipeline.py)."""
    return max(1, (os.cpu_count() or 1) - 1)


def compare(model: str, size: int, steps: int, count: int, args, tmp: str, sampler=None,
            address: str | None = None) -> dict:
    """One interleaved pair: the plain loop, then `seedsift generate`, on the same corpus and settings.

    `sampler(name)`, if given, is a context manager around each side's process (the GPU check samples the GPU
    with it) whose `summary(first_image, last_image)` goes into the result. `address`: the seedsift side joins
    that Ray instead of starting its own (the GPU check's smoke test joins the test session's).
    """
    threads = args.generator_cpus or local_generator_threads()
    prompts = os.path.join(tmp, "prompts.txt")
    make_corpus(prompts, count)
    common = ["--prompts", prompts, "--steps", str(steps), "--batch-size", str(args.batch_size), "--guidance",
              str(args.guidance), "--model", model]
    load_before = os.getloadavg()[0]
    out_plain, out_seedsift = f"{tmp}/plain", f"{tmp}/seedsift"
    sampled = {}
    with sampler("plain") if sampler else contextlib.nullcontext() as sampling:
        stdout, _, plain_wall, plain_curve = run_watched(
            [PYTHON, __file__, "--child", "plain", "--out", out_plain, "--threads", str(threads), "--size", str(size),
             "--device", args.device] + common, out_plain)
    sampled["plain"] = sampling
    plain = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT:"))[7:])
    # Ray's own folder sits directly under the system's temporary folder: its socket paths must stay within
    # AF_UNIX's 107 bytes, which a nested benchmark folder (the GPU check's) can exceed.
    ray_tmp, trace_file = (None if address else tempfile.mkdtemp(prefix="ss-ray-")), os.path.join(tmp, "trace.jsonl")
    env = {"SEEDSIFT_TRACE": trace_file}
    env.update({"RAY_ADDRESS": address, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")} if address else
               {"RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp})
    try:
        with sampler("seedsift") if sampler else contextlib.nullcontext() as sampling:
            stdout, started_wall, seedsift_wall, seedsift_curve = run_watched(
                [PYTHON, "-m", "jobs.generate", "--out", out_seedsift, "--policy", "random", "-n", "1", "-k", "1",
                 "--width", str(size), "--height", str(size), "--generator-cpus", str(threads), "--json"] + common,
                out_seedsift, env=env)
        sampled["seedsift"] = sampling
        summary = json.loads(stdout.replace(tmp, "TMP"))  # the results are committed: no path of this machine
        leftovers = [] if address else leftover_processes(ray_tmp)
    finally:
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]
    same = compare_images(out_plain, out_seedsift)
    p_rate, s_rate = steady_rate(plain_curve, STEADY_AFTER), steady_rate(seedsift_curve, STEADY_AFTER)
    if p_rate is None or s_rate is None or summary["images"] != count:
        raise SystemExit(f"{count} images is too few for a steady window after {STEADY_AFTER} "
                         f"(or the run made {summary['images']})")
    first = {"plain": round(plain_curve[0][0], 2), "seedsift": round(seedsift_curve[0][0], 2)}
    row = {
        "size": f"{size}x{size}", "steps": steps, "images": count,
        "plain first image s": first["plain"], "seedsift first image s": first["seedsift"],
        "start-up difference s": first["seedsift"] - first["plain"],
        "plain s/img": 1 / p_rate, "seedsift s/img": 1 / s_rate, "marginal ratio": s_rate / p_rate,
        "plain wall s": plain_wall, "seedsift wall s": seedsift_wall,
        # Fixed cost = wall time not explained by steady throughput: imports, loads, Ray, actors.
        "plain fixed s": plain_wall - count / p_rate, "seedsift fixed s": seedsift_wall - count / s_rate,
        "identical images": f"{same['identical']}/{same['matched']} (max diff {same['max_abs_uint8_diff']})",
        "leftover processes": len([p for p in leftovers if p["state"] != "Z"]),
        "load1 before/after": f"{load_before:.1f}/{load_after:.1f}",
    }
    row["fixed cost difference s"] = row["seedsift fixed s"] - row["plain fixed s"]
    trace = read_trace(trace_file, started_wall)
    curves = {"plain": plain_curve, "seedsift": seedsift_curve}
    for side, sampling in sampled.items():
        if sampling is not None:  # what the sampler saw while this side rendered (first to last image)
            row.update({f"{side} {k}": v for k, v in sampling.summary(curves[side][0][0], curves[side][-1][0]).items()})
    return {"row": row, "breakdown": breakdown(trace, plain, first),
            "raw": {"plain": plain, "plain_curve": plain_curve, "seedsift_curve": seedsift_curve, "trace": trace,
                    "leftovers": leftovers, "summary": summary}}


COLUMNS = ["size", "steps", "images", "repeat", "plain first image s", "seedsift first image s",
           "start-up difference s", "plain s/img", "seedsift s/img", "marginal ratio", "plain fixed s",
           "seedsift fixed s", "fixed cost difference s", "plain wall s", "seedsift wall s", "identical images",
           "leftover processes", "load1 before/after"]


def breakdown_text(breakdowns: dict[str, list[dict]]) -> str:
    return "".join(f"\n\nWhere the seconds to the first image go ({name}, last repeat; seconds from process start, "
                   "from SEEDSIFT_TRACE):\n\n" + table(steps_table, ["step", "seedsift", "plain"])
                   for name, steps_table in breakdowns.items())


def parent(args) -> None:
    sizes = [tuple(int(x) for x in spec.split(":")) for spec in args.sizes]  # size:steps:images
    rows, raw, breakdowns = [], [], {}
    start_machine = machine()
    with LoadSampler() as load:
        for repeat in range(args.repeats):
            for size, steps, count in sizes:
                with tempfile.TemporaryDirectory(prefix="seedsift-overhead-") as tmp:
                    result = compare(args.model, size, steps, count, args, tmp)
                rows.append({**result["row"], "repeat": repeat + 1})
                raw.append(result["raw"])
                breakdowns[f"{size}x{size}, {steps} steps, {count} images"] = result["breakdown"]
                print(json.dumps(rows[-1]), flush=True)
    load_summary = load.summary()
    threads = args.generator_cpus or local_generator_threads()
    text = (f"Start-up and throughput: `seedsift generate` (the CLI, local Ray, 1 generator, {args.batch_size}/batch, "
            f"guidance {args.guidance}, --policy random -n 1 -k 1) vs a plain diffusers loop on {args.model}, both "
            f"{threads} torch threads, interleaved; load avg 1-min during run {load_summary}\n\n" + table(rows, COLUMNS)
            + f"\n\nTimes are from process start, taken by the parent watching each output folder for image files; "
            f"steady = images/s after the first {STEADY_AFTER} images appeared; marginal ratio = seedsift's steady rate /"
            " plain's; fixed = wall - images / steady rate; 'leftover processes' = Ray processes of the run still "
            "alive 3 s after its driver exited." + breakdown_text(breakdowns))
    save(args.name, {"args": vars(args), "machine_at_start": start_machine, "load_during": load_summary,
                     "rows": rows, "raw": raw}, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["plain"])
    parser.add_argument("--sizes", nargs="+", default=["64:4:64"],
                        help="SIZE:STEPS:IMAGES per configuration (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--model", default="embedded:tiny-sd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator-cpus", type=int, default=0,
                        help="torch threads of both sides (0: the generator's local default, all cores but one)")
    parser.add_argument("--name", default="overhead", help="results/NAME.json and NAME.md (default: %(default)s)")
    # the plain child's arguments
    parser.add_argument("--prompts")
    parser.add_argument("--out")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", help="the plain child's device (cuda: float16, as seedsift)")
    args = parser.parse_args()
    if args.child == "plain":
        child_plain(args)
    else:
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
