"""The skinny-GEMM kernel (stepserve.kernels.gemv) under Triton's CPU interpreter, against F.linear in float32.

float16 throughout: the triton 3.9 interpreter computes a bfloat16 `tl.dot` wrongly and rounds float32 ->
bfloat16 toward zero (see tests/test_kernels_interpret.py); tests/gpu/test_gemv.py covers bfloat16 on the
device. Shapes are small and odd on purpose: partial K steps, a last tile of rows past N, empty K splits.
"""

from __future__ import annotations

from triton_interpret import interpreted_triton  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def gemv():
    interpreted_triton()
    from stepserve.kernels import gemv

    return gemv


def _case(M, N, K, bias=False):
    x = torch.randn(M, K, dtype=torch.float16)
    w = (torch.randn(N, K) / K ** 0.5).half()
    b = torch.randn(N, dtype=torch.float16) if bias else None
    return x, w, b


def _check(gemv, x, w, b, **config):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype)  # unwritten elements stay NaN
    got = gemv.linear_small_m(x, w, b, out=out, **config)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "output elements left unwritten"
    ref = gemv.linear_small_m_reference(x, w, b)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-3, err


# (N, K): K a whole number of steps, K with a partial last step, N not a multiple of the row tile.
SHAPES = [(48, 64), (40, 100), (37, 33)]


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_register_path(gemv, N, K, split_k):
    x, w, _ = _case(1, N, K)
    _check(gemv, x, w, None, use_dot=False, block_n=8, block_k=32, split_k=split_k, num_warps=1)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_dot_path(gemv, M, N, K):
    x, w, _ = _case(M, N, K)
    _check(gemv, x, w, None, use_dot=True, block_n=16, block_k=32, split_k=1)


@pytest.mark.parametrize("use_dot", [False, True])
def test_split_k_with_bias_and_empty_splits(gemv, use_dot):
    # K = 64 is two 32-wide steps: of 4 splits, the last two get no K at all and must contribute zeros.
    for K, split_k in ((200, 3), (64, 4)):
        x, w, b = _case(1, 24, K, bias=True)
        _check(gemv, x, w, b, use_dot=use_dot, block_n=16, block_k=32, split_k=split_k)


def test_default_config_and_leading_dims(gemv):
    x, w, b = _case(6, 40, 96, bias=True)
    out = gemv.linear_small_m(x.view(2, 3, 96), w, b)  # default config: tensor-core path, M padded to 16
    assert out.shape == (2, 3, 40)
    _check(gemv, x, w, b)
    _check(gemv, x[:1], w, b)  # default config at M = 1: the register path


def test_default_config_fills_the_sms(gemv):
    for M in (1, 2, 8):
        for N, K in ((4096, 4096), (6144, 4096), (24576, 4096), (4096, 12288), (151936, 4096)):
            cfg = gemv.default_config(M, N, K, 132)
            assert triton.cdiv(N, cfg["block_n"]) * cfg["split_k"] >= 132
            assert cfg["use_dot"] == (M > 1)
    assert gemv.default_config(4, 256, 4096, 132)["split_k"] > 1  # 16 row tiles: K must be split


def test_rejects_what_it_cannot_do(gemv):
    x, w, _ = _case(9, 16, 32)
    with pytest.raises(ValueError):
        gemv.linear_small_m(x, w)  # more rows than SMALL_M_MAX
    with pytest.raises(ValueError):
        gemv.linear_small_m(x[:2], w, use_dot=False)  # the register path takes one row


def test_empty_k_gives_bias(gemv):
    x, w, b = _case(2, 16, 0, bias=True)
    assert torch.equal(gemv.linear_small_m(x, w, b), b.expand(2, 16))
    assert torch.equal(gemv.linear_small_m(x, w), torch.zeros(2, 16, dtype=x.dtype))
