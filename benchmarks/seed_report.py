"""The GPU speed targets against one `benchmarks/seed_gpu.sh` run: one JSON and one markdown table from its $OUT.

    python3 benchmarks/seed_report.py $OUT        # writes $OUT/summary.json and $OUT/summary.md, prints the table

Reads what the stages left there (a stage that did not run shows as "not run"): bench.jsonl (the latency line is
the one at concurrency 1, the throughput line the one at the highest concurrency; the last of each), the vision
tower's JSON for the configuration the server ran, prefill.json (the seed request's 1439 tokens), peer.json,
gpu_tests.log, and gpu.txt / commit.txt / server_flags.txt. A row with a target (the seed latency command: mean
TPOT <= 6 ms, mean TTFT <= 250 ms; the seed throughput command: >= 4 req/s with mean TTFT < 10 s; tests/gpu all
pass) says whether it is met; the others are measured against a floor (vision images/s against the FLOP floor,
prefill tokens/s against the GEMM peak) or a peer (transformers' TPOT over stepserve's).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TPOT_MS, TTFT_MS = 6.0, 250.0  # the seed latency command: mean TPOT and mean TTFT at most these
RATE, RATE_TTFT_S = 4.0, 10.0  # the seed throughput command: at least 4 req/s with mean TTFT under 10 s
SEED_PREFILL = "1439"  # prefill.py's case for the seed request's prompt (1340 vision + ~100 text tokens)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def read_text(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def bench_lines(path: Path) -> tuple[dict | None, dict | None]:
    """(latency line, throughput line) of bench.jsonl: concurrency 1, and the highest concurrency above 1."""
    if not path.exists():
        return None, None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latency = [r for r in lines if r.get("max_concurrency") == 1]
    throughput = sorted((r for r in lines if (r.get("max_concurrency") or 0) > 1), key=lambda r: r["max_concurrency"])
    return (latency[-1] if latency else None), (throughput[-1] if throughput else None)


def pytest_counts(log: str | None) -> dict[str, int] | None:
    """The counts of pytest's last summary line ("263 passed, 2 failed, 1 skipped in 180.1s")."""
    if not log:
        return None
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not summary:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1]):
        counts["errors" if what.startswith("error") else what] += int(n)
    return counts


def vision_rows(out: Path, flags: str) -> tuple[str, list[dict]] | None:
    """The tower benchmark run in the server's configuration (compiled, Triton kernels, fp8 if the server was)."""
    name = "vision_compiled_kernels_fp8.json" if "--quantize-vision" in flags else "vision_compiled_kernels.json"
    rows = read_json(out / name)
    return (name, rows) if rows else None


def summarize(out: Path) -> dict[str, Any]:
    flags = read_text(out / "server_flags.txt") or ""
    latency, throughput = bench_lines(out / "bench.jsonl")
    rows: list[dict[str, Any]] = []

    def row(name: str, target: str, measured: str | None, met: bool | None = None, **figures: Any) -> None:
        rows.append({"name": name, "target": target, "measured": measured or "not run", "met": met, **figures})

    if latency:
        tpot, ttft = latency["mean_tpot_ms"], latency["mean_ttft_ms"]
        row("seed latency: mean TPOT", f"<= {TPOT_MS} ms", f"{tpot:.2f} ms", tpot <= TPOT_MS, value=tpot)
        row("seed latency: mean TTFT", f"<= {TTFT_MS:.0f} ms", f"{ttft:.1f} ms", ttft <= TTFT_MS, value=ttft)
    else:
        row("seed latency", f"TPOT <= {TPOT_MS} ms, TTFT <= {TTFT_MS:.0f} ms", None)
    if throughput:
        rate, ttft_s = throughput["request_throughput"], throughput["mean_ttft_ms"] / 1e3
        prompts = len(throughput.get("output_lens") or []) or throughput["completed"]
        row(f"seed throughput: {throughput['completed']} of {prompts} prompts at concurrency "
            f"{throughput['max_concurrency']}", f">= {RATE} req/s, mean TTFT < {RATE_TTFT_S:.0f} s",
            f"{rate:.2f} req/s, mean TTFT {ttft_s:.2f} s",
            rate >= RATE and ttft_s < RATE_TTFT_S and throughput["completed"] == prompts, value=rate)
    else:
        row("seed throughput", f">= {RATE} req/s, mean TTFT < {RATE_TTFT_S:.0f} s", None)

    vision = vision_rows(out, flags)
    if vision:
        name, runs = vision
        two = next((r for r in runs if r["images"] == 2), runs[0])
        floor = two["images"] / two["floor_ms"] * 1e3
        rates = " / ".join(f"{r['images_per_s']:.2f}" for r in runs)
        counts = " / ".join(str(r["images"]) for r in runs)
        row(f"vision tower, 1280x720 ({name})", f"FLOP floor: {floor:.1f} images/s at 782 TFLOP/s",
            f"{rates} images/s at {counts} images ({two['ms']:.1f} ms for 2: {two['tflops']:.0f} TFLOP/s, "
            f"{100 * two['images_per_s'] / floor:.0f} % of the floor)", value=two["images_per_s"])
    else:
        row("vision tower, 1280x720", "its FLOP floor at 782 TFLOP/s", None)
    prefill = read_json(out / "prefill.json")
    if prefill:
        seed = next((r for r in prefill if r["case"] == SEED_PREFILL), prefill[0])
        row(f"prefill, {seed['tokens']} tokens", "GEMM peak (782 TFLOP/s)",
            f"{seed['tokens_per_s']:.0f} tokens/s ({seed['tflops']:.0f} TFLOP/s, {seed['pct_peak']:.1f} % of peak)",
            value=seed["tokens_per_s"])
    else:
        row("prefill", "GEMM peak (782 TFLOP/s)", None)
    peer = read_json(out / "peer.json")
    if peer and latency:
        ratio = peer["tpot_ms"] / latency["mean_tpot_ms"]
        row(f"transformers {peer['version']} generate, batch 1", "TPOT ratio to stepserve's latency run",
            f"TPOT {peer['tpot_ms']:.1f} ms: stepserve {ratio:.1f}x lower", value=ratio)
    else:
        row("transformers peer", "TPOT ratio to stepserve's latency run",
            f"TPOT {peer['tpot_ms']:.1f} ms (no latency run to compare)" if peer else None)
    tests = pytest_counts(read_text(out / "gpu_tests.log"))
    row("tests/gpu", "all pass", ", ".join(f"{n} {k}" for k, n in tests.items() if n) if tests else None,
        tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0 if tests else None)
    return {"gpu": read_text(out / "gpu.txt"), "commit": read_text(out / "commit.txt"), "server_flags": flags,
            "rows": rows, "latency": strip_details(latency), "throughput": strip_details(throughput)}


def strip_details(line: dict | None) -> dict | None:
    """A bench line without its per-request lists (those stay in bench.jsonl)."""
    return None if line is None else {k: v for k, v in line.items() if not isinstance(v, list)}


def markdown(summary: dict[str, Any]) -> str:
    mark = {True: "yes", False: "**no**", None: ""}
    lines = [f"GPU: {summary['gpu'] or 'unknown'}; commit {summary['commit'] or 'unknown'}; server flags: "
             f"`{summary['server_flags'] or '(none: bf16)'}`", "",
             "| what | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['target']} | {r['measured']} | {mark[r['met']]} |" for r in summary["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python3 benchmarks/seed_report.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
