"""`stepserve bench serving` (the seed's section-5.1 commands) and `stepserve eval mmmu` against the real server
(tiny random-weight model on CPU): the runs complete without failures and their figures are consistent with
what the server counted."""

from __future__ import annotations

import json
import pprint
import re

import pytest

from real_server import SEED_MODEL
from stepserve import loader
from stepserve.bench.datasets import parse_image_resolution
from stepserve.cli import main as cli
from stepserve.multimodal.processor import ImageProcessor, ImageTokenIds
from stepserve.testing import tiny_checkpoint
from test_mmmu import ROWS, png


def seed_bench_command(port: int, num_prompts: int, concurrency: int, resolution: str) -> list[str]:
    """The seed's command line, `python3 -m sglang.bench_serving` -> `stepserve bench serving`, with a run size
    and resolution a 2-core CPU finishes in seconds."""
    return ("bench serving --backend sglang-oai-chat --host 127.0.0.1 "
            f"--port {port} --model {SEED_MODEL} --dataset-name image --image-count 2 "
            f"--image-resolution {resolution} --random-input-len 128 --random-output-len 1024 "
            f"--num-prompts {num_prompts} --max-concurrency {concurrency}").split()


def report(out: str) -> dict[str, str]:
    """The report block's `label: value` lines."""
    block = out[out.index("============ Serving Benchmark Result ============"):]
    assert block.rstrip().endswith("=" * 50)
    return dict(re.findall(r"^([^:\n]+):\s+(\S+)\s*$", block, re.M))


@pytest.mark.parametrize("num_prompts,concurrency,resolution", [(3, 1, "720p"), (6, 3, "360p")],
                         ids=["latency-720p", "throughput-360p"])
def test_bench_serving_seed_commands(real_server, tmp_path, monkeypatch, capsys, num_prompts, concurrency,
                                     resolution):
    monkeypatch.chdir(tmp_path)  # the run's JSONL goes to the working directory, as in SGLang
    rc = cli(seed_bench_command(real_server.port, num_prompts, concurrency, resolution) + ["--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "failed" not in out
    r = report(out)
    assert r["Backend"] == "sglang-oai-chat" and r["Traffic request rate"] == "inf"
    assert int(r["Max request concurrency"]) == concurrency
    assert int(r["Successful requests"]) == num_prompts

    # input: the server's prompt counts, split into the dataset's text and the images' exact token counts
    text = int(re.search(r"#Input text tokens: (\d+)", out).group(1))
    width, height = parse_image_resolution(resolution)
    per_image = ImageProcessor(ImageTokenIds.from_tokenizer(loader.load_tokenizer(tiny_checkpoint()))) \
        .num_image_tokens(width, height)
    assert int(r["Total input text tokens"]) == text
    assert int(r["Total input vision tokens"]) == num_prompts * 2 * per_image
    assert int(r["Total input tokens"]) == text + num_prompts * 2 * per_image
    # output: ignore_eos, so exactly the drawn lengths
    requested = int(re.search(r"#Output tokens: (\d+)", out).group(1))
    assert int(r["Total generated tokens"]) == requested
    assert int(r["Total generated tokens (retokenized)"]) > 0

    (line,) = [json.loads(x) for x in next(tmp_path.glob("*.jsonl")).open()]  # the figures unrounded
    assert line["completed"] == num_prompts and line["total_output_tokens"] == requested
    assert line["total_input_vision_tokens"] == num_prompts * 2 * per_image
    duration = line["duration"]
    assert r["Benchmark duration (s)"] == f"{duration:.2f}"
    assert float(r["Request throughput (req/s)"]) == pytest.approx(num_prompts / duration, abs=0.006)
    assert float(r["Output token throughput (tok/s)"]) == pytest.approx(requested / duration, abs=0.006)
    assert 0 < float(r["Concurrency"]) <= concurrency + 0.01
    # counted per one-second bucket (as SGLang does): sub-second requests that follow each other share a bucket
    assert 1 <= int(r["Peak concurrent requests"]) <= num_prompts
    assert float(r["Mean TTFT (ms)"]) <= float(r["Mean E2E Latency (ms)"]) <= duration * 1000
    assert 0 < float(r["Mean TPOT (ms)"]) and float(r["Median ITL (ms)"]) <= float(r["Max ITL (ms)"])


def test_eval_mmmu_on_real_server(real_server, tmp_path, capsys):
    """The MMMU harness on a small sample in the dataset's layout; random weights, so any accuracy."""
    root = tmp_path / "MMMU"
    for subject, rows in ROWS.items():
        (root / subject).mkdir(parents=True)
        (root / subject / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "Accounting" / "img.png").write_bytes(png(4, 4, "green"))
    answers, evals = tmp_path / "answers.json", tmp_path / "val.json"
    rc = cli(["eval", "mmmu", "--port", str(real_server.port), "--concurrency", "64", "--dataset-path", str(root),
              "--answer-file", str(answers), "--result-filename", str(evals), "--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0, out
    results = json.loads(evals.read_text())
    asked = {q["id"] for rows in ROWS.values() for q in rows}
    saved = json.loads(answers.read_text())
    assert set(saved) == asked and results["Overall"]["num"] == len(asked)
    for subject, rows in ROWS.items():
        assert results[subject]["num"] == len(rows) and 0 <= results[subject]["acc"] <= 1
    assert re.search(r"Benchmark time: \d+\.\d+\n", out)
    assert pprint.pformat(results) in out and f"Overall accuracy: {results['Overall']['acc']}" in out
    assert all(a["judge"] in ("Correct", "Wrong") and a["original_response"] for a in saved.values())
