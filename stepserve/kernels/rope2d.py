"""The vision tower's 2D rotary of q and k (`layers.rotary.rope2d_qk`) in one pass over memory.

q and k are views into the qkv GEMM's output rows; the rotation writes them into one new [2, T, H, D] buffer
(q, then k), both contiguous as the attention kernels read them. Here a program takes a [tokens, 2 * BLOCK_P]
tile of q's and of k's rows with 16-byte loads, splits it into the pairs' two members in registers, and gathers
each pair's angle from the token's cos / sin row, which stays in L1 for the 16 heads that share it. H100, two
720p images' tower (266 MB read and written per block): 4.53 ms over its 47 blocks against 6.17 for the kernel
Inductor made of the same rotation in the compiled blocks (docs/benchmarks.md, session 19).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepserve.layers import rotary as reference


@triton.jit
def _rotate(src_ptr, stride, dst_ptr, rows, cols, mask, cos, sin, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
            ROW: tl.constexpr):
    x = tl.load(src_ptr + rows * stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, b = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_P, 2)))
    y = tl.reshape(tl.join(a * cos - b * sin, b * cos + a * sin), (BLOCK_T, 2 * BLOCK_P))
    tl.store(dst_ptr + rows * ROW + cols, y.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope2d_qk_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, out_ptr, T, stride_q, stride_k, stride_cs,
                      PAIRS: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    t_ok = (t < T)[:, None]
    rows = t.to(tl.int64)[:, None]
    angle = rows * stride_cs + (p % HALF)[None, :]
    pair_ok = t_ok & (p < PAIRS)[None, :]
    cos = tl.load(cos_ptr + angle, mask=pair_ok, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=pair_ok, other=0.0)
    cols = 2 * tl.program_id(1) * BLOCK_P + tl.arange(0, 2 * BLOCK_P)[None, :]
    mask = t_ok & (cols < 2 * PAIRS)
    _rotate(q_ptr, stride_q, out_ptr, rows, cols, mask, cos, sin, BLOCK_T, BLOCK_P, 2 * PAIRS)
    _rotate(k_ptr, stride_k, out_ptr + T * 2 * PAIRS, rows, cols, mask, cos, sin, BLOCK_T, BLOCK_P, 2 * PAIRS)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t, heads, head_dim = q.shape
    out = q.new_empty(2, t, heads, head_dim)
    if t:
        pairs = heads * head_dim // 2
        block_p = min(256, triton.next_power_of_2(pairs))
        _rope2d_qk_kernel[(triton.cdiv(t, 8), triton.cdiv(pairs, block_p))](
            q, k, cos, sin, out, t, q.stride(0), k.stride(0), cos.stride(0), PAIRS=pairs, HALF=head_dim // 2,
            BLOCK_T=8, BLOCK_P=block_p, num_warps=4)
    return out


@torch.library.custom_op("stepserve::rope2d_qk", mutates_args=())
def _rope2d_qk_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _launch(q, k, cos, sin)


@_rope2d_qk_op.register_fake
def _rope2d_qk_fake(q, k, cos, sin):
    return q.new_empty(2, *q.shape)


def _fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    t, heads, head_dim = q.shape
    rows_ok = all(x.shape == q.shape and x.stride(2) == 1 and x.stride(1) == head_dim for x in (q, k))
    angles_ok = all(a.shape == (t, 1, head_dim // 2) and a.stride(2) == 1 and a.stride(0) == cos.stride(0)
                    and a.dtype == torch.float32 for a in (cos, sin))
    return rows_ok and angles_ok and head_dim % 2 == 0


def rope2d_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`layers.rotary.rope2d_qk` for q, k [T, H, D] whose H x D part of a row is contiguous, angles in float32;
    anything else (e.g. `VisionOptions.rope_dtype=bfloat16`) takes the reference."""
    if not _fits(q, k, cos, sin):
        return reference.rope2d_qk.reference(q, k, cos, sin)
    # An opaque op in the compiled vision blocks: Inductor would otherwise trace into the launch.
    fn = _rope2d_qk_op if torch.compiler.is_compiling() else _launch
    out = fn(q, k, cos, sin)
    return out[0], out[1]
