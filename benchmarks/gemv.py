"""Times the skinny bf16 GEMM (stepserve.kernels.gemv) at the Qwen3-8B decoder's linear shapes, M = 1, 4, 8,
against F.linear (cuBLAS) and against the bytes floor (W read once at the 3.0 TB/s copy ceiling of
docs/performance), then sweeps launch configs per shape so the defaults can be picked from measurements.

    python benchmarks/gemv.py              # table, decode-step sums, sweep; JSON in $OUT/gemv.json if OUT is set
    python benchmarks/gemv.py --quick      # no sweep
    python benchmarks/gemv.py --sweep-s 60 # stop sweeping after about 60 s

"cold" is a triton.testing.do_bench median with the L2 flushed before each call. "graph" replays a CUDA graph
of many calls that cycle over distinct weight sets of > 4 x L2 together, so every call streams its W from
memory as a decode step's graph does; it is the number that matters, and the sweep uses it alone. Every
config is checked against F.linear in float32 before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
import triton

from stepserve.kernels.gemv import FMA_K_PER_WARP, default_config, linear_small_m, linear_small_m_reference

BANDWIDTH = 3.0e12
LAYERS = 36
SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
          "down_proj": (4096, 12288), "lm_head": (151936, 4096)}
ROTATE_BYTES = 256 << 20  # > 4 x the H100's 50 MB L2
GRAPH_BYTES = 2 << 30  # weight bytes one graph replay streams: ~0.7 ms, well above replay overheads
REPLAYS = 15
DEV = "cuda"


def weight_sets(N: int, K: int) -> list[torch.Tensor]:
    n = max(1, math.ceil(ROTATE_BYTES / (N * K * 2)))
    return [torch.randn(N, K, device=DEV, dtype=torch.bfloat16) for _ in range(n)]


def cold_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def graph_us(fn, x: torch.Tensor, ws: list[torch.Tensor]) -> float:
    """Median per-call time of a CUDA graph of fn(x, w) calls cycling over the weight sets `ws`."""
    per_call = ws[0].numel() * 2
    calls = len(ws) * max(1, math.ceil(GRAPH_BYTES / (len(ws) * per_call)))
    fn(x, ws[0])  # compile and create library handles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, ws[i % len(ws)])
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def floor_us(M: int, N: int, K: int) -> float:
    return (N * K + M * K + M * N) * 2 / BANDWIDTH * 1e6


def bench_table(results: list, sums: dict) -> None:
    print(f"{'shape':13s} {'M':>2s} {'floor us':>9s} {'cold us':>8s} {'graph us':>9s} {'floor%':>7s} {'TB/s':>5s}"
          f" {'F.lin cold':>10s} {'F.lin graph':>11s} {'floor%':>7s} {'speedup':>7s}  config")
    for name, (N, K) in SHAPES.items():
        ws = weight_sets(N, K)
        for M in (1, 4, 8):
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            err = rel_err(linear_small_m(x, ws[0]), linear_small_m_reference(x, ws[0]))
            assert err < 1e-2, (name, M, err)
            floor = floor_us(M, N, K)
            t_cold = cold_us(lambda: linear_small_m(x, ws[0]))
            t_graph = graph_us(linear_small_m, x, ws)
            b_cold = cold_us(lambda: F.linear(x, ws[0]))
            b_graph = graph_us(F.linear, x, ws)
            cfg = default_config(M, N, K, torch.cuda.get_device_properties(0).multi_processor_count)
            results.append({"shape": name, "N": N, "K": K, "M": M, "floor_us": floor, "cold_us": t_cold,
                            "graph_us": t_graph, "flinear_cold_us": b_cold, "flinear_graph_us": b_graph,
                            "floor_frac": floor / t_graph, "flinear_floor_frac": floor / b_graph,
                            "rel_err": err, "config": cfg})
            for key, t in (("triton", t_graph), ("F.linear", b_graph)):
                sums[(key, M)] = sums.get((key, M), 0.0) + t * (1 if name == "lm_head" else LAYERS)
            print(f"{name:13s} {M:2d} {floor:9.1f} {t_cold:8.1f} {t_graph:9.1f} {100 * floor / t_graph:6.0f}%"
                  f" {N * K * 2 / t_graph / 1e6:5.2f} {b_cold:10.1f} {b_graph:11.1f} {100 * floor / b_graph:6.0f}%"
                  f" {b_graph / t_graph:6.2f}x  {cfg}", flush=True)
        del ws
        torch.cuda.empty_cache()


def sweep_grid(M: int) -> list[dict]:
    """Configs to try at M rows, most promising first (the sweep may stop on its time budget)."""
    dot = [dict(use_dot=True, block_n=bn, block_k=bk, num_warps=4, num_stages=st)
           for bn, bk, st in ((16, 256, 4), (16, 256, 3), (16, 512, 3), (16, 128, 5), (32, 256, 4), (32, 128, 4),
                              (32, 512, 3), (64, 256, 3), (64, 128, 4), (64, 256, 4), (128, 128, 3))]
    dot += [dict(use_dot=True, block_n=16, block_k=256, num_warps=4, num_stages=4, split_k=s) for s in (2, 3)]
    if M > 1:
        return dot
    fma = [dict(use_dot=False, block_n=bn, block_k=FMA_K_PER_WARP * w * kmul, num_warps=w, num_stages=1)
           for bn, w, kmul in ((8, 4, 2), (8, 2, 2), (8, 4, 1), (16, 4, 1), (4, 4, 2), (16, 2, 1), (8, 8, 2),
                               (4, 8, 1))]
    fma += [dict(use_dot=False, block_n=8, block_k=FMA_K_PER_WARP * 8, num_warps=4, num_stages=1, split_k=s)
            for s in (2, 3)]
    return fma + dot


def sweep(results: list, budget_s: float) -> None:
    """For each shape and M in (1, 4, 8), graph-time every config; print the best per (shape, M)."""
    deadline = time.monotonic() + budget_s
    for M in (1, 4, 8):
        for name, (N, K) in SHAPES.items():
            if time.monotonic() > deadline:
                print(f"  sweep budget spent: stopped before {name} M={M}", flush=True)
                return
            ws = weight_sets(N, K)
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            ref = linear_small_m_reference(x, ws[0])
            default_t = graph_us(linear_small_m, x, ws)
            best_t, best_cfg = default_t, "default"
            for cfg in sweep_grid(M):
                fn = lambda a, w, cfg=cfg: linear_small_m(a, w, **cfg)  # noqa: E731
                row = {"sweep": True, "shape": name, "M": M, "config": cfg, "default_graph_us": default_t}
                try:
                    row["rel_err"] = rel_err(fn(x, ws[0]), ref)
                    row["graph_us"] = graph_us(fn, x, ws) if row["rel_err"] < 1e-2 else None
                except Exception as e:  # e.g. out of shared memory: record and go on
                    row["graph_us"], row["error"] = None, str(e).splitlines()[0][:160]
                results.append(row)
                if row["graph_us"] is not None and row["graph_us"] < best_t:
                    best_t, best_cfg = row["graph_us"], cfg
            print(f"best {name:13s} M={M}: {best_t:8.1f} us ({100 * floor_us(M, N, K) / best_t:.0f}% of floor;"
                  f" default {default_t:.1f} us)  {best_cfg}", flush=True)
            del ws
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the config sweep")
    parser.add_argument("--sweep-s", type=float, default=150.0, help="time budget of the sweep, seconds")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    results: list[dict] = []
    sums: dict = {}
    bench_table(results, sums)
    print("linear layers of one decode step (36 layers + lm_head, graph times):")
    for M in (1, 4, 8):
        t, b = sums[("triton", M)], sums[("F.linear", M)]
        floor = sum(floor_us(M, N, K) * (1 if name == "lm_head" else LAYERS) for name, (N, K) in SHAPES.items())
        print(f"  M={M}: triton {t / 1e3:.3f} ms, F.linear {b / 1e3:.3f} ms, floor {floor / 1e3:.3f} ms "
              f"({100 * floor / t:.0f}% / {100 * floor / b:.0f}% of floor)", flush=True)
    if not args.quick:
        sweep(results, args.sweep_s)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gemv.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results,
                       "decode_step_us": {f"{k}_M{m}": v for (k, m), v in sums.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
