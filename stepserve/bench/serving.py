"""`stepserve bench serving`: an online serving benchmark that accepts SGLang bench_serving's flags and prints
its report block, e.g. (the seed's command with the module swapped)

    stepserve bench serving --backend sglang-oai-chat --host 127.0.0.1 --port 30000 \
        --model stepfun-ai/Step3-VL-10B --dataset-name image --image-count 2 --image-resolution 720p \
        --random-input-len 128 --random-output-len 1024 --num-prompts 10 --max-concurrency 1

Every figure is measured from the streamed responses (see `metrics.py`). Ctrl-C stops sending, cancels the
requests in flight and prints the report for those that finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import time
from datetime import datetime
from typing import Any

import numpy as np
from tqdm import tqdm

from stepserve.bench import client as http
from stepserve.bench import datasets
from stepserve.bench.metrics import RequestRecord, format_report, summarize

INTERRUPTED_EXIT_CODE = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepserve bench serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="sglang-oai-chat", choices=http.CHAT_BACKENDS + http.COMPLETION_BACKENDS)
    p.add_argument("--base-url", default=None, help="server URL; overrides --host/--port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name sent to the server (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: the model's)")
    p.add_argument("--dataset-name", default="random", choices=["random", "image", "sharegpt"])
    p.add_argument("--dataset-path", default="", help="ShareGPT JSON file (sharegpt dataset)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--sharegpt-context-len", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn uniformly in [ratio * len, len]")
    p.add_argument("--image-count", type=int, default=1)
    p.add_argument("--image-resolution", default="1080p", help="4k, 1080p, 720p, 360p or HEIGHTxWIDTH")
    p.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"])
    p.add_argument("--image-content", default="random", choices=["random", "blank"])
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--output-file", default=None, help="JSONL file the run's result line is appended to")
    p.add_argument("--output-details", action="store_true", help="add per-request lists to the result line")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--extra-request-body", default=None, metavar="JSON", help="merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    return p


def load_tokenizer(tokenizer: str | None, model: str | None, base_url: str | None = None) -> Any:
    """`--tokenizer`; else the one the server reports (/get_model_info) if it resolves here, so that text and
    vision tokens split exactly as the server counts them (the served name may be an alias); else the model's.
    A model is None (the built-in tiny one), a directory, or a hub id downloaded without its weights."""
    from stepserve import loader
    from stepserve.errors import ModelLoadError

    if tokenizer:
        return loader.load_tokenizer(tokenizer)
    served = http.fetch_model_path(base_url) if base_url else None
    if served:
        try:
            return loader.load_tokenizer(loader.resolve_model_dir(served, download_weights=False))
        except ModelLoadError:
            pass
    return loader.load_tokenizer(loader.resolve_model_dir(model, download_weights=False))


def make_requests(args: argparse.Namespace, tokenizer: Any) -> list[datasets.BenchRequest]:
    if args.dataset_name == "image":
        return datasets.sample_image_requests(
            tokenizer, args.num_prompts, args.image_count, args.random_input_len, args.random_output_len,
            args.random_range_ratio, args.image_resolution, args.image_format, args.image_content, args.seed)
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path (a local ShareGPT JSON file)")
        return datasets.sample_sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.seed,
                                                 args.sharegpt_output_len, args.sharegpt_context_len)
    return datasets.sample_random_requests(tokenizer, args.num_prompts, args.random_input_len,
                                           args.random_output_len, args.random_range_ratio, args.seed)


class Runner:
    """Sends the requests (warmup first) under the concurrency cap and arrival process; stops on Ctrl-C."""

    def __init__(self, args: argparse.Namespace, url: str, model: str, rng: np.random.Generator):
        self.args, self.url, self.model, self.rng = args, url, model, rng
        self.chat = args.backend in http.CHAT_BACKENDS
        self.extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
        self.stop = asyncio.Event()

    def payload(self, req: datasets.BenchRequest, output_len: int) -> dict[str, Any]:
        return http.build_payload(self.chat, self.model, req.prompt, req.image_data, output_len,
                                  not self.args.disable_stream, not self.args.disable_ignore_eos, self.extra)

    async def send(self, client, req: datasets.BenchRequest, output_len: int, sem: asyncio.Semaphore | None,
                   pbar: tqdm | None) -> RequestRecord:
        async with sem or contextlib.nullcontext():
            rec = await http.send_request(client, self.url, self.payload(req, output_len), self.chat, output_len)
        if pbar is not None:
            pbar.update(1)
        return rec

    async def warmup(self, client, sem: asyncio.Semaphore | None, first: datasets.BenchRequest) -> None:
        n = self.args.warmup_requests
        if n <= 0:
            return
        print(f"Starting warmup with {n} sequences...")
        outs = await asyncio.gather(*(self.send(client, first, min(first.output_len, 32), sem, None)
                                      for _ in range(n)))
        if not any(o.success for o in outs):
            raise SystemExit(f"Warmup failed - check the benchmark arguments. Error: {outs[0].error}")
        print(f"Warmup completed with {n} sequences. Starting main benchmark run...")
        await asyncio.sleep(1.0)

    async def run(self, requests: list[datasets.BenchRequest]) -> tuple[list[RequestRecord], float]:
        """Records aligned with `requests` (cut short on Ctrl-C) and the measured run's wall time."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self.stop.set)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread: Ctrl-C stays default
            pass
        try:
            async with http.make_async_client() as client:
                sem = asyncio.Semaphore(self.args.max_concurrency) if self.args.max_concurrency else None
                if requests:
                    await self.warmup(client, sem, requests[0])
                return await self._measure(client, sem, requests)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def _measure(self, client, sem, requests) -> tuple[list[RequestRecord], float]:
        pbar = tqdm(total=len(requests), disable=self.args.disable_tqdm)
        tasks: list[asyncio.Task] = []

        async def dispatch() -> None:
            for req in requests:
                tasks.append(asyncio.create_task(self.send(client, req, req.output_len, sem, pbar)))
                if self.args.request_rate != float("inf"):
                    await asyncio.sleep(float(self.rng.exponential(1.0 / self.args.request_rate)))
            await asyncio.gather(*tasks)

        start = time.perf_counter()
        work = asyncio.create_task(dispatch())
        interrupt = asyncio.create_task(self.stop.wait())
        await asyncio.wait([work, interrupt], return_when=asyncio.FIRST_COMPLETED)
        duration = time.perf_counter() - start
        for task in (work, interrupt, *tasks):
            task.cancel()
        await asyncio.gather(work, interrupt, *tasks, return_exceptions=True)
        pbar.close()
        records = [t.result() if not t.cancelled() else RequestRecord(error="cancelled by Ctrl-C") for t in tasks]
        return records, duration


def attribute_input_tokens(records: list[RequestRecord], requests: list[datasets.BenchRequest],
                           image: bool) -> None:
    """Fill each record's total/text/vision prompt counts: the server's usage count when it reported one.

    Vision tokens are what the server counted beyond the text (the image dataset's text-only prompt length).
    """
    for rec, req in zip(records, requests):
        total = rec.prompt_len or req.prompt_len
        rec.prompt_len = total
        rec.text_prompt_len = req.prompt_len if image else total
        rec.vision_prompt_len = total - req.prompt_len if image else 0


def default_output_file(args: argparse.Namespace) -> str:
    now = datetime.now().strftime("%m%d")
    if args.dataset_name == "image":
        return (f"{args.backend}_{now}_{args.num_prompts}_{args.random_input_len}_{args.random_output_len}_"
                f"{args.image_count}imgs_{args.image_resolution}.jsonl")
    if args.dataset_name == "random":
        return f"{args.backend}_{now}_{args.num_prompts}_{args.random_input_len}_{args.random_output_len}.jsonl"
    return f"{args.backend}_{now}_{args.num_prompts}_{args.dataset_name}.jsonl"


def result_line(args: argparse.Namespace, summary: dict[str, Any], records: list[RequestRecord]) -> dict[str, Any]:
    """SGLang's result JSON: the run's settings, then the figures; per-request lists with --output-details."""
    line: dict[str, Any] = {
        "backend": args.backend, "dataset_name": args.dataset_name, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, **summary,
    }
    if args.output_details:
        # Request start times, as seconds after the first and as one wall-clock anchor, place each request's
        # tokens on the run's timeline (and next to the server's log lines).
        t0 = min((r.start_time for r in records if r.start_time), default=0.0)
        line.update({
            "start_unix_time": time.time() - (time.perf_counter() - t0),
            "start_times": [r.start_time - t0 if r.start_time else None for r in records],
            "input_lens": [r.prompt_len for r in records],
            "output_lens": [r.output_len if r.success else 0 for r in records],
            "ttfts": [r.ttft for r in records],
            "itls": [r.itl for r in records],
            "generated_texts": [r.generated_text for r in records],
            "errors": [r.error for r in records],
        })
    return line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    base_url = http.resolve_base_url(args.host, args.port, args.base_url)
    url = http.api_url(args.backend, base_url)
    if args.dataset_name == "image" and args.backend not in http.CHAT_BACKENDS:
        raise SystemExit(f"the image dataset needs a chat backend ({', '.join(http.CHAT_BACKENDS)})")
    model = args.model or http.fetch_model_id(base_url)
    if model is None:
        raise SystemExit(f"--model not given and {base_url}/v1/models did not answer")
    tokenizer = load_tokenizer(args.tokenizer, args.model or model, base_url)

    requests = make_requests(args, tokenizer)
    if args.dataset_name == "image":
        print(f"#Input text tokens: {sum(r.prompt_len for r in requests)} (vision tokens: counted by the server)")
        print(f"#Total images: {sum(len(r.image_data) for r in requests)}")
    else:
        print(f"#Input tokens: {sum(r.prompt_len for r in requests)}")
    print(f"#Output tokens: {sum(r.output_len for r in requests)}")

    runner = Runner(args, url, model, rng)
    records, duration = asyncio.run(runner.run(requests))
    interrupted = runner.stop.is_set()
    attribute_input_tokens(records, requests, args.dataset_name == "image")

    summary = summarize(records, duration, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    if interrupted:
        print(f"\nInterrupted: {summary['completed']} of {len(requests)} requests finished.")
    print("\n" + format_report(summary, args.backend, args.request_rate, args.max_concurrency,
                               show_vision=args.dataset_name == "image"))
    output_file = args.output_file or default_output_file(args)
    with open(output_file, "a") as f:
        f.write(json.dumps(result_line(args, summary, records)) + "\n")
    failed = [r for r in records if not r.success]
    if failed and not interrupted:
        print(f"{len(failed)} requests failed; first error: {failed[0].error}")
    if interrupted:
        return INTERRUPTED_EXIT_CODE
    return 0 if summary["completed"] else 1
