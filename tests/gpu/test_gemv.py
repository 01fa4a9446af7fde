"""The skinny GEMM (stepserve.kernels.gemv) vs its float32 reference on the GPU, at the Qwen3-8B decoder's linear
shapes and odd ones, M = 1..8 (and the tensor-core path to 64): bf16 and block-fp8 weights, with and without the
fused silu_and_mul. Fresh random inputs every case; the output is NaN-poisoned first, so an element the kernel
never writes fails the check.
"""

from __future__ import annotations

import pytest
import torch

from stepserve.kernels.gemv import FMA_K_PER_WARP, linear_small_m, linear_small_m_reference
from stepserve.layers.quant import dequantize_fp8_blockwise, quantize_fp8_blockwise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
SILU = "silu_and_mul"
# (N, K) of qkv_proj, o_proj, gate_up_proj, down_proj and lm_head.
SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096)]
INTER, HIDDEN = 12288, 4096


def _inputs(M, N, K, bias=False, x_row_stride=None, fp8=False):
    x = torch.randn(M, x_row_stride or K, device=DEV, dtype=torch.bfloat16)[:, :K]
    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16)
    scale = None
    if fp8:
        w, scale = quantize_fp8_blockwise(w * torch.rand(N, 1, device=DEV, dtype=torch.bfloat16))
    b = torch.randn(N, device=DEV, dtype=torch.bfloat16) if bias else None
    return x, w, b, scale


def _check(x, w, b=None, scale=None, activation=None, **config):
    N = w.shape[0] // (2 if activation else 1)
    out = torch.full((x.shape[0], N), float("nan"), device=DEV, dtype=x.dtype)
    linear_small_m(x, w, b, weight_scale_inv=scale, activation=activation, out=out, **config)
    assert torch.isfinite(out).all(), "output elements left unwritten"
    ref = linear_small_m_reference(x, w, b, weight_scale_inv=scale, activation=activation).double()
    wd = w.double() if scale is None else dequantize_fp8_blockwise(w, scale, torch.float32).double()
    exact = torch.nn.functional.linear(x.double(), wd, None if b is None else b.double())
    if activation:
        gate, up = exact.chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
    err = ((out.double() - exact).norm() / exact.norm()).item()
    ref_err = ((ref - exact).norm() / exact.norm()).item()
    assert err < 1e-2, (err, ref_err)
    assert err < 2 * ref_err + 1e-4, (err, ref_err)  # no worse than one bf16 rounding of the exact result


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("N,K", SHAPES)
def test_decoder_shapes(M, N, K, fp8):
    _check(*_inputs(M, N, K, fp8=fp8))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_fused_silu_and_mul(M, fp8):
    """gate_up_proj with its epilogue: silu(x @ Wg.T) * (x @ Wu.T), [M, 12288] straight from the kernel."""
    _check(*_inputs(M, 2 * INTER, HIDDEN, fp8=fp8), activation=SILU)
    _check(*_inputs(M, 2 * INTER, HIDDEN, bias=True, fp8=fp8), activation=SILU, split_k=2)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M", [16, 33, 64])
def test_beyond_decode_rows(M, fp8):
    """The tensor-core path takes up to 64 rows (benchmarks/fp8.py weighs it against the GEMMs there)."""
    _check(*_inputs(M, 6144, 4096, fp8=fp8))
    _check(*_inputs(M, 2 * INTER, HIDDEN, fp8=fp8), activation=SILU)


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(1000, 4095), (37, 4104), (4100, 777), (8, 12300)])
def test_odd_shapes_and_strided_x(M, N, K):
    _check(*_inputs(M, N, K, bias=True, x_row_stride=K + 24))


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("N,K", [(1000, 4095), (136, 4104), (4224, 777)])
def test_fp8_ragged_blocks(M, N, K):
    """The last 128 x 128 scale block partial in N, K or both."""
    _check(*_inputs(M, N, K, bias=True, x_row_stride=K + 24, fp8=True))


def _register(block_n, warps, loads, split=1):
    return dict(use_dot=False, block_n=block_n, num_warps=warps, block_k=FMA_K_PER_WARP * warps * loads, split_k=split)


def _dot(block_n, block_k, stages, split=1, warps=4):
    return dict(use_dot=True, block_n=block_n, block_k=block_k, num_stages=stages, split_k=split, num_warps=warps)


# Kinds of configuration benchmarks/gemv.py sweeps (which also checks each one before timing it), on two real
# shapes: other row counts, warps and loads per thread, split-K, wgmma tiles, 8 warps, short K steps.
CONFIGS = [_register(*c) for c in ((16, 4, 1), (4, 8, 1), (8, 4, 4), (8, 4, 1, 3))]
CONFIGS += [_dot(*c) for c in ((16, 512, 3), (64, 256, 4, 4), (16, 128, 8), (32, 64, 8), (64, 128, 4, 1, 8))]


# fp8 tensor-core steps must divide the 128-wide scale block, so those configs run in bf16 only.
@pytest.mark.parametrize("config,fp8", [(c, fp8) for c in CONFIGS for fp8 in (False, True)
                                        if not (fp8 and c["use_dot"] and 128 % c["block_k"])],
                         ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else f"fp8{v}")
@pytest.mark.parametrize("N,K", [(4096, 12288), (6144, 4096)])
def test_configs(config, N, K, fp8):
    for M in ([1] if not config["use_dot"] else [1, 5, 8]):
        _check(*_inputs(M, N, K, bias=M == 5, fp8=fp8), **config)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M,activation,config", [(1, None, {}), (8, None, {}), (1, None, {"split_k": 3}),
                                                 (4, None, {"split_k": 2}), (1, SILU, {}), (8, SILU, {"split_k": 2})])
def test_cuda_graph_replays_new_inputs(M, activation, config, fp8):
    """Captured once, replayed after x and the weights change in place: no host sync, nothing baked in."""
    N, K = (2 * 4096 if activation else 4096), 4096
    x, w, _, scale = _inputs(M, N, K, fp8=fp8)
    linear_small_m(x, w, weight_scale_inv=scale, activation=activation, **config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_small_m(x, w, weight_scale_inv=scale, activation=activation, **config)
    for _ in range(3):
        _, w_new, _, scale_new = _inputs(M, N, K, fp8=fp8)
        x.copy_(torch.randn_like(x))
        w.copy_(w_new)
        if fp8:
            scale.copy_(scale_new)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = linear_small_m_reference(x, w, weight_scale_inv=scale, activation=activation)
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2
