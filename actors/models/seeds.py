"""Candidate seeds and their initial noise: pure functions of (run seed, prompt id, candidate index).

Sits between corpus reading and scoring: every later stage re-derives the same latent from the seed alone.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch's CPU generator keeps 32 bits of a seed (seed and seed + 2**32 draw the same noise), so a derived seed is
# 32 bits: the value recorded is the value used, as diffusers users pass seeds. Version 1 drew 63-bit seeds.
SEED_BITS = 32
SEED_VERSION = 2
NO_SEED = -1  # between stages only, for rows without a seed (quarantined, tallies); manifests hold null


def candidate_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """Seed of candidate `index` of a prompt: a stable 32-bit hash, independent of batch, machine and Python."""
    message = f"seedsift/v{SEED_VERSION}\x1f{int(run_seed)}\x1f{prompt_id}\x1f{int(index)}".encode()
    digest = hashlib.blake2b(message, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def candidate_seeds(run_seed: int, prompt_id: str, count: int) -> list[int]:
    """The first `count` candidate seeds of a prompt (a prefix: asking for more never changes the first ones)."""
    return [candidate_seed(run_seed, prompt_id, j) for j in range(count)]


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal latent for one seed, always drawn on the CPU in float32 so every device sees the same tensor."""
    import torch  # here, not at the top: the sink and the driver use the seed arithmetic without torch (start-up)

    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def batch_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Stack of initial noises, one per seed: each row depends on its own seed only, never on the batch."""
    import torch

    return torch.stack([initial_noise(seed, shape) for seed in seeds])


def step_noise_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image for the noise a stochastic solver adds at each step, drawn from a stream
    apart from the initial latent's (a hash of the seed, not the seed itself)."""
    import torch

    generators = []
    for seed in seeds:
        digest = hashlib.blake2b(f"seedsift/steps\x1f{int(seed)}".encode(), digest_size=4).digest()
        generators.append(torch.Generator("cpu").manual_seed(int.from_bytes(digest, "big")))
    return generators
