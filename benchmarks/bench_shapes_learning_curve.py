"""How the shapes predictor's held-out figures grow with the number of training prompts (a learning curve).

Takes a training collect and a held-out collect of embedded:shapes (the two collects of
scripts/train_shapes_predictor.sh), trains the predictor with the train job's defaults (70 % of a subset's prompts
fitted, 15 % for early stopping, 15 % unused here) on nested subsets of the
training prompts (the first K in a fixed hash order, so every subset contains the smaller ones), and evaluates each
on every held-out prompt with the evaluate job. Whether the figures still rise at the full set, and how fast, says
how many prompts the issue's goals (per-prompt Spearman >= 0.5, top-1 of 16 >= +1.0 sd) would take.

    .venv/bin/python benchmarks/bench_shapes_learning_curve.py --train TRAIN_COLLECT --held-out HELD_OUT_COLLECT

Each point runs `seedsift train` and `seedsift evaluate` as the user would (without the contact sheet and the
preview cost curve, which render; about 4 minutes for 600 prompts on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
from _common import REPO_ROOT, LoadSampler, machine, save

SEEDSIFT = [sys.executable, "-m", "jobs.cli"]


def prompt_order(prompt_ids: list[str]) -> list[str]:
    """A fixed order of the prompts that does not depend on how the collect wrote them."""
    return sorted(set(prompt_ids), key=lambda p: hashlib.blake2b(p.encode(), digest_size=8).digest())


def run(args: list[str]) -> float:
    started = time.time()
    subprocess.run(SEEDSIFT + args, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training collect (folder or its dataset.parquet)")
    parser.add_argument("--held-out", required=True, help="held-out collect (folder or its dataset.parquet)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[75, 150, 300, 600], help="training prompts")
    parser.add_argument("--name", default="shapes-learning-curve")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    if not sizes or sizes[0] < 2:
        raise SystemExit("--sizes: give one or more subset sizes of at least 2 prompts")

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from orchestrator.output.dataset import dataset_digest, read_dataset

    table = read_dataset(args.train)
    held_out = read_dataset(args.held_out)
    order = prompt_order(table.column("prompt_id").to_pylist())
    if sizes[-1] > len(order):
        raise SystemExit(f"--sizes {sizes[-1]}: the training collect has only {len(order)} prompts")
    points = []
    with LoadSampler() as load, tempfile.TemporaryDirectory(prefix="seedsift-curve-") as work:
        started = time.time()
        for size in sizes:
            folder = Path(work) / f"prompts-{size}"
            folder.mkdir()
            chosen = pa.array(order[:size], type=pa.string())
            subset = table.filter(pc.is_in(table.column("prompt_id"), value_set=chosen))
            pq.write_table(subset, folder / "dataset.parquet")
            train_s = run(["train", "--dataset", str(folder / "dataset.parquet"), "--out", str(folder / "predictor")])
            evaluate_s = run(["evaluate", "--dataset", args.held_out, "--predictor", str(folder / "predictor"),
                              "--out", str(folder / "evaluation"), "--split", "all", "--contact-prompts", "0",
                              "--previews", "none"])
            evaluation = json.loads((folder / "evaluation" / "evaluation.json").read_text())
            config = json.loads((folder / "predictor" / "config.json").read_text())
            swap = evaluation.get("prompt_swap") or {}
            point = {"training_prompts": size, "training_rows": subset.num_rows,
                     "val_spearman": config["metrics"]["val"]["per_prompt_spearman"],
                     "held_out_spearman": evaluation["spearman_per_prompt_mean"],
                     "held_out_top1_gain_sd": evaluation["top1_gain_std_units"],
                     "held_out_p_pick_best": evaluation["p_pick_best"],
                     "prompt_swap_gain_kept": swap.get("gain_kept"),
                     "train_seconds": round(train_s, 1), "evaluate_seconds": round(evaluate_s, 1)}
            points.append(point)
            print(point, flush=True)
        wall = time.time() - started

    per_doubling = None
    if len(points) > 1:
        log_sizes = np.log([p["training_prompts"] for p in points])
        per_doubling = float(np.polyfit(log_sizes, [p["held_out_spearman"] for p in points], 1)[0] * np.log(2))
    split = config["split"]  # the train job's, the same for every point
    lines = [(f"embedded:shapes predictor, train job defaults, nested subsets of {len(order)} training prompts x "
             f"{config['metrics']['candidates_per_prompt']} candidates (the train job fits "
             f"{split['train'] * 100:.0f} % of each subset's prompts, stops early on {split['val'] * 100:.0f} %); "
             f"figures on the {evaluation['prompts']} held-out prompts (evaluate --split all)."), "",
             ("| training prompts | val Spearman (train job) | held-out per-prompt Spearman | held-out top-1 gain, "
             "per-prompt sd | P(true best) | prompt-swap keeps |"), "|---|---|---|---|---|---|"]
    for p in points:
        kept = "n/a" if p["prompt_swap_gain_kept"] is None else f"{p['prompt_swap_gain_kept']:.0%}"
        lines.append(f"| {p['training_prompts']} | {p['val_spearman']:.3f} | {p['held_out_spearman']:.3f} | "
                     f"{p['held_out_top1_gain_sd']:+.2f} | {p['held_out_p_pick_best']:.2f} | {kept} |")
    if per_doubling is not None:
        lines += ["", (f"Held-out Spearman per doubling of the training prompts (least squares on log size): "
                  f"{per_doubling:+.3f}.")]
    save(args.name, {"machine": machine(), "load": load.summary(), "wall_s": round(wall, 1),
                     "settings": {"sizes": sizes}, "training_prompts_available": len(order),
                     "training_collect_digest": dataset_digest(table),
                     "held_out_collect_digest": dataset_digest(held_out),
                     "spearman_per_doubling": per_doubling,
                     "points": points}, "\n".join(lines))


if __name__ == "__main__":
    main()
