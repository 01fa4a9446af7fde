"""fp8 linears (kernels/fp8_gemm.py) at Qwen3-8B's decoder shapes for prefill-sized M, every candidate path against
bf16 cuBLAS, and the fp8 model at real size.

    python benchmarks/fp8.py               # GEMM table + model rows; JSON in $OUT/fp8.json when OUT is set
    python benchmarks/fp8.py --gemm-only   # no model rows
    python benchmarks/fp8.py --sweep       # + config sweeps of the Triton W8A8 GEMM at M = 256 and 2048

GEMM rows: M = 16, 64, 256, 1024, 2048, 8192 tokens x (qkv 6144x4096, o 4096x4096, gate_up 24576x4096,
down 4096x12288). Candidates:
- skinny:      the GEMV's tensor-core path, weight-only (M <= 64 only)
- scaled_mm:   cuBLAS block-scaled fp8 (F.scaled_mm, 1x128 x 128x128), x quantized per token group first;
               reported as not supported (and skipped) where torch lacks it
- dequant:     W dequantized to bf16 (one Triton pass, timed with it) + cuBLAS bf16
- w8a8_triton: the Triton block-scaled GEMM, default config
- rule:        fp8_gemm, i.e. what `fp8_path` picks (should match the best of the above)
- bf16:        F.linear on bf16 weights, the baseline
Times are medians of CUDA-graph replays over rotating weight sets (> 4 x L2, as a forward pass streams 36
layers' weights); the floor is max(bytes / 3.0 TB/s, FLOPs / 1420 TFLOP/s fp8). Every candidate is checked
against float32 weight-only math before it is timed (W8A8 paths: < 0.06, weight-only: < 1e-2).

Model rows: Step3-VL-10B with dummy weights in bf16, then with quantization="fp8" (same seed, so the fp8
weights are the bf16 ones quantized): weight memory; an image + text prompt's logits (relative error, top-1
agreement, greedy decode tokens; tests/gpu/test_model_gpu.py's `run` and `compare`); and the decode step time
through a CUDA graph at a 2048-token context for batch 1, 16 and 64 (the TPOT target is 3.3 ms at batch 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from kernels import n_sets, rel_err  # noqa: E402  (benchmarks/kernels.py)
from test_model_gpu import NUM_CROPS, compare, image_prompt, run  # noqa: E402

from stepserve.engine.cuda_graph import DecodeGraphs  # noqa: E402
from stepserve.kernels import install_triton_kernels  # noqa: E402
from stepserve.kernels.fp8_gemm import (SKINNY_MAX, dequantize_fp8, fp8_gemm, fp8_gemm_w8a8, fp8_path,  # noqa: E402
                                        fp8_scaled_mm, scaled_mm_supported)
from stepserve.kernels.gemv import linear_small_m  # noqa: E402
from stepserve.layers.quant import dequantize_fp8_blockwise, quantize_fp8_blockwise  # noqa: E402
from stepserve.loader import load_model  # noqa: E402
from stepserve.testing import attach_kv_cache  # noqa: E402

BANDWIDTH, FP8_FLOPS = 3.0e12, 1420e12
LAYERS = 36
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
TOKENS = (16, 64, 256, 1024, 2048, 8192)
DEV = "cuda"
# name: (call(x, q, s), weight-only math?, rows it takes)
CANDIDATES = {
    "skinny": (lambda x, q, s: linear_small_m(x, q, weight_scale_inv=s), True, SKINNY_MAX),
    "scaled_mm": (fp8_scaled_mm, False, None),
    "dequant": (lambda x, q, s: F.linear(x, dequantize_fp8(q, s, x.dtype)), True, None),
    "w8a8_triton": (fp8_gemm_w8a8, False, None),
    "rule": (fp8_gemm, None, None),
}


def graph_us(fns, target_ms: float = 20.0, replays: int = 5) -> float:
    """Median per-call time of a CUDA graph calling `fns` round robin for ~target_ms (distinct weight sets defeat
    the L2). Shorter than triton's do_bench_cudagraph (10 x 100 ms): this table has ~150 rows."""
    for fn in fns:  # compile, create library handles
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for fn in fns:
        fn()
    end.record()
    torch.cuda.synchronize()
    rounds = max(1, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in fns:
                fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (rounds * len(fns)))
    del graph
    return statistics.median(times)


def gemm_floor_us(m: int, n: int, k: int) -> float:
    nbytes = n * k + (n // 128) * (k // 128) * 4 + 2 * m * k + 2 * m * n
    return max(nbytes / BANDWIDTH, 2 * m * n * k / FP8_FLOPS) * 1e6


def sweep_grid() -> list[dict]:
    return [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, split_k=1)
            for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for st in (3, 4)]


def bench_gemm(results: list, m: int, name: str, sets: list, bf16_sets: list, sweep: bool) -> dict:
    """Times every candidate at one (M, shape); returns {candidate: us} (None: skipped or failed)."""
    q, s = sets[0]
    n, k = q.shape
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    exact = F.linear(x.float(), dequantize_fp8_blockwise(q, s, torch.float32))
    times = {"bf16": graph_us([lambda wb=wb: F.linear(x, wb) for wb in bf16_sets])}
    for cand, (fn, weight_only, max_rows) in CANDIDATES.items():
        if max_rows is not None and m > max_rows:
            continue
        if cand == "scaled_mm" and not scaled_mm_supported(x.device):
            times[cand] = None
            continue
        if cand == "rule":
            weight_only = fp8_path(m, n, k, x.dtype, x.device) in ("skinny", "dequant")
        try:
            err = rel_err(fn(x, q, s), exact)
            assert err < (1e-2 if weight_only else 0.06), err
            times[cand] = graph_us([lambda qs=qs: fn(x, *qs) for qs in sets])
        except Exception as e:  # an unsupported layout or a wrong result: say so, time the rest
            print(f"    {cand} at M={m} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            times[cand] = None
    floor = gemm_floor_us(m, n, k)
    timed = {c: t for c, t in times.items() if t is not None and c != "rule"}
    best = min(timed, key=timed.get)  # bf16 included: the fp8 paths must beat it to matter
    results.append({"m": m, "shape": name, "n": n, "k": k, "us": times, "floor_us": floor, "best": best,
                    "rule_path": fp8_path(m, n, k, x.dtype, x.device)})
    cols = "  ".join(f"{c} {t:8.1f}" if t is not None else f"{c} {'-':>8s}" for c, t in times.items())
    print(f"M={m:5d} {name:8s} floor {floor:8.1f} us | {cols} | best {best} ({100 * floor / timed[best]:.0f}% of "
          f"floor, x{times['bf16'] / timed[best]:.2f} vs bf16); rule: {fp8_path(m, n, k, x.dtype, x.device)}",
          flush=True)
    if sweep and m in (256, 2048):
        best_cfg = (times["w8a8_triton"], "default")
        for cfg in sweep_grid():
            try:
                e = rel_err(fp8_gemm_w8a8(x, q, s, **cfg), exact)
                tc = graph_us([lambda qs=qs: fp8_gemm_w8a8(x, *qs, **cfg) for qs in sets]) if e < 0.06 else None
            except Exception as exc:  # e.g. a tile that needs more shared memory than the SM has
                e, tc, cfg = None, None, {**cfg, "error": str(exc).splitlines()[0][:120]}
            results.append({"kernel": "w8a8_triton sweep", "m": m, "shape": name, **cfg, "us": tc, "rel_err": e})
            if tc is not None and (best_cfg[0] is None or tc < best_cfg[0]):
                best_cfg = (tc, cfg)
        print(f"    w8a8_triton best {best_cfg[0]:.1f} us with {best_cfg[1]}", flush=True)
    return times


def bench_gemms(results: list, sweep: bool) -> dict:
    if not scaled_mm_supported(torch.device(DEV)):
        print(f"scaled_mm: not supported here (torch {torch.__version__}, CUDA {torch.version.cuda}, sm "
              f"{torch.cuda.get_device_capability()}, F.scaled_mm {'present' if hasattr(F, 'scaled_mm') else 'absent'})"
              f": skipped", flush=True)
    per_layer: dict = {m: {} for m in TOKENS}
    for name, (n, k) in SHAPES.items():
        g = torch.Generator(device=DEV).manual_seed(n + k)
        w = torch.randn(n, k, device=DEV, generator=g, dtype=torch.bfloat16) / k ** 0.5
        sets = [quantize_fp8_blockwise(w.roll(i, 0)) for i in range(n_sets(n * k))]
        bf16_sets = [w.roll(i, 0) for i in range(n_sets(2 * n * k))]
        for m in TOKENS:
            for cand, t in bench_gemm(results, m, name, sets, bf16_sets, sweep).items():
                per_layer[m][cand] = per_layer[m].get(cand, 0.0) + (t if t is not None else float("nan"))
        del w, sets, bf16_sets
        torch.cuda.empty_cache()
    for m, totals in per_layer.items():
        print(f"  M={m}: one layer's four linears x36 (ms): " +
              ", ".join(f"{c} {t * LAYERS / 1e3:.3f}" for c, t in totals.items()), flush=True)
    return per_layer


def decode_step_ms(model, batch_sizes=(1, 16, 64), context: int = 2048, page_size: int = 16) -> dict:
    """Median decode step (forward + logits) through a CUDA graph; all sequences read one shared 2k context."""
    pages = context // page_size
    attach_kv_cache(model, pages + 1, page_size)
    graphs = DecodeGraphs(model, max(batch_sizes), pages, context, pages * page_size, torch.device(DEV))
    graphs.capture()
    out = {}
    for bs in batch_sizes:
        ids = torch.randint(0, 1000, (bs,)).tolist()
        pos, slots, kv_lens = [context - 1] * bs, [context - 1] * bs, [context] * bs
        table = [list(range(pages))] * bs
        step = lambda: graphs.run(ids, pos, slots, kv_lens, table, [], [], None)  # noqa: E731
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
    parser.add_argument("--gemm-only", action="store_true", help="no model rows")
    parser.add_argument("--sweep", action="store_true", help="config sweeps of the Triton W8A8 GEMM")
    args = parser.parse_args()
    install_triton_kernels()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda, "triton",
          triton.__version__, flush=True)
    gemms: list = []
    per_layer = bench_gemms(gemms, args.sweep)
    model: dict = {}
    if not args.gemm_only:
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
