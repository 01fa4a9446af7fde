"""benchmarks/offline_throughput.py on the tiny model: every request of the seed workload runs to its length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from stepserve.bench.datasets import seeded_lens
from stepserve.testing import tiny_checkpoint

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "offline_throughput.py"


def test_offline_throughput_runs_every_request_to_its_length(tmp_path):
    model = tiny_checkpoint()
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model), "--num-prompts", "3",
                           "--max-concurrency", "2", "--context-length", "4096", "--seed", "5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "offline_throughput.json").read_text())
    _, output_lens = seeded_lens(128, 1024, 0.0, 3, 5)
    assert result["output_tokens"] == sum(output_lens)
    assert result["num_prompts"] == 3 and result["req_per_s"] > 0
    assert result["steps"] >= max(output_lens)  # a sequence decodes one token per step
