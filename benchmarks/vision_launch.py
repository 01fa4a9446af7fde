"""Host time to launch the compiled vision tower vs its GPU time, and the same blocks replayed as a CUDA graph.

    python3 benchmarks/vision_launch.py [--images 1,2,3] [--kernels] [--quantize-vision]

When launching a step's vision work takes the host longer than the GPU takes to run it, the GPU waits: the
server's profile (benchmarks/trace_gaps.py) put most of its idle time inside the engine's `launch` label.
Per image count (1280x720 images: one view + six crops each): host ms to queue the whole encode (no sync) and
its GPU ms; the 47 blocks alone, eager-compiled and as one replayed CUDA graph (host and GPU ms), and the
largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

from cuda_timing import median_ms
from vision_tower import build_model, encode, make_inputs


def host_ms(fn, reps: int = 5) -> float:
    """Median ms the host spends queueing fn() (the GPU idle before each call)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def reset_and_replay(graph: torch.cuda.CUDAGraph, static: torch.Tensor, x: torch.Tensor) -> None:
    static.copy_(x)
    graph.replay()


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", default="1,2,3")
    p.add_argument("--kernels", action="store_true", help="install the Triton kernels as the server does")
    p.add_argument("--quantize-vision", action="store_true", help="the blocks' qkv and MLPs in fp8")
    args = p.parse_args()
    if args.kernels:
        from stepserve.kernels import install_triton_kernels

        install_triton_kernels()
    model, _ = build_model(args.quantize_vision)
    tower = model.vision_model
    tower.compile_blocks()
    rows = []
    for n in map(int, args.images.split(",")):
        inputs = make_inputs(n)
        for _ in range(2):
            encode(model, inputs)
        views, crops, _ = inputs
        x = torch.cat([tower._embed(views), tower._embed(crops)])
        seqs = [(views.shape[0], 52), (crops.shape[0], 36)]
        # The blocks update their input in place: each call gets a copy of x, the graph a static one reset first.
        want = tower._blocks(x.clone(), seqs)
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            tower._blocks(static, seqs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                got = tower._blocks(static, seqs)
        torch.cuda.current_stream().wait_stream(stream)
        replay = functools.partial(reset_and_replay, graph, static, x)
        replay()
        row = {"images": n, "encode_host_ms": host_ms(lambda: encode(model, inputs)),
               "encode_gpu_ms": median_ms(lambda: encode(model, inputs), 5),
               "blocks_host_ms": host_ms(lambda: tower._blocks(x.clone(), seqs)),
               "blocks_gpu_ms": median_ms(lambda: tower._blocks(x.clone(), seqs), 5),
               "graph_host_ms": host_ms(replay), "graph_gpu_ms": median_ms(replay, 5),
               "graph_max_abs_diff": float((got.float() - want.float()).abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del replay, graph, got
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "vision_launch.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
