"""Real-size Step3-VL-10B with dummy weights: an image + text prompt in bf16 against the same weights in
float32 on the GPU (vision rows, final hidden states, logits), plus load time and peak memory; the image
pixel path (uint8 -> normalized, resized on the GPU) against the CPU's."""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from stepserve.layers.attention import build_context, forward_context
from stepserve.loader import load_model
from stepserve.multimodal.processor import ImageProcessor, ImageTokenIds, pixel_inputs
from stepserve.testing import attach_kv_cache

PAGE_SIZE = 16
NUM_CROPS = 2
# bf16 rounds each op by up to 2^-9 relative; the tiny model (3 layers) shows ~1% after the decoder, and
# 47 vision + 36 decoder layers accumulate more, so allow 10% (a wrong kernel or layout gives ~100%).
# Near-ties among 151936 random logits flip some argmaxes.
MAX_REL_ERR = 0.1
MIN_TOP1 = 0.7


def image_prompt(image_token_id: int, seed: int = 0) -> torch.Tensor:
    """Text, one image with NUM_CROPS crops in the processor's layout (markers as plain ids), text."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 100_000, (n,), generator=g).tolist()  # noqa: E731
    im = image_token_id
    crops = ([1] + [im] * 81 + [2]) * NUM_CROPS
    ids = text(24) + crops + [3] + [im] * 169 + [4] + text(40)
    assert ids.count(im) == 81 * NUM_CROPS + 169
    return torch.tensor(ids)


def run(model, ids: torch.Tensor, views: torch.Tensor, crops: torch.Tensor, decode_steps: int = 8) -> dict:
    """Encode the image, prefill over a paged cache, decode greedily; everything returned on the CPU in fp32."""
    device = next(model.parameters()).device
    n = ids.shape[0]
    total = n + decode_steps
    pages = list(range(1, (total + PAGE_SIZE - 1) // PAGE_SIZE + 1))[::-1]  # non-contiguous order
    attach_kv_cache(model, len(pages) + 1, PAGE_SIZE)
    ids, views, crops = ids.to(device), views.to(device), crops.to(device)
    with torch.inference_mode():
        (rows,) = model.encode_images(views, crops, [NUM_CROPS])
        with forward_context(build_context([n], [n], [pages], PAGE_SIZE, device)):
            hidden = model(ids, torch.arange(n, device=device), rows, ids == model.image_token_id)
        logits = model.compute_logits(hidden)
        tokens = [int(logits[-1].argmax())]
        for step in range(decode_steps - 1):
            with forward_context(build_context([1], [n + step + 1], [pages], PAGE_SIZE, device)):
                h = model(torch.tensor(tokens[-1:], device=device), torch.tensor([n + step], device=device))
            tokens.append(int(model.compute_logits(h)[-1].argmax()))
    return {"rows": rows.float().cpu(), "hidden": hidden.float().cpu(), "logits": logits.cpu(), "tokens": tokens}


def compare(got: dict, want: dict) -> dict:
    rel = lambda k: float((got[k] - want[k]).norm() / want[k].norm())  # noqa: E731
    top1 = float((got["logits"].argmax(-1) == want["logits"].argmax(-1)).float().mean())
    return {"rel_err_vision_rows": rel("rows"), "rel_err_hidden": rel("hidden"), "rel_err_logits": rel("logits"),
            "top1_agreement": top1, "decode_tokens_equal": got["tokens"] == want["tokens"]}


def param_counts(model) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    v = model.vision_model
    downsamplers = count(v.vit_downsampler1) + count(v.vit_downsampler2)
    return {"vision_trunk": count(v) - downsamplers, "downsamplers": downsamplers,
            "projector": count(model.vit_large_projector), "decoder_layers": count(model.model.layers),
            "embed_tokens": count(model.model.embed_tokens), "lm_head": count(model.lm_head), "total": count(model)}


def test_real_size_bf16_matches_fp32(tmp_path, report):
    # The float32 reference must really be float32: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_model(tmp_path, torch.bfloat16, "cuda", load_format="dummy")  # no config.json: the real size
    torch.cuda.synchronize()
    results = {"device": torch.cuda.get_device_name(), "load_s": round(time.perf_counter() - start, 2),
               "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2), "params": param_counts(model)}
    assert model.num_layers == 36 and model.vocab_size == 151936 and model.image_token_id == 151679

    g = torch.Generator().manual_seed(1)
    views, crops = torch.randn(1, 3, 728, 728, generator=g), torch.randn(NUM_CROPS, 3, 504, 504, generator=g)
    ids = image_prompt(model.image_token_id)
    start = time.perf_counter()
    bf16 = run(model, ids, views, crops)
    results |= {"prompt_tokens": ids.shape[0], "bf16_run_s": round(time.perf_counter() - start, 2),
                "peak_gib_bf16": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    try:
        from stepserve.kernels import install_triton_kernels
    except ImportError:
        install_triton_kernels = None
    if install_triton_kernels is not None:
        install_triton_kernels()
        try:
            with_kernels = run(model, ids, views, crops)
        finally:
            install_triton_kernels(False)

    model.float()  # the same weights, widened; frees the bf16 copy tensor by tensor
    fp32 = run(model, ids, views, crops)
    results["bf16_vs_fp32"] = compare(bf16, fp32)
    if install_triton_kernels is not None:
        results["bf16_triton_vs_fp32"] = compare(with_kernels, fp32)
    results["peak_gib_total"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report("model_gpu", results)

    for name in [k for k in results if k.endswith("_vs_fp32")]:
        r = results[name]
        assert torch.isfinite(bf16["logits"]).all()
        assert max(r["rel_err_vision_rows"], r["rel_err_hidden"], r["rel_err_logits"]) < MAX_REL_ERR, (name, r)
        assert r["top1_agreement"] >= MIN_TOP1, (name, r)
    assert fp32["logits"].std() > 0.1  # logits carry signal, so agreement is not trivially about ties


def test_pixel_inputs_on_gpu_match_cpu(report):
    """The uint8 -> normalized, resized path on CUDA against the CPU one (which is bit-identical to the reference
    processor). CUDA divides by a scalar as a multiplication by its reciprocal, so even unresized crops may
    differ from the CPU's correctly rounded division in the last bit; the resize kernels round differently too."""
    sizes = [(1280, 720), (728, 400), (640, 480), (1280, 720), (4000, 3000)]  # 504 and 400 crops, none, clamped
    proc = ImageProcessor(ImageTokenIds(151679, 151680, 151681, 151689, 151690, 151691))
    rng = np.random.default_rng(0)
    images = [proc(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for w, h in sizes]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    want = [pixel_inputs([im], cpu) for im in images]
    # The GPU sleeps first, so every upload below is still queued when its call returns and drops its pinned
    # staging buffer; a buffer handed out again before its copy ran would corrupt an earlier image.
    torch.cuda._sleep(2_000_000_000)
    alone = [pixel_inputs([im], cuda) for im in images]
    views, crops = pixel_inputs(images, cuda)
    half_views, half_crops = pixel_inputs(images, cuda, torch.bfloat16)
    torch.cuda.synchronize()

    def max_err(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
        return 0.0 if ref is None else float((got.float().cpu() - ref).abs().max())

    errs = {"views": max(max_err(g[0], w[0]) for g, w in zip(alone, want)),
            "crops_504": max(max_err(g[1], w[1]) for g, w, im in zip(alone, want, images)
                             if im.num_crops and im.crops.shape[1] == 504),
            "crops_400_resized": max_err(alone[1][1], want[1][1]),
            "batched_views": max_err(views, torch.cat([w[0] for w in want])),
            "batched_crops": max_err(crops, torch.cat([w[1] for w in want if w[1] is not None])),
            "bf16_views": max_err(half_views, torch.cat([w[0] for w in want])),
            "bf16_crops": max_err(half_crops, torch.cat([w[1] for w in want if w[1] is not None]))}
    report("pixel_inputs_gpu", errs)
    assert errs["crops_504"] < 1e-6, errs  # one rounding of values |x| < 2.2
    # The antialiased resize sums ~4 x 4 taps per output in another order on the GPU: measured 1.4e-4 at most.
    assert max(errs["views"], errs["crops_400_resized"], errs["batched_views"], errs["batched_crops"]) < 5e-4, errs
    assert max(errs["bf16_views"], errs["bf16_crops"]) < 0.02, errs  # bf16 keeps 8 bits: |x| < 2.2 -> 2^-7
    assert views.dtype == torch.float32 and half_views.dtype == torch.bfloat16 and views.is_cuda
