"""The vision MLP's first linear + quick-GELU: cuBLAS then a fused pointwise kernel, against one Triton GEMM
whose epilogue applies bias and activation (`stepserve.kernels.linear_gelu`), over launch configs.

    python benchmarks/vision_gemm.py [--tokens 20960]

20960 tokens = two 1280x720 images (2 x 2704 view patches + 12 x 1296 crop patches). Prints ms and TFLOP/s.
"""

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from stepserve.kernels.linear_gelu import linear_gelu
from stepserve.layers.activation import quick_gelu


def timed(fn, reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


CONFIGS = [(128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 8),
           (256, 128, 64, 8, 3, 8), (128, 256, 32, 8, 4, 8), (128, 128, 128, 8, 3, 8), (128, 256, 64, 16, 3, 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20960)
    args = ap.parse_args()
    torch.manual_seed(0)
    m, k, n = args.tokens, 1536, 8960
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    out: dict = {}
    gelu = torch.compile(quick_gelu)
    ref = quick_gelu(F.linear(x.float(), w.float(), b.float()))
    h = F.linear(x, w, b)
    out["cublas linear ms"] = timed(lambda: F.linear(x, w, b))
    out["compiled quick_gelu ms"] = timed(lambda: gelu(h))
    out["cublas + gelu ms"] = timed(lambda: gelu(F.linear(x, w, b)))
    print(json.dumps({key: round(v, 3) for key, v in out.items()}),
          f"cuBLAS {flops / out['cublas linear ms'] / 1e9:.0f} TFLOP/s")
    for cfg in CONFIGS:
        try:
            y = linear_gelu(x, w, b, config=cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            ms = timed(lambda: linear_gelu(x, w, b, config=cfg))
            ms_plain = timed(lambda: linear_gelu(x, w, b, gelu=False, config=cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is reported and skipped
            print(cfg, type(e).__name__, str(e)[:100])
            continue
        out[str(cfg)] = {"ms": round(ms, 3), "no_gelu_ms": round(ms_plain, 3), "rel_err": err}
        print(f"{cfg}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), without GELU {ms_plain:.3f}, rel err {err:.2e}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "vision_gemm.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
