"""Where the longest inter-token gaps of a serving benchmark run happened, and whether the whole server stalled.

Reads the result line that `stepserve bench serving --output-details` appended (per-request start times, TTFTs
and ITLs) and prints the longest gaps on the run's timeline: when each began, how many other requests were
streaming across it and how many of those got no token inside it either (all of them: a server-wide stall; none:
that one stream), and how many requests had started in the seconds before. With --server-log, the server's log
lines from around each gap follow (their asctime is matched against the run's wall-clock start).

    python3 benchmarks/itl_stalls.py $OUT/bench.jsonl [--server-log $OUT/server.log] [--top 5]
"""

from __future__ import annotations

import argparse
import bisect
import json
from datetime import datetime

import numpy as np


def token_times(result: dict) -> list[np.ndarray]:
    """Per request, the seconds after the run's start at which each of its tokens arrived."""
    out = []
    for start, ttft, itl in zip(result["start_times"], result["ttfts"], result["itls"]):
        out.append(np.array([]) if start is None or not ttft else start + ttft + np.cumsum([0.0, *itl]))
    return out


def gaps(times: list[np.ndarray], top: int) -> list[tuple[float, int, float, float]]:
    """The `top` longest gaps between two tokens of one request: (length, request, begin, end)."""
    found = [(t[j + 1] - t[j], i, t[j], t[j + 1]) for i, t in enumerate(times) for j in range(len(t) - 1)]
    return sorted(found, reverse=True)[:top]


def log_lines_near(path: str, t0_unix: float, begin: float, end: float, margin: float = 1.0) -> list[str]:
    """Lines of a log whose leading asctime ("2026-11-24 10:00:00,123") falls within the window (run seconds)."""
    lines = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_unix
            except ValueError:
                continue
            if begin - margin <= stamp <= end + margin:
                lines.append(f"  [{stamp:8.3f}] {line.rstrip()[24:]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result", help="bench_serving output file (JSONL; its last line is read)")
    p.add_argument("--server-log")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--burst-window", type=float, default=5.0, help="seconds before a gap to count new requests in")
    args = p.parse_args()
    with open(args.result) as f:
        result = json.loads(f.readlines()[-1])
    times = token_times(result)
    starts = sorted(s for s in result["start_times"] if s is not None)
    for length, i, begin, end in gaps(times, args.top):
        streaming = [t for k, t in enumerate(times) if k != i and len(t) and t[0] < begin and t[-1] > end]
        silent = sum(1 for t in streaming if not np.any((t > begin) & (t < end)))
        started = bisect.bisect(starts, begin) - bisect.bisect(starts, begin - args.burst_window)
        print(f"{length * 1e3:8.1f} ms gap in request {i} from {begin:8.3f} s to {end:8.3f} s: {silent} of "
              f"{len(streaming)} other streams got no token in it either; {started} requests started in the "
              f"{args.burst_window:g} s before")
        if args.server_log:
            print("\n".join(log_lines_near(args.server_log, result["start_unix_time"], begin, end)) or "  (no log lines)")


if __name__ == "__main__":
    main()
