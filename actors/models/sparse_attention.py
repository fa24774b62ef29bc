"""Block-sparse attention that skips work (issue 22, Re-ttention's kernel): each block of queries attends to its
kept blocks of keys only, and the dense score matrix is never formed.

On CPU the kept key blocks of every query block are gathered into one batched `scaled_dot_product_attention` call
(the cost is the kept share of the dense cost); rows that keep different numbers of blocks are padded with masked
blocks. Under the same mask it equals dense attention to float precision (tests/test_sparse_attention.py); a mask
that keeps everything takes the stock dense path, exactly. On a GPU the kernel is PyTorch's `flex_attention` with a
BlockMask made from the same block mask, compiled once per process: it skips the masked blocks itself. The tests
run that path on CPU (eager, slow, the same arithmetic) against the gathering one; its GPU timing is
benchmarks/gpu_check.py's attention part.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def band_block_mask(blocks: int, density: float, heads: int = 1) -> torch.Tensor:
    """(heads, blocks, blocks) bool: each query block keeps the `round(density * blocks)` key blocks nearest to it
    (at least one, its own), a band along the token order. The same for every head."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")
    kept = max(1, min(blocks, round(density * blocks)))
    rows = torch.arange(blocks)
    start = (rows - (kept - 1) // 2).clamp(0, blocks - kept)
    mask = torch.zeros(blocks, blocks, dtype=torch.bool)
    for offset in range(kept):
        mask[rows, start + offset] = True
    return mask.expand(heads, blocks, blocks).clone()


def token_mask(block_mask: torch.Tensor, block: int, tokens: int) -> torch.Tensor:
    """The (heads, tokens, tokens) bool mask a block mask stands for: what dense attention would be given."""
    expanded = block_mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return expanded[..., :tokens, :tokens]


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                           block: int, scale: float | None = None, return_lse: bool = False):
    """Attention of query (B, H, N, D) over key and value (B, H, N, D) where query block i sees key block j only
    if block_mask[h, i, j] (block_mask (H or 1, Nb, Nb), Nb = ceil(N / block)). Returns (B, H, N, D); with
    `return_lse` also each query's log-sum-exp of its kept scores (B, H, N, 1), from an explicit softmax over the
    gathered blocks (what Re-ttention's ratio needs; SDPA does not give it)."""
    if query.is_cuda:  # the GPU kernel: flex_attention skips the masked blocks itself
        return flex_block_sparse_attention(query, key, value, block_mask, block, scale, return_lse)
    batch, heads, tokens, dim = query.shape
    blocks = math.ceil(tokens / block)
    if block_mask.shape[-2:] != (blocks, blocks):
        raise ValueError(f"block mask {tuple(block_mask.shape)} for {tokens} tokens in blocks of {block}: expected "
                         f"(heads, {blocks}, {blocks})")
    if not block_mask.any(dim=-1).all():
        raise ValueError("every query block must keep at least one key block")
    if bool(block_mask.all()) and not return_lse:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    padded = blocks * block
    if padded != tokens:  # pad to whole blocks; padded keys are masked out below, padded queries cropped
        pad = (0, 0, 0, padded - tokens)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    mask = block_mask.expand(heads, blocks, blocks)
    kept = int(mask.sum(dim=-1).max())
    # For each (head, query block), the indices of its kept key blocks, padded with block 0 (masked below).
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kept]  # kept blocks first, in order
    valid = torch.gather(mask, -1, order)  # (H, Nb, kept)
    keys = key.reshape(batch, heads, blocks, block, dim)
    values = value.reshape(batch, heads, blocks, block, dim)
    index = order.reshape(1, heads, blocks * kept, 1, 1).expand(batch, heads, blocks * kept, block, dim)
    gathered_k = torch.gather(keys, 2, index).reshape(batch, heads, blocks, kept * block, dim)
    gathered_v = torch.gather(values, 2, index).reshape(batch, heads, blocks, kept * block, dim)
    allowed = valid.repeat_interleave(block, dim=-1)  # (H, Nb, kept * block)
    if padded != tokens:
        positions = (order.unsqueeze(-1) * block + torch.arange(block)).view(heads, blocks, kept * block)
        allowed = allowed & (positions < tokens)
    attn_mask = None if bool(allowed.all()) else allowed.view(1, heads, blocks, 1, kept * block)
    blocked_query = query.reshape(batch, heads, blocks, block, dim)
    if attn_mask is None:  # as 4-d (batch, heads x blocks, block, dim): SDPA's fused kernels take that shape
        flat = (batch, heads * blocks, -1, dim)
        if return_lse and query.device.type == "cpu":
            out, lse = _flash_with_lse(blocked_query.reshape(flat), gathered_k.reshape(flat),
                                       gathered_v.reshape(flat), scale)
            return (out.reshape(batch, heads, padded, dim)[:, :, :tokens],
                    lse.reshape(batch, heads, padded, 1)[:, :, :tokens])
        if not return_lse:
            out = F.scaled_dot_product_attention(blocked_query.reshape(flat), gathered_k.reshape(flat),
                                                 gathered_v.reshape(flat), scale=scale)
            return out.reshape(batch, heads, padded, dim)[:, :, :tokens]
    elif not return_lse:
        out = F.scaled_dot_product_attention(blocked_query, gathered_k, gathered_v, attn_mask=attn_mask, scale=scale)
        return out.reshape(batch, heads, padded, dim)[:, :, :tokens]
    scores = (blocked_query @ gathered_k.transpose(-1, -2)) * (scale if scale is not None else dim**-0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ gathered_v
    return (out.reshape(batch, heads, padded, dim)[:, :, :tokens],
            lse.reshape(batch, heads, padded, 1)[:, :, :tokens])


def dense_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention (B, H, N, D) and each query's log-sum-exp of its scores (B, H, N, 1): Re-ttention's full step.
    A fused kernel on CPU and CUDA (the scores are never formed); elsewhere over chunks of queries, so the score
    matrix in memory stays near 2^26 values."""
    if query.device.type == "cpu":
        return _flash_with_lse(query, key, value, scale)
    if query.is_cuda:  # the fused kernel with no mask: the dense scores are never formed
        return flex_dense_attention_with_lse(query, key, value, scale)
    batch, heads, tokens, dim = query.shape
    scale = scale if scale is not None else dim**-0.5
    chunk = max(1, (1 << 26) // max(1, batch * heads * key.shape[-2]))
    outs, lses = [], []
    for start in range(0, tokens, chunk):
        scores = (query[..., start:start + chunk, :] @ key.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        outs.append(torch.exp(scores - lse) @ value)
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-2)


def flex_dense_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dense_attention_with_lse through `flex_attention` with no mask (the GPU path; compiled there, eager in the
    tests): the log-sum-exp comes as (B, H, N, 1) in the output's dtype, as the sparse path gives it."""
    out, lse = _flex(compiled=query.is_cuda)(query, key, value, scale=scale, return_lse=True)
    return out, lse.unsqueeze(-1).to(out.dtype)


def _flash_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU attention, which SDPA runs, asked for its log-sum-exp as well (B, H, N, 1): the same
    output as `scaled_dot_product_attention`, bit for bit, at its cost."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
    return out, lse.unsqueeze(-1)


# BlockMasks made, by (mask shape and bytes, block, tokens, device): making one evaluates the mask at every
# (query, key) pair, in every layer at every step when remade per call (on an H200 the whole sparse call, remaking
# it, took 4.3 ms at 4,096 tokens, ten times dense SDPA), while a run asks for the same few masks throughout.
BLOCK_MASKS_KEPT = 16


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention compiled once per process: its fused kernel, for GPU tensors."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled variant per shape and call form (a BlockMask or none, with or without the log-sum-exp): a model
    # with several attention sizes needs more than dynamo's default 8 before it would fall back to the eager,
    # unfused kernel. Raised, never lowered.
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def _flex(compiled: bool):
    """flex_attention compiled (for GPU tensors) or eager (the tests' CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if compiled else flex_attention


def flex_block_mask(block_mask: torch.Tensor, block: int, tokens: int, device: torch.device):
    """The BlockMask of `block_mask` (H or 1, Nb, Nb) for `tokens` tokens in blocks of `block`, made once and kept."""
    return _made_block_mask(tuple(block_mask.shape), block_mask.cpu().numpy().tobytes(), block, tokens, str(device))


@functools.lru_cache(maxsize=BLOCK_MASKS_KEPT)
def _made_block_mask(shape: tuple, data: bytes, block: int, tokens: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = torch.frombuffer(bytearray(data), dtype=torch.bool).reshape(shape).to(device)
    per_head = mask.shape[0] > 1

    def keep(b, h, q, kv):
        return mask[h if per_head else 0, q // block, kv // block]

    return create_block_mask(keep, None, mask.shape[0] if per_head else None, tokens, tokens, device=device,
                             BLOCK_SIZE=block)


def flex_block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                                block: int, scale: float | None = None, return_lse: bool = False):
    """block_sparse_attention through `flex_attention` with a BlockMask of the same blocks (the GPU path; compiled
    there, eager elsewhere). Same arguments and results; the log-sum-exp comes as (B, H, N, 1)."""
    blocks = flex_block_mask(block_mask, block, query.shape[-2], query.device)
    function = _flex(compiled=query.is_cuda)
    result = function(query, key, value, block_mask=blocks, scale=scale, return_lse=return_lse)
    if return_lse:
        out, lse = result
        return out, lse.unsqueeze(-1).to(out.dtype)
    return result
