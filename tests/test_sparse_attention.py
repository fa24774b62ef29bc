"""The block-sparse attention kernel (actors/models/sparse_attention.py): equal to dense attention under the same
mask, exactly the stock path at full density, and the band masks' density."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.models.sparse_attention import band_block_mask, block_sparse_attention, token_mask


def qkv(batch=2, heads=3, tokens=100, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("tokens, block", [(100, 16), (128, 16), (64, 8)])
@pytest.mark.parametrize("kind", ["band-0.2", "band-0.5", "random"])
def test_block_sparse_attention_equals_dense_attention_under_the_same_mask(tokens, block, kind):
    query, key, value = qkv(tokens=tokens)
    blocks = -(-tokens // block)
    if kind == "random":  # a different pattern per head, rows keeping different numbers of blocks
        generator = torch.Generator().manual_seed(1)
        mask = torch.rand(3, blocks, blocks, generator=generator) < 0.3
        mask[:, torch.arange(blocks), torch.arange(blocks)] = True
    else:
        mask = band_block_mask(blocks, float(kind.split("-")[1]), heads=3)
    found = block_sparse_attention(query, key, value, mask, block)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=token_mask(mask, block, tokens))
    assert found.shape == expected.shape
    assert float((found - expected).abs().max()) <= 1e-5
    assert float((found - F.scaled_dot_product_attention(query, key, value)).abs().max()) > 1e-3  # it is sparse


def test_a_mask_that_keeps_everything_is_the_stock_dense_path_exactly():
    query, key, value = qkv(tokens=96)
    full = torch.ones(1, 6, 6, dtype=torch.bool)
    assert torch.equal(block_sparse_attention(query, key, value, full, 16),
                       F.scaled_dot_product_attention(query, key, value))


def test_band_masks_keep_the_asked_share_of_blocks_around_the_diagonal():
    mask = band_block_mask(64, 0.031)
    assert mask.shape == (1, 64, 64) and int(mask[0].sum(dim=-1).min()) == int(mask[0].sum(dim=-1).max()) == 2
    assert bool(mask[0].diagonal().all())
    assert int(band_block_mask(64, 0.125)[0].sum(dim=-1).max()) == 8
    with pytest.raises(ValueError, match="density must be in"):
        band_block_mask(64, 0)
    query, key, value = qkv(tokens=64)
    empty_row = band_block_mask(4, 0.5)
    empty_row[0, 1] = False
    with pytest.raises(ValueError, match="at least one key block"):
        block_sparse_attention(query, key, value, empty_row, 16)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention warns when run eagerly (on CPU)
def test_the_flex_attention_path_for_gpus_equals_the_gathering_kernel_with_the_log_sum_exp():
    """The GPU path (flex_attention with a BlockMask of the same blocks), run here eagerly on CPU: the same output
    and log-sum-exp as the gathering kernel, which the rest of this file checks against dense attention."""
    from actors.models.sparse_attention import flex_block_sparse_attention

    query, key, value = qkv(tokens=128)
    mask = band_block_mask(8, 0.25)
    gathered, lse = block_sparse_attention(query, key, value, mask, 16, return_lse=True)
    flexed, flex_lse = flex_block_sparse_attention(query, key, value, mask, 16, return_lse=True)
    assert float((gathered - flexed).abs().max()) <= 1e-5 and float((lse - flex_lse).abs().max()) <= 1e-5
    scores = (query @ key.transpose(-1, -2)) / 8**0.5
    expected = torch.logsumexp(scores.masked_fill(~token_mask(mask, 16, 128), float("-inf")), dim=-1, keepdim=True)
    assert float((lse - expected).abs().max()) <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_gpu_path_makes_each_block_mask_once_and_its_dense_step_equals_the_fused_cpu_kernel():
    """Making a BlockMask evaluates the mask at every (query, key) pair (on an H200 it cost ten times the attention
    it served): an equal mask, even a new tensor, gets the BlockMask already made; another density a new one. The
    GPU's dense attention with log-sum-exp (flex_attention, no mask), run eagerly here, equals the CPU's kernel."""
    from actors.models.sparse_attention import (_flash_with_lse, _made_block_mask, flex_block_mask,
                                                flex_block_sparse_attention, flex_dense_attention_with_lse)

    query, key, value = qkv(tokens=128)
    _made_block_mask.cache_clear()

    def made() -> int:
        return _made_block_mask.cache_info().currsize

    first = flex_block_mask(band_block_mask(8, 0.25), 16, 128, query.device)
    flex_block_sparse_attention(query, key, value, band_block_mask(8, 0.25), 16)
    assert flex_block_mask(band_block_mask(8, 0.25), 16, 128, query.device) is first and made() == 1
    assert flex_block_mask(band_block_mask(8, 0.5), 16, 128, query.device) is not first and made() == 2
    out, lse = flex_dense_attention_with_lse(query, key, value)
    expected_out, expected_lse = _flash_with_lse(query, key, value, None)
    assert float((out - expected_out).abs().max()) <= 1e-5 and float((lse - expected_lse).abs().max()) <= 1e-5
