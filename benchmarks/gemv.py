"""Times the skinny GEMM (stepserve.kernels.gemv) at the Qwen3-8B decoder's linear shapes, M = 1, 4, 8 (or --rows), in
bf16 and block-fp8, against bf16 F.linear (cuBLAS) and against the bytes floor (W read once at the 3.0 TB/s copy
ceiling of docs/performance); then (--sweep) a grid of launch configs per shape, so one GPU run picks the defaults;
then all the linears of one decode step in one CUDA graph (with --sweep also the best config of each shape).

    python benchmarks/gemv.py                       # bf16 and fp8 tables, decode-step linears; $OUT/gemv.json
    python benchmarks/gemv.py --sweep --fp8         # + the fp8 config sweep (--bf16 for bf16, both: neither)
    python benchmarks/gemv.py --sweep --sweep-s 60  # stop sweeping after about 60 s
    python benchmarks/gemv.py --bf16 --rows 96,128 --sweep --sweep-s 400  # a seed-sized decode batch: wide row
                                                                           # tiles and split-K against cuBLAS

Every time is a CUDA-graph replay of many calls that cycle over distinct weight sets of > 4 x L2 together, so
each call streams its W from memory as a decode step's graph does. "gate_up+silu" is gate_up_proj with the
fused silu_and_mul epilogue ([M, 12288] out); its cuBLAS baseline is F.linear + the silu_and_mul kernel.
Every config is checked against the float32 reference before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton

from cuda_timing import median_ms

from stepserve.kernels.activation import silu_and_mul
from stepserve.kernels.gemv import FMA_K_PER_WARP, default_config, linear_small_m, linear_small_m_reference
from stepserve.layers.quant import BLOCK, FP8_DTYPE

BANDWIDTH = 3.0e12
LAYERS = 36
SILU = "silu_and_mul"
# name: (rows of W, K, activation)
SHAPES = {"qkv_proj": (6144, 4096, None), "o_proj": (4096, 4096, None), "gate_up_proj": (24576, 4096, None),
          "gate_up+silu": (24576, 4096, SILU), "down_proj": (4096, 12288, None), "lm_head": (151936, 4096, None)}
STEP = ("qkv_proj", "o_proj", "gate_up+silu", "down_proj")  # one decoder layer's linears, as a decode step runs them
ROTATE_BYTES = 256 << 20  # > 4 x the H100's 50 MB L2
GRAPH_BYTES = 2 << 30  # weight bytes one graph replay streams: ~0.7 ms, well above replay overheads
REPLAYS = 15
DEV = "cuda"


def w_bytes(N: int, K: int, fp8: bool) -> int:
    return N * K + math.ceil(N / BLOCK) * math.ceil(K / BLOCK) * 4 if fp8 else 2 * N * K


def floor_us(M: int, N: int, K: int, fp8: bool, activation: str | None = None) -> float:
    out_cols = N // 2 if activation else N
    return (w_bytes(N, K, fp8) + 2 * M * K + 2 * M * out_cols) / BANDWIDTH * 1e6


def random_weight(N: int, K: int, fp8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, scales): random bf16, or random e4m3 with random block scales (values do not matter for timing)."""
    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16)
    if not fp8:
        return w, None
    scale = torch.rand(math.ceil(N / BLOCK), math.ceil(K / BLOCK), device=DEV) * 1e-2 + 1e-3
    return w.to(FP8_DTYPE), scale


def weight_sets(N: int, K: int, fp8: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [random_weight(N, K, fp8) for _ in range(max(1, math.ceil(ROTATE_BYTES / w_bytes(N, K, fp8))))]



def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    """Median over REPLAYS of one replay of `graph`, in ms (CUDA events)."""
    return median_ms(graph.replay, REPLAYS)

def graph_us(fn, x: torch.Tensor, sets: list) -> float:
    """Median per-call time of a CUDA graph of fn(x, set) calls cycling over the weight sets."""
    per_call = w_bytes(*sets[0][0].shape, sets[0][1] is not None)
    calls = len(sets) * max(1, math.ceil(GRAPH_BYTES / (len(sets) * per_call)))
    fn(x, sets[0])  # compile and create library handles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(x, sets[i % len(sets)])
    graph.replay()
    us = replay_ms(graph) * 1e3 / calls
    del graph
    return us


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def skinny_fn(activation: str | None, **config):
    return lambda a, ws: linear_small_m(a, ws[0], weight_scale_inv=ws[1], activation=activation, **config)


def cublas_fn(activation: str | None):
    return lambda a, ws: (F.linear(a, ws[0]) if activation is None else silu_and_mul(F.linear(a, ws[0])))


def checked(fn, x: torch.Tensor, ws: tuple, activation: str | None) -> float:
    err = rel_err(fn(x, ws), linear_small_m_reference(x, ws[0], weight_scale_inv=ws[1], activation=activation))
    assert err < 1e-2, err
    return err


def bench_table(results: list, dtypes: list[str], rows: list[int]) -> None:
    print(f"{'shape':13s} {'dtype':5s} {'M':>2s} {'floor us':>9s} {'graph us':>9s} {'floor%':>7s} {'TB/s':>5s}"
          f" {'cuBLAS bf16':>11s} {'floor%':>7s} {'speedup':>7s}  config")
    for name, (N, K, act) in SHAPES.items():
        bf16_sets = weight_sets(N, K, False)
        for dtype in dtypes:
            fp8 = dtype == "fp8"
            if fp8 and name == "lm_head":  # stays bf16 in an fp8 model
                continue
            sets = weight_sets(N, K, True) if fp8 else bf16_sets
            for M in rows:
                x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
                err = checked(skinny_fn(act), x, sets[0], act)
                t = graph_us(skinny_fn(act), x, sets)
                b = graph_us(cublas_fn(act), x, bf16_sets)
                floor, b_floor = floor_us(M, N, K, fp8, act), floor_us(M, N, K, False, act)
                cfg = default_config(M, N // (2 if act else 1), K, torch.cuda.get_device_properties(0).multi_processor_count,
                                     fp8, act is not None)
                results.append({"shape": name, "dtype": dtype, "N": N, "K": K, "M": M, "floor_us": floor,
                                "graph_us": t, "floor_frac": floor / t, "cublas_bf16_us": b,
                                "cublas_floor_frac": b_floor / b, "rel_err": err, "config": cfg})
                print(f"{name:13s} {dtype:5s} {M:2d} {floor:9.1f} {t:9.1f} {100 * floor / t:6.0f}%"
                      f" {w_bytes(N, K, fp8) / t / 1e6:5.2f} {b:11.1f} {100 * b_floor / b:6.0f}% {b / t:6.2f}x  {cfg}",
                      flush=True)
            del sets
        del bf16_sets
        torch.cuda.empty_cache()


def decode_step(results: dict, dtypes: list[str], rows: list[int], best: dict) -> None:
    """All linears of one decode step (36 layers of qkv, o, gate_up + silu_and_mul, down; then the bf16 lm_head)
    in one CUDA graph over the real model's worth of distinct weights (nothing stays in L2). `best`: the sweep's
    fastest call per (dtype, M, shape), timed as one more variant."""
    hidden = torch.randn(max(rows), SHAPES["qkv_proj"][1], device=DEV, dtype=torch.bfloat16)
    inter = torch.randn(max(rows), SHAPES["down_proj"][1], device=DEV, dtype=torch.bfloat16)
    lm_head = random_weight(*SHAPES["lm_head"][:2], False)
    variants = {  # name: (fp8 weights, the layer call)
        "cuBLAS bf16 + silu kernel": (False, lambda a, ws, act: cublas_fn(act)(a, ws)),
        "skinny bf16 + silu kernel": (False, lambda a, ws, act: skinny_fn(None)(a, ws) if act is None else
                                      silu_and_mul(skinny_fn(None)(a, ws))),
        "skinny bf16, fused silu": (False, lambda a, ws, act: skinny_fn(act)(a, ws)),
        "skinny fp8 + silu kernel": (True, lambda a, ws, act: skinny_fn(None)(a, ws) if act is None else
                                     silu_and_mul(skinny_fn(None)(a, ws))),
        "skinny fp8, fused silu": (True, lambda a, ws, act: skinny_fn(act)(a, ws)),
        "best per shape (sweep)": (None, None),
    }
    print("\nlinears of one decode step (36 layers + bf16 lm_head), one CUDA graph:")
    for fp8 in (dtype == "fp8" for dtype in dtypes):
        layers = [{name: random_weight(*SHAPES[name][:2], fp8) for name in STEP} for _ in range(LAYERS)]
        floor_bytes = LAYERS * sum(w_bytes(*SHAPES[name][:2], fp8) for name in STEP) + w_bytes(*SHAPES["lm_head"][:2], False)
        for vname, (v_fp8, call) in variants.items():
            if v_fp8 not in (fp8, None):
                continue
            for M in rows:
                x_h, x_i = hidden[:M], inter[:M]
                dtype = "fp8" if fp8 else "bf16"
                if v_fp8 is None:  # the sweep's best calls, where it timed every shape of the step
                    if not all((dtype, M, name) in best for name in (*STEP, "lm_head")):
                        continue
                    fns = {name: best[(dtype, M, name)] for name in (*STEP, "lm_head")}
                else:
                    fns = {name: functools.partial(call, act=SHAPES[name][2]) for name in STEP}
                    fns["lm_head"] = cublas_fn(None) if vname.startswith("cuBLAS") else skinny_fn(None)

                def step():
                    for layer in layers:
                        for name in STEP:
                            fns[name](x_i if name == "down_proj" else x_h, layer[name])
                    fns["lm_head"](x_h, lm_head)

                step()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                ms, floor_ms = replay_ms(graph), floor_bytes / BANDWIDTH * 1e3
                del graph
                results[f"{vname} M{M}"] = {"ms": ms, "floor_ms": floor_ms, "floor_frac": floor_ms / ms}
                print(f"  {vname:28s} M={M}: {ms:6.3f} ms (floor {floor_ms:.3f} ms, {100 * floor_ms / ms:.0f}%)",
                      flush=True)
        layers = None  # free this dtype's weights before the next dtype's
        torch.cuda.empty_cache()


def wide_grid(N: int, K: int, silu: bool) -> list[dict]:
    """Tensor-core configs for a decode batch (M > 8, x padded to up to 128 rows): x's tile is re-read from L2 by
    every program, so each program takes 64-256 rows of W, and split-K brings the programs to ~100-400."""
    halves = 2 if silu else 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for rows, block_k, stages, warps in ((64, 64, 4, 4), (64, 64, 6, 4), (64, 128, 3, 4), (128, 64, 4, 4),
                                          (128, 64, 4, 8), (128, 64, 5, 8), (128, 64, 6, 8), (128, 128, 3, 8),
                                          (256, 64, 3, 8)):
        tiles, k_steps = N // (rows // halves), K // block_k
        splits = {s for s in (1, 2, 3, 4, 6, 8, 12) if s <= k_steps and 96 <= tiles * s <= 400}
        for split in sorted(splits | ({1} if tiles >= sms else set())):
            out.append(dict(use_dot=True, block_n=rows // halves, block_k=block_k, num_stages=stages,
                            num_warps=warps, split_k=split))
    return out


def sweep_grid(M: int, N: int, K: int, fp8: bool, silu: bool) -> list[dict]:
    """Configs to try at M rows, most promising first (the sweep may stop on its time budget). Sizes are rows
    of W per program (halved into gate and up with silu)."""
    halves = 2 if silu else 1
    if M > 8 and not fp8:
        return wide_grid(N, K, silu)

    def reg(rows, warps, loads, split=None):
        cfg = dict(use_dot=False, block_n=rows // halves, num_warps=warps, block_k=FMA_K_PER_WARP * warps * loads,
                   num_stages=1)
        return cfg if split is None else cfg | {"split_k": split}

    def dot(rows, block_k, stages, warps=4, split=None):
        cfg = dict(use_dot=True, block_n=rows // halves, block_k=block_k, num_stages=stages, num_warps=warps)
        return cfg if split is None else cfg | {"split_k": split}

    if fp8:  # tensor-core steps of at most 128 columns: one scale column each
        dots = [dot(32, 128, 6), dot(16, 128, 8), dot(32, 128, 4), dot(32, 128, 8), dot(64, 128, 4), dot(64, 128, 6),
                dot(32, 64, 8), dot(64, 128, 4, warps=8), dot(32, 128, 6, split=2)]
    else:
        dots = [dot(16, 256, 4), dot(16, 256, 3), dot(16, 512, 3), dot(16, 128, 5), dot(32, 256, 4), dot(32, 128, 4),
                dot(64, 256, 3), dot(64, 128, 4), dot(16, 256, 4, split=2)]
    if M > 1:
        return dots
    regs = [reg(8, 4, 2), reg(8, 4, 1), reg(8, 4, 4), reg(16, 4, 1), reg(4, 4, 2), reg(8, 2, 2), reg(16, 2, 2),
            reg(8, 8, 1), reg(8, 4, 2, split=2)]
    return regs + dots


def sweep(results: list, dtypes: list[str], rows: list[int], budget_s: float) -> dict:
    """For each dtype, M in `rows` and shape, graph-time every config (and, in bf16, cuBLAS); print the best per
    (shape, M) and what a decode step's linears would take with the best call of each shape instead of the
    defaults. Returns the best call per (dtype, M, shape) for `decode_step`."""
    deadline = time.monotonic() + budget_s
    best_calls: dict = {}
    for dtype in dtypes:
        fp8 = dtype == "fp8"
        for M in rows:
            step_default = step_best = step_cublas = 0.0
            for name, (N, K, act) in SHAPES.items():
                if (fp8 and name == "lm_head") or name == "gate_up_proj":  # the step runs gate_up fused
                    continue
                if time.monotonic() > deadline:
                    print(f"  sweep budget spent: stopped before {dtype} {name} M={M}", flush=True)
                    return
                sets = weight_sets(N, K, fp8)
                x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
                ref = linear_small_m_reference(x, sets[0][0], weight_scale_inv=sets[0][1], activation=act)
                default_t = graph_us(skinny_fn(act), x, sets)
                best_t, best_cfg, best_calls[(dtype, M, name)] = default_t, "default", skinny_fn(act)
                cublas_t = None if fp8 else graph_us(cublas_fn(act), x, sets)
                if cublas_t is not None and cublas_t < best_t:
                    best_t, best_cfg, best_calls[(dtype, M, name)] = cublas_t, "cuBLAS", cublas_fn(act)
                for cfg in sweep_grid(M, N // (2 if act else 1), K, fp8, act is not None):
                    row = {"sweep": True, "dtype": dtype, "shape": name, "M": M, "config": cfg,
                           "default_graph_us": default_t}
                    try:
                        row["rel_err"] = rel_err(skinny_fn(act, **cfg)(x, sets[0]), ref)
                        row["graph_us"] = graph_us(skinny_fn(act, **cfg), x, sets) if row["rel_err"] < 1e-2 else None
                    except Exception as e:  # e.g. out of shared memory: record and go on
                        row["graph_us"], row["error"] = None, str(e).splitlines()[0][:160]
                    results.append(row)
                    if row["graph_us"] is not None and row["graph_us"] < best_t:
                        best_t, best_cfg, best_calls[(dtype, M, name)] = row["graph_us"], cfg, skinny_fn(act, **cfg)
                weight = 1 if name == "lm_head" else LAYERS
                step_default, step_best = step_default + weight * default_t, step_best + weight * best_t
                step_cublas += weight * (cublas_t or 0.0)
                vs = "" if cublas_t is None else f"; cuBLAS {cublas_t:.1f} us"
                print(f"best {dtype} {name:13s} M={M}: {best_t:8.1f} us ({100 * floor_us(M, N, K, fp8, act) / best_t:.0f}%"
                      f" of floor; default {default_t:.1f} us{vs})  {best_cfg}", flush=True)
                del sets
                torch.cuda.empty_cache()
            lm = "" if not fp8 else " (lm_head not included)"
            vs = "" if fp8 else f", cuBLAS {step_cublas / 1e3:.3f} ms"
            print(f"  {dtype} M={M} step linears{lm}: defaults {step_default / 1e3:.3f} ms, best per shape "
                  f"{step_best / 1e3:.3f} ms{vs}", flush=True)
    return best_calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="sweep launch configs per shape")
    parser.add_argument("--fp8", action="store_true", help="tables and sweep for fp8 weights only")
    parser.add_argument("--bf16", action="store_true", help="tables and sweep for bf16 weights only")
    parser.add_argument("--sweep-s", type=float, default=120.0, help="time budget of the sweep, seconds")
    parser.add_argument("--no-step", action="store_true", help="skip the decode-step graph")
    parser.add_argument("--rows", default="1,4,8", help="comma list of M (rows of x) to time, at most gemv.MAX_ROWS")
    args = parser.parse_args()
    rows = [int(m) for m in args.rows.split(",")]
    dtypes = [d for d, on in (("bf16", args.bf16), ("fp8", args.fp8)) if on] or ["bf16", "fp8"]
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    results: list[dict] = []
    step: dict = {}
    bench_table(results, dtypes, rows)
    best = sweep(results, dtypes, rows, args.sweep_s) if args.sweep else {}
    if not args.no_step:
        decode_step(step, dtypes, rows, best)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gemv.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results, "decode_step": step}, f, indent=1)


if __name__ == "__main__":
    main()
