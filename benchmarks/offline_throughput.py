"""The seed throughput workload driven straight into `Engine.step` (no HTTP): the rate the engine and GPU reach
by themselves, to compare with the served rate of the same prompts.

    python benchmarks/offline_throughput.py [--model-dir DIR] [--num-prompts 400] [--max-concurrency 100]
        [--quantization fp8 [--quantize-vision]] [--kv-cache-dtype fp8_e4m3]

The prompts are those `stepserve bench serving --dataset-name image --image-count 2 --image-resolution 720p
--random-input-len 128 --random-output-len 1024` sends (same generator and seed), each rendered through the chat
template with its two images decoded and preprocessed before the clock starts; greedy, ignore_eos, max_tokens
the sampled output length, as the benchmark's requests. A new request enters as soon as one finishes, keeping
`--max-concurrency` in flight. Without `--model-dir` a dummy checkpoint with the real shapes is written to a
temporary directory (`--load-format dummy` either way).

On CUDA every engine step's GPU work is bracketed by CUDA events: "GPU busy" sums each step's span, "GPU idle" the
gaps between one step's end and the next one's start (time the GPU waited for the host). The busy time is also given
per kind of step, vision steps (the tower and prefill of new prompts beside the running decodes) and text steps, and
the idle time before vision steps on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from stepserve.api.chat import render_chat
from stepserve.bench.datasets import sample_image_requests
from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.engine.sampling_params import SamplingParams
from stepserve.multimodal.image_io import load_image
from stepserve.testing import real_dummy_checkpoint


class StepTimer:
    """Wraps `runner.run`: CUDA events around each step's queued work (GPU busy and idle between steps)."""

    def __init__(self, runner):
        self.run, self.spans = runner.run, []
        runner.run = self

    def __call__(self, batch):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launched = self.run(batch)
        end.record()
        self.spans.append((start, end, bool(batch.images)))
        return launched

    def totals(self) -> dict:
        torch.cuda.synchronize()
        busy = [(s.elapsed_time(e), vision) for s, e, vision in self.spans]
        gaps = [(prev[1].elapsed_time(s), vision) for prev, (s, _, vision) in zip(self.spans, self.spans[1:])]
        return {"gpu_busy_s": sum(ms for ms, _ in busy) / 1e3, "gpu_idle_s": sum(max(g, 0.0) for g, _ in gaps) / 1e3,
                "gpu_idle_before_vision_steps_s": sum(max(g, 0.0) for g, v in gaps if v) / 1e3,
                "vision_steps": sum(v for _, v in busy), "vision_steps_busy_s": sum(ms for ms, v in busy if v) / 1e3,
                "text_steps": sum(not v for _, v in busy),
                "text_steps_busy_s": sum(ms for ms, v in busy if not v) / 1e3}


def prepare(engine: Engine, num: int, seed: int) -> list[tuple]:
    reqs = sample_image_requests(engine.tokenizer, num, 2, 128, 1024, 0.0, "720p", "jpeg", "random", seed)
    out = []
    for r in reqs:
        content = [{"type": "image_url", "image_url": {"url": u}} for u in r.image_data]
        text, sources = render_chat([{"role": "user", "content": content + [{"type": "text", "text": r.prompt}]}],
                                    engine.tokenizer, engine.chat_template)
        ids, images = engine.encode_prompt(text, [load_image(s) for s in sources])
        out.append((ids, images, SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)))
    return out


def drive(engine: Engine, requests: list[tuple], concurrency: int) -> dict:
    """Run every request, `concurrency` at a time; the wall time and what the steps did."""
    nxt = in_flight = done = steps = decoded = 0
    start = time.perf_counter()
    while done < len(requests):
        while in_flight < concurrency and nxt < len(requests):
            engine.add_request(str(nxt), *requests[nxt])
            nxt += 1
            in_flight += 1
        outs = engine.step()
        steps += 1
        for out in outs:
            decoded += sum(len(o.delta_token_ids) for o in out.outputs)
            if out.finished:
                done += 1
                in_flight -= 1
    wall = time.perf_counter() - start
    return {"duration_s": wall, "req_per_s": len(requests) / wall, "output_tokens": decoded,
            "output_tok_per_s": decoded / wall, "steps": steps, "tokens_per_step": decoded / steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--max-concurrency", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1, help="the dataset seed (bench serving's default)")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quantize-vision", action="store_true")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--context-length", type=int, default=32768)
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = tempfile.mkdtemp(prefix="stepserve-dummy-")
        real_dummy_checkpoint(model_dir)
    engine = Engine(EngineConfig(model=model_dir, load_format="dummy", context_length=args.context_length,
                                 quantization=args.quantization, quantize_vision=args.quantize_vision,
                                 kv_cache_dtype=args.kv_cache_dtype))
    mark = time.perf_counter()
    requests = prepare(engine, args.num_prompts, args.seed)
    print(f"{len(requests)} requests prepared in {time.perf_counter() - mark:.1f} s: mean prompt "
          f"{np.mean([len(r[0]) for r in requests]):.0f} tokens, mean max_tokens "
          f"{np.mean([r[2].max_tokens for r in requests]):.1f}", flush=True)
    timer = StepTimer(engine.runner) if engine.device.type == "cuda" else None
    result = {"num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency,
              **drive(engine, requests, args.max_concurrency), **(timer.totals() if timer else {})}
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "offline_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
