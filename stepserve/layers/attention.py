"""Causal self-attention over the paged KV cache: the one interface every decoder model is written against.

The model runner fills a `ForwardContext` for each step and sets it with `forward_context(...)`; each
`Attention` layer writes the step's new K/V into its pages (`slot_mapping`) and attends over the whole
sequence (`block_tables`, `kv_lens`). A step is a flat batch of sequences, each contributing `q_len >= 1`
new tokens (prefill chunks and decodes may be mixed). Models never see the scheduler. A model whose K needs
work before it is stored (Qwen3's per-head norm and rotation) calls `Attention.qk_norm_rope_attend`, which
stores and attends (on GPU, one kernel for a decode step).

KV layout per layer: `kv_cache[0]` is K, `kv_cache[1]` is V, each [num_pages, page_size, num_kv_heads, head_dim].
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stepserve.host_copy import to_device, to_device_aligned
from stepserve.layers.dispatch import dispatched
from stepserve.layers.rotary import qk_norm_rope


@dataclass
class ForwardContext:
    cu_q_lens: torch.Tensor  # int32 [B+1]: offsets of each sequence's new tokens in the flat batch
    kv_lens: torch.Tensor  # int32 [B]: tokens in the cache for each sequence after this step
    block_tables: torch.Tensor  # int32 [B, max_pages]: page ids of each sequence (unused slots are 0)
    slot_mapping: torch.Tensor  # int64 [T]: cache slot (page * page_size + offset) of each new token
    max_q_len: int
    max_kv_len: int
    # Host copies, so the reference path and metadata building never synchronize with the device.
    q_lens_cpu: list[int]
    kv_lens_cpu: list[int]
    kv_scale: float = 1.0  # per-tensor scale of an fp8 KV cache (stored = value / scale)

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1

    @property
    def batch_size(self) -> int:
        return len(self.q_lens_cpu)

    @functools.cached_property
    def leading_decodes(self) -> ForwardContext:
        """The sequences at the front of the step with one new token each (the scheduler puts decodes first), as a
        context of their own: views of this one's device tensors, built once per step for all its layers."""
        n = next((i for i, q in enumerate(self.q_lens_cpu) if q != 1), self.batch_size)
        kv_lens = self.kv_lens_cpu[:n]
        return ForwardContext(self.cu_q_lens[: n + 1], self.kv_lens[:n], self.block_tables[:n], self.slot_mapping[:n],
                              int(n > 0), max(kv_lens, default=0), self.q_lens_cpu[:n], kv_lens,
                              self.kv_scale)


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no ForwardContext is set: run the model through the model runner or forward_context()")
    return _CONTEXT


@contextlib.contextmanager
def forward_context(ctx: ForwardContext):
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = prev


def slot_of(pages: list[int], position: int, page_size: int) -> int:
    """The cache slot of a sequence's token at `position`, given the sequence's pages."""
    return pages[position // page_size] * page_size + position % page_size


def step_slots(q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], page_size: int) -> list[int]:
    """The cache slots of a step's new tokens: the last `q_lens[i]` of each sequence's `kv_lens[i]`, in order."""
    slots: list[int] = []
    for q, kv, pages in zip(q_lens, kv_lens, block_tables):
        slots.extend(slot_of(pages, p, page_size) for p in range(kv - q, kv))
    return slots


def build_context(q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], page_size: int,
                  device: torch.device | str = "cpu", kv_scale: float = 1.0) -> ForwardContext:
    """Context for sequences whose last `q_lens[i]` of `kv_lens[i]` tokens are new this step.

    The metadata reaches the device in two copies: one int32 buffer (offsets, lengths, page table) and the
    int64 slot mapping."""
    b = len(q_lens)
    width = max((len(p) for p in block_tables), default=1) or 1
    table: list[int] = []
    for pages in block_tables:
        table.extend(pages)
        table.extend([0] * (width - len(pages)))
    slots = step_slots(q_lens, kv_lens, block_tables, page_size)
    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    cu_q_lens, kv, tables = to_device_aligned([cu, list(kv_lens), table], torch.int32, device)
    return ForwardContext(
        cu_q_lens=cu_q_lens,
        kv_lens=kv,
        block_tables=tables.view(b, width),
        slot_mapping=to_device(torch.tensor(slots, dtype=torch.int64), device),
        max_q_len=max(q_lens, default=0),
        max_kv_len=max(kv_lens, default=0),
        q_lens_cpu=list(q_lens),
        kv_lens_cpu=list(kv_lens),
        kv_scale=kv_scale,
    )


def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             scale: float = 1.0) -> None:
    """Write new K/V rows [T, Hkv, D] into their cache slots."""
    k_flat = kv_cache[0].view(-1, *kv_cache.shape[-2:])
    v_flat = kv_cache[1].view(-1, *kv_cache.shape[-2:])
    if scale != 1.0:
        k, v = k / scale, v / scale
    if kv_cache.element_size() == 1:  # fp8
        # Saturate explicitly (older torch casts overflow to NaN); index_copy_ has no fp8 kernel: copy bytes.
        fp8_max = torch.finfo(kv_cache.dtype).max
        k, v = (t.clamp(-fp8_max, fp8_max).to(kv_cache.dtype).view(torch.uint8) for t in (k, v))
        k_flat, v_flat = k_flat.view(torch.uint8), v_flat.view(torch.uint8)
    else:
        k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)


@dispatched
def qk_norm_rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                          k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
    """`qk_norm_rope` of q [T, Hq, D] and k [T, Hkv, D], then `store_kv` of the rotated k and v; returns q.

    The kernel rotates q in place and writes k only to the cache: callers use the returned q and nothing else."""
    q, k = qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    store_kv(kv_cache, k, v, slot_mapping, kv_scale)
    return q


@dispatched
def qk_norm_rope_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
    """`qk_norm_rope_store_kv`, then paged attention of the rotated q: [T, Hq, D]. On GPU a decode step is one
    attention kernel that does both."""
    q = qk_norm_rope_store_kv(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, kv_cache,
                              ctx.slot_mapping, ctx.kv_scale)
    return attention_backend()(q, kv_cache, ctx, scale)


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
    """Plain-torch attention of q [T, Hq, D] over each sequence's cached K/V (new tokens already stored).

    Query token j of a sequence with q_len new tokens and kv_len cached sees keys 0 .. kv_len - q_len + j.
    """
    page_size = kv_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(ctx.q_lens_cpu, ctx.kv_lens_cpu)):
        n_pages = (kv_len + page_size - 1) // page_size
        pages = ctx.block_tables[i, :n_pages].long()
        k = kv_cache[0, pages].flatten(0, 1)[:kv_len].to(q.dtype) * ctx.kv_scale
        v = kv_cache[1, pages].flatten(0, 1)[:kv_len].to(q.dtype) * ctx.kv_scale
        qi = q[start : start + q_len]
        rows = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= rows  # [q_len, kv_len]
        # [H, q, D] x [Hkv, kv, D]: SDPA broadcasts the GQA groups with enable_gqa.
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


class Attention(nn.Module):
    """Paged causal attention. `kv_cache` is attached by the model runner before the first forward."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]: stores the step's K/V, then attends."""
        ctx = get_forward_context()
        store_kv(self._cache(), k, v, ctx.slot_mapping, ctx.kv_scale)
        return self.attend(q)

    def qk_norm_rope_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                            k_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm and rotation of q and k, the step's k and v stored, then attention: [T, Hq * D]."""
        out = qk_norm_rope_attend(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, self._cache(),
                                  get_forward_context(), self.scale)
        return out.reshape(q.shape[0], -1)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D] of a step whose K/V are already stored -> [T, Hq * D]."""
        out = attention_backend()(q, self._cache(), get_forward_context(), self.scale)
        return out.reshape(q.shape[0], -1)

    def _cache(self) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("Attention.kv_cache is not allocated")
        return self.kv_cache


def attention_backend():
    """The paged attention implementation for the current device: Triton on CUDA, the reference elsewhere."""
    return _BACKEND or paged_attention_reference


_BACKEND = None


def set_attention_backend(fn) -> None:
    """Install a faster paged attention (same signature as `paged_attention_reference`); None restores it."""
    global _BACKEND
    _BACKEND = fn
