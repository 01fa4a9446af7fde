"""`stepserve bench serving` end to end against the fake streaming server, with the seed's command line."""

import base64
import io
import json
import os
import re
import signal
import time

import numpy as np
import pytest
from PIL import Image

from fake_openai_server import FakeOpenAIServer, make_tiny_tokenizer
from stepserve.bench import datasets
from stepserve.bench.serving import main

LABELS = [
    "Backend:", "Traffic request rate:", "Max request concurrency:", "Successful requests:",
    "Benchmark duration (s):", "Total input tokens:", "Total input text tokens:", "Total input vision tokens:",
    "Total generated tokens:", "Total generated tokens (retokenized):", "Request throughput (req/s):",
    "Input token throughput (tok/s):", "Output token throughput (tok/s):", "Peak output token throughput (tok/s):",
    "Peak concurrent requests:", "Total token throughput (tok/s):", "Concurrency:",
    "----------------End-to-End Latency----------------",
    "Mean E2E Latency (ms):", "Median E2E Latency (ms):", "P90 E2E Latency (ms):", "P99 E2E Latency (ms):",
    "---------------Time to First Token----------------",
    "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):",
    "-----Time per Output Token (excl. 1st token)------",
    "Mean TPOT (ms):", "Median TPOT (ms):", "P99 TPOT (ms):",
    "---------------Inter-Token Latency----------------",
    "Mean ITL (ms):", "Median ITL (ms):", "P95 ITL (ms):", "P99 ITL (ms):", "Max ITL (ms):",
]

SEED_ARGS = """--backend sglang-oai-chat --host 127.0.0.1 --port 30000 --model stepfun-ai/Step3-VL-10B
    --dataset-name image --image-count 2 --image-resolution 720p --random-input-len 128
    --random-output-len 1024 --num-prompts 10 --max-concurrency 1""".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    make_tiny_tokenizer(path)
    return path


def seed_argv(port, num_prompts, concurrency, extra):
    argv = list(SEED_ARGS)
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--num-prompts") + 1] = str(num_prompts)
    argv[argv.index("--max-concurrency") + 1] = str(concurrency)
    return argv + extra


def report(out: str) -> dict[str, str]:
    """The report block's rows, label -> value, in printed order; separators map to ''."""
    lines = out.split("============ Serving Benchmark Result ============\n", 1)[1].splitlines()
    rows = {}
    for line in lines[:lines.index("=" * 50)]:
        if line.startswith("-"):
            rows[line] = ""
        else:
            assert line[40] == " " and line[41] != " ", f"misaligned: {line!r}"
            rows[line[:40].rstrip()] = line[41:].strip()
    return rows


def test_seed_image_command_end_to_end(tok_dir, tmp_path, capsys):
    out_file = tmp_path / "bench.jsonl"
    with FakeOpenAIServer(vision_tokens_per_image=670, itl_s=0.0005) as server:
        rc = main(seed_argv(server.port, 4, 2, ["--tokenizer", tok_dir, "--output-file", str(out_file),
                                                "--output-details", "--disable-tqdm"]))
        bodies = server.requests
    assert rc == 0
    rows = report(capsys.readouterr().out)
    assert list(rows) == LABELS
    measured = bodies[1:]                      # bodies[0] is the warmup request
    assert len(measured) == 4
    assert rows["Backend:"] == "sglang-oai-chat"
    assert rows["Traffic request rate:"] == "inf"
    assert rows["Max request concurrency:"] == "2"
    assert rows["Successful requests:"] == "4"
    text_tokens = sum(len(b["messages"][0]["content"][2]["text"].split()) for b in measured)
    assert rows["Total input vision tokens:"] == str(4 * 2 * 670)
    assert rows["Total input text tokens:"] == str(text_tokens)
    assert rows["Total input tokens:"] == str(text_tokens + 4 * 2 * 670)
    generated = sum(b["max_tokens"] for b in measured)
    assert rows["Total generated tokens:"] == str(generated)
    assert rows["Total generated tokens (retokenized):"] == str(generated)
    assert 1 <= int(rows["Peak concurrent requests:"]) <= 4
    assert re.fullmatch(r"\d+\.\d\d", rows["Benchmark duration (s):"])

    # the request path serving.md describes
    body = measured[0]
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    assert all(1 <= b["max_tokens"] <= 1024 for b in measured)
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (1280, 720)
    assert bodies[0]["max_tokens"] <= 32

    lines = out_file.read_text().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["backend"] == "sglang-oai-chat" and result["completed"] == 4
    assert result["total_input_vision_tokens"] == 4 * 2 * 670
    assert result["total_output_tokens"] == generated == sum(result["output_lens"])
    assert len(result["ttfts"]) == len(result["itls"]) == len(result["generated_texts"]) == 4
    # the server may see the concurrent requests in another order than they were created
    assert sorted(len(itl) for itl in result["itls"]) == sorted(b["max_tokens"] - 1 for b in measured)
    # the timeline: concurrency 2 starts two requests at once, the others as earlier ones end
    starts = sorted(result["start_times"])
    assert starts[0] == 0.0 and starts[1] < 0.05 and 0 < starts[2] <= float(rows["Benchmark duration (s):"])
    assert abs(result["start_unix_time"] - time.time()) < 60


def test_timing_reasoning_and_usage_lengths(tok_dir, tmp_path, capsys):
    """TTFT counts reasoning chunks; output lengths come from the server's usage (EOS honoured here)."""
    with FakeOpenAIServer(ttft_s=0.2, itl_s=0.02, reasoning_chunks=2, eos_after=6) as server:
        rc = main(["--backend", "openai-chat", "--port", str(server.port), "--model", server.model,
                   "--tokenizer", tok_dir, "--dataset-name", "random", "--random-input-len", "40",
                   "--random-output-len", "64", "--random-range-ratio", "0.5", "--num-prompts", "3",
                   "--max-concurrency", "3", "--disable-ignore-eos", "--request-rate", "20",
                   "--output-file", str(tmp_path / "r.jsonl"), "--disable-tqdm"])
        measured = server.requests[1:]
    assert rc == 0
    rows = report(capsys.readouterr().out)
    assert "Total input vision tokens:" not in rows
    assert rows["Traffic request rate:"] == "20.0"
    assert rows["Total generated tokens:"] == str(3 * 6)
    assert all(b["ignore_eos"] is False for b in measured)
    assert all(32 <= b["max_tokens"] <= 64 for b in measured)
    assert 200.0 <= float(rows["Mean TTFT (ms):"]) < 800.0
    assert 20.0 <= float(rows["Mean ITL (ms):"]) < 200.0
    assert float(rows["Mean TPOT (ms):"]) >= 20.0


def test_completions_backend(tok_dir, tmp_path, capsys):
    with FakeOpenAIServer() as server:
        rc = main(["--backend", "sglang-oai", "--base-url", server.base_url, "--tokenizer", tok_dir,
                   "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
                   "--num-prompts", "2", "--output-file", str(tmp_path / "c.jsonl"), "--disable-tqdm"])
        measured = server.requests[1:]
    assert rc == 0                                  # the model name came from /v1/models
    rows = report(capsys.readouterr().out)
    assert rows["Successful requests:"] == "2"
    assert rows["Max request concurrency:"] == "not set"
    assert all("prompt" in b and b["model"] == server.model for b in measured)
    assert rows["Total generated tokens:"] == str(sum(b["max_tokens"] for b in measured))


def test_ctrl_c_prints_partial_report(tok_dir, tmp_path, capsys):
    def interrupt_on_third(n):
        if n == 3:        # warmup, first measured request, then Ctrl-C while the second is in flight
            os.kill(os.getpid(), signal.SIGINT)

    with FakeOpenAIServer(itl_s=0.02, on_request=interrupt_on_third) as server:
        rc = main(["--backend", "sglang-oai-chat", "--port", str(server.port), "--model", server.model,
                   "--tokenizer", tok_dir, "--dataset-name", "random", "--random-input-len", "8",
                   "--random-output-len", "10", "--random-range-ratio", "1.0", "--num-prompts", "5",
                   "--max-concurrency", "1", "--output-file", str(tmp_path / "i.jsonl"), "--disable-tqdm"])
    assert rc == 130
    out = capsys.readouterr().out
    assert "Interrupted: 1 of 5 requests finished." in out
    assert report(out)["Successful requests:"] == "1"


def test_failed_server_is_reported(tok_dir, tmp_path):
    with FakeOpenAIServer() as server, pytest.raises(SystemExit, match="Warmup failed"):
        main(["--port", str(server.port), "--model", "not-the-model", "--tokenizer", tok_dir,
              "--num-prompts", "1", "--random-input-len", "4", "--random-output-len", "4",
              "--output-file", str(tmp_path / "f.jsonl"), "--disable-tqdm"])


def test_dataset_rules(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    state = np.random.RandomState(0)
    assert datasets.parse_image_resolution("720p") == (1280, 720)
    assert datasets.parse_image_resolution("1080x1920") == (1920, 1080)     # SGLang's HEIGHTxWIDTH
    with pytest.raises(ValueError):
        datasets.parse_image_resolution("720")
    lens = datasets.random_lens(100, 0.25, 2000, state)
    assert min(lens) == 25 and max(lens) == 100
    assert set(datasets.random_lens(10, 0.0, 2000, state)) == set(range(1, 11))
    reqs = datasets.sample_random_requests(tok, 5, 30, 9, 1.0, seed=0)
    assert all(r.prompt_len == 30 and len(tok.encode(r.prompt)) == 30 and r.output_len == 9 for r in reqs)
    img = datasets.sample_image_requests(tok, 2, 3, 12, 5, 1.0, "40x60", "png", "blank", seed=0)
    assert all(len(r.image_data) == 3 and r.prompt_len == 12 for r in img)
    pixels = Image.open(io.BytesIO(base64.b64decode(img[0].image_data[0].split(",", 1)[1])))
    assert pixels.size == (60, 40) and pixels.getpixel((0, 0)) == (255, 255, 255)


def test_seeded_lens_reproduce_the_seed_reports():
    """The seed's two reports (SGLang, --seed 1 by default) generated 4220 tokens for 10 prompts and 510855 for
    1000: the same flags must give the same output lengths here, or the workloads differ."""
    assert sum(datasets.seeded_lens(128, 1024, 0.0, 10, 1)[1]) == 4220
    assert sum(datasets.seeded_lens(128, 1024, 0.0, 1000, 1)[1]) == 510855
    ins, outs = datasets.seeded_lens(128, 1024, 0.0, 1000, 1)
    assert min(ins) >= 1 and max(ins) <= 128 and min(outs) >= 1 and max(outs) <= 1024


def test_chat_text_len_counts_the_template(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = "{% for m in messages %}w1 {{ m['content'] }} w2{% endfor %} w3"
    assert datasets.chat_text_len(tok, "w5 w6") == 5


def test_sharegpt_file(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = [{"conversations": [{"from": "human", "value": "w1 w2 w3"}, {"from": "gpt", "value": "w4 w5"}]},
            {"conversations": [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w4 w5"}]},
            {"conversations": [{"from": "human", "value": "w9 w8"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = datasets.sample_sharegpt_requests(str(path), 10, tok, seed=1)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [("w1 w2 w3", 3, 2)]


def test_tokenizer_from_the_served_model_dir(tmp_path, capsys):
    """No --model/--tokenizer: the model named by /v1/models (here the built-in tiny checkpoint's directory)
    is resolved through stepserve.loader for the tokenizer."""
    from stepserve import loader
    from stepserve.testing import tiny_checkpoint

    model_dir = str(tiny_checkpoint())
    tok = loader.load_tokenizer(model_dir)
    with FakeOpenAIServer(model=model_dir) as server:
        rc = main(["--port", str(server.port), "--dataset-name", "image", "--image-resolution", "32x48",
                   "--image-count", "1", "--random-input-len", "12", "--random-output-len", "4",
                   "--random-range-ratio", "1.0", "--num-prompts", "2", "--disable-tqdm",
                   "--output-file", str(tmp_path / "t.jsonl")])
        measured = server.requests[1:]
    assert rc == 0
    rows = report(capsys.readouterr().out)
    assert rows["Successful requests:"] == "2"
    # text tokens are counted with the model's chat template applied
    texts = [b["messages"][0]["content"][1]["text"] for b in measured]
    assert rows["Total input text tokens:"] == str(sum(datasets.chat_text_len(tok, t) for t in texts))
    assert all(datasets.chat_text_len(tok, t) > len(tok.encode(t)) for t in texts)


def test_disable_stream(tok_dir, tmp_path, capsys):
    with FakeOpenAIServer(ttft_s=0.05) as server:
        rc = main(["--backend", "vllm-chat", "--port", str(server.port), "--tokenizer", tok_dir,
                   "--random-input-len", "8", "--random-output-len", "5", "--random-range-ratio", "1.0",
                   "--num-prompts", "2", "--disable-stream", "--output-file", str(tmp_path / "n.jsonl"),
                   "--disable-tqdm"])
        measured = server.requests[1:]
    assert rc == 0
    rows = report(capsys.readouterr().out)
    assert all(b["stream"] is False and "stream_options" not in b for b in measured)
    assert rows["Total generated tokens:"] == "10" and rows["Total generated tokens (retokenized):"] == "10"
    assert rows["Mean TTFT (ms):"] == rows["Mean E2E Latency (ms):"]     # one response: TTFT is the latency
    assert rows["Mean ITL (ms):"] == "0.00"
