"""quick_gelu(x @ w.T + b) in one GEMM: the activation is applied to the accumulator before the store.

The vision MLP's first linear writes [tokens, 8960] and quick-GELU reads it back and writes it again: at two
720p images that is ~0.75 GB of traffic per block (~12 ms over 47 blocks). Here the GEMM's epilogue applies
bias and activation, so the pre-activation never reaches memory. Tiles move by TMA (Hopper); the launch
config is the one measured fastest for the tower's shapes (`benchmarks/vision_overlap.py --gemm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _linear_gelu_kernel(a_desc, w_desc, c_desc, bias_ptr, M, N, K,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        STAGES: tl.constexpr, GELU: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % rows)
    pid_n = (pid % (GROUP_M * num_n)) // rows
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        a = a_desc.load([pid_m * BM, k * BK])
        w = w_desc.load([pid_n * BN, k * BK])
        acc = tl.dot(a, w.T, acc)
    cols = pid_n * BN + tl.arange(0, BN)
    acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = acc * tl.sigmoid(1.702 * acc)
    c_desc.store([pid_m * BM, pid_n * BN], acc.to(c_desc.dtype))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool = True,
                config: tuple[int, int, int, int, int, int] = (128, 256, 64, 8, 3, 8)) -> torch.Tensor:
    """quick_gelu(x @ weight.T + bias) (or without the activation); x [M, K], weight [N, K], bias [N], bf16.

    config: (BM, BN, BK, GROUP_M, stages, warps).
    """
    bm, bn, bk, group_m, stages, warps = config
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    a_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_gelu_kernel[grid](a_desc, w_desc, c_desc, bias, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
                              STAGES=stages, GELU=gelu, num_warps=warps)
    return out
