"""quick_gelu(x @ w.T + b) in one GEMM: the activation is applied to the accumulator before the store.

The vision MLP's first linear writes [tokens, 8960] and quick-GELU reads it back and writes it again: at two
720p images that is ~0.75 GB of traffic per block (~11.5 ms over 47 blocks). Here the GEMM's epilogue applies
bias and activation, so the pre-activation never reaches memory.

The kernel is persistent (one program per SM walks the output tiles), so with `flatten` the loads of the next
tile are issued while the current one runs its epilogue; a one-tile-per-program version ran at ~500 TFLOP/s
against cuBLAS's ~715 on this shape, its epilogue (a sigmoid on 32k values per tile) overlapped with nothing.
The fast activation is one `tanh.approx` per value instead of exp + divide:
quick_gelu(x) = x * sigmoid(1.702 x) = x * (0.5 + 0.5 tanh(0.851 x)). Measured on the H100 for two 720p
images: 0.88 ms against 1.02 for cuBLAS and a fused activation pass (docs/benchmarks.md, session 9).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from stepserve.kernels.paged_attention import _num_sms


@dataclass(frozen=True)
class GemmConfig:
    """A launch config; the defaults measured fastest for the tower's c_fc on the H100
    (`benchmarks/vision_gemm.py`)."""

    bm: int = 128
    bn: int = 256
    bk: int = 64
    group_m: int = 16
    stages: int = 3
    warps: int = 8
    ctas_per_sm: int = 1  # 0: one program per tile (not persistent)
    flatten: bool = True
    warp_specialize: bool = False
    subtile: bool = True  # store the tile as two halves (half the epilogue's shared memory)
    fast_gelu: bool = True


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _quick_gelu(x, FAST: tl.constexpr):
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * 0.851], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return x * (0.5 + 0.5 * t)
    return x * tl.sigmoid(1.702 * x)


DEFAULT_CONFIG = GemmConfig()


@triton.jit
def _linear_gelu_kernel(a_desc, w_desc, c_desc, bias_ptr, M, N, K, NUM_PROGRAMS, HAS_BIAS: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                        GELU: tl.constexpr, FAST: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
                        WS: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    # The epilogue keeps its own tile counter: with a flattened loop the compiler may hoist the next tile's
    # loads above this tile's store, so the two must not share an induction variable.
    tile_c = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            w = w_desc.load([pid_n * BN, ki * BK])
            acc = tl.dot(a, w.T, acc)
        tile_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_c, num_m, num_n, GROUP_M)
        if HAS_BIAS:
            cols = pid_n * BN + tl.arange(0, BN)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if GELU:
            acc = _quick_gelu(acc, FAST)
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            c_desc.store([pid_m * BM, pid_n * BN], left.to(c_desc.dtype))
            c_desc.store([pid_m * BM, pid_n * BN + BN // 2], right.to(c_desc.dtype))
        else:
            c_desc.store([pid_m * BM, pid_n * BN], acc.to(c_desc.dtype))


def _alloc(size: int, alignment: int, stream) -> torch.Tensor:
    # Warp specialization builds TMA descriptors on the device, in scratch memory from the runtime.
    return torch.empty(size, device="cuda", dtype=torch.int8)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = True,
                config: GemmConfig = DEFAULT_CONFIG, programs: int | None = None) -> torch.Tensor:
    """quick_gelu(x @ weight.T + bias) (or without the activation) for x [M, K], weight [N, K], bias [N] or
    None, all bf16 or all fp16, K and N multiples of 8 (TMA rows are 16-byte aligned).

    programs: how many persistent programs walk the tiles (default: SMs x config.ctas_per_sm, or one per
    tile when that is 0)."""
    c = config
    if x.stride(-1) != 1 or x.stride(0) != x.shape[1] or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)  # TMA wants a 16-byte aligned, dense matrix
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    a_desc = TensorDescriptor.from_tensor(x, [c.bm, c.bk])
    w_desc = TensorDescriptor.from_tensor(weight, [c.bn, c.bk])
    c_desc = TensorDescriptor.from_tensor(out, [c.bm, c.bn // 2 if c.subtile else c.bn])
    tiles = triton.cdiv(m, c.bm) * triton.cdiv(n, c.bn)
    if programs is None:
        programs = min(tiles, _num_sms(x.device) * c.ctas_per_sm) if c.ctas_per_sm else tiles
    if c.warp_specialize:
        triton.set_allocator(_alloc)
    _linear_gelu_kernel[(programs,)](a_desc, w_desc, c_desc, bias, m, n, k, programs, HAS_BIAS=bias is not None,
                                     BM=c.bm, BN=c.bn, BK=c.bk, GROUP_M=c.group_m, GELU=gelu, FAST=c.fast_gelu,
                                     SUBTILE=c.subtile, FLATTEN=c.flatten, WS=c.warp_specialize,
                                     num_warps=c.warps, num_stages=c.stages)
    return out


@torch.library.custom_op("stepserve::linear_quick_gelu", mutates_args=())
def linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_gelu(x, weight, bias)


@linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.compiler.assume_constant_result  # a compiled graph (the vision tower) takes its answer as a constant
@functools.cache
def _has_tma(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def linear_gelu_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear_quick_gelu` takes these operands (else cuBLAS and a separate activation)."""
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    return len(dtypes) == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % 8 == 0 and \
        weight.shape[0] % 8 == 0 and _has_tma(x.device)


def linear_quick_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """quick_gelu(x @ weight.T + bias) for x [..., K] in one GEMM (see `linear_gelu_fits`)."""
    # Dynamo cannot trace the TMA descriptors: a compiled graph calls the kernel as an opaque op.
    fn = linear_gelu_op if torch.compiler.is_compiling() else linear_gelu
    return fn(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
