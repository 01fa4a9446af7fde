"""Where the time to first token goes for the seed latency request, in process (no HTTP), at real size.

    python benchmarks/ttft_breakdown.py [--runs 5] [--images 2] [--resolution 1280x720] [--format png]

One request = `--images` random images as data URLs (as `stepserve bench serving --dataset-name image` sends
them) + 128 random text tokens. Phases, each closed by a device synchronize so GPU work is charged to the
phase that queued it: image load (base64 + decode), preprocessing, tokenization, the vision tower (timed
inside the first engine step), the rest of the first step (prefill + sampling), and the steps until the
first token reaches the host. Prints the median of each phase over `--runs` requests after one warm-up.
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch

from stepserve.bench.datasets import make_image_data_url
from stepserve.config import EngineConfig
from stepserve.engine.engine import Engine
from stepserve.engine.sampling_params import SamplingParams
from stepserve.multimodal.image_io import load_image
from stepserve.multimodal.processor import expand_prompt
from stepserve.testing import real_dummy_checkpoint


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_request(engine: Engine, urls: list[str], text_ids: list[int], rid: str, vision_ms: list[float]) -> dict:
    t = {}
    start = time.perf_counter()
    images = [load_image(u) for u in urls]
    t["load_images"] = time.perf_counter() - start
    mark = time.perf_counter()
    inputs = [engine.image_processor(im) for im in images]
    t["preprocess"] = time.perf_counter() - mark
    mark = time.perf_counter()
    ids = expand_prompt(text_ids[:64] + [engine.image_token_id] * len(inputs) + text_ids[64:], inputs,
                        engine.image_token_id)
    engine.add_request(rid, ids, inputs, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    t["add"] = time.perf_counter() - mark
    vision_ms.clear()
    mark = time.perf_counter()
    engine.step()
    sync()
    t["first_step"] = time.perf_counter() - mark
    t["vision"] = sum(vision_ms) / 1e3
    mark = time.perf_counter()
    steps = 0
    while True:
        outs = engine.step()
        steps += 1
        if any(o.request_id == rid and o.outputs[0].token_ids for o in outs):
            break
    t["until_first_token"] = time.perf_counter() - mark
    t["ttft"] = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    t["steps_after_first"] = steps
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--resolution", default="1280x720")
    ap.add_argument("--format", default="png")
    ap.add_argument("--model-dir", default="/tmp/step3-vl-10b-dummy")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model (a smoke test on CPU)")
    args = ap.parse_args()
    if args.tiny:
        engine = Engine(EngineConfig())
    else:
        real_dummy_checkpoint(args.model_dir)
        engine = Engine(EngineConfig(model=args.model_dir, load_format="dummy", context_length=32768,
                                     quantization=args.quantization))
    runner = engine.runner
    vision_ms: list[float] = []
    encode = runner.encode

    def timed_encode(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = encode(*a, **k)
        sync()
        vision_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    runner.encode = timed_encode
    w, h = (int(v) for v in args.resolution.split("x"))
    rng = np.random.default_rng(0)
    words = " ".join(f"word{i}" for i in rng.integers(0, 1000, size=200))
    text_ids = engine.tokenizer.encode(words, add_special_tokens=False)[:128]
    rows = []
    for r in range(args.runs + 1):
        urls = [make_image_data_url(w, h, "random", args.format, rng) for _ in range(args.images)]
        t = one_request(engine, urls, text_ids, f"r{r}", vision_ms)
        print(f"run {r}: " + " ".join(f"{k}={v * 1e3:.1f}ms" if k != "steps_after_first" else f"{k}={v}"
                                      for k, v in t.items()), flush=True)
        if r:
            rows.append(t)
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    med["prefill_and_sample"] = med["first_step"] - med["vision"]
    print(json.dumps({k: round(v * 1e3, 2) if k != "steps_after_first" else v for k, v in med.items()}))


if __name__ == "__main__":
    main()
