"""Can the vision tower run beside decoding? Vision is compute-bound, decode at batch ~100 is memory-bound.

    python benchmarks/vision_overlap.py [--batch 96] [--prompt 1900] [--passes 6] [--steps 120]

At real size with dummy weights: one vision pass (two 1280x720 images: 2 views + 12 crops) and one decode
step (CUDA-graph replay at `--batch` sequences of `--prompt` tokens) timed alone, then `--passes` vision passes
and `--steps` decode steps queued together on two streams (each variant below), against running them one
after the other. `--attention` also times the vision attention shapes with head_dim 96 against 128 (zero-padded).
`--alone-sms` times a decode step and a vision pass each alone in a green context of so many SMs: how much of
its speed decode keeps on a few SMs (it is bound by memory, not by SMs) bounds what an SM split could gain.
`--split K` gives decode K SMs and vision the rest (two disjoint green contexts, made with the driver API), times
each alone there, then both together, and prints the request rate the seed's mix would reach with lanes split so.
"""

import argparse
import ctypes
import json
import os
import time

import torch
import torch.nn.functional as F

from cuda_timing import median_ms

from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.engine.sampling_params import SamplingParams
from stepserve.testing import real_dummy_checkpoint


def together(vision, decode, passes: int, steps: int, vs: torch.cuda.Stream, ds: torch.cuda.Stream) -> dict:
    """Queue `passes` vision passes on vs and `steps` decode steps on ds, interleaved on the host as an engine
    would (a pass, then its share of steps), from one start; when each stream ends."""
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    vs.wait_event(start)
    ds.wait_event(start)
    ends = {"vision": torch.cuda.Event(enable_timing=True), "decode": torch.cuda.Event(enable_timing=True)}
    for i in range(passes):
        with torch.cuda.stream(vs):
            vision()
        with torch.cuda.stream(ds):
            for _ in range(steps * (i + 1) // passes - steps * i // passes):
                decode()
    ends["vision"].record(vs)
    ends["decode"].record(ds)
    torch.cuda.synchronize()
    return {k: round(start.elapsed_time(e), 1) for k, e in ends.items()}


def green_stream(sms: int):
    """A stream whose kernels run on `sms` SMs only, and the green context that must outlive it."""
    from torch.cuda.green_contexts import GreenContext

    gc = GreenContext.create(sms, 0)
    if hasattr(gc, "Stream"):
        return gc.Stream(), gc
    gc.set_context()  # torch 2.10's API: a stream made while the green context is current belongs to it
    stream = torch.cuda.Stream()
    gc.pop_context()
    return stream, gc


def disjoint_streams(sms: int) -> tuple[torch.cuda.ExternalStream, torch.cuda.ExternalStream, list]:
    """Two streams on disjoint SMs of device 0: one on `sms` SMs, one on all the others; and the handles to keep.

    torch's GreenContext.create takes its SMs from the whole device each time, so two of them may share SMs; the
    driver's split returns a group and the remaining SMs, one green context each.
    """
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed: CUresult {result}")

    # CUdevResource is ~144 bytes (larger in newer drivers): generous zeroed buffers hold one each.
    whole, group, rest = (ctypes.create_string_buffer(4096) for _ in range(3))
    device = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    check(cuda.cuDeviceGetDevResource(device, whole, 1), "cuDeviceGetDevResource")  # 1: CU_DEV_RESOURCE_TYPE_SM
    groups = ctypes.c_uint(1)
    check(cuda.cuDevSmResourceSplitByCount(group, ctypes.byref(groups), whole, rest, 0, sms),
          "cuDevSmResourceSplitByCount")
    streams, keep = [], []
    for resource in (group, rest):
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check(cuda.cuDevResourceGenerateDesc(ctypes.byref(desc), resource, 1), "cuDevResourceGenerateDesc")
        check(cuda.cuGreenCtxCreate(ctypes.byref(ctx), desc, device, 1), "cuGreenCtxCreate")  # 1: default stream
        check(cuda.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, 1, 0), "cuGreenCtxStreamCreate")  # non-blocking
        streams.append(torch.cuda.ExternalStream(stream.value))
        keep.append(ctx)
    return streams[0], streams[1], keep


def attention_shapes(out: dict) -> None:
    """SDPA over the tower's sequences (views 2 x 2704, crops 12 x 1296 tokens, 16 heads): d 96 vs padded 128."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for count, length in ((2, 2704), (12, 1296)):
        flops = 4 * count * 16 * length * length * 96
        qkv = torch.randn(count * length, 3, 16, 96, device="cuda", dtype=torch.bfloat16)
        views = [x.unflatten(0, (count, length)).transpose(1, 2) for x in qkv.unbind(1)]
        padded = [F.pad(x, (0, 32)).contiguous() for x in views]
        dense = [x.contiguous() for x in views]
        for name, args, backend in (("d96 strided cudnn", views, SDPBackend.CUDNN_ATTENTION),
                                    ("d96 dense cudnn", dense, SDPBackend.CUDNN_ATTENTION),
                                    ("d96 dense flash", dense, SDPBackend.FLASH_ATTENTION),
                                    ("d128 padded cudnn", padded, SDPBackend.CUDNN_ATTENTION),
                                    ("d128 padded flash", padded, SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(*args, scale=96 ** -0.5), 20)
            except RuntimeError as e:
                print(f"{count}x{length} {name}: {str(e)[:80]}")
                continue
            out[f"attn {count}x{length} {name}"] = {"ms": round(ms, 3), "tflops_d96": round(flops / ms / 1e9, 1)}
            print(f"attention {count}x{length} {name}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s at d 96)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=1900)
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--green-sms", default="96,112,120", help="SMs for vision in a green context (0: skip)")
    ap.add_argument("--attention", action="store_true", help="also time SDPA at the tower's shapes, d 96 vs 128")
    ap.add_argument("--alone-sms", default="", help="SM counts: decode and vision each alone in such a green context")
    ap.add_argument("--split", default="", help="SM counts for decode, vision on the rest (disjoint); comma list")
    ap.add_argument("--prefill-ms", type=float, default=36.0, help="prefill per request on the whole GPU (seed mix)")
    ap.add_argument("--steps-per-request", type=float, default=5.53,
                    help="decode steps per request at --batch: 531 output tokens / 96 rows (seed mix)")
    args = ap.parse_args()
    out: dict = {}
    if args.attention:
        attention_shapes(out)
    engine = Engine(EngineConfig(model=str(real_dummy_checkpoint("/tmp/step3-vl-10b-dummy")), load_format="dummy",
                                 context_length=8192))
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"d{i}", [(7 * i + j) % 800 + 10 for j in range(args.prompt)], [], params)
    while any(s.is_prefilling or not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()  # the graph's staged inputs are now a decode step of every sequence
    torch.cuda.synchronize()
    graphs = engine.runner.graphs
    padded = next(s for s in graphs.sizes if s >= args.batch)
    graph = graphs.graphs[padded]
    model = engine.runner.model
    pixels = torch.randn(2, 3, 728, 728, device="cuda", dtype=torch.bfloat16)
    crops = torch.randn(12, 3, 504, 504, device="cuda", dtype=torch.bfloat16)

    @torch.inference_mode()
    def vision():
        model.encode_images(pixels, crops, [6, 6])

    vision()
    out["vision_ms"] = median_ms(vision, 5)
    torch.cuda.synchronize()
    t = time.perf_counter()
    vision()
    out["vision_enqueue_ms"] = round((time.perf_counter() - t) * 1e3, 2)  # host time to queue one pass
    out["decode_ms"] = median_ms(graph.replay, 30)
    serial = args.passes * out["vision_ms"] + args.steps * out["decode_ms"]
    out["serial_ms"] = round(serial, 1)
    print(json.dumps(out))

    def capture_on(stream) -> torch.cuda.CUDAGraph:
        """The decode step's graph captured on `stream`: a graph replays on the SMs it was captured on (the
        engine's used every SM whatever the stream: 15.7 ms in an 8-SM green context)."""
        with torch.cuda.stream(stream), torch.inference_mode():
            graphs._forward(padded)
            local = torch.cuda.CUDAGraph()
            with torch.cuda.graph(local, stream=stream):
                graphs._forward(padded)
        return local

    for sms in [int(s) for s in args.alone_sms.split(",") if s]:
        stream, gc = green_stream(sms)
        local = capture_on(stream)
        with torch.cuda.stream(stream):
            alone = {"decode_ms": median_ms(local.replay, 30), "vision_ms": median_ms(vision, 5)}
        out[f"alone in {sms} SMs"] = alone
        print(f"alone in a {sms}-SM green context: {json.dumps(alone)}")
        del local, gc
    serial_request = out["vision_ms"] + args.prefill_ms + args.steps_per_request * out["decode_ms"]
    for sms in [int(s) for s in args.split.split(",") if s]:
        ds, vs, handles = disjoint_streams(sms)
        local = capture_on(ds)
        res = {"decode_alone_ms": median_ms(local.replay, 30, ds), "vision_alone_ms": median_ms(vision, 5, vs)}
        # Together: both lanes busy for about the same time, so each one's rate is its rate beside the other.
        steps = max(1, round(args.passes * res["vision_alone_ms"] / res["decode_alone_ms"]))
        ends = together(vision, local.replay, args.passes, steps, vs, ds)
        res.update(decode_ms=round(ends["decode"] / steps, 2), vision_ms=round(ends["vision"] / args.passes, 1))
        # The seed's mix per request: a vision pass and a prefill on the vision lane (prefill scaled as vision is),
        # its share of decode steps on the decode lane; the busier lane sets the rate.
        vision_lane = res["vision_ms"] * (1 + args.prefill_ms / out["vision_ms"])
        decode_lane = args.steps_per_request * res["decode_ms"]
        res.update(vision_lane_ms=round(vision_lane, 1), decode_lane_ms=round(decode_lane, 1),
                   req_per_s=round(1e3 / max(vision_lane, decode_lane), 2), serial_req_per_s=round(1e3 / serial_request, 2))
        out[f"split {sms} SMs to decode"] = res
        print(f"decode on {sms} SMs, vision on the rest: {json.dumps(res)}")
        del local, handles
    variants = {"same priority": (torch.cuda.Stream(), torch.cuda.Stream()),
                "decode high priority": (torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1))}
    keep = []  # a green context is destroyed with its Python object
    for sms in [int(s) for s in args.green_sms.split(",") if int(s)]:
        try:
            vs, gc = green_stream(sms)
            keep.append(gc)
            variants[f"vision in a {sms}-SM green context"] = (vs, torch.cuda.Stream(priority=-1))
        except Exception as e:  # noqa: BLE001 - report whatever this torch / driver lacks and go on
            print(f"green context {sms}: {type(e).__name__}: {str(e)[:120]}")
    for name, (vs, ds) in variants.items():
        ends = together(vision, graph.replay, args.passes, args.steps, vs, ds)
        total = max(ends.values())
        out[name] = {**ends, "total_ms": total, "vs_serial": round(total / serial, 3)}
        print(f"{name}: {json.dumps(out[name])}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "vision_overlap.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
