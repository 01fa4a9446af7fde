"""Decoder prefill at real size (Step3-VL-10B's Qwen3-8B-shaped decoder, dummy bf16 weights): tokens/s, TFLOP/s.

    python3 benchmarks/prefill.py [--cases 512,1439,2048,8192,4x2048,2048@6144] [--profile 8192]

Text-only prompts go through the paged model the way the engine runs a prefill step: one flat batch under a
ForwardContext, the Triton kernels installed (paged extend attention, norms, rope), logits for each
sequence's last token. Case "N": one sequence of N new tokens; "KxN": K sequences of N; "N@C": a chunk of N
new tokens after C cached ones (a later chunk of a chunked prefill). The cache holds random values, not zeros.
GPU time with CUDA events around the forward (its metadata is built before), median of 10 after 2 warm-ups.

FLOPs: 2 x new tokens x decoder-layer linear params, + 2 x sequences x lm_head params, + attention: per layer
4 x heads x head_dim x (keys each new token sees, causal). Against the 782 TFLOP/s bf16 GEMM ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from cuda_timing import median_ms

from stepserve.kernels import install_triton_kernels
from stepserve.layers.attention import build_context, forward_context
from stepserve.loader import init_dummy_weights
from stepserve.models.configs import TextConfig
from stepserve.models.qwen3 import Qwen3ForCausalLM
from stepserve.testing import attach_kv_cache, real_config
from vision_tower import PEAK, kernel_profile

PAGE_SIZE = 16
DEFAULT_CASES = "512,1439,2048,8192,4x2048,2048@6144"


def parse_case(case: str) -> list[tuple[int, int]]:
    """'KxN@C' -> K sequences of (N new tokens, C cached)."""
    count, _, rest = case.rpartition("x")
    new, _, cached = rest.partition("@")
    return [(int(new), int(cached or 0))] * int(count or 1)


def flops(cfg: TextConfig, seqs: list[tuple[int, int]]) -> tuple[float, float]:
    """(linear, attention) FLOPs of one prefill step over `seqs`."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layer_params = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    tokens = sum(new for new, _ in seqs)
    linear = 2 * tokens * layer_params * cfg.num_hidden_layers + 2 * len(seqs) * cfg.vocab_size * h
    keys = sum(new * cached + new * (new + 1) // 2 for new, cached in seqs)
    return linear, 4 * q * keys * cfg.num_hidden_layers


def build(cfg: TextConfig, num_pages: int) -> Qwen3ForCausalLM:
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg, torch.bfloat16).eval()
    init_dummy_weights(model)
    install_triton_kernels()
    attach_kv_cache(model, num_pages, PAGE_SIZE)
    for attn in model.attention_layers():
        attn.kv_cache.normal_()
    return model


def prepare(cfg: TextConfig, seqs: list[tuple[int, int]]):
    """Inputs of one step: ids, positions, ForwardContext (pages from 1 up, one run per sequence), last rows."""
    q_lens, kv_lens, tables, positions = [], [], [], []
    page = 1
    for new, cached in seqs:
        pages = -(-(new + cached) // PAGE_SIZE)
        tables.append(list(range(page, page + pages)))
        page += pages
        q_lens.append(new)
        kv_lens.append(new + cached)
        positions.extend(range(cached, cached + new))
    g = torch.Generator().manual_seed(len(positions))
    ids = torch.randint(0, cfg.vocab_size, (len(positions),), generator=g).cuda()
    last = torch.tensor(q_lens).cumsum(0).cuda() - 1
    return ids, torch.tensor(positions).cuda(), build_context(q_lens, kv_lens, tables, PAGE_SIZE, "cuda"), last


def step(model: Qwen3ForCausalLM, ids, positions, ctx, last) -> torch.Tensor:
    with forward_context(ctx):
        hidden = model(ids, positions)
    return model.compute_logits(hidden[last])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--profile", default="", help="a case to print the kernel-time profile of (e.g. 8192)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = TextConfig.from_dict(real_config()["text_config"])
    cases = args.cases.split(",")
    num_pages = 1 + max(sum(-(-(n + c) // PAGE_SIZE) for n, c in parse_case(case)) for case in cases)
    model = build(cfg, num_pages)
    rows = []
    with torch.inference_mode():
        for case in cases:
            seqs = parse_case(case)
            inputs = prepare(cfg, seqs)
            run = lambda: step(model, *inputs)  # noqa: E731
            for _ in range(2):
                run()
            ms = median_ms(run, 10)
            linear, attention = flops(cfg, seqs)
            tokens = sum(new for new, _ in seqs)
            rows.append({"case": case, "tokens": tokens, "ms": ms, "tokens_per_s": tokens / ms * 1e3,
                         "tflops": (linear + attention) / ms / 1e9, "attention_share": attention / (linear + attention),
                         "pct_peak": 100 * (linear + attention) / PEAK / ms * 1e3,
                         "floor_ms": (linear + attention) / PEAK * 1e3})
            print(json.dumps(rows[-1]), flush=True)
            if case == args.profile:
                kernel_profile(run, f"profile of prefill {case}")
    print(f"\ndecoder prefill, bf16, dummy weights, Triton kernels; peak {PEAK / 1e12:.0f} TFLOP/s")
    print(f"{'case':<10} {'tokens':>6} {'ms':>8} {'floor ms':>8} {'tokens/s':>9} {'TFLOP/s':>7} {'% peak':>6} "
          f"{'attn FLOPs':>10}")
    for r in rows:
        print(f"{r['case']:<10} {r['tokens']:>6} {r['ms']:8.2f} {r['floor_ms']:8.2f} {r['tokens_per_s']:9.0f} "
              f"{r['tflops']:7.0f} {r['pct_peak']:6.1f} {100 * r['attention_share']:9.1f}%")
    print(f"prefill benchmark took {time.perf_counter() - t0:.0f} s")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
