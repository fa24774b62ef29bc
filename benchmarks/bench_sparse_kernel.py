"""Block-sparse attention against dense SDPA on CPU: time of one attention call, interleaved, best of a few.

The kernel part of issue 22's figures (the whole benchmark, with fidelity on the trained models, is still to come):
PixArt-XL's layout, 16 heads of 72, batch 2 (guidance), 4,096 and 16,384 tokens, blocks of 64 tokens.

    python benchmarks/bench_sparse_kernel.py [--tokens 4096 16384] [--densities 0.031 0.0625 0.125] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.models.sparse_attention import band_block_mask, block_sparse_attention  # noqa: E402


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.031, 0.0625, 0.125])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=72)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            query, key, value = (torch.randn(args.batch, args.heads, tokens, args.dim) for _ in range(3))
            blocks = -(-tokens // args.block)
            for density in args.densities:
                mask = band_block_mask(blocks, density)
                dense, sparse = [], []
                for _ in range(2):  # interleaved: the machine's drift falls on both
                    dense.append(best_of(lambda: F.scaled_dot_product_attention(query, key, value), args.repeats))
                    sparse.append(best_of(lambda: block_sparse_attention(query, key, value, mask, args.block),
                                          args.repeats))
                row = {"tokens": tokens, "density": density, "kept_blocks": int(mask[0, 0].sum()),
                       "dense_ms": round(1000 * min(dense), 1), "sparse_ms": round(1000 * min(sparse), 1),
                       "ratio": round(min(sparse) / min(dense), 3)}
                rows.append(row)
                print(f"{tokens} tokens, density {density}: dense {row['dense_ms']} ms, sparse {row['sparse_ms']} ms, "
                      f"ratio {row['ratio']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
