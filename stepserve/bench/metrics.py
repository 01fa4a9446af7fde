"""Serving-benchmark figures from recorded request events, and the report block.

Definitions follow SGLang's bench_serving so numbers can be compared side by side: percentiles use numpy's
default (linear) method, the peak figures bucket events into whole seconds from the earliest request start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class RequestRecord:
    """What one benchmark request measured. Times are seconds; `start_time` is a perf_counter reading."""

    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_len: int = 0
    prompt_len: int = 0
    text_prompt_len: int = 0
    vision_prompt_len: int = 0
    generated_text: str = ""
    error: str = ""


def _stats(values: list[float], percentiles: tuple[int, ...]) -> dict[str, float]:
    # SGLang reports 0 rather than NaN when nothing was measured (e.g. no streamed tokens).
    arr = np.asarray(values if values else [0.0], dtype=np.float64) * 1000.0
    out = {"mean": float(np.mean(arr)), "median": float(np.median(arr)), "std": float(np.std(arr))}
    for p in percentiles:
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = float(np.max(arr))
    return out


def _peaks(records: list[RequestRecord]) -> tuple[float, int]:
    """Most output chunks finished in one second, and most requests alive in one second."""
    done = [r for r in records if r.success]
    if not done:
        return 0.0, 0
    t0 = min(r.start_time for r in done)
    t_end = max(r.start_time + r.latency for r in done)
    n_buckets = int(math.ceil(t_end - t0)) + 1
    tokens = np.zeros(n_buckets)
    alive = np.zeros(n_buckets)
    for r in done:
        t = r.start_time + r.ttft
        for gap in [0.0, *r.itl]:
            t += gap
            bucket = int(t - t0)
            if 0 <= bucket < n_buckets:
                tokens[bucket] += 1
        first = int(r.start_time - t0)
        last = int(r.start_time + r.latency - t0)
        alive[first:min(last + 1, n_buckets)] += 1
    return float(tokens.max()), int(alive.max())


def summarize(records: list[RequestRecord], duration_s: float, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """All report figures (SGLang's JSON key names) from per-request records and the run's wall time.

    `count_tokens` re-tokenizes generated text for the "(retokenized)" total.
    """
    done = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_len for r in done)
    retokenized = sum(count_tokens(r.generated_text) for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    itls = [gap for r in done for gap in r.itl]
    ttft = _stats([r.ttft for r in done], (90, 95, 99))
    tpot = _stats(tpots, (90, 95, 99))
    itl = _stats(itls, (90, 95, 99))
    e2e = _stats([r.latency for r in done], (90, 95, 99))
    peak_tokens, peak_requests = _peaks(records)
    summary: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "total_input_tokens": total_input,
        "total_input_text_tokens": sum(r.text_prompt_len for r in done),
        "total_input_vision_tokens": sum(r.vision_prompt_len for r in done),
        "total_output_tokens": total_output,
        "total_output_tokens_retokenized": retokenized,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_input / duration_s,
        "output_throughput": total_output / duration_s,
        "total_throughput": (total_input + total_output) / duration_s,
        "concurrency": sum(r.latency for r in done) / duration_s,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
    }
    for name, stats in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e_latency", e2e)):
        for key in ("mean", "median", "std", "p90", "p95", "p99"):
            summary[f"{key}_{name}_ms"] = stats[key]
    summary["max_itl_ms"] = itl["max"]
    return summary


def _row(label: str, value: Any, fmt: str = "") -> str:
    # The value column is padded to 10 like SGLang's "{:<40} {:<10}" so the lines match byte for byte.
    return f"{label:<40} {format(value, fmt):<10}"


def format_report(summary: dict[str, Any], backend: str, request_rate: float, max_concurrency: int | None,
                  show_vision: bool) -> str:
    """The `Serving Benchmark Result` block, with the labels, order and alignment of SGLang's report."""
    s = summary
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
        _row("Backend:", backend),
        _row("Traffic request rate:", request_rate),
        _row("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _row("Successful requests:", s["completed"]),
        _row("Benchmark duration (s):", s["duration"], ".2f"),
        _row("Total input tokens:", s["total_input_tokens"]),
        _row("Total input text tokens:", s["total_input_text_tokens"]),
    ]
    if show_vision:
        lines.append(_row("Total input vision tokens:", s["total_input_vision_tokens"]))
    lines += [
        _row("Total generated tokens:", s["total_output_tokens"]),
        _row("Total generated tokens (retokenized):", s["total_output_tokens_retokenized"]),
        _row("Request throughput (req/s):", s["request_throughput"], ".2f"),
        _row("Input token throughput (tok/s):", s["input_throughput"], ".2f"),
        _row("Output token throughput (tok/s):", s["output_throughput"], ".2f"),
        _row("Peak output token throughput (tok/s):", s["max_output_tokens_per_s"], ".2f"),
        _row("Peak concurrent requests:", s["max_concurrent_requests"]),
        _row("Total token throughput (tok/s):", s["total_throughput"], ".2f"),
        _row("Concurrency:", s["concurrency"], ".2f"),
        "{s:{c}^{n}}".format(s="End-to-End Latency", n=50, c="-"),
        _row("Mean E2E Latency (ms):", s["mean_e2e_latency_ms"], ".2f"),
        _row("Median E2E Latency (ms):", s["median_e2e_latency_ms"], ".2f"),
        _row("P90 E2E Latency (ms):", s["p90_e2e_latency_ms"], ".2f"),
        _row("P99 E2E Latency (ms):", s["p99_e2e_latency_ms"], ".2f"),
        "{s:{c}^{n}}".format(s="Time to First Token", n=50, c="-"),
        _row("Mean TTFT (ms):", s["mean_ttft_ms"], ".2f"),
        _row("Median TTFT (ms):", s["median_ttft_ms"], ".2f"),
        _row("P99 TTFT (ms):", s["p99_ttft_ms"], ".2f"),
        "{s:{c}^{n}}".format(s="Time per Output Token (excl. 1st token)", n=50, c="-"),
        _row("Mean TPOT (ms):", s["mean_tpot_ms"], ".2f"),
        _row("Median TPOT (ms):", s["median_tpot_ms"], ".2f"),
        _row("P99 TPOT (ms):", s["p99_tpot_ms"], ".2f"),
        "{s:{c}^{n}}".format(s="Inter-Token Latency", n=50, c="-"),
        _row("Mean ITL (ms):", s["mean_itl_ms"], ".2f"),
        _row("Median ITL (ms):", s["median_itl_ms"], ".2f"),
        _row("P95 ITL (ms):", s["p95_itl_ms"], ".2f"),
        _row("P99 ITL (ms):", s["p99_itl_ms"], ".2f"),
        _row("Max ITL (ms):", s["max_itl_ms"], ".2f"),
        "=" * 50,
    ]
    return "\n".join(lines)
