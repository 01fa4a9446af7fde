"""The block-fp8 GEMM (kernels/fp8_gemm.py) at Qwen3-8B's decoder shapes, and the fp8 model at real size.

    python benchmarks/fp8.py            # table on stdout; JSON in $OUT/fp8.json when OUT is set
    python benchmarks/fp8.py --quick    # no config sweeps

GEMM rows: M = 1, 16, 64, 256, 2048 tokens x (qkv, o, gate_up, down). Times are medians of CUDA-graph
replays over rotating weight sets (> 4 x L2, as a decode step streams 36 layers' weights); the floor is
max(bytes / 3.0 TB/s, FLOPs / 1420 TFLOP/s fp8), bytes = fp8 W + scales + bf16 x and out; the baseline is
bf16 F.linear (cuBLAS) on the same shape, timed the same way. Each sweep variant is checked against the
default config before it is timed.

Model rows: Step3-VL-10B with dummy weights in bf16, then with quantization="fp8" (same seed, so the fp8
weights are the bf16 ones quantized): weight memory; an image + text prompt's logits (relative error, top-1
agreement, greedy decode tokens; tests/gpu/test_model_gpu.py's `run` and `compare`); and the decode step time
through a CUDA graph at a 2048-token context for batch 1, 16 and 64 (the TPOT target is 3.3 ms at batch 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from kernels import graph_us, n_sets, rel_err  # noqa: E402  (benchmarks/kernels.py)
from test_model_gpu import NUM_CROPS, compare, image_prompt, run  # noqa: E402

from stepserve.engine.cuda_graph import DecodeGraphs  # noqa: E402
from stepserve.kernels import fp8_gemm, install_triton_kernels  # noqa: E402
from stepserve.kernels.fp8_gemm import default_config  # noqa: E402
from stepserve.layers.quant import quantize_fp8_blockwise  # noqa: E402
from stepserve.loader import load_model  # noqa: E402
from stepserve.testing import attach_kv_cache  # noqa: E402

BANDWIDTH, FP8_FLOPS = 3.0e12, 1420e12
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
TOKENS = (1, 16, 64, 256, 2048)
DEV = "cuda"


def gemm_floor_us(m: int, n: int, k: int) -> float:
    nbytes = n * k + (n // 128) * (k // 128) * 4 + 2 * m * k + 2 * m * n
    return max(nbytes / BANDWIDTH, 2 * m * n * k / FP8_FLOPS) * 1e6


def sweep_grid(m: int) -> list[dict]:
    if m <= 64:
        return [dict(block_n=bn, split_k=s) for bn in (32, 64, 128) for s in (1, 2, 4, 8)] + \
            [dict(num_stages=st) for st in (3, 6)] + [dict(num_warps=8)]
    return [dict(block_m=bm, block_n=bn, num_warps=w, split_k=1)
            for bm in (64, 128) for bn in (128, 256) for w in (4, 8)]


def bench_gemm(results: list, m: int, name: str, n: int, k: int, sweep: bool) -> None:
    g = torch.Generator(device=DEV).manual_seed(m + n)
    w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.bfloat16) / k ** 0.5
    sets = [quantize_fp8_blockwise(w.roll(i, 0)) for i in range(n_sets(n * k))]
    x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
    q, s = sets[0]
    out = fp8_gemm(x, q, s)
    ref = F.linear(x, (q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.bfloat16))
    err = rel_err(out, ref)  # activation rounding to fp8: a few percent
    t = graph_us([lambda qs=qs: fp8_gemm(x, *qs) for qs in sets])
    bf16_sets = [w.roll(i, 0) for i in range(n_sets(2 * n * k))]
    t_bf16 = graph_us([lambda wb=wb: F.linear(x, wb) for wb in bf16_sets])
    floor = gemm_floor_us(m, n, k)
    r = {"kernel": "fp8_gemm", "m": m, "shape": name, "n": n, "k": k, "us": t, "bf16_us": t_bf16,
         "floor_us": floor, "floor_frac": floor / t, "speedup_vs_bf16": t_bf16 / t, "rel_err_vs_bf16_weights": err,
         "TB/s": (n * k + 2 * m * k + 2 * m * n) / (t * 1e-6) / 1e12, "config": default_config(m, n, k, 132)}
    results.append(r)
    print(f"M={m:5d} {name:8s} {t:9.1f} us  bf16 {t_bf16:9.1f} us  floor {floor:8.1f} us ({100 * floor / t:3.0f}%)"
          f"  x{t_bf16 / t:4.2f} vs bf16  err {err:.3f}", flush=True)
    if not sweep:
        return
    best = (t, "default")
    for cfg in sweep_grid(m):
        try:
            e = rel_err(fp8_gemm(x, q, s, **cfg), out)
            tc = graph_us([lambda qs=qs: fp8_gemm(x, *qs, **cfg) for qs in sets]) if e < 1e-2 else None
        except Exception as exc:  # e.g. a tile that needs more shared memory than the SM has
            e, tc, cfg = None, None, {**cfg, "error": str(exc).splitlines()[0][:120]}
        results.append({"kernel": "fp8_gemm sweep", "m": m, "shape": name, **cfg, "us": tc, "rel_err_vs_default": e})
        if tc is not None and tc < best[0]:
            best = (tc, cfg)
    print(f"    best {best[0]:.1f} us with {best[1]}", flush=True)


def decode_step_ms(model, batch_sizes=(1, 16, 64), context: int = 2048, page_size: int = 16) -> dict:
    """Median decode step (forward + logits) through a CUDA graph; all sequences read one shared 2k context."""
    pages = context // page_size
    attach_kv_cache(model, pages + 1, page_size)
    graphs = DecodeGraphs(model, max(batch_sizes), pages, context, pages * page_size, torch.device(DEV))
    graphs.capture()
    out = {}
    for bs in batch_sizes:
        ids = torch.randint(0, 1000, (bs,), device=DEV)
        pos = torch.full((bs,), context - 1, device=DEV)
        slots = torch.full((bs,), context - 1, dtype=torch.long, device=DEV)
        kv_lens = torch.full((bs,), context, dtype=torch.int32, device=DEV)
        table = torch.arange(pages, dtype=torch.int32, device=DEV).expand(bs, -1).contiguous()
        step = lambda: graphs.run(ids, pos, slots, kv_lens, table)  # noqa: E731
        out[f"bs{bs}"] = triton.testing.do_bench(step, warmup=10, rep=200, return_mode="median")
    return out


def bench_model(results: dict, tmp: Path) -> None:
    g = torch.Generator().manual_seed(1)
    views, crops = torch.randn(1, 3, 728, 728, generator=g), torch.randn(NUM_CROPS, 3, 504, 504, generator=g)
    outputs = {}
    for name, quant in (("bf16", None), ("fp8", "fp8")):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load_model(tmp, torch.bfloat16, DEV, load_format="dummy", quantization=quant)
        torch.cuda.synchronize()
        results[name] = {"load_s": round(time.perf_counter() - start, 1),
                         "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                         "peak_load_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        ids = image_prompt(model.image_token_id)
        with torch.inference_mode():
            outputs[name] = run(model, ids, views, crops)
        results[name]["decode_step_ms"] = decode_step_ms(model)
        print(name, json.dumps(results[name]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    results["fp8_vs_bf16"] = compare(outputs["fp8"], outputs["bf16"])
    print("fp8 vs bf16:", json.dumps(results["fp8_vs_bf16"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="no config sweeps")
    args = parser.parse_args()
    install_triton_kernels()
    gemms: list = []
    for m in TOKENS:
        for name, (n, k) in SHAPES.items():
            bench_gemm(gemms, m, name, n, k, sweep=not args.quick and m in (1, 2048))
    per_layer = {m: sum(r["us"] for r in gemms if r["kernel"] == "fp8_gemm" and r["m"] == m) for m in TOKENS}
    print("GEMM time per decoder layer (us):", per_layer, " x36:", {m: round(t * 36 / 1e3, 3) for m, t in
                                                                  per_layer.items()}, "ms", flush=True)
    model: dict = {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "fp8-bench-empty"  # no config.json: the real size
    tmp.mkdir(exist_ok=True)
    bench_model(model, tmp)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "fp8.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "gemm": gemms, "gemm_us_per_layer": per_layer, "model": model}, f, indent=1)


if __name__ == "__main__":
    main()
