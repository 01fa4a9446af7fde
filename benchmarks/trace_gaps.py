"""Where the GPU sat idle in a server trace (/start_profile ... /stop_profile), and what the host did meanwhile.

    python3 benchmarks/trace_gaps.py TRACE.json [--min-gap-us 20] [--json OUT.json]

GPU busy time is the union of kernels, copies and memsets; a gap is a stretch with none of them. Each gap is
split over the engine's host labels (schedule, launch, wait, collect, deliver) that overlap it; the rest is
"unlabelled" (the engine loop between labels, or the GIL held by another thread). Also prints the labels' host
durations, the CUDA runtime calls that held the host longest inside `launch` (a synchronizing call there stops
the host from queueing the step's remaining work while the GPU drains), the kernels that took the most GPU
time, and the kernel time of each kind of step: a step's kernels are those its `launch` queued (matched by
correlation id), and a step that ran a vision attention kernel (cuDNN / flash SDPA) is a "vision" step (the tower,
with the prefill and the decodes beside it), any other a "text" step. Kernel times add up PDL overlaps twice (a
kernel launched early waits inside its predecessor's tail); the busy time above does not.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_LABELS = {"schedule", "launch", "wait", "collect", "deliver"}  # the engine's (stepserve/engine/profiler.py)
VISION_ATTENTION = "sdpa"  # cuDNN's and FlashAttention's SDPA kernel names hold it; the decoder's kernels do not


def busy_segments(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals, sorted."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def gaps_by_label(segments: list[tuple[float, float]], labels: list[tuple[str, float, float]],
                  min_gap: float) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """Idle time (us) between busy segments, split over the host labels overlapping it; and the gaps."""
    gaps = [(a[1], b[0]) for a, b in zip(segments, segments[1:]) if b[0] - a[1] >= min_gap]
    split: dict[str, float] = defaultdict(float)
    labels = sorted(labels, key=lambda x: x[1])
    for start, end in gaps:
        covered = 0.0
        for name, ls, le in labels:
            if ls >= end:
                break
            overlap = min(end, le) - max(start, ls)
            if overlap > 0:
                split[name] += overlap
                covered += overlap
        split["unlabelled"] += max(0.0, (end - start) - covered)
    return dict(split), gaps


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def analyze(events: list[dict], min_gap: float) -> dict:
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    segments = busy_segments(gpu)
    window = segments[-1][1] - segments[0][0]
    busy = sum(b - a for a, b in segments)
    host = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"] in HOST_LABELS]
    split, gaps = gaps_by_label(segments, host, min_gap)
    durations: dict[str, list[float]] = defaultdict(list)
    for name, a, b in host:
        durations[name].append(b - a)
    launches = sorted((a, b) for name, a, b in host if name == "launch")
    starts = [a for a, _ in launches]
    runtime: dict[str, list[float]] = defaultdict(list)
    step_of = {}  # correlation id of a runtime call inside a launch -> that launch's index
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] < launches[i][1]:
                runtime[e["name"]].append(e["dur"])
                step_of[e["args"].get("correlation")] = i
    kernels: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            kernels[e["name"][:90]] += e["dur"]
    step_kernels: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel" and e["args"].get("correlation") in step_of:
            step_kernels[step_of[e["args"]["correlation"]]][e["name"][:60]] += e["dur"]
    kinds: dict[str, dict] = {}
    for per_kernel in step_kernels.values():
        vision = any(VISION_ATTENTION in name for name in per_kernel)
        kind = kinds.setdefault("vision" if vision else "text", {"steps": 0, "kernel_ms": 0.0,
                                                                 "by_kernel": defaultdict(float)})
        kind["steps"] += 1
        for name, us in per_kernel.items():
            kind["kernel_ms"] += us / 1e3
            kind["by_kernel"][name] += us / 1e3
    for kind in kinds.values():
        kind["by_kernel"] = dict(sorted(kind["by_kernel"].items(), key=lambda kv: -kv[1])[:8])
    return {
        "window_ms": window / 1e3, "gpu_busy_ms": busy / 1e3, "gpu_busy_fraction": busy / window,
        "gaps": len(gaps), "gap_ms": sum(b - a for a, b in gaps) / 1e3,
        "largest_gaps_ms": sorted(((b - a) / 1e3 for a, b in gaps), reverse=True)[:10],
        "gap_ms_by_label": {k: v / 1e3 for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
        "host_labels_ms": {k: {"count": len(v), "mean": sum(v) / len(v) / 1e3, "p50": percentile(v, 0.5) / 1e3,
                               "p90": percentile(v, 0.9) / 1e3, "max": max(v) / 1e3, "total": sum(v) / 1e3}
                           for k, v in durations.items()},
        "launch_runtime_calls_ms": {k: {"count": len(v), "total": sum(v) / 1e3, "max": max(v) / 1e3}
                                    for k, v in sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:12]},
        "top_kernels_ms": {k: v / 1e3 for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:25]},
        "steps": kinds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--min-gap-us", type=float, default=20.0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    with open(args.trace) as f:
        report = analyze(json.load(f)["traceEvents"], args.min_gap_us)
    print(f"window {report['window_ms']:.1f} ms, GPU busy {report['gpu_busy_ms']:.1f} ms "
          f"({100 * report['gpu_busy_fraction']:.1f} %), {report['gaps']} gaps >= {args.min_gap_us:g} us "
          f"= {report['gap_ms']:.1f} ms; largest {', '.join(f'{g:.2f}' for g in report['largest_gaps_ms'])}")
    print("idle ms by host label: " + ", ".join(f"{k} {v:.1f}" for k, v in report["gap_ms_by_label"].items()))
    print(f"{'label':<10} {'count':>6} {'mean':>8} {'p50':>8} {'p90':>8} {'max':>8} {'total':>9}  (host ms)")
    for name, d in sorted(report["host_labels_ms"].items()):
        print(f"{name:<10} {d['count']:>6} {d['mean']:>8.2f} {d['p50']:>8.2f} {d['p90']:>8.2f} {d['max']:>8.2f} "
              f"{d['total']:>9.1f}")
    print("CUDA runtime calls inside launch (host ms):")
    for name, d in report["launch_runtime_calls_ms"].items():
        print(f"  {name:<40} count {d['count']:>7} total {d['total']:>9.1f} max {d['max']:>8.2f}")
    print("top kernels (GPU ms):")
    for name, ms in report["top_kernels_ms"].items():
        print(f"  {ms:9.1f}  {name}")
    for kind, d in report["steps"].items():
        print(f"{kind} steps: {d['steps']}, kernels {d['kernel_ms']:.1f} ms ({d['kernel_ms'] / d['steps']:.2f} per step); "
              "per step: " + ", ".join(f"{name} {ms / d['steps']:.2f}" for name, ms in d["by_kernel"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
