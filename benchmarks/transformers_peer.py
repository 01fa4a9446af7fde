"""The transformers peer on the same decoder shapes: Qwen3-8B with random bf16 weights, `generate` at batch 1.

TPOT = (time to generate N tokens - time to generate 1) / (N - 1), with a 128-token prompt; the same
definition bench_serving applies to stepserve. Prints one JSON line.
"""

import json
import os
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from stepserve.testing import real_config


def timed_generate(model, ids, n: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    text = real_config()["text_config"]
    cfg = Qwen3Config(**{k: v for k, v in text.items() if k not in ("architectures", "model_type")})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 150000, (1, 128), device="cuda")
    timed_generate(model, ids, 4)  # warm up
    n = 128
    t1, tn = timed_generate(model, ids, 1), timed_generate(model, ids, n)
    result = {"peer": "transformers", "version": __import__("transformers").__version__, "batch": 1,
              "prompt_tokens": 128, "new_tokens": n, "ttft_ms": t1 * 1e3, "tpot_ms": (tn - t1) / (n - 1) * 1e3}
    print(json.dumps(result))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "peer.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
