"""Seed derivation and initial noise: pure, stable, batch-independent."""

import torch

from actors.models.seeds import SEED_BITS, batch_noise, candidate_seed, candidate_seeds, initial_noise


def test_candidate_seed_is_stable_across_processes_and_versions():
    # Pinned values: a change here silently changes every image of every earlier run.
    assert candidate_seed(0, "abc", 0) == candidate_seed(0, "abc", 0)
    assert candidate_seeds(0, "abc", 3) == [candidate_seed(0, "abc", j) for j in range(3)]
    assert candidate_seed(0, "abc", 0) == 3553749098  # seed version 2: 32-bit seeds


def test_a_seed_is_the_value_the_noise_generator_uses():
    """torch's CPU generator keeps 32 bits of a seed; a derived seed has no more, so distinct seeds mean distinct
    noise, and a seed recorded in a manifest works as it is in a plain diffusers call."""
    seeds = candidate_seeds(0, "p", 64)
    assert all(s < 2**32 for s in seeds)
    assert torch.equal(initial_noise(5, (4, 4, 4)), initial_noise(5 + 2**32, (4, 4, 4)))  # why 32 bits
    generator = torch.Generator("cpu").manual_seed(seeds[0])
    assert torch.equal(initial_noise(seeds[0], (4, 8, 8)), torch.randn((4, 8, 8), generator=generator))


def test_seeds_depend_on_run_seed_prompt_and_index():
    base = candidate_seed(0, "p", 0)
    assert candidate_seed(1, "p", 0) != base
    assert candidate_seed(0, "q", 0) != base
    assert candidate_seed(0, "p", 1) != base
    seeds = candidate_seeds(7, "p", 200)
    assert len(set(seeds)) == 200
    assert all(0 <= s < 2**SEED_BITS for s in seeds)


def test_more_candidates_keep_the_first_ones():
    assert candidate_seeds(3, "p", 16)[:4] == candidate_seeds(3, "p", 4)


def test_noise_is_a_function_of_the_seed_only():
    shape = (4, 8, 8)
    a = initial_noise(123, shape)
    assert a.dtype == torch.float32 and tuple(a.shape) == shape
    assert torch.equal(a, initial_noise(123, shape))
    assert not torch.equal(a, initial_noise(124, shape))
    stacked = batch_noise([5, 123, 9], shape)
    assert torch.equal(stacked[1], a)
    assert torch.equal(batch_noise([123], shape)[0], a)
