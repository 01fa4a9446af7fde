"""benchmarks/trace_gaps.py on a hand-made trace: idle time by host label, kernel time by kind of step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("trace_gaps", Path(__file__).parents[1] / "benchmarks" / "trace_gaps.py")
trace_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_gaps)


def x(cat, name, ts, dur, corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_kernels_are_counted_by_the_step_that_queued_them():
    events = [
        # step 0 queues a text step's two kernels; step 1 a vision step (an SDPA kernel among its three)
        x("user_annotation", "launch", 0, 10), x("cuda_runtime", "cudaLaunchKernel", 1, 1, 1),
        x("cuda_runtime", "cudaGraphLaunch", 2, 1, 2),
        x("user_annotation", "launch", 20, 10), x("cuda_runtime", "cudaLaunchKernel", 21, 1, 3),
        x("cuda_runtime", "cudaLaunchKernel", 22, 1, 4), x("cuda_runtime", "cudaLaunchKernel", 23, 1, 5),
        x("kernel", "_decode_kernel", 5, 10, 1), x("kernel", "nvjet_gemm", 15, 5, 2),
        # 100 us idle from 20 to 120: 10 of them inside the vision step's launch, the rest under no host label
        x("kernel", "nvjet_gemm", 120, 30, 3), x("kernel", "cudnn_sdpa_fprop", 150, 40, 4),
        x("kernel", "_linear_gelu_kernel", 190, 20, 5),
    ]
    report = trace_gaps.analyze(events, min_gap=20)
    assert report["gap_ms"] == pytest.approx(0.1)
    assert report["gap_ms_by_label"] == pytest.approx({"unlabelled": 0.09, "launch": 0.01})
    text, vision = report["steps"]["text"], report["steps"]["vision"]
    assert text["steps"] == 1 and abs(text["kernel_ms"] - 0.015) < 1e-9
    assert vision["steps"] == 1 and abs(vision["kernel_ms"] - 0.09) < 1e-9
    assert vision["by_kernel"]["cudnn_sdpa_fprop"] == pytest.approx(0.04)
