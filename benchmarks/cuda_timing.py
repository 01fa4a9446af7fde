"""The benchmarks' one GPU timer: the median over repeated calls, each bracketed by CUDA events."""

import statistics

import torch


def median_ms(fn, reps: int, stream: torch.cuda.Stream | None = None) -> float:
    """Median ms of fn() over `reps` calls, events recorded on `stream` (default: the current stream)."""
    stream = stream or torch.cuda.current_stream()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
