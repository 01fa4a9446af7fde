"""The skinny-GEMM kernel (stepserve.kernels.gemv) under Triton's CPU interpreter, against its float32 reference:
fp16 and block-fp8 weights, with and without the fused silu_and_mul, and the CUDA entry points that route to it.

float16 throughout: the triton 3.9 interpreter computes a bfloat16 `tl.dot` wrongly and rounds float32 ->
bfloat16 toward zero (see tests/test_kernels_interpret.py); tests/gpu/test_gemv.py covers bfloat16 on the
device. Shapes are small and odd on purpose: partial K steps, a last tile of rows past N, a last fp8 scale
block that is ragged in both dims, empty K splits.
"""

from __future__ import annotations

from triton_interpret import interpreted_triton  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from stepserve.layers.quant import quantize_fp8_blockwise  # noqa: E402

triton = pytest.importorskip("triton")
SILU = "silu_and_mul"


@pytest.fixture(scope="module")
def gemv():
    interpreted_triton()
    from stepserve.kernels import gemv

    return gemv


def _case(M, N, K, bias=False, fp8=False, silu=False):
    """x [M, K], W [N', K] (N' = 2N with silu: [gate; up]), its scales when fp8, a bias of N'."""
    rows = 2 * N if silu else N
    x = torch.randn(M, K, dtype=torch.float16)
    w = torch.randn(rows, K) / K ** 0.5 * torch.rand(rows, 1)  # rows of different sizes: distinct block scales
    w, scale = quantize_fp8_blockwise(w) if fp8 else (w.half(), None)
    b = torch.randn(rows, dtype=torch.float16) if bias else None
    return x, w, b, scale


def _check(gemv, x, w, b, scale=None, activation=None, **config):
    N = w.shape[0] // (2 if activation else 1)
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)  # unwritten elements stay NaN
    got = gemv.linear_small_m(x, w, b, weight_scale_inv=scale, activation=activation, out=out, **config)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "output elements left unwritten"
    ref = gemv.linear_small_m_reference(x, w, b, weight_scale_inv=scale, activation=activation)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-3, err


# (N, K): K a whole number of steps, K with a partial last step, N not a multiple of the row tile.
SHAPES = [(48, 64), (40, 100), (37, 33)]
# fp8: N past one 128-row scale block and ragged, K past one 128-column block and ragged.
FP8_SHAPES = [(200, 300), (136, 128)]
REGISTER = dict(use_dot=False, block_n=8, block_k=32, num_warps=1)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_register_path(gemv, N, K, split_k):
    x, w, _, _ = _case(1, N, K)
    _check(gemv, x, w, None, **REGISTER, split_k=split_k)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_dot_path(gemv, M, N, K):
    x, w, _, _ = _case(M, N, K)
    _check(gemv, x, w, None, use_dot=True, block_n=16, block_k=32, split_k=1)


@pytest.mark.parametrize("use_dot", [False, True])
def test_split_k_with_bias_and_empty_splits(gemv, use_dot):
    # K = 64 is two 32-wide steps: of 4 splits, the last two get no K at all and must contribute zeros.
    for K, split_k in ((200, 3), (64, 4)):
        x, w, b, _ = _case(1, 24, K, bias=True)
        _check(gemv, x, w, b, use_dot=use_dot, block_n=16, block_k=32, split_k=split_k)


@pytest.mark.parametrize("N,K", FP8_SHAPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp8_register_path(gemv, N, K, split_k):
    x, w, b, scale = _case(1, N, K, bias=split_k == 3, fp8=True)
    _check(gemv, x, w, b, scale, **REGISTER, split_k=split_k)


@pytest.mark.parametrize("N,K", FP8_SHAPES)
@pytest.mark.parametrize("M,block_k,split_k", [(1, 64, 1), (3, 128, 1), (8, 32, 2), (5, 64, 3)])
def test_fp8_dot_path(gemv, M, N, K, block_k, split_k):
    x, w, b, scale = _case(M, N, K, bias=M == 5, fp8=True)
    _check(gemv, x, w, b, scale, use_dot=True, block_n=16, block_k=block_k, split_k=split_k)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("M,config", [
    (1, dict(REGISTER, block_n=4, split_k=1)),
    (1, dict(REGISTER, block_n=8, split_k=3)),     # split-K: partials of gate and up, activated by the sum kernel
    (2, dict(use_dot=True, block_n=8, block_k=32, split_k=1)),
    (7, dict(use_dot=True, block_n=16, block_k=64, split_k=2)),
])
def test_silu_and_mul_epilogue(gemv, fp8, M, config):
    # fp8 merges need whole 128-row scale blocks per half (Fp8Linear's rule); fp16 takes a ragged last tile.
    N, K = (128, 300) if fp8 else (37, 100)
    for bias in (False, True):
        x, w, b, scale = _case(M, N, K, bias=bias, fp8=fp8, silu=True)
        _check(gemv, x, w, b, scale, activation=SILU, **config)


@pytest.mark.parametrize("fp8", [False, True])
def test_default_config_and_leading_dims(gemv, fp8):
    N, K = (256, 384) if fp8 else (40, 96)
    x, w, b, scale = _case(6, N, K, bias=True, fp8=fp8)
    out = gemv.linear_small_m(x.view(2, 3, K), w, b, weight_scale_inv=scale)  # tensor-core path, M padded to 16
    assert out.shape == (2, 3, N)
    for rows in (1, 6, 20):  # the register path, the tensor-core path, beyond decode (x padded to 32 rows)
        xr = torch.randn(rows, K, dtype=torch.float16)
        _check(gemv, xr, w, b, scale)
        _check(gemv, xr, *_case(rows, N // 2, K, fp8=fp8, silu=True)[1:], activation=SILU)


def test_default_config_fills_the_sms(gemv):
    for fp8 in (False, True):
        for silu in (False, True):
            for M in (1, 2, 8, 64):
                for N, K in ((4096, 4096), (6144, 4096), (12288, 4096), (4096, 12288), (151936, 4096)):
                    cfg = gemv.default_config(M, N, K, 132, fp8, silu)
                    assert triton.cdiv(N, cfg["block_n"]) * cfg["split_k"] >= 132
                    assert cfg["use_dot"] == (M > 1)
                    # Both row halves of a fused tile share a scale row; tensor-core steps one scale column.
                    assert 128 % cfg["block_n"] == 0 and (not cfg["use_dot"] or not fp8 or 128 % cfg["block_k"] == 0)
    assert gemv.default_config(4, 256, 4096, 132)["split_k"] > 1  # 16 row tiles: K must be split


def test_rejects_what_it_cannot_do(gemv):
    x, w, _, _ = _case(gemv.MAX_ROWS + 1, 16, 32)
    with pytest.raises(ValueError):
        gemv.linear_small_m(x, w)  # more rows than MAX_ROWS
    with pytest.raises(ValueError):
        gemv.linear_small_m(x[:2], w, use_dot=False)  # the register path takes one row


def test_empty_k_gives_bias(gemv):
    x, w, b, _ = _case(2, 16, 0, bias=True)
    assert torch.equal(gemv.linear_small_m(x, w, b), b.expand(2, 16))
    assert torch.equal(gemv.linear_small_m(x, w), torch.zeros(2, 16, dtype=x.dtype))
    gate, up = b.float().chunk(2)
    assert torch.equal(gemv.linear_small_m(x, w, b, activation=SILU),
                       (torch.nn.functional.silu(gate) * up).half().expand(2, 8))


def test_cuda_entry_points_route_by_rows(gemv):
    """`linear` and `fp8_gemm` (what the layer functions call on CUDA) against the layer references, fused
    activation included, across their thresholds: the skinny kernel for one row, then F.linear (fp8: the
    dequantized W, as the interpreter has no scaled_mm) and the separate silu_and_mul kernel."""
    from stepserve.kernels.fp8_gemm import fp8_gemm, fp8_path
    from stepserve.layers.linear import linear
    from stepserve.layers.quant import fp8_linear

    assert [fp8_path(m, 256, 384, torch.float16, torch.device("cpu")) for m in (1, 2, 65)] == \
        ["skinny", "dequant", "dequant"]
    for rows in (1, 2, 9, 70):
        for activation in (None, SILU):
            x, w, b, _ = _case(rows, 128, 384, bias=True, silu=activation is not None)
            want = linear.reference(x.float(), w.float(), b.float(), activation)
            got = gemv.linear(x, w, b, activation)
            assert ((got.float() - want).norm() / want.norm()).item() < 2e-3, (rows, activation)
            q, scale = quantize_fp8_blockwise(w.float())
            want = fp8_linear.reference(x.float(), q, scale, b.float(), activation)
            got = fp8_gemm(x.view(1, rows, -1), q, scale, b, activation)
            assert got.shape == (1, *want.shape)
            assert ((got[0].float() - want).norm() / want.norm()).item() < 2e-3, (rows, activation)
