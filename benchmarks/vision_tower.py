"""Vision tower + projector throughput for 1280x720 inputs (one 728 view + six 504 crops each) vs its FLOP floor.

Linear FLOPs per image: patches x layers x 2 x (4 w^2 + 2 w mlp); attention adds 4 x L^2 x w per view and
layer. Floor = FLOPs / 782 TFLOP/s (the measured bf16 GEMM ceiling). Timed with CUDA events, median of 5.
"""

import argparse
import json
import os

import torch

from stepserve.loader import init_dummy_weights
from stepserve.models.configs import Step3VLConfig
from stepserve.models.step3_vl_10b import Step3VL10BForCausalLM
from stepserve.testing import real_config

PEAK = 782e12


def flops_per_image(cfg) -> float:
    w, layers, mlp = cfg.width, cfg.layers, cfg.mlp_dim
    views = [52 * 52] + [36 * 36] * 6
    linear = sum(views) * layers * 2 * (4 * w * w + 2 * w * mlp)
    attention = sum(4 * n * n * w for n in views) * layers
    return linear + attention


def profile(model, views, crops) -> None:
    """Top CUDA kernels of one 2-image encode: where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.encode_images(views, crops, [6] * views.shape[0])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks, as the server does")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    config = Step3VLConfig.from_dict(real_config())
    with torch.device("cuda"):
        model = Step3VL10BForCausalLM(config, torch.bfloat16).eval()
    init_dummy_weights(model)
    if args.compile:
        model.vision_model.compile_blocks()
    results = []
    for images in (1, 2, 8):
        views = torch.randn(images, 3, 728, 728, device="cuda", dtype=torch.bfloat16)
        crops = torch.randn(images * 6, 3, 504, 504, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            model.encode_images(views, crops, [6] * images)
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model.encode_images(views, crops, [6] * images)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
        ms = sorted(times)[len(times) // 2]
        flops = flops_per_image(config.vision) * images
        if args.profile and images == 2:
            profile(model, views, crops)
        results.append({"compiled": args.compile, "images": images, "ms": ms, "images_per_s": images / ms * 1e3,
                        "tflops": flops / ms / 1e9, "floor_ms": flops / PEAK * 1e3})
        print(json.dumps(results[-1]))
    if os.environ.get("OUT"):
        name = "vision_compiled.json" if args.compile else "vision.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
