"""fp8 on the GPU: `fp8_linear`'s CUDA paths (kernels/fp8_gemm.py) at Qwen3-8B shapes, its CUDA-graph replay, the
fp8 KV cache scale in decode graphs, and the real-size fp8 model against the same weights in bf16.

Tolerances: a weight-only path (skinny kernel, dequant) against float32 math on the dequantized weight differs
by bf16 output rounding (2^-9): 1e-2. A W8A8 path (scaled_mm, the Triton W8A8 GEMM) against
`fp8_gemm_reference` (the same per-token-group activation rounding, fp32 sums) differs by bf16 output rounding
and by rare fp8 ties that round the other way: 1e-2; against weight-only math it adds activation rounding
(e4m3, ~2.6% rms): 0.06. The real-size model bounds are loose (random weights, 36 layers, no trained
robustness): they catch a broken kernel or scale layout (~100%).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_model_gpu import NUM_CROPS, compare, image_prompt, run  # noqa: E402

from stepserve.engine.cuda_graph import DecodeGraphs  # noqa: E402
from stepserve.layers.attention import build_context, forward_context  # noqa: E402
from stepserve.layers.quant import Fp8Linear, dequantize_fp8_blockwise, quantize_fp8_blockwise  # noqa: E402
from stepserve.loader import load_model  # noqa: E402
from stepserve.testing import attach_kv_cache, tiny_checkpoint  # noqa: E402

DEV = "cuda"
SHAPES = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]  # qkv, o, gate_up, down


@pytest.fixture(scope="module", autouse=True)
def kernels():
    from stepserve.kernels import install_triton_kernels
    install_triton_kernels()
    yield
    install_triton_kernels(False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _weights(n, k, g):
    return quantize_fp8_blockwise(torch.randn(n, k, device=DEV, generator=g) / k ** 0.5)


def _weight_only(x, q, s, bias=None):
    """fp8_linear's reference in float32: the exact dequantized weight, no activation rounding."""
    return F.linear(x.float(), dequantize_fp8_blockwise(q, s, torch.float32), None if bias is None else bias.float())


@pytest.mark.parametrize("m", [1, 3, 16, 64, 65, 256, 2048])
@pytest.mark.parametrize("n, k", SHAPES)
def test_fp8_linear_on_cuda_matches_its_path(m, n, k):
    """fp8_gemm (the layer function's CUDA kernel) per fp8_path: the skinny kernel is weight-only (bf16 output
    rounding: 1e-2 against the float32 weight-only math); scaled_mm is W8A8 (1e-2 against
    fp8_gemm_reference, 0.06 against weight-only); dequant is weight-only after a bf16 rounding of W."""
    from stepserve.kernels.fp8_gemm import SKINNY_MAX, fp8_gemm, fp8_gemm_reference, fp8_path, scaled_mm_supported

    g = torch.Generator(device=DEV).manual_seed(m * 7 + n)
    q, s = _weights(n, k, g)
    x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16) * 3
    bias = torch.randn(n, device=DEV, generator=g, dtype=torch.bfloat16)
    out = fp8_gemm(x, q, s, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and torch.isfinite(out).all()
    path = fp8_path(m, n, k, x.dtype, x.device)
    assert path == ("skinny" if m <= SKINNY_MAX else "scaled_mm" if scaled_mm_supported(x.device) else "dequant")
    if path == "scaled_mm":
        assert rel(out, fp8_gemm_reference(x, q, s, bias)) < 1e-2
        assert rel(out, _weight_only(x, q, s, bias)) < 0.06
    else:
        assert rel(out, _weight_only(x, q, s, bias)) < 1e-2


@pytest.mark.parametrize("m", [1, 8, 16, 65, 301])
def test_prefill_candidates(m):
    """Each path benchmarks/fp8.py times, on a ragged row count: scaled_mm pads rows to a multiple of 4."""
    from stepserve.kernels.fp8_gemm import (dequantize_fp8, fp8_gemm_reference, fp8_gemm_w8a8, fp8_scaled_mm,
                                            scaled_mm_supported)

    g = torch.Generator(device=DEV).manual_seed(m)
    q, s = _weights(6144, 4096, g)
    x = torch.randn(m, 4096, device=DEV, generator=g, dtype=torch.bfloat16)
    bias = torch.randn(6144, device=DEV, generator=g, dtype=torch.bfloat16)
    w8a8 = fp8_gemm_reference(x, q, s, bias)
    assert rel(fp8_gemm_w8a8(x, q, s, bias), w8a8) < 1e-2
    if m <= 64:  # the split-K partial sums equal one pass up to fp32 summation order
        assert rel(fp8_gemm_w8a8(x, q, s, bias, split_k=1), w8a8) < 1e-2
    assert torch.equal(dequantize_fp8(q, s, torch.bfloat16), dequantize_fp8_blockwise(q, s, torch.bfloat16))
    if not scaled_mm_supported(x.device):
        pytest.skip(f"no block-scaled F.scaled_mm in torch {torch.__version__} (CUDA {torch.version.cuda}) here")
    out = fp8_scaled_mm(x, q, s, bias)
    assert out.shape == (m, 6144) and rel(out, w8a8) < 1e-2


@pytest.mark.parametrize("m", [1, 8, 64, 300])
def test_fused_activation_through_the_layer_function(m):
    """fp8_linear(..., activation="silu_and_mul") on CUDA: fused in the skinny kernel, silu_and_mul after
    the GEMM above SKINNY_MAX rows."""
    from stepserve.layers.quant import fp8_linear

    g = torch.Generator(device=DEV).manual_seed(m + 1)
    q, s = _weights(2 * 12288, 4096, g)
    x = torch.randn(m, 4096, device=DEV, generator=g, dtype=torch.bfloat16)
    out = fp8_linear(x, q, s, None, "silu_and_mul")
    gate, up = _weight_only(x, q, s).chunk(2, dim=-1)
    from stepserve.kernels.fp8_gemm import SKINNY_MAX

    # Weight-only in the skinny kernel; above it the GEMM quantizes x per 128 columns too.
    assert out.shape == (m, 12288) and rel(out, F.silu(gate) * up) < (1e-2 if m <= SKINNY_MAX else 0.06)


@pytest.mark.parametrize("m", [1, 37, 2048])
def test_fp8_mlp_applies_the_first_bias_and_gelu_in_the_quantization(m):
    """The vision MLP in fp8 (`fp8_mlp`): the first GEMM's bias + quick-GELU are applied as the second one's input
    is quantized; it computes what the two layers compute one after the other (1 row: the skinny path does)."""
    from stepserve.kernels.fp8_gemm import fp8_gemm, fp8_mlp, quantize_groups
    from stepserve.layers.quant import quantize_fp8_per_token_group

    g = torch.Generator(device=DEV).manual_seed(m)
    fc, proj = _weights(1024, 256, g), _weights(256, 1024, g)
    fc_b, proj_b = (torch.randn(n, device=DEV, generator=g, dtype=torch.bfloat16) for n in (1024, 256))
    x = torch.randn(2, m, 256, device=DEV, generator=g, dtype=torch.bfloat16)
    out = fp8_mlp(x, *fc, fc_b, *proj, proj_b, "quick_gelu")
    ref = fp8_gemm(fp8_gemm(x, *fc, fc_b, "quick_gelu"), *proj, proj_b)
    h = _weight_only(x, *fc, fc_b)
    exact = _weight_only(h * torch.sigmoid(1.702 * h), *proj, proj_b)
    # The two W8A8 paths round the hidden to bf16 at different points (before / after bias and activation), so
    # ~3 % of its fp8 roundings differ (each 1/16 of the value): ~1 % apart. Activation rounding: 0.06.
    assert out.shape == (2, m, 256) and rel(out, ref) < 3e-2 and rel(out, exact) < 0.06
    # The fused quantization itself, rounding included, against the plain torch one.
    h = torch.randn(m, 1024, device=DEV, generator=g, dtype=torch.bfloat16)
    q, s = quantize_groups(h, -(-m // 4) * 4, fc_b, "quick_gelu")
    a = h.float() + fc_b.float()  # in float32, rounded to bf16 after the activation, as the kernel does
    ref_q, ref_s = quantize_fp8_per_token_group((a * torch.sigmoid(1.702 * a)).to(torch.bfloat16).float())
    assert torch.allclose(s[:m], ref_s, rtol=1e-2) and rel(q[:m].float() * s[:m].repeat_interleave(128, 1),
                                                          ref_q.float() * ref_s.repeat_interleave(128, 1)) < 1e-2


@pytest.mark.parametrize("rows", [1, 37, 2704])
def test_layer_norm_quantizes_for_the_fp8_linears(rows):
    """scaled_add_layer_norm_(quantize=True) hands the vision tower's fp8 linears the codes and scales their own
    quantization of the bf16 norm makes, bit for bit, so qkv and the MLP compute what they computed before
    (1 row: the skinny path reads the dequantized rows, weight-only)."""
    from stepserve.kernels.fp8_gemm import fp8_gemm, fp8_mlp, quantize_groups
    from stepserve.kernels.layer_norm import scaled_add_layer_norm_

    g = torch.Generator(device=DEV).manual_seed(rows)
    x, y = (torch.randn(rows, 1536, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(2))
    gamma, weight, bias = (torch.randn(1536, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(3))
    shift = torch.randn(1536, device=DEV, generator=g)
    x_q = x.clone()
    h = scaled_add_layer_norm_(x, y, gamma, shift, weight, bias, 1e-5)
    hq = scaled_add_layer_norm_(x_q, y, gamma, shift, weight, bias, 1e-5, quantize=True)
    q, scales = quantize_groups(h, -(-rows // 4) * 4)
    assert torch.equal(x_q, x) and hq.rows == rows and hq.dtype == torch.bfloat16
    assert torch.equal(hq.q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(hq.scales, scales)
    qkv, qkv_b = _weights(4608, 1536, g), torch.randn(4608, device=DEV, generator=g, dtype=torch.bfloat16)
    fc, proj = _weights(8960, 1536, g), _weights(1536, 8960, g)
    fc_b, proj_b = (torch.randn(n, device=DEV, generator=g, dtype=torch.bfloat16) for n in (8960, 1536))
    mlp = (fc[0], fc[1], fc_b, proj[0], proj[1], proj_b, "quick_gelu")
    pairs = [(fp8_gemm(hq, *qkv, qkv_b), fp8_gemm(h, *qkv, qkv_b)), (fp8_mlp(hq, *mlp), fp8_mlp(h, *mlp))]
    for got, want in pairs:
        assert got.shape == want.shape and (torch.equal(got, want) if rows > 1 else rel(got, want) < 0.06)


def test_gemm_ragged_and_3d():
    from stepserve.kernels.fp8_gemm import fp8_gemm

    g = torch.Generator(device=DEV).manual_seed(0)
    q, s = quantize_fp8_blockwise(torch.randn(1000, 600, device=DEV, generator=g))
    for rows in (1, 37):  # skinny, then dequant + cuBLAS (ragged blocks are not for scaled_mm)
        x = torch.randn(2, rows, 600, device=DEV, generator=g, dtype=torch.bfloat16)
        out = fp8_gemm(x, q, s)
        assert out.shape == (2, rows, 1000) and rel(out, _weight_only(x, q, s)) < 1e-2
    assert fp8_gemm(x[:, :0], q, s).shape == (2, 0, 1000)


@pytest.mark.parametrize("m", [1, 8, 48, 300])
def test_gemm_graph_replay_equals_eager(m):
    from stepserve.kernels.fp8_gemm import fp8_gemm

    g = torch.Generator(device=DEV).manual_seed(m)
    q, s = quantize_fp8_blockwise(torch.randn(4096, 4096, device=DEV, generator=g))
    x = torch.randn(m, 4096, device=DEV, generator=g, dtype=torch.bfloat16)
    eager = fp8_gemm(x, q, s)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_gemm(x, q, s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = fp8_gemm(x, q, s)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.randn(m, 4096, device=DEV, generator=g, dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fp8_gemm(x, q, s)) and not torch.equal(captured, eager)


def test_decode_graph_uses_the_fp8_kv_scale(tmp_path):
    """Prefill stores K/V / s; the captured decode must read them back * s (it used 1.0 before the fix)."""
    model = load_model(tiny_checkpoint(tmp_path / "tiny"), torch.bfloat16, DEV)
    page, n, scale = 16, 40, 0.05
    pages = list(range(4))
    ids = torch.randint(0, 800, (n,), device=DEV)

    def decode_logits(graph_scale: float | None) -> torch.Tensor:
        attach_kv_cache(model, len(pages) + 1, page, torch.float8_e4m3fn)
        with torch.inference_mode():
            with forward_context(build_context([n], [n], [pages], page, DEV, kv_scale=scale)):
                model(ids, torch.arange(n, device=DEV))
            ctx = build_context([1], [n + 1], [pages], page, DEV, kv_scale=scale)
            token, pos = ids[-1:], torch.tensor([n], device=DEV)
            if graph_scale is None:
                with forward_context(ctx):
                    return model.compute_logits(model(token, pos))
            graphs = DecodeGraphs(model, 1, len(pages), n + 1, len(pages) * page, torch.device(DEV), graph_scale)
            graphs.capture()
            return graphs.run(token.tolist(), pos.tolist(), ctx.slot_mapping.tolist(), [n + 1], [pages], [], [],
                              None).clone()

    eager = decode_logits(None)
    assert rel(decode_logits(scale), eager) < 2e-2
    assert rel(decode_logits(1.0), eager) > 0.1  # the test can tell a missing scale


def test_real_size_fp8_close_to_bf16(tmp_path, report):
    g = torch.Generator().manual_seed(1)
    views, crops = torch.randn(1, 3, 728, 728, generator=g), torch.randn(NUM_CROPS, 3, 504, 504, generator=g)
    results, outs = {}, {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        torch.cuda.empty_cache()
        model = load_model(tmp_path, torch.bfloat16, DEV, load_format="dummy", quantization=quant)
        results[f"{name}_weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        if quant:
            layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
            assert len(layers) == 4 * 36 and model.lm_head.weight.dtype == torch.bfloat16
        outs[name] = run(model, image_prompt(model.image_token_id), views, crops)
        del model
        gc.collect()
    results |= compare(outs["fp8"], outs["bf16"])
    report("fp8_model_gpu", results)
    assert results["rel_err_vision_rows"] < 1e-3  # the vision tower stays bf16, with the same weights
    assert results["bf16_weights_gib"] - results["fp8_weights_gib"] > 6.0  # 6.95 B decoder params at 1 byte
    assert results["rel_err_logits"] < 0.35 and results["top1_agreement"] >= 0.5, results


def test_compiled_vision_tower_with_fp8_linears():
    """--quantize-vision (or an fp8 checkpoint's vision MLPs): the compiled tower traces the scaled_mm paths whole
    (no graph break: each one split the tower's graph), computes what the eager kernels compute, and stays within
    fp8 rounding of the unquantized tower."""
    import dataclasses

    from torch._dynamo.utils import counters

    from stepserve.layers.quant import Fp8Config
    from stepserve.loader import init_dummy_weights
    from stepserve.models.configs import VisionConfig
    from stepserve.models.perception_encoder import PerceptionEncoder
    from stepserve.models.qwen3 import dtype_scope

    cfg = dataclasses.replace(VisionConfig(), layers=3)
    with torch.device(DEV), dtype_scope(torch.bfloat16):
        tower = PerceptionEncoder(cfg, Fp8Config(online_prefixes=("vision_model.transformer.",)))
    init_dummy_weights(tower)
    with torch.device(DEV), dtype_scope(torch.bfloat16):
        plain = PerceptionEncoder(cfg)
    init_dummy_weights(plain)  # the same draws, unquantized
    tower.fold_layer_scales()
    plain.fold_layer_scales()
    # qkv, c_fc, c_proj per block (online); both norms come quantized for them.
    assert sum(isinstance(m, Fp8Linear) for m in tower.modules()) == 3 * 3
    assert all(block.fp8_norms == (True, True) for block in tower.transformer.resblocks)
    g = torch.Generator(device=DEV).manual_seed(0)
    pixels = [torch.randn(1, 3, 728, 728, device=DEV, generator=g), torch.randn(2, 3, 504, 504, device=DEV, generator=g)]
    with torch.inference_mode():
        eager = torch.cat([x.flatten(0, 1) for x in tower(pixels)])
        exact = torch.cat([x.flatten(0, 1) for x in plain(pixels)])
        torch._dynamo.reset()
        counters.clear()
        tower.compile_blocks()
        compiled = torch.cat([x.flatten(0, 1) for x in tower(pixels)])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel(compiled, eager) < 2e-2 and rel(eager, exact) < 0.06
