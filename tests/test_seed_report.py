"""benchmarks/seed_report.py on a hand-made $OUT: each issue-6 target read from the right file and judged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("seed_report", Path(__file__).parents[1] / "benchmarks" / "seed_report.py")
seed_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_report)


def vision_run(ms_per_image: float) -> list[dict]:
    return [{"images": n, "ms": ms_per_image * n, "images_per_s": 1e3 / ms_per_image, "tflops": 41.4 / ms_per_image * 1e3,
             "floor_ms": 53.0 * n} for n in (1, 2, 8)]


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    (tmp_path / "commit.txt").write_text("abc1234\n")
    (tmp_path / "server_flags.txt").write_text("\n")
    lines = [{"max_concurrency": 1, "mean_tpot_ms": 5.43, "mean_ttft_ms": 223.3, "completed": 10},
             {"max_concurrency": 100, "request_throughput": 3.46, "mean_ttft_ms": 2080.0, "completed": 999,
              "output_lens": [1] * 1000}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "vision_compiled_kernels.json").write_text(json.dumps(vision_run(77.0)))
    (tmp_path / "vision_compiled_kernels_fp8.json").write_text(json.dumps(vision_run(63.5)))
    (tmp_path / "prefill.json").write_text(json.dumps([
        {"case": "512", "tokens": 512, "tokens_per_s": 33000.0, "tflops": 467.0, "pct_peak": 59.7},
        {"case": "1439", "tokens": 1439, "tokens_per_s": 40895.0, "tflops": 586.0, "pct_peak": 74.9}]))
    (tmp_path / "peer.json").write_text(json.dumps({"version": "5.17.0", "tpot_ms": 86.88}))
    (tmp_path / "gpu_tests.log").write_text("....F..\nFAILED tests/gpu/test_x.py::test_y\n"
                                            "2 failed, 263 passed, 1 skipped in 180.00s (0:03:00)\n")
    return tmp_path


class Rows:
    """A summary's rows by the start of their name."""

    def __init__(self, summary: dict):
        self.rows = summary["rows"]

    def __getitem__(self, prefix: str) -> dict:
        return next(r for r in self.rows if r["name"].startswith(prefix))


def test_each_target_is_read_and_judged(out: Path):
    rows = Rows(seed_report.summarize(out))
    assert rows["seed latency: mean TPOT"]["met"] is True and rows["seed latency: mean TPOT"]["value"] == 5.43
    assert rows["seed latency: mean TTFT"]["met"] is True and rows["seed latency: mean TTFT"]["value"] == 223.3
    # 3.46 req/s misses 4, and one of the 1000 prompts failed
    assert rows["seed throughput"]["met"] is False and "999 of 1000" in rows["seed throughput"]["name"]
    assert rows["vision tower"]["value"] == pytest.approx(1e3 / 77.0)  # bf16 server: the bf16 tower's file
    assert rows["prefill"]["value"] == 40895.0 and "1439 tokens" in rows["prefill"]["name"]
    assert rows["transformers 5.17.0"]["value"] == pytest.approx(86.88 / 5.43)
    assert rows["tests/gpu"]["met"] is False and rows["tests/gpu"]["measured"] == "263 passed, 2 failed, 1 skipped"


def test_fp8_server_reads_the_fp8_tower_and_files_are_written(out: Path, capsys):
    (out / "server_flags.txt").write_text("--quantization fp8 --kv-cache-dtype fp8_e4m3 --quantize-vision\n")
    assert seed_report.main([str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert Rows(summary)["vision tower"]["value"] == pytest.approx(1e3 / 63.5)
    assert "output_lens" not in summary["throughput"]  # per-request lists stay in bench.jsonl
    table = (out / "summary.md").read_text()
    assert table == capsys.readouterr().out
    assert "| seed latency: mean TPOT | <= 6.0 ms | 5.43 ms | yes |" in table
    assert "3.46 req/s, mean TTFT 2.08 s | **no** |" in table


def test_stages_that_did_not_run(tmp_path: Path):
    rows = seed_report.summarize(tmp_path)["rows"]
    assert [r["measured"] for r in rows] == ["not run"] * len(rows)
    assert all(r["met"] is None for r in rows)
    (tmp_path / "bench.jsonl").write_text(json.dumps({"max_concurrency": 100, "request_throughput": 4.27,
                                                      "mean_ttft_ms": 1980.0, "completed": 300}) + "\n")
    rows = Rows(seed_report.summarize(tmp_path))
    assert rows["seed throughput"]["met"] is True and rows["seed latency"]["measured"] == "not run"


@pytest.mark.parametrize("log, counts", [
    ("==== 265 passed in 179.52s (0:02:59) ====", {"passed": 265, "failed": 0, "skipped": 0, "errors": 0}),
    ("1 failed, 3 passed, 2 errors in 5.0s", {"passed": 3, "failed": 1, "skipped": 0, "errors": 2}),
    ("collecting ... no tests ran", None),
])
def test_pytest_counts(log: str, counts):
    assert seed_report.pytest_counts(log) == counts
