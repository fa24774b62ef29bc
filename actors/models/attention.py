"""Sparse self-attention in the denoiser (issue 22, "Re-ttention"): which steps attend sparsely, and the diffusers
attention processor that does it, with Re-ttention's corrections from the last full step.

Re-ttention (the seed paper; its released processor is cccrrrccc/Re-ttention `module/pixart_processor.py`) keeps a
few denoising steps at full attention and makes the rest sparse: each query attends only to the keys of a band
around it (`sparse_attention.band_block_mask`: a share `density` of the key blocks). On each full step it caches,
per image, head and query,

- the **ratio**: the share of the full softmax's weight that falls inside the sparse pattern, and
- the **residual**: the full output minus the ratio-scaled sparse output,

and on the sparse steps until the next full step it returns `ratio * sparse + residual`. Between neighbouring steps
attention changes slowly, so the correction carries most of what the band leaves out. The modes:

- `full`: the stock processor, untouched (nothing is installed).
- `sparse`: the naive baseline, sparse steps with no correction (full steps plain attention).
- `re-ttention`: both corrections. `ratio` and `residual` (one correction alone) exist for the benchmark's
  ablation; the command line offers the three above.

What differs from the released code, and why: the released processor builds every "sparse" step as a dense score
matrix with a mask (never faster than dense; here the block-sparse kernel skips the work), caches the residual only
on some full steps and the ratio on others, and adds 0.04 to the ratio after every sparse step (an undocumented
drift). Here every full step refreshes both caches and the ratio is used as cached.

A `StepClock`, shared by all processors of a denoiser, says which step is being computed: the adapter's denoise
loop sets it before each model call. Caches live in each layer's processor, hold one row per image of the batch
(the unconditional and conditional halves of a guided batch are rows like any other) and are rebuilt on every full
step; step 0 is always full, so each denoising starts with its own caches. Cross-attention is left as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actors.models.attention_plan import AttentionPlan
from actors.models.sparse_attention import band_block_mask, block_sparse_attention, dense_attention_with_lse

SEQUENCE_BLOCKS = 64  # a sequence is cut into at most 64 blocks: 64 tokens in blocks of 1, 4,096 in blocks of 64
_USES_RATIO = {"re-ttention", "ratio"}
_USES_RESIDUAL = {"re-ttention", "residual"}


class StepClock:
    """The denoising step being computed, set by the adapter's denoise loop and read by every processor."""

    def __init__(self, plan: AttentionPlan):
        self.plan = plan
        self.step = 0
        self._full = frozenset(plan.full_steps)

    @property
    def full(self) -> bool:
        return self.step in self._full


def _blocks(tokens: int) -> tuple[int, int]:
    """(block size, blocks) for a sequence: at most SEQUENCE_BLOCKS blocks."""
    block = math.ceil(tokens / min(tokens, SEQUENCE_BLOCKS))
    return block, math.ceil(tokens / block)


def full_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
              block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-ttention's full step: (full attention, the band's attention, the share of each query's softmax weight
    inside the band (B, H, N, 1)). The share is exp(lse_band - lse_full): no mask over the dense scores."""
    full, lse_full = dense_attention_with_lse(query, key, value)
    band, lse_band = block_sparse_attention(query, key, value, block_mask, block, return_lse=True)
    return full, band, torch.exp(lse_band - lse_full)


class SparseSelfAttention:
    """A diffusers attention processor for one self-attention layer: full or block-sparse by the clock's step, with
    the mode's corrections (module docstring). Holds that layer's caches."""

    def __init__(self, clock: StepClock):
        self.clock = clock
        self.ratio: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self._masks: dict[int, torch.Tensor] = {}

    def _mask(self, blocks: int) -> torch.Tensor:
        if blocks not in self._masks:
            self._masks[blocks] = band_block_mask(blocks, self.clock.plan.density)
        return self._masks[blocks]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) attention of one layer at the clock's step, updating or using the caches."""
        mode = self.clock.plan.mode
        block, blocks = _blocks(query.shape[-2])
        mask = self._mask(blocks)
        if self.clock.full:
            if mode == "sparse":
                return F.scaled_dot_product_attention(query, key, value)
            full, sparse, ratio = full_step(query, key, value, mask, block)
            self.ratio = ratio if mode in _USES_RATIO else None
            self.residual = full - (sparse * ratio if self.ratio is not None else sparse) \
                if mode in _USES_RESIDUAL else None
            return full
        out = block_sparse_attention(query, key, value, mask, block)
        for cache in (self.ratio, self.residual):
            if cache is not None and cache.shape[:3] != out.shape[:3]:
                raise RuntimeError(f"sparse attention at step {self.clock.step}: caches of a batch of "
                                   f"{cache.shape[0]} from the last full step, a batch of {out.shape[0]} now (a "
                                   "denoising continued with fewer images: the preview cascade does that)")
        if mode in _USES_RATIO:
            out = out * self.ratio
        if mode in _USES_RESIDUAL:
            out = out + self.residual
        return out

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sparse attention is for self-attention without a mask; this layer got "
                             + ("a context" if encoder_hidden_states is not None else "an attention mask"))
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attention_layers(denoiser) -> list[str]:
    """Processor names of the denoiser's self-attention layers (`attn1` of every transformer block: PixArt's
    blocks and the UNets' spatial transformers alike)."""
    return [name for name in denoiser.attn_processors if name.endswith("attn1.processor")]


def install(denoiser, plan: AttentionPlan) -> StepClock | None:
    """Put a SparseSelfAttention on every self-attention layer of `denoiser`; returns the clock the denoise loop
    sets, or None for full attention (the stock processors run: put back where a sparse run had replaced them)."""
    if not plan.sparse:
        if any(isinstance(p, SparseSelfAttention) for p in denoiser.attn_processors.values()):
            from diffusers.models.attention_processor import AttnProcessor2_0

            denoiser.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, SparseSelfAttention) else p
                                         for name, p in denoiser.attn_processors.items()})
        return None
    clock = StepClock(plan)
    layers = set(self_attention_layers(denoiser))
    if not layers:
        raise ValueError(f"{type(denoiser).__name__} has no self-attention layer for --attention {plan.mode}")
    processors = {name: SparseSelfAttention(clock) if name in layers else processor
                  for name, processor in denoiser.attn_processors.items()}
    denoiser.set_attn_processor(processors)
    return clock
