"""Triton paged attention: a split-KV decode kernel and a flash-attention extend kernel over the page table.

Both match `stepserve.layers.attention.paged_attention_reference` (the plain-torch reference) and read the
KV cache layout [2, num_pages, page_size, num_kv_heads, head_dim] through `ctx.block_tables`. A program
owns one kv head and the whole group of query heads that share it, so each K/V row is read once per group.
An fp8 cache is read as stored and its per-tensor `ctx.kv_scale` is folded into the softmax scale (K) and
the output (V): the same function as the reference, which scales K/V after loading. With an fp8 cache the
products run in fp16, not bf16: fp8 -> fp16 is one instruction per pair (to bf16 it is several), and fp16 holds
every fp8 value, q (|q| < 65504) and the probabilities at least as precisely as bf16.

Decode (every sequence has one new token) is CUDA-graph capturable: the grid and scratch buffers depend
only on the batch size and the number of KV splits, never on data; each sequence's keys are divided among
the splits in-kernel from `kv_lens`, splits with no keys write an empty partial, and a second small kernel
combines the partials, skipping the empty ones. The step's new key is the one K/V row an earlier kernel of
the step writes: the split that holds it attends to it last, so everything else (lengths, pages, the first
block of cached K/V) loads before the PDL wait. For Qwen3 the decode kernel also does the per-head norm and
rotation of q and k and the store of the new K/V (`qk_norm_rope_attend`): no rotary kernel runs between the
qkv projection and attention. On Hopper every kernel here launches with PDL (`stepserve.kernels.pdl`), so
the reduce kernel's launch overlaps the split kernel's tail.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from stepserve.kernels import pdl
from stepserve.kernels.rotary import _load_weight, _norm_rotate, _to_cache, qk_norm_rope_store_kv
from stepserve.layers.attention import ForwardContext

_LOG2E = 1.4426950408889634
# A mixed step (prefill chunks after ~100 decodes at high load) attends its decodes with the decode kernel from
# this many on: the extend kernel gives each decode a whole query tile of its own. H100, a 1439-token prefill after
# 95 decodes, per layer: 513 us in one extend launch against 383 apart (bf16 cache), 579 against 337 (fp8);
# `benchmarks/kernels.py --mixed` in session 10, cold event timings. Its GPU kernel time in session 20 (PDL off):
# 347 against 369 us (bf16), 332 against 328 (fp8), no longer a gain; left as it is (docs/benchmarks.md).
MIN_MIXED_DECODES = 32


@triton.jit
def _kv_rows(table_ptr, keys, kv_end, stride_kp, stride_ks, MASKED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Offsets of the cache rows of `keys` (through the page table) and which of them exist (< kv_end)."""
    key_ok = keys < kv_end
    if MASKED:
        pages = tl.load(table_ptr + keys // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
    else:
        pages = tl.load(table_ptr + keys // PAGE_SIZE).to(tl.int64)
    return pages * stride_kp + (keys % PAGE_SIZE) * stride_ks, key_ok


@triton.jit
def _load_rows(ptr, rows, key_ok, dims, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + rows[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0)
    return tl.load(ptr + rows[:, None] + dims[None, :])


@triton.jit
def _softmax_step(q, k, acc, m_i, l_i, keys, key_ok, last_key, qk_scale, MASKED: tl.constexpr):
    """The online-softmax update for one block of keys with base-2 scores (qk_scale includes log2 e): the
    rescaled accumulator and sums, and the block's probabilities p for `acc += p @ V`."""
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    if MASKED:
        # last_key [rows]: the causal limit of each query row.
        s = tl.where((keys[None, :] <= last_key[:, None]) & key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return acc * alpha[:, None], m_new, l_i * alpha + tl.sum(p, 1), p


@triton.jit
def _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, keys, last_key, kv_end, dims, qk_scale,
                  stride_kp, stride_ks, MASKED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """One online-softmax step over the keys `keys`, loading them (V after the scores)."""
    rows, key_ok = _kv_rows(table_ptr, keys, kv_end, stride_kp, stride_ks, MASKED, PAGE_SIZE)
    k = _load_rows(k_ptr, rows, key_ok, dims, MASKED)
    acc, m_i, l_i, p = _softmax_step(q, k, acc, m_i, l_i, keys, key_ok, last_key, qk_scale, MASKED)
    v = _load_rows(v_ptr, rows, key_ok, dims, MASKED)
    return acc + tl.dot(p.to(q.dtype), v.to(q.dtype)), m_i, l_i


@triton.jit
def _attend_range(q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, start, full_end, end, last_key, dims, qk_scale,
                  stride_kp, stride_ks, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Attend over keys [start, end): unmasked full blocks up to `full_end`, then masked blocks."""
    for n0 in range(start, full_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, keys, last_key, end, dims,
                                      qk_scale, stride_kp, stride_ks, False, PAGE_SIZE)
    for n0 in range(full_end, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, keys, last_key, end, dims,
                                      qk_scale, stride_kp, stride_ks, True, PAGE_SIZE)
    return acc, m_i, l_i


# Integer arguments that change with the batch are not specialized: Triton would otherwise build a kernel again
# (~1.3 s, on a user's request) the first time one is 1 or a multiple of 16, e.g. a prompt of 96 KV pages.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(q_ptr, knew_ptr, vnew_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, eps, slot_ptr, fp8_max,
                   k_ptr, v_ptr, table_ptr, kv_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr, qk_scale, v_scale,
                   stride_qt, stride_qh, stride_nt, stride_nh, stride_cs, stride_kp, stride_ks, stride_kh,
                   stride_bt, stride_ot, stride_oh,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr,
                   USE_PDL: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    # Lengths, pages, slots and positions are copied in before the step's first kernel, and every key but the
    # step's new one (the last) was cached by earlier steps: all of that is read before the PDL wait, so the
    # first block's K/V loads overlap the kernel that computes q.
    kv_len = tl.load(kv_lens_ptr + seq)
    # Whole blocks per split (equal shares measured slower), so past a split's first block (masked: it is loaded
    # before the wait) only a sequence's last block needs a mask; at least one block, so that the number of
    # non-empty splits, cdiv(kv_len, chunk), is defined for kv_len 0 too.
    chunk = tl.maximum(tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)
    old_end = tl.minimum(end, kv_len - 1)  # this split's keys cached by earlier steps: [start, old_end)
    kv_off = kv_head * stride_kh
    k_ptr += kv_off
    v_ptr += kv_off
    table_ptr += seq * stride_bt
    dims = tl.arange(0, HEAD_DIM)
    keys0 = start + tl.arange(0, BLOCK_N)
    rows0, ok0 = _kv_rows(table_ptr, keys0, old_end, stride_kp, stride_ks, True, PAGE_SIZE)
    k0 = _load_rows(k_ptr, rows0, ok0, dims, True)
    v0 = _load_rows(v_ptr, rows0, ok0, dims, True)
    if ROPE:  # the new key's cache row: where this kernel stores it
        slot = tl.load(slot_ptr + seq)
        new_row = (slot // PAGE_SIZE) * stride_kp + (slot % PAGE_SIZE) * stride_ks
    else:  # where the kernel before this one stored it, found like every other key
        last = tl.maximum(kv_len - 1, 0)
        new_row = tl.load(table_ptr + last // PAGE_SIZE).to(tl.int64) * stride_kp + (last % PAGE_SIZE) * stride_ks
    half = tl.arange(0, HALF)
    if ROPE:
        pos = tl.load(pos_ptr + seq).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_cs + half)[None, :]
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + half)[None, :]
        qw1, qw2 = _load_weight(qw_ptr, HALF, HALF, True)
        kw1, kw2 = _load_weight(kw_ptr, HALF, HALF, True)
    pdl.wait_for_predecessor(USE_PDL)

    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < GROUP
    heads = kv_head * GROUP + rows
    q_lo = q_ptr + seq * stride_qt + heads[:, None] * stride_qh + half[None, :]
    if ROPE:  # q as computed by the qkv projection: normalize and rotate it here (each split redoes it: 1 KB)
        q1, q2 = _norm_rotate(q_lo, row_ok[:, None], qw1, qw2, eps, cos, sin, HALF, True)
    else:
        q1 = tl.load(q_lo, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q_lo + HALF, mask=row_ok[:, None], other=0.0)
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_H, HEAD_DIM))
    if FP8:
        q = q.to(tl.float16)  # the module docstring says why
    # The new key and value, loaded by every split with q (a few hundred bytes) so that the one holding the key
    # does not wait for them at the end.
    if ROPE:  # computed here, stored below, used as stored (an fp8 cache rounds it)
        cache_dtype = k_ptr.dtype.element_ty
        k_lo = knew_ptr + seq * stride_nt + kv_head * stride_nh + half[None, :]
        k1, k2 = _norm_rotate(k_lo, half[None, :] < HALF, kw1, kw2, eps, cos, sin, HALF, True)
        k1 = _to_cache(k1, v_scale, cache_dtype, fp8_max, FP8)
        k2 = _to_cache(k2, v_scale, cache_dtype, fp8_max, FP8)
        v_new = _to_cache(tl.load(vnew_ptr + seq * stride_nt + kv_head * stride_nh + dims), v_scale, cache_dtype,
                          fp8_max, FP8)
    else:
        k1 = tl.load(k_ptr + new_row + half[None, :])
        k2 = tl.load(k_ptr + new_row + HALF + half[None, :])
        v_new = tl.load(v_ptr + new_row + dims)
    last_key = tl.zeros([BLOCK_H], tl.int32) + (kv_len - 1)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    if start < old_end:
        acc, m_i, l_i, p = _softmax_step(q, k0, acc, m_i, l_i, keys0, ok0, last_key, qk_scale, True)
        acc += tl.dot(p.to(q.dtype), v0.to(q.dtype))
    rest = start + BLOCK_N
    acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, k_ptr, v_ptr, table_ptr, rest,
                                  tl.maximum(rest, old_end - old_end % BLOCK_N), old_end, last_key, dims, qk_scale,
                                  stride_kp, stride_ks, BLOCK_N, PAGE_SIZE)
    if (start < end) & (end == kv_len):  # this split holds the new key
        if ROPE:
            tl.store(k_ptr + new_row + half[None, :], k1)
            tl.store(k_ptr + new_row + HALF + half[None, :], k2)
            tl.store(v_ptr + new_row + dims, v_new)
        s = tl.sum(q1.to(tl.float32) * k1.to(q.dtype).to(tl.float32), 1)
        s = (s + tl.sum(q2.to(tl.float32) * k2.to(q.dtype).to(tl.float32), 1)) * qk_scale
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(q.dtype).to(tl.float32)[None, :]
        m_i = m_new
    # An empty split (or a padded sequence with kv_len 0) has l_i == 0: output 0, lse -inf.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [B, Hq, NUM_SPLITS]
        # An empty split stores lse -inf and output 0 (weight 0 in the reduce), so that the reduce can load
        # every output without waiting for the lse to tell which ones exist.
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], o, mask=row_ok[:, None])


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
                          USE_PDL: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    pdl.wait_for_predecessor(USE_PDL)
    splits = tl.arange(0, SPLITS_POW2)
    dims = tl.arange(0, HEAD_DIM)
    base = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + base, mask=splits < NUM_SPLITS, other=float("-inf"))
    o = tl.load(part_out_ptr + base[:, None] * HEAD_DIM + dims[None, :], mask=(splits < NUM_SPLITS)[:, None],
                other=0.0)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every split empty: all weights 0, output 0
    w = tl.exp2(lse - top)
    total = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["first_seq", "num_seqs", "tok_base", "stride_bt"])
def _extend_kernel(q_ptr, k_ptr, v_ptr, table_ptr, cu_q_lens_ptr, kv_lens_ptr, out_ptr, first_seq, num_seqs,
                   tok_base, qk_scale, v_scale, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_bt,
                   stride_ot, stride_oh,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, BLOCK_B: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr):
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile; a row is (token, head in group)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    pdl.wait_for_predecessor(USE_PDL)  # before the early exit below: every program must wait
    # Tiles are numbered over sequences first_seq.. (no host list): find this tile's sequence by a prefix sum,
    # BLOCK_B sequences at a time (one build serves every batch size). Tokens are rows of q / out counted from
    # the first of sequence first_seq (tok_base in the step).
    seq = first_seq  # sequences that end at or before this tile
    seq_tiles = 0  # the tile's sequence: its tile count and the tile number it ends at
    seq_end = 0
    done = 0  # tiles of the sequences before this block
    for first in range(first_seq, num_seqs, BLOCK_B):
        b = first + tl.arange(0, BLOCK_B)
        lo = tl.load(cu_q_lens_ptr + b, mask=b < num_seqs, other=0)
        hi = tl.load(cu_q_lens_ptr + b + 1, mask=b < num_seqs, other=0)
        n_tiles = tl.cdiv(hi - lo, TOKENS)
        tiles_end = done + tl.cumsum(n_tiles, 0)
        seq += tl.sum((tiles_end <= tile).to(tl.int32), 0)
        owns = (tiles_end > tile) & (tiles_end - n_tiles <= tile)
        seq_tiles += tl.sum(tl.where(owns, n_tiles, 0), 0)
        seq_end += tl.sum(tl.where(owns, tiles_end, 0), 0)
        done += tl.sum(n_tiles, 0)
    if seq < num_seqs:
        local = tile - seq_end + seq_tiles
        q_block = seq_tiles - 1 - local  # the costliest (last) tiles of a sequence start first
        q_start = tl.load(cu_q_lens_ptr + seq)
        q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
        q_start -= tok_base
        kv_len = tl.load(kv_lens_ptr + seq)

        r = tl.arange(0, BLOCK_M)
        tok = q_block * TOKENS + r // GROUP
        row_ok = (r < TOKENS * GROUP) & (tok < q_len)
        heads = kv_head * GROUP + r % GROUP
        dims = tl.arange(0, HEAD_DIM)
        q_off = (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
        if FP8:
            q = q.to(tl.float16)

        first_tok = q_block * TOKENS
        last_tok = tl.minimum(first_tok + TOKENS, q_len) - 1
        last_key = kv_len - q_len + tok  # causal limit of each row
        full_end = (kv_len - q_len + first_tok + 1) // BLOCK_N * BLOCK_N  # every row sees these keys
        end = kv_len - q_len + last_tok + 1
        kv_off = kv_head * stride_kh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, k_ptr + kv_off, v_ptr + kv_off, table_ptr + seq * stride_bt,
                                      0, full_end, end, last_key, dims, qk_scale, stride_kp, stride_ks,
                                      BLOCK_N, PAGE_SIZE)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
        out_off = (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int]:
    T, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, kv_dim = kv_cache.shape
    assert kv_dim == head_dim and num_heads % num_kv_heads == 0, (q.shape, kv_cache.shape)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1, "q and kv_cache need a contiguous last dim"
    return num_heads, num_kv_heads, page_size


def _check_ctx(ctx: ForwardContext) -> None:
    for name in ("block_tables", "kv_lens", "cu_q_lens"):
        t = getattr(ctx, name)
        assert t.dtype == torch.int32 and t.stride(-1) == 1, f"ctx.{name} must be int32 with a contiguous last dim"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SM count; use an H100's so CPU tests take the same paths


def default_num_splits(batch: int, num_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """KV splits per (sequence, kv head) so that a small batch still fills the chip.

    Aims for about four programs per SM while giving each split at least 128 keys; 1 at large batch.
    """
    programs = batch * num_kv_heads
    want = math.ceil(4 * num_sms / programs)
    return max(1, min(want, math.ceil(max_kv_len / 128), 64))


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (out.shape, q.shape)
    return out


class StepKV(NamedTuple):
    """A decode step's new k and v [B, Hkv, D] as the qkv projection left them (q too), with what Qwen3 applies
    before they are attended and stored: per-head RMSNorm of q and k, then the rotation (`qk_norm_rope_store_kv`)."""

    k: torch.Tensor
    v: torch.Tensor
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext, scale: float, *,
                     step_kv: StepKV | None = None, num_splits: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence (q [B, Hq, D]) over its cached keys, split over the KV.

    With `step_kv`, q is not yet normalized or rotated and the step's K/V are not yet stored: the kernel does
    both (`qk_norm_rope_store_kv`), so the decode step runs no separate rotary kernel. Launch sizes depend only
    on B and `num_splits` (from `ctx.max_kv_len` unless given), so a CUDA graph captured for a batch size
    replays correctly for any kv_lens. `out` (like q, contiguous) receives the result instead of a new tensor.
    """
    num_heads, num_kv_heads, page_size = _check(q, kv_cache)
    _check_ctx(ctx)
    batch, _, head_dim = q.shape
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, ctx.max_kv_len, _num_sms(q.device))
    # Many splits (batch 1) leave each a block or two: smaller blocks spread the keys over more programs and
    # nothing is left to pipeline (fp8 batch-1 replay 3.25 ms vs 3.35 with 64/2); fewer, longer splits want
    # 64-key blocks, 2 stages (bf16 batch 16, 5 splits: 7.82 ms vs 8.20). benchmarks/decode_parts.py, 01c4af8.
    short = num_splits >= 32
    block_n = block_n or (32 if short else 64)
    num_stages = num_stages or (1 if short else 2)
    out = _output(q, out)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    if step_kv is not None:
        assert ctx.slot_mapping.shape == (batch,) and ctx.slot_mapping.stride(0) == 1, ctx.slot_mapping.shape
        new_k, new_v, positions, cos_sin = step_kv.k, step_kv.v, step_kv.positions, step_kv.cos_sin_cache
        assert new_k.shape == new_v.shape == (batch, num_kv_heads, head_dim), (new_k.shape, new_v.shape)
        assert new_k.stride() == new_v.stride() and new_k.stride(-1) == 1, (new_k.stride(), new_v.stride())
        assert positions.shape == (batch,) and positions.stride(0) == 1, positions.shape
        assert cos_sin.dtype == torch.float32 and cos_sin.shape[-1] == head_dim and cos_sin.stride(-1) == 1
        assert step_kv.q_weight.shape == step_kv.k_weight.shape == (head_dim,)
        assert kv_cache.element_size() > 1 or kv_cache.dtype == torch.float8_e4m3fn, kv_cache.dtype
        rope_args = (new_k, new_v, positions, cos_sin, step_kv.q_weight.contiguous(), step_kv.k_weight.contiguous(),
                     step_kv.eps)
        new_strides = (new_k.stride(0), new_k.stride(1), cos_sin.stride(0))
    else:  # the ROPE-only arguments are never read
        rope_args, new_strides = (q, q, ctx.kv_lens, q, q, q, 0.0), (0, 0, 0)
    use_pdl = pdl.enabled(q.device)
    k, v = kv_cache[0], kv_cache[1]
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, *rope_args, ctx.slot_mapping, torch.finfo(torch.float8_e4m3fn).max,
        k, v, ctx.block_tables, ctx.kv_lens, out, part_out, part_lse, scale * ctx.kv_scale * _LOG2E, ctx.kv_scale,
        q.stride(0), q.stride(1), *new_strides, k.stride(0), k.stride(1), k.stride(2), ctx.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, PAGE_SIZE=page_size, NUM_SPLITS=num_splits, ROPE=step_kv is not None,
        FP8=kv_cache.element_size() == 1, USE_PDL=use_pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=use_pdl)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits),
            USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return out


def extend_attention(q: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext, scale: float, *,
                     first_seq: int = 0, out: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] (any mix of q_lens) over each sequence's cached keys.

    first_seq: q holds only the tokens of ctx's sequences first_seq.. (the rest of a mixed step). `out` (like q,
    contiguous) receives the result instead of a new tensor."""
    # The launch config: of six swept on the H100 (Qwen3-8B heads; one or two 1439-token prompts, a 700-token chunk
    # after 739 cached keys, 20 decodes + a prompt, eight 200-token prompts; bf16 and fp8 caches), 64 x 64 tiles,
    # 4 warps, 3 stages was the fastest or within 8 % of it in every case, and 8-26 % faster than the 128 x 64 / 8 / 2
    # it replaces (one 1439-token prompt: 101 -> 88 us bf16, 119 -> 97 us fp8; docs/benchmarks.md, session 11).
    num_heads, num_kv_heads, page_size = _check(q, kv_cache)
    _check_ctx(ctx)
    T, _, head_dim = q.shape
    group = num_heads // num_kv_heads
    assert block_m >= group, "a tile must hold at least one token's whole query-head group"
    batch = ctx.cu_q_lens.numel() - 1
    out = _output(q, out)
    tokens_per_tile = block_m // group
    # Sum over sequences of ceil(q_len / tokens_per_tile) is at most this; extra programs exit at once.
    max_tiles = triton.cdiv(T, tokens_per_tile) + batch - first_seq
    use_pdl = pdl.enabled(q.device)
    k, v = kv_cache[0], kv_cache[1]
    _extend_kernel[(max_tiles, num_kv_heads)](
        q, k, v, ctx.block_tables, ctx.cu_q_lens, ctx.kv_lens, out, first_seq, batch, sum(ctx.q_lens_cpu[:first_seq]),
        scale * ctx.kv_scale * _LOG2E, ctx.kv_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), ctx.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_B=16, FP8=kv_cache.element_size() == 1, USE_PDL=use_pdl, num_warps=num_warps,
        num_stages=num_stages, launch_pdl=use_pdl)
    return out


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
    """Drop-in for `paged_attention_reference`: the decode kernel when every q_len is 1, else extend."""
    if ctx.is_decode:
        return decode_attention(q, kv_cache, ctx, scale)
    return extend_attention(q, kv_cache, ctx, scale)


def qk_norm_rope_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        kv_cache: torch.Tensor, ctx: ForwardContext, scale: float) -> torch.Tensor:
    """Drop-in for `stepserve.layers.attention.qk_norm_rope_attend`: one decode kernel (plus the split
    reduce) for a decode step, else the rotary-and-store kernel and the extend kernel (a mixed step's leading
    decodes, from MIN_MIXED_DECODES of them, as a decode step)."""
    if ctx.is_decode:
        return decode_attention(q, kv_cache, ctx, scale,
                                step_kv=StepKV(k, v, q_weight, k_weight, eps, positions, cos_sin_cache))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    decodes = ctx.leading_decodes
    d = decodes.batch_size if decodes.batch_size >= MIN_MIXED_DECODES else 0
    if d:  # a mixed step's decodes as a decode step (one split each: the build a large decode graph uses)
        decode_attention(q[:d], kv_cache, decodes, scale, num_splits=1, out=out[:d],
                         step_kv=StepKV(k[:d], v[:d], q_weight, k_weight, eps, positions[:d], cos_sin_cache))
    rest = qk_norm_rope_store_kv(q[d:], k[d:], v[d:], q_weight, k_weight, eps, positions[d:], cos_sin_cache,
                                 kv_cache, ctx.slot_mapping[d:], ctx.kv_scale)
    extend_attention(rest, kv_cache, ctx, scale, first_seq=d, out=out[d:])
    return out

