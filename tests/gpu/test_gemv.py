"""The skinny bf16 GEMM (stepserve.kernels.gemv) vs F.linear in float32 on the GPU, at the Qwen3-8B decoder's
linear shapes and odd ones, M = 1..8. Fresh random inputs every case; the output is NaN-poisoned first, so an
element the kernel never writes fails the check.
"""

from __future__ import annotations

import pytest
import torch

from stepserve.kernels.gemv import SMALL_M_MAX, linear_small_m, linear_small_m_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
# (N, K) of qkv_proj, o_proj, gate_up_proj, down_proj and lm_head.
SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096)]


def _inputs(M, N, K, bias=False, x_row_stride=None):
    x = torch.randn(M, x_row_stride or K, device=DEV, dtype=torch.bfloat16)[:, :K]
    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(N, device=DEV, dtype=torch.bfloat16) if bias else None
    return x, w, b


def _check(x, w, b=None, **config):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), device=DEV, dtype=x.dtype)
    linear_small_m(x, w, b, out=out, **config)
    assert torch.isfinite(out).all(), "output elements left unwritten"
    ref = linear_small_m_reference(x, w, b).double()  # float32 sums, one rounding
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    err = ((out.double() - exact).norm() / exact.norm()).item()
    ref_err = ((ref - exact).norm() / exact.norm()).item()
    assert err < 1e-2, (err, ref_err)
    assert err < 2 * ref_err + 1e-4, (err, ref_err)  # no worse than the rounding F.linear itself does


@pytest.mark.parametrize("M", [1, 2, 3, 4, SMALL_M_MAX])
@pytest.mark.parametrize("N,K", SHAPES)
def test_decoder_shapes(M, N, K):
    _check(*_inputs(M, N, K))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(1000, 4095), (37, 4104), (4100, 777), (8, 12300)])
def test_odd_shapes_and_strided_x(M, N, K):
    _check(*_inputs(M, N, K, bias=True, x_row_stride=K + 24))


# The configurations benchmarks/gemv.py sweeps, on two real shapes: each must be right before it is timed.
CONFIGS = [dict(use_dot=False, block_n=bn, num_warps=w, block_k=256 * w * kmul, split_k=s)
           for bn, w, kmul, s in ((4, 4, 1, 1), (16, 2, 1, 1), (16, 8, 1, 1), (8, 4, 2, 1), (8, 4, 1, 2), (8, 4, 1, 3))]
CONFIGS += [dict(use_dot=True, block_n=bn, block_k=bk, num_stages=st, split_k=s)
            for bn, bk, st, s in ((16, 512, 3, 1), (32, 128, 4, 1), (64, 256, 3, 1), (64, 256, 4, 4), (16, 256, 4, 2))]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("N,K", [(4096, 12288), (6144, 4096)])
def test_configs(config, N, K):
    for M in ([1] if not config["use_dot"] else [1, 5, 8]):
        _check(*_inputs(M, N, K, bias=M == 5), **config)


@pytest.mark.parametrize("M,config", [(1, {}), (8, {}), (1, {"split_k": 3}), (4, {"split_k": 2})])
def test_cuda_graph_replays_new_inputs(M, config):
    """Captured once, replayed after x and the weights change in place: no host sync, nothing baked in."""
    N, K = 4096, 4096
    x, w, _ = _inputs(M, N, K)
    linear_small_m(x, w, **config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_small_m(x, w, **config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        w.copy_(torch.randn_like(w))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = linear_small_m_reference(x, w)
        assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2
