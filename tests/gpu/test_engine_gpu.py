"""The engine at real size (dummy weights, bf16) on the GPU: batch invariance, page accounting, abort.

Greedy equality alone vs batched may break only through bf16 rounding in batch-variant kernels (GEMM
tiling that depends on M); the test measures how often and how early, writes it to $OUT, and requires
exact page accounting.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_engine import make_prompts  # noqa: E402

from stepserve import LLM, SamplingParams  # noqa: E402
from stepserve.engine.engine import WARMUP_PROMPT, _warmup_image  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from stepserve.testing import real_dummy_checkpoint

    path = real_dummy_checkpoint(tmp_path_factory.mktemp("real"))
    return LLM(model=str(path), load_format="dummy", context_length=8192, cuda_graph_max_bs=64)


def test_batched_vs_alone_divergence(llm):
    """Where a prompt's greedy tokens differ alone vs in a batch of 64, the alone run must have been at a
    near-tie: its top two logprobs within a few bf16 steps (logits are bf16, so ties are common with random
    weights, and batch-size-dependent GEMM kernels round differently)."""
    prompts = make_prompts(64)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    first_diff, gaps, second = [], [], 0
    for i, p in enumerate(prompts):
        alone = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
        j = next((j for j, (a, b) in enumerate(zip(alone.token_ids, batched[i])) if a != b), None)
        first_diff.append(j)
        if j is not None:
            top = alone.logprobs[j].top
            gaps.append(round(top[0][1] - top[1][1], 4))
            second += batched[i][j] == top[1][0]
    diverged = [d for d in first_diff if d is not None]
    report = {"prompts": len(prompts), "identical": len(prompts) - len(diverged),
              "first_divergence_steps": sorted(diverged), "top2_logprob_gaps_at_divergence": sorted(gaps),
              "batched_token_was_alone_second_choice": second}
    print("batch invariance:", report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "engine_batch_invariance.json").write_text(json.dumps(report))
    assert all(g <= 0.125 for g in gaps), report
    stats = llm.engine.stats()
    assert stats["num_kv_pages_free"] == stats["num_kv_pages_total"]


def test_abort_and_page_accounting_exact(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.8, max_tokens=100, ignore_eos=True)
    for i, p in enumerate(make_prompts(16)):
        text, images = (p["prompt"], p["images"]) if isinstance(p, dict) else (p, [])
        ids, inputs = engine.encode_prompt(text, images)
        engine.add_request(f"gpu{i}", ids, inputs, params)
    for _ in range(8):
        engine.step()
    for i in range(16):
        engine.abort(f"gpu{i}")
    engine.pool.check_invariants()
    assert engine.stats()["num_kv_pages_free"] == engine.stats()["num_kv_pages_total"]


@pytest.mark.parametrize("image_seed, params", [
    (1001, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)),
    (1000, SamplingParams(temperature=1.0, top_k=20, seed=1, max_tokens=3, ignore_eos=True)),
    (1002, SamplingParams(temperature=1.0, top_p=0.9, seed=1, max_tokens=3, ignore_eos=True)),
    (None, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)),
], ids=["greedy", "top_k", "top_p", "text"])
def test_steps_never_wait_for_the_gpu_while_queueing(llm, image_seed, params):
    """No synchronizing CUDA call on a step's path (vision + prefill, or a text prompt's prefill graph, then
    decodes), torch's sync debug mode checking: a blocking copy there (there were two: the prefill's sampled-row
    index, the sampler's parameters) makes the host wait for the work it has just queued, then leaves the GPU
    idle while it queues the rest of the step. Only `collect` may wait, on the previous step's event."""
    engine = llm.engine
    images = [] if image_seed is None else [_warmup_image(image_seed)]
    ids, images = engine.encode_prompt(WARMUP_PROMPT.format("<im_patch>" if images else ""), images)
    engine.add_request("no-sync", ids, images, params)
    steps = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.has_work():
            engine.step()
            steps += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps >= 3


def test_prefill_graphs_match_eager_steps(tmp_path):
    """The tiny model served with and without prefill graphs (`cuda_graph_max_tokens` 2048 vs 0), prompts
    chunked by 64 tokens: each image prompt alone (its chunks after the first take image rows from the encoder
    cache in captured steps), then all twelve together. Each prompt's first sampled token (the last prefill
    chunk's logits) is the same unless the eager run had a near-tie, and its logprob agrees."""
    from stepserve.testing import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "tiny")
    prompts = make_prompts(12)
    runs = [[p] for p in prompts if isinstance(p, dict)] + [prompts]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    firsts = {}
    for max_tokens in (0, 2048):
        llm = LLM(model=str(path), num_kv_pages=1024, chunked_prefill_size=64, cuda_graph_max_tokens=max_tokens)
        graphs = llm.engine.runner.prefill_graphs
        assert (graphs is not None) == (max_tokens > 0)
        replays = []  # token counts of the steps replayed from a prefill graph
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda *args: replays.append(len(args[1])) or run(*args)
        firsts[max_tokens] = [o.outputs[0].logprobs[0].top for batch in runs
                              for o in llm.generate(batch, params, use_tqdm=False)]
        # Every image prompt alone has chunks with image rows and no image to encode; decode steps are not counted.
        assert len(replays) >= (len(runs) - 1 if graphs is not None else 0), replays
        del llm, graphs
        torch.cuda.empty_cache()
    assert len(firsts[0]) == len(firsts[2048]) == len(runs) - 1 + len(prompts)
    for eager, graphed in zip(firsts[0], firsts[2048]):
        if eager[0][0] != graphed[0][0]:
            assert eager[0][1] - eager[1][1] < 0.05, (eager, graphed)
        assert abs(eager[0][1] - graphed[0][1]) < 0.05, (eager, graphed)
