"""The vision MLP's first linear + quick-GELU: cuBLAS then a fused pointwise kernel, against one Triton GEMM
whose epilogue applies bias and activation (`stepserve.kernels.linear_gelu`), over launch configs.

    python3 benchmarks/vision_gemm.py [--tokens 20960]

20960 tokens = two 1280x720 images (2 x 2704 view patches + 12 x 1296 crop patches). Prints ms and TFLOP/s.
"""

import argparse
import dataclasses
import json
import os

import torch
import torch.nn.functional as F

from cuda_timing import median_ms
from stepserve.kernels.linear_gelu import GemmConfig, linear_gelu
from stepserve.layers.activation import quick_gelu

C = GemmConfig


def timed(fn) -> float:
    fn()  # compiles and warms up outside the timing
    return median_ms(fn, 20)

CONFIGS = {
    "one tile per program, exact sigmoid": C(ctas_per_sm=0, fast_gelu=False, subtile=False, group_m=8),
    "persistent, group 8": C(group_m=8),
    "persistent": C(),
    "persistent, exact sigmoid": C(fast_gelu=False),
    "persistent, whole-tile store": C(subtile=False),
    "persistent, 4 stages": C(stages=4),
    "persistent, group 32": C(group_m=32),
    "persistent, warp-specialized": C(warp_specialize=True),
    "persistent, warp-specialized, 4 stages": C(warp_specialize=True, stages=4),
    "persistent, warp-specialized, whole-tile store": C(warp_specialize=True, subtile=False),
    "persistent, 4 stages, whole-tile store": C(stages=4, subtile=False),
    "persistent 256x128, warp-specialized": C(bm=256, bn=128, warp_specialize=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20960)
    args = ap.parse_args()
    torch.manual_seed(0)
    m, k, n = args.tokens, 1536, 8960
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    tflop = 2 * m * n * k / 1e12
    gelu = torch.compile(quick_gelu)
    ref = quick_gelu(F.linear(x.float(), w.float(), b.float()))
    h = F.linear(x, w, b)
    out: dict = {"tokens": m, "cublas linear ms": timed(lambda: F.linear(x, w, b)),
                 "compiled quick_gelu ms": timed(lambda: gelu(h)),
                 "cublas + gelu ms": timed(lambda: gelu(F.linear(x, w, b)))}
    print(json.dumps({key: round(v, 3) for key, v in out.items()}),
          f"cuBLAS {tflop / out['cublas linear ms'] * 1e3:.0f} TFLOP/s", flush=True)
    for name, cfg in CONFIGS.items():
        try:
            err = ((linear_gelu(x, w, b, config=cfg).float() - ref).norm() / ref.norm()).item()
            ms = timed(lambda: linear_gelu(x, w, b, config=cfg))
            ms_plain = timed(lambda: linear_gelu(x, w, b, gelu=False, config=cfg))
        except Exception as e:  # noqa: BLE001 - a config that does not build (shared memory, API) is reported
            print(f"{name}: {type(e).__name__} {str(e)[:160]}", flush=True)
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        out[name] = {"config": dataclasses.asdict(cfg), "ms": ms, "no_gelu_ms": ms_plain, "rel_err": err}
        print(f"{name}: {ms:.3f} ms ({tflop / ms * 1e3:.0f} TFLOP/s), without GELU {ms_plain:.3f} "
              f"({tflop / ms_plain * 1e3:.0f}), rel err {err:.2e}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "vision_gemm.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
