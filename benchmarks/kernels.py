"""Times the Triton kernels at the seed's shapes (Qwen3-8B decoder, 2 x 720p images + 128 text tokens, so
contexts of ~1.5k-2.5k) against their floors and the torch paths they replace.

    python benchmarks/kernels.py            # table on stdout; JSON in $OUT/kernels.json when OUT is set
    python benchmarks/kernels.py --quick    # no block-size sweeps
    python benchmarks/kernels.py --fusions  # only the fused norm + rope + KV store vs the kernels it replaces
    python benchmarks/kernels.py --pdl-chain  # only the batch-1 decode chain with PDL off vs on
    python benchmarks/kernels.py --mixed      # only a mixed step's attention: its decodes split off or not
    python benchmarks/kernels.py --extend     # only the extend kernel's launch configs on the seed's prefill shapes

Floors use the measured ceilings of docs/performance (3.0 TB/s copy, 782 TFLOP/s bf16): bytes are each
input read once and each output written once. "cold" times are triton.testing.do_bench medians (L2 flushed
before each call); "graph" times replay a CUDA graph of many calls over rotating input sets (> 4 x L2), as a
decode step's graph runs them; --mixed sums the profiler's kernel times (`kernel_us`). Every variant is checked
against the default before it is timed. Kernels launch
with PDL where the device has it (stepserve.kernels.pdl), as the server runs them; STEPSERVE_PDL=0 turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import os

import torch
import torch.nn.functional as F
import triton

from stepserve.kernels import (decode_attention, extend_attention, fused_add_rms_norm, qk_norm_rope,
                               qk_norm_rope_store_kv, rms_norm, silu_and_mul)
from stepserve.kernels.paged_attention import StepKV, default_num_splits
from stepserve.layers import activation as act_ref
from stepserve.layers import norm as norm_ref
from stepserve.layers import rotary as rope_ref
from stepserve.layers.attention import build_context, paged_attention_reference, store_kv

BANDWIDTH, BF16_FLOPS = 3.0e12, 782e12
HIDDEN, INTER, HQ, HKV, D, LAYERS = 4096, 12288, 32, 8, 128, 36
SCALE = D ** -0.5
DEV = "cuda"
ROTATE_BYTES = 256 << 20


def cold_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def kernel_us(fn, calls: int = 10) -> float:
    """GPU kernel time per call of fn: the profiler's sum over its kernels, with PDL off (a kernel launched with
    PDL starts early, and its duration would include its wait for the one before). For eager paths, whose event
    timings measure the host's launches once a call's GPU work is short."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with pdl_setting(False):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / calls


def graph_us(fns) -> float:
    """Median per-call time of a CUDA graph that calls `fns` round robin (distinct inputs defeat the L2).

    Every fn runs once first, so that all the kernel specializations its inputs need are compiled: one compiled
    inside do_bench_cudagraph's eager timing estimate makes the estimate seconds long, the graph then holds a
    single call, and its replay times the graph launch (~20 us) rather than the kernels.
    """
    for fn in fns:
        fn()
    cycle = itertools.cycle(fns)
    return triton.testing.do_bench_cudagraph(lambda: next(cycle)(), rep=100, return_mode="median") * 1e3


def n_sets(bytes_per_call: float) -> int:
    return max(1, min(64, math.ceil(ROTATE_BYTES / bytes_per_call)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def paged_sets(q_lens, kv_lens, page_size, sets, kv_dtype=torch.bfloat16):
    """One q and `sets` contexts over disjoint, shuffled pages of one cache."""
    per_set = [(kv + page_size - 1) // page_size for kv in kv_lens]
    total = sum(per_set) * sets
    kv_cache = torch.randn(2, total, page_size, HKV, D, device=DEV).to(kv_dtype)
    perm = torch.randperm(total).tolist()
    ctxs, i = [], 0
    for _ in range(sets):
        tables = []
        for n in per_set:
            tables.append(perm[i:i + n])
            i += n
        ctxs.append(build_context(q_lens, kv_lens, tables, page_size, device=DEV,
                                  kv_scale=0.05 if kv_dtype != torch.bfloat16 else 1.0))
    q = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=torch.bfloat16)
    return q, kv_cache, ctxs


def row(results, kernel, shape, floor_us, t_cold, t_graph=None, base=None, base_name="", extra=None):
    best = min(t for t in (t_cold, t_graph) if t is not None)
    r = {"kernel": kernel, "shape": shape, "floor_us": floor_us, "cold_us": t_cold, "graph_us": t_graph,
         "floor_frac": floor_us / best, "baseline": base_name, "baseline_us": base, **(extra or {})}
    results.append(r)
    g = f"{t_graph:9.1f}" if t_graph is not None else " " * 9
    b = f"{base:9.1f} {base_name}" if base is not None else ""
    print(f"{kernel:14s} {shape:34s} {floor_us:8.1f} {t_cold:9.1f} {g} {100 * r['floor_frac']:6.0f}%  {b}",
          flush=True)


def attn_bytes(q_tokens, kv_tokens, kv_elt):
    return kv_tokens * HKV * D * 2 * kv_elt + 2 * q_tokens * HQ * D * 2


def bench_decode(results, batch, kv_len, page_size, kv_dtype=torch.bfloat16, capture_len=None):
    elt = torch.empty((), dtype=kv_dtype).element_size()
    nbytes = attn_bytes(batch, batch * kv_len, elt)
    q, kv_cache, ctxs = paged_sets([1] * batch, [kv_len] * batch, page_size, n_sets(nbytes), kv_dtype)
    splits = None
    if capture_len:  # what a CUDA graph captured for `capture_len` contexts runs
        splits = default_num_splits(batch, HKV, capture_len, torch.cuda.get_device_properties(0).multi_processor_count)
    out = decode_attention(q, kv_cache, ctxs[0], SCALE, num_splits=splits)
    ref = paged_attention_reference(q.float(), kv_cache, ctxs[0], SCALE)
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    t_cold = cold_us(lambda: decode_attention(q, kv_cache, ctxs[0], SCALE, num_splits=splits))
    t_graph = graph_us([lambda c=c: decode_attention(q, kv_cache, c, SCALE, num_splits=splits) for c in ctxs])
    # The dense torch path: SDPA over contiguous [B, Hkv, L, D] K/V (no paging), GQA broadcast.
    k = torch.randn(batch, HKV, kv_len, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qd = q.view(batch, HQ, 1, D)
    t_sdpa = cold_us(lambda: F.scaled_dot_product_attention(qd, k, v, scale=SCALE, enable_gqa=True))
    name = f"b{batch} kv{kv_len} p{page_size}" + (" fp8" if elt == 1 else "") + (
        f" splits@{capture_len}" if capture_len else "")
    row(results, "decode", name, nbytes / BANDWIDTH * 1e6, t_cold, t_graph, t_sdpa, "dense SDPA",
        {"GB/s": nbytes / (min(t_cold, t_graph) * 1e-6) / 1e9, "us_x36_layers": min(t_cold, t_graph) * LAYERS})


def bench_extend(results, q_lens, kv_lens, page_size, label):
    nbytes = attn_bytes(sum(q_lens), sum(kv_lens), 2)
    visible = sum(q * (kv - q) + q * (q + 1) // 2 for q, kv in zip(q_lens, kv_lens))
    flops = 4 * D * HQ * visible
    q, kv_cache, ctxs = paged_sets(q_lens, kv_lens, page_size, 1)
    ctx = ctxs[0]
    out = extend_attention(q, kv_cache, ctx, SCALE)
    ref = paged_attention_reference(q.float(), kv_cache, ctx, SCALE)
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)
    t = cold_us(lambda: extend_attention(q, kv_cache, ctx, SCALE))
    base, base_name = None, ""
    if all(a == b for a, b in zip(q_lens, kv_lens)) and len(set(q_lens)) == 1:  # fresh equal prefills
        qd = torch.randn(len(q_lens), HQ, q_lens[0], D, device=DEV, dtype=torch.bfloat16)
        kd = torch.randn(len(q_lens), HKV, q_lens[0], D, device=DEV, dtype=torch.bfloat16)
        base = cold_us(lambda: F.scaled_dot_product_attention(qd, kd, kd, is_causal=True, scale=SCALE,
                                                              enable_gqa=True))
        base_name = "dense causal SDPA"
    floor = max(flops / BF16_FLOPS, nbytes / BANDWIDTH) * 1e6
    row(results, "extend", label, floor, t, None, base, base_name, {"TFLOP/s": flops / (t * 1e-6) / 1e12})


def sweep(results, name, fn, default_out, grid):
    """Time every config in `grid` (dicts of kwargs for fn); a config that fails or disagrees is recorded."""
    for cfg in grid:
        try:
            out = fn(**cfg)
            err = rel_err(out, default_out)
            t = cold_us(lambda: fn(**cfg)) if err < 1e-2 else None
        except Exception as e:  # e.g. out of shared memory for a large tile: record and go on
            err, t = None, None
            cfg = {**cfg, "error": str(e).splitlines()[0][:120]}
        results.append({"kernel": name + " sweep", **cfg, "us": t, "rel_err_vs_default": err})
        print(f"  {name} {cfg}: {t if t is None else round(t, 1)} us  err {err}", flush=True)


def bench_elementwise(results):
    for T in (1, 64, 256, 4096):
        x = [torch.randn(T, HIDDEN, device=DEV, dtype=torch.bfloat16) for _ in range(n_sets(4 * T * HIDDEN))]
        res = [torch.randn_like(a) for a in x]
        w = torch.randn(HIDDEN, device=DEV, dtype=torch.bfloat16)
        nbytes = 2 * T * HIDDEN * 2 + HIDDEN * 2
        row(results, "rms_norm", f"T{T} H{HIDDEN}", nbytes / BANDWIDTH * 1e6, cold_us(lambda: rms_norm(x[0], w, 1e-6)),
            graph_us([lambda a=a: rms_norm(a, w, 1e-6) for a in x]),
            cold_us(lambda: norm_ref.rms_norm.reference(x[0], w, 1e-6)), "torch")
        row(results, "add_rms_norm", f"T{T} H{HIDDEN}", 2 * nbytes / BANDWIDTH * 1e6,
            cold_us(lambda: fused_add_rms_norm(x[0], res[0], w, 1e-6)),
            graph_us([lambda a=a, r=r: fused_add_rms_norm(a, r, w, 1e-6) for a, r in zip(x, res)]),
            cold_us(lambda: norm_ref.fused_add_rms_norm.reference(x[0], res[0], w, 1e-6)), "torch")

        qkv = [torch.randn(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16) for _ in x]
        qk = [(a[:, : HQ * D].view(T, HQ, D), a[:, HQ * D: (HQ + HKV) * D].view(T, HKV, D)) for a in qkv]
        pos = torch.randint(0, 4096, (T,), device=DEV)
        cache = rope_ref.rotary_cos_sin_cache(D, 40960, 1e6, device=DEV)
        qw, kw = torch.randn(D, device=DEV, dtype=torch.bfloat16), torch.randn(D, device=DEV, dtype=torch.bfloat16)
        nbytes = 2 * T * (HQ + HKV) * D * 2 + T * D * 4
        row(results, "qk_norm_rope", f"T{T} {HQ}+{HKV} heads", nbytes / BANDWIDTH * 1e6,
            cold_us(lambda: qk_norm_rope(*qk[0], qw, kw, 1e-6, pos, cache)),
            graph_us([lambda p=p: qk_norm_rope(*p, qw, kw, 1e-6, pos, cache) for p in qk]),
            cold_us(lambda: rope_ref.qk_norm_rope.reference(*qk[0], qw, kw, 1e-6, pos, cache)), "torch")

        gu = [torch.randn(T, 2 * INTER, device=DEV, dtype=torch.bfloat16) for _ in range(n_sets(6 * T * INTER))]
        nbytes = 3 * T * INTER * 2
        row(results, "silu_and_mul", f"T{T} I{INTER}", nbytes / BANDWIDTH * 1e6, cold_us(lambda: silu_and_mul(gu[0])),
            graph_us([lambda a=a: silu_and_mul(a) for a in gu]),
            cold_us(lambda: act_ref.silu_and_mul.reference(gu[0])), "torch")


def side_by_side(results, kernel, shape, old_name, old_us, new_name, new_us):
    saved = old_us - new_us
    results.append({"kernel": kernel, "shape": shape, old_name: old_us, new_name: new_us, "saved_us": saved})
    print(f"{kernel:14s} {shape:34s} {old_name} {old_us:7.2f} us   {new_name} {new_us:7.2f} us   "
          f"saved {saved:6.2f} us/layer = {saved * LAYERS:6.1f} us/step", flush=True)


def bench_rope_store(results):
    """qk_norm_rope then store_kv (a Triton kernel and two index_copy_, plus the fp8 conversion ops) vs the
    fused kernel, as graph replays."""
    cos_sin = rope_ref.rotary_cos_sin_cache(D, 40960, 1e6, device=DEV)
    qw, kw = torch.randn(D, device=DEV, dtype=torch.bfloat16), torch.randn(D, device=DEV, dtype=torch.bfloat16)
    for T in (1, 8, 64, 1536):
        for kv_dtype, kv_scale in ((torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.05)):
            sets = n_sets(T * (HQ + 2 * HKV) * D * 2 * 2)
            pages = triton.cdiv(T * sets, 16)
            cache = torch.zeros(2, pages, 16, HKV, D, device=DEV).to(kv_dtype)
            # One tensor per set, 16-byte aligned as the runner's slot mapping is: rows of one [sets, T] int64
            # tensor at T = 1 alternate 16- and 8-byte alignment, hence two specializations of the fused kernel.
            slots = [s.clone() for s in torch.randperm(pages * 16, device=DEV)[: T * sets].view(sets, T)]
            pos = torch.randint(0, 4096, (T,), device=DEV)
            inputs = []
            for i in range(sets):
                qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
                q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
                inputs.append((q.view(T, HQ, D), k.view(T, HKV, D), v.view(T, HKV, D), slots[i]))

            def old(q, k, v, s):
                qk_norm_rope(q, k, qw, kw, 1e-6, pos, cos_sin)
                store_kv(cache, k, v, s, kv_scale)

            def new(q, k, v, s):
                qk_norm_rope_store_kv(q, k, v, qw, kw, 1e-6, pos, cos_sin, cache, s, kv_scale)

            t_old = graph_us([lambda a=a: old(*a) for a in inputs])
            t_new = graph_us([lambda a=a: new(*a) for a in inputs])
            name = f"T{T} {'fp8' if kv_dtype != torch.bfloat16 else 'bf16'} cache"
            side_by_side(results, "rope+store", name, "norm_rope+store_kv", t_old, "fused", t_new)


@contextlib.contextmanager
def pdl_setting(on: bool):
    """Launch (and capture) the kernels with PDL on or off: stepserve.kernels.pdl reads STEPSERVE_PDL per launch."""
    before = os.environ.get("STEPSERVE_PDL")
    os.environ["STEPSERVE_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["STEPSERVE_PDL"]
        else:
            os.environ["STEPSERVE_PDL"] = before


def decode_chain(layers: int, kv_len: int, splits: int, kv_dtype: torch.dtype = torch.bfloat16,
                 fused: bool = False):
    """A batch-1 decode step's small kernels without its GEMVs: `layers` x [add_rms_norm, norm + rope + KV store,
    decode attention (split kernel + reduce when splits > 1)], each reading what the one before wrote (q is the
    norm's output, k and v slices of the residual, the attention output the next layer's input), so the chain
    is as dependent as the step's; `fused`: the rope and store inside the decode kernel (what Qwen3 runs).
    Returns (run, caches): run(x, residual), both [1, HIDDEN], returns the last (hidden, residual) and writes
    each layer's new K/V to the same slot of its cache."""
    page = 16
    pages = triton.cdiv(kv_len, page)
    kv_scale = 1.0 if kv_dtype == torch.bfloat16 else 0.05
    caches = [torch.randn(2, pages, page, HKV, D, device=DEV).to(kv_dtype) for _ in range(layers)]
    ctx = build_context([1], [kv_len], [torch.randperm(pages).tolist()], page, device=DEV, kv_scale=kv_scale)
    positions = torch.tensor([kv_len - 1], device=DEV)
    cos_sin = rope_ref.rotary_cos_sin_cache(D, 40960, 1e6, device=DEV)
    norm_w = torch.randn(layers, HIDDEN, device=DEV, dtype=torch.bfloat16)
    qk_w = torch.randn(layers, 2, D, device=DEV, dtype=torch.bfloat16)

    def run(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in range(layers):
            h, res = fused_add_rms_norm(x, res, norm_w[layer], 1e-6)
            kv = res.view(1, HQ, D)
            q, k, v = h.view(1, HQ, D), kv[:, :HKV], kv[:, HKV: 2 * HKV]
            if fused:
                step_kv = StepKV(k, v, qk_w[layer, 0], qk_w[layer, 1], 1e-6, positions, cos_sin)
                x = decode_attention(q, caches[layer], ctx, SCALE, step_kv=step_kv, num_splits=splits)
            else:
                q = qk_norm_rope_store_kv(q, k, v, qk_w[layer, 0], qk_w[layer, 1], 1e-6, positions, cos_sin,
                                          caches[layer], ctx.slot_mapping, kv_scale)
                x = decode_attention(q, caches[layer], ctx, SCALE, num_splits=splits)
            x = x.view(1, HIDDEN)
        return x, res

    return run, caches


def bench_pdl_chain(results):
    """The decode chain over 36 layers at b1 x kv1536 as one graph, PDL off vs on, with the splits of a graph
    captured for a 32k context (what the runner replays) and for the length itself; the rope and store in
    their own kernel and fused into the decode kernel."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits, fused in itertools.product((default_num_splits(1, HKV, 32768, sms),
                                            default_num_splits(1, HKV, 1536, sms)), (False, True)):
        run, _ = decode_chain(LAYERS, 1536, splits, fused=fused)
        x, res = (torch.randn(1, HIDDEN, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        us, outs = {}, {}
        for on in (False, True):
            with pdl_setting(on):
                outs[on] = [t.clone() for t in run(x, res)]
                us[on] = graph_us([lambda: run(x, res)]) / LAYERS
        assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True])), "PDL changed the result"
        kernels = 3 + (splits > 1) - fused
        side_by_side(results, "pdl chain", f"b1 kv1536 splits {splits}, {kernels} kernels", "PDL off", us[False],
                     "PDL on", us[True])


def bench_mixed(results):
    """A mixed step of the seed's throughput run (one 1439-token prefill after 95 decodes at kv 1900) through
    `qk_norm_rope_attend` (norm, rotation, store, attention), its decodes through the extend kernel with the
    prefill (as before MIN_MIXED_DECODES) or split off to the decode kernel, bf16 and fp8 caches."""
    # The module (the package re-exports its function `paged_attention` under the same name).
    paged_attention = importlib.import_module("stepserve.kernels.paged_attention")
    q_lens, kv_lens = [1] * 95 + [1439], [1900] * 95 + [1439]
    T = sum(q_lens)
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        _, kv_cache, (ctx,) = paged_sets(q_lens, kv_lens, 16, 1, kv_dtype)
        qkv = torch.randn(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
        q, k, v = (t.view(T, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))
        positions = torch.tensor([1899] * 95 + list(range(1439)), device=DEV)
        cos_sin = rope_ref.rotary_cos_sin_cache(D, 40960, 1e6, device=DEV)
        qw, kw = torch.randn(2, D, device=DEV, dtype=torch.bfloat16)
        # The kernels rotate q in place: every call starts from a copy of the same q (~8 us in both timings).
        run = lambda: paged_attention.qk_norm_rope_attend(q.clone(), k, v, qw, kw, 1e-6, positions, cos_sin,  # noqa: E731
                                                          kv_cache, ctx, SCALE)
        us, outs = {}, {}
        for split, threshold in (("one extend", 10**9), ("decodes split off", paged_attention.MIN_MIXED_DECODES)):
            saved, paged_attention.MIN_MIXED_DECODES = paged_attention.MIN_MIXED_DECODES, threshold
            try:
                outs[split] = run()
                us[split] = kernel_us(run)
            finally:
                paged_attention.MIN_MIXED_DECODES = saved
        err = rel_err(outs["decodes split off"], outs["one extend"])
        assert err < 1e-2, err
        side_by_side(results, "mixed step", f"1x1439 + 95 decodes kv1900 {str(kv_dtype)[6:]}", "one extend",
                     us["one extend"], "split", us["decodes split off"])


# The seed's prefill shapes (q_lens, kv_lens): the extend kernel's launch configs are chosen on these.
EXTEND_CASES = (([1439], [1439], "1x1439 prompt"), ([1439] * 2, [1439] * 2, "2x1439 prompts"),
                ([700], [1439], "700 after 739 cached"), ([1] * 20 + [1439], [1800] * 20 + [3239], "20 decodes + 1x1439"),
                ([200] * 8, [200] * 8, "8x200 prompts"))
EXTEND_CONFIGS = ((64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4),
                  (64, 128, 4, 3))  # (block_m, block_n, num_warps, num_stages); the first is the default


def bench_extend_configs(results):
    """Each launch config of EXTEND_CONFIGS on each of EXTEND_CASES, bf16 and fp8 caches."""
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for q_lens, kv_lens, label in EXTEND_CASES:
            q, kv_cache, ctxs = paged_sets(q_lens, kv_lens, 16, 1, kv_dtype)
            fn = lambda c=ctxs[0], **kw: extend_attention(q, kv_cache, c, SCALE, **kw)  # noqa: E731
            grid = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s) for bm, bn, w, s in EXTEND_CONFIGS]
            sweep(results, f"extend {label} {str(kv_dtype)[6:]}", fn, fn(), grid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the block-size sweeps")
    parser.add_argument("--fusions", action="store_true", help="only the fused rope + store vs the old kernels")
    parser.add_argument("--pdl-chain", action="store_true", help="only the b1 decode kernel chain, PDL off vs on")
    parser.add_argument("--mixed", action="store_true", help="only a mixed step's attention, split or not")
    parser.add_argument("--extend", action="store_true", help="only the extend kernel's launch configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    results: list[dict] = []
    if args.mixed or args.extend:
        (bench_mixed if args.mixed else bench_extend_configs)(results)
        write_json(results)
        return
    print("CUDA-graph replay, per layer:")
    if args.fusions or not args.pdl_chain:
        bench_rope_store(results)
    if args.pdl_chain or not args.fusions:
        bench_pdl_chain(results)
    if args.fusions or args.pdl_chain:
        write_json(results)
        return
    print(f"{'kernel':14s} {'shape':34s} {'floor us':>8s} {'cold us':>9s} {'graph us':>9s} {'floor%':>7s}  baseline us")

    for batch, kv_len in ((1, 1536), (1, 8192), (16, 2048), (64, 2048), (96, 1900), (100, 2560), (256, 2048)):
        bench_decode(results, batch, kv_len, 16)
    bench_decode(results, 1, 1536, 16, capture_len=32768)
    bench_decode(results, 64, 2048, 64)
    for batch, kv_len in ((64, 2048), (96, 1900)):  # (96, 1900): the seed throughput run's decode steps
        bench_decode(results, batch, kv_len, 16, kv_dtype=torch.float8_e4m3fn)

    bench_extend(results, [1536], [1536], 16, "prefill 1x1536")
    bench_extend(results, [8192], [8192], 16, "prefill 1x8192")
    bench_extend(results, [1536] * 4, [1536] * 4, 16, "prefill 4x1536")
    bench_extend(results, [2048], [6144], 16, "chunk 2048 after 4096 cached")
    bench_extend(results, [1536] + [1] * 99, [1536] + [2048] * 99, 16, "1 prefill 1536 + 99 decodes kv2k")

    bench_elementwise(results)

    if not args.quick:
        for batch, kv_len in ((1, 1536), (64, 2048)):
            q, kv_cache, ctxs = paged_sets([1] * batch, [kv_len] * batch, 16, 1)
            fn = lambda c=ctxs[0], **kw: decode_attention(q, kv_cache, c, SCALE, **kw)  # noqa: E731
            default = fn()
            grid = [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]
            grid += [dict(num_splits=n) for n in (1, 2, 4, 8, 16, 32, 64)]
            sweep(results, f"decode b{batch} kv{kv_len}", fn, default, grid)
        for q_lens, kv_lens, label in (([8192], [8192], "prefill 1x8192"),
                                       ([1536] + [1] * 99, [1536] + [2048] * 99, "1x1536 + 99 decodes")):
            q, kv_cache, ctxs = paged_sets(q_lens, kv_lens, 16, 1)
            fn = lambda c=ctxs[0], **kw: extend_attention(q, kv_cache, c, SCALE, **kw)  # noqa: E731
            default = fn()
            grid = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                    for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3)]
            sweep(results, f"extend {label}", fn, default, grid)
    write_json(results)


def write_json(results: list[dict]) -> None:
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
