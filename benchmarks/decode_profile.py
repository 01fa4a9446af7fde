"""Where a decode step's time goes, at real size with dummy weights: GPU graph replay vs the engine's host work.

    python benchmarks/decode_profile.py [--batch 1,64] [--prompt 1412] [--kernels] [--quantization fp8]
        [--kv-cache-dtype fp8_e4m3]

For each batch size: the CUDA-graph replay alone (events, median), then engine.step() wall time split into
schedule / model runner (incl. the sampled ids' device->host copy) / token bookkeeping + detokenization.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time

import torch

from cuda_timing import median_ms

from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.engine.sampling_params import SamplingParams
from stepserve.testing import real_dummy_checkpoint


def replay_ms(engine: Engine, bs: int) -> float:
    graphs = engine.runner.graphs
    padded = next(s for s in graphs.sizes if s >= bs)
    return median_ms(graphs.graphs[padded].replay, 50)


def kernel_table(engine: Engine, bs: int, replays: int = 10, top: int = 25) -> list[dict]:
    """GPU time per kernel name in one graph replay (torch.profiler over `replays` replays): where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    graphs = engine.runner.graphs
    g = graphs.graphs[next(s for s in graphs.sizes if s >= bs)]
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(ev.name, [0.0, 0])
            a[0] += ev.device_time_total
            a[1] += 1
    rows = sorted(({"kernel": k[:90], "us_per_step": v[0] / replays, "calls_per_step": v[1] / replays}
                   for k, v in agg.items()), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"batch {bs}: kernels sum to {total:.1f} us per replay over {sum(r['calls_per_step'] for r in rows):.0f} "
          "launches")
    for r in rows[:top]:
        print(f"  {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f} x  {r['kernel']}")
    return rows


def profile_steps(engine: Engine, bs: int, prompt_len: int, steps: int = 64, cprofile: bool = False) -> dict:
    # No sequence may finish before the timed steps end (the first ones decode while the last prefill): the
    # replays that follow read the last step's inputs, and a smaller last batch leaves stale rows (-1 ids).
    params = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    for i in range(bs):
        ids = [(7 * i + j) % 800 + 10 for j in range(prompt_len)]
        engine.add_request(f"p{bs}-{i}", ids, [], params)
    while any(s.is_prefilling or not s.output_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    parts = {"schedule": [], "run": [], "bookkeeping": [], "step": []}
    sched, runner = engine.scheduler, engine.runner
    orig_schedule, orig_run = sched.schedule, runner.run

    def timed(name, fn):
        def call(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            parts[name].append((time.perf_counter() - t) * 1e3)
            return out
        return call

    sched.schedule, runner.run = timed("schedule", orig_schedule), timed("run", orig_run)
    profiler = cProfile.Profile() if cprofile else None
    for _ in range(steps):
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        engine.step()
        if profiler:
            profiler.disable()
        parts["step"].append((time.perf_counter() - t) * 1e3)
    sched.schedule, runner.run = orig_schedule, orig_run
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    for rid in list(engine.seqs):
        engine.abort(rid)
    med = {k: statistics.median(v) for k, v in parts.items() if v}
    med["bookkeeping"] = med["step"] - med["schedule"] - med["run"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=1412)
    ap.add_argument("--cprofile", action="store_true", help="print the host functions' own time (largest batch)")
    ap.add_argument("--compare-linear", action="store_true",
                    help="also time the graph replays with cuBLAS for the decode linears instead of the skinny kernel")
    ap.add_argument("--kernels", action="store_true", help="per-kernel GPU time of one graph replay (torch.profiler)")
    ap.add_argument("--quantization", default=None, help="fp8: block-fp8 decoder linears")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8_e4m3")
    args = ap.parse_args()
    engine = Engine(EngineConfig(model=str(real_dummy_checkpoint("/tmp/step3-vl-10b-dummy")), load_format="dummy",
                                 context_length=32768, quantization=args.quantization,
                                 kv_cache_dtype=args.kv_cache_dtype))
    rows = []
    sizes = [int(b) for b in args.batch.split(",")]
    for bs in sizes:
        steps = profile_steps(engine, bs, args.prompt, cprofile=args.cprofile and bs == sizes[-1])
        row = {"batch": bs, "graph_replay_ms": replay_ms(engine, bs), **steps}
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        if args.kernels:
            row["kernels"] = kernel_table(engine, bs)
        rows.append(row)
    if args.compare_linear:
        from stepserve.layers.dispatch import register_kernel

        register_kernel("linear", None)
        engine.runner.capture_graphs(engine.context_length)
        for row in rows:
            row["graph_replay_ms_cublas"] = replay_ms(engine, row["batch"])
            print(json.dumps({"batch": row["batch"], "graph_replay_ms_cublas": round(row["graph_replay_ms_cublas"], 3)}))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_profile.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
