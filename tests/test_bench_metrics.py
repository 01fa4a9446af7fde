"""Every serving-benchmark figure against values computed by hand from a small recorded event list."""

import math

import pytest

from stepserve.bench.metrics import RequestRecord, format_report, summarize

# Two finished requests and one failure; duration 2.5 s.
A = RequestRecord(success=True, start_time=10.0, ttft=0.5, itl=[0.1, 0.2, 0.3], latency=1.2, output_len=4,
                  prompt_len=100, text_prompt_len=60, vision_prompt_len=40, generated_text="a b c d")
B = RequestRecord(success=True, start_time=10.2, ttft=1.0, itl=[0.9], latency=2.0, output_len=2,
                  prompt_len=50, text_prompt_len=50, vision_prompt_len=0, generated_text="x y")
C = RequestRecord(success=False, start_time=10.1, ttft=0.0, latency=0.3, output_len=7, prompt_len=999,
                  error="boom")


@pytest.fixture(scope="module")
def s():
    return summarize([A, B, C], 2.5, count_tokens=len)


def test_counts_and_totals(s):
    assert s["completed"] == 2
    assert s["total_input_tokens"] == 150
    assert s["total_input_text_tokens"] == 110
    assert s["total_input_vision_tokens"] == 40
    assert s["total_output_tokens"] == 6
    assert s["total_output_tokens_retokenized"] == len("a b c d") + len("x y")


def test_throughputs(s):
    assert s["request_throughput"] == pytest.approx(2 / 2.5)
    assert s["input_throughput"] == pytest.approx(60.0)
    assert s["output_throughput"] == pytest.approx(2.4)
    assert s["total_throughput"] == pytest.approx(62.4)
    assert s["concurrency"] == pytest.approx((1.2 + 2.0) / 2.5)


def test_ttft(s):
    assert s["mean_ttft_ms"] == pytest.approx(750.0)
    assert s["median_ttft_ms"] == pytest.approx(750.0)
    assert s["p90_ttft_ms"] == pytest.approx(950.0)      # linear interpolation: 500 + 0.90 * 500
    assert s["p99_ttft_ms"] == pytest.approx(995.0)


def test_tpot(s):
    a, b = (1.2 - 0.5) / 3 * 1000, (2.0 - 1.0) / 1 * 1000
    assert s["mean_tpot_ms"] == pytest.approx((a + b) / 2)
    assert s["median_tpot_ms"] == pytest.approx((a + b) / 2)
    assert s["p99_tpot_ms"] == pytest.approx(a + 0.99 * (b - a))


def test_itl(s):
    # gaps of both requests pooled: 100, 200, 300, 900 ms
    assert s["mean_itl_ms"] == pytest.approx(375.0)
    assert s["median_itl_ms"] == pytest.approx(250.0)
    assert s["p95_itl_ms"] == pytest.approx(300 + 0.85 * 600)   # rank 0.95 * 3 = 2.85
    assert s["p99_itl_ms"] == pytest.approx(300 + 0.97 * 600)
    assert s["max_itl_ms"] == pytest.approx(900.0)


def test_e2e(s):
    assert s["mean_e2e_latency_ms"] == pytest.approx(1600.0)
    assert s["median_e2e_latency_ms"] == pytest.approx(1600.0)
    assert s["p90_e2e_latency_ms"] == pytest.approx(1920.0)
    assert s["p99_e2e_latency_ms"] == pytest.approx(1992.0)


def test_peaks(s):
    # chunk times from t0 = 10.0: A at 0.5, 0.6, 0.8, 1.1; B at 1.2, 2.1 -> buckets [3, 2, 1]
    assert s["max_output_tokens_per_s"] == 3.0
    # alive seconds: A in [0, 1], B in [0, 2] -> [2, 2, 1, 0]
    assert s["max_concurrent_requests"] == 2


def test_peak_concurrency_counts_overlap():
    recs = [RequestRecord(success=True, start_time=0.1 * i, ttft=0.05, latency=0.5, output_len=1) for i in range(5)]
    s = summarize(recs, 1.0, count_tokens=len)
    assert s["max_concurrent_requests"] == 5
    assert s["max_output_tokens_per_s"] == 5.0
    assert s["mean_tpot_ms"] == 0.0          # output_len 1 has no TPOT; an empty list reports 0 like SGLang


def test_all_failed_reports_zeros():
    s = summarize([C], 1.0, count_tokens=len)
    assert s["completed"] == 0 and s["total_output_tokens"] == 0
    assert s["max_concurrent_requests"] == 0 and s["max_output_tokens_per_s"] == 0.0
    assert not math.isnan(s["mean_e2e_latency_ms"])


SEED_BLOCK = """\
============ Serving Benchmark Result ============
Backend:                                 sglang-oai-chat
Traffic request rate:                    inf
Max request concurrency:                 1
Successful requests:                     10
Benchmark duration (s):                  30.85
Total input tokens:                      14120
Total input text tokens:                 720
Total input vision tokens:               13400
Total generated tokens:                  4220
Total generated tokens (retokenized):    4217
Request throughput (req/s):              0.32
Input token throughput (tok/s):          457.71
Output token throughput (tok/s):         136.79
Peak output token throughput (tok/s):    240.00
Peak concurrent requests:                2
Total token throughput (tok/s):          594.50
Concurrency:                             1.00
----------------End-to-End Latency----------------
Mean E2E Latency (ms):                   3083.40
Median E2E Latency (ms):                 2747.00
P90 E2E Latency (ms):                    4574.50
P99 E2E Latency (ms):                    5462.49
---------------Time to First Token----------------
Mean TTFT (ms):                          1327.69
Median TTFT (ms):                        1341.01
P99 TTFT (ms):                           1486.11
-----Time per Output Token (excl. 1st token)------
Mean TPOT (ms):                          4.16
Median TPOT (ms):                        4.17
P99 TPOT (ms):                           4.18
---------------Inter-Token Latency----------------
Mean ITL (ms):                           4.17
Median ITL (ms):                         4.18
P95 ITL (ms):                            4.30
P99 ITL (ms):                            4.38
Max ITL (ms):                            8.24
=================================================="""


def test_report_block_matches_seed_layout():
    summary = {
        "duration": 30.853, "completed": 10, "total_input_tokens": 14120, "total_input_text_tokens": 720,
        "total_input_vision_tokens": 13400, "total_output_tokens": 4220, "total_output_tokens_retokenized": 4217,
        "request_throughput": 0.3241, "input_throughput": 457.7135, "output_throughput": 136.7899,
        "max_output_tokens_per_s": 240.0, "max_concurrent_requests": 2, "total_throughput": 594.4977,
        "concurrency": 0.9995, "mean_e2e_latency_ms": 3083.4, "median_e2e_latency_ms": 2747.0,
        "p90_e2e_latency_ms": 4574.5, "p99_e2e_latency_ms": 5462.49, "mean_ttft_ms": 1327.69,
        "median_ttft_ms": 1341.01, "p99_ttft_ms": 1486.11, "mean_tpot_ms": 4.16, "median_tpot_ms": 4.17,
        "p99_tpot_ms": 4.18, "mean_itl_ms": 4.17, "median_itl_ms": 4.18, "p95_itl_ms": 4.3, "p99_itl_ms": 4.38,
        "max_itl_ms": 8.24,
    }
    block = format_report(summary, "sglang-oai-chat", float("inf"), 1, show_vision=True)
    assert [line.rstrip() for line in block.splitlines()] == SEED_BLOCK.splitlines()
    # SGLang pads the value column to 10 characters; so do we.
    assert "Traffic request rate:                    inf       " in block.splitlines()
    without_vision = format_report(summary, "sglang-oai-chat", float("inf"), None, show_vision=False)
    assert "Total input vision tokens:" not in without_vision
    assert "Max request concurrency:                 not set   " in without_vision.splitlines()
