"""What each part of the batch-1 decode step costs: graph replays with a part skipped or configured differently.

    python benchmarks/decode_parts.py [--quantization fp8] [--prompt 1412] [--batch 1] [--variants a,b]

Skipping a part gives wrong outputs; only the replay time matters: the difference to the baseline is what that
part costs inside the real step, PDL overlap included (a kernel micro-benchmark cannot show that). Each variant
recaptures the graphs, then runs real steps (eager prefill with every kernel) so the replay attends over a
real context: a fresh capture's static inputs are empty sequences.
"""

import argparse
import json

from decode_profile import profile_steps, replay_ms

from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.kernels import decode_attention, qk_norm_rope_attend
from stepserve.kernels.paged_attention import StepKV
from stepserve.layers.dispatch import _KERNELS, register_kernel
from stepserve.testing import real_dummy_checkpoint


def decode_with(**options):
    """`qk_norm_rope_attend` whose decode kernel runs with `options` (num_splits, block_n, num_warps, ...)."""
    def attend(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, kv_cache, ctx, scale):
        if ctx.is_decode:
            step_kv = StepKV(k, v, q_weight, k_weight, eps, positions, cos_sin_cache)
            return decode_attention(q, kv_cache, ctx, scale, step_kv=step_kv, **options)
        return qk_norm_rope_attend(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, kv_cache, ctx, scale)
    return attend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--prompt", type=int, default=1412)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variants", default="", help="comma list of variant names to run (default: all)")
    args = ap.parse_args()
    engine = Engine(EngineConfig(model=str(real_dummy_checkpoint("/tmp/step3-vl-10b-dummy")), load_format="dummy",
                                 context_length=32768, quantization=args.quantization))
    kernels = {name: _KERNELS[name] for name in ("qk_norm_rope_attend", "rms_norm", "fused_add_rms_norm")}
    variants = {
        "baseline": {},
        "rope + store in their own kernel": {"qk_norm_rope_attend": None},  # the layer's two-step path
        "no attention (rope + store + split kernel + reduce)": {"qk_norm_rope_attend": lambda q, *a: q},
        "no norms": {"rms_norm": lambda x, w, eps: x, "fused_add_rms_norm": lambda x, r, w, eps: (x, r)},
        "attention: 16 splits": {"qk_norm_rope_attend": decode_with(num_splits=16)},
        "attention: 128 splits": {"qk_norm_rope_attend": decode_with(num_splits=128)},
        "attention: 96 splits": {"qk_norm_rope_attend": decode_with(num_splits=96)},
        "attention: 16-key blocks": {"qk_norm_rope_attend": decode_with(block_n=16)},
        "attention: 32-key blocks": {"qk_norm_rope_attend": decode_with(block_n=32)},
        "attention: 1 stage": {"qk_norm_rope_attend": decode_with(num_stages=1)},
        "attention: 1 stage + 32-key blocks": {"qk_norm_rope_attend": decode_with(num_stages=1, block_n=32)},
        "attention: 1 stage + 2 warps": {"qk_norm_rope_attend": decode_with(num_stages=1, num_warps=2)},
        "attention: 64-key blocks + 2 stages": {"qk_norm_rope_attend": decode_with(num_stages=2, block_n=64)},
        "baseline again": {},
    }
    if args.variants:
        variants = {name: variants[name] for name in args.variants.split(",")}
    for name, swap in variants.items():
        for kernel, fn in kernels.items():
            register_kernel(kernel, swap.get(kernel, fn))
        engine.runner.capture_graphs(engine.context_length)
        for kernel, fn in kernels.items():  # the real kernels again for the eager prefill
            register_kernel(kernel, fn)
        profile_steps(engine, args.batch, args.prompt, steps=4)
        print(json.dumps({"quantization": args.quantization, "variant": name, "batch": args.batch,
                          "replay_ms": round(replay_ms(engine, args.batch), 3)}), flush=True)


if __name__ == "__main__":
    main()
