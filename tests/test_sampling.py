import pytest
import torch

from stepserve.engine.sampling import Sampler, SamplingBatch, uniforms
from stepserve.engine.sampling_params import SamplingParams
from stepserve.errors import InvalidRequestError

SAMPLER = Sampler()


def sample(logits, params, seeds=None, steps=None, output_ids=None, prompt_ids=None, eos_ids=()):
    b, v = logits.shape
    batch = SamplingBatch.build(params, seeds or [0] * b, steps or [0] * b, output_ids or [[] for _ in range(b)],
                                prompt_ids, v, "cpu", eos_ids)
    return SAMPLER.sample(logits.clone(), batch)


def test_greedy_rows_take_the_argmax_alone_and_in_a_sampling_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.3)]
    out = sample(logits[:2], greedy)
    assert out.token_ids.tolist() == logits[:2].argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5), SamplingParams(top_k=1),
             SamplingParams(top_p=0.5), SamplingParams(temperature=0.0, repetition_penalty=1.0),
             SamplingParams(min_p=0.3)]
    tokens = sample(logits, mixed, seeds=list(range(6))).token_ids
    for row in (0, 2, 4):
        assert tokens[row] == logits[row].argmax()


def test_uniforms_are_a_function_of_seed_and_step_only():
    u = uniforms([7, 7, 8, -5, 2**70 + 3], [0, 1, 0, 3, 9])
    assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert uniforms([7], [1]).item() == u[1].item() and uniforms([2**70 + 3], [9]).item() == u[4].item()
    assert len(set(u.tolist())) == 5
    many = uniforms([123] * 4000, list(range(4000)))
    assert abs(many.mean().item() - 0.5) < 0.02 and abs(many.var().item() - 1 / 12) < 0.005


def _run_seeded(logits_per_step, row_params, seed, companions):
    """Tokens of one seeded row over steps, with `companions` rows (params, seed) sampled beside it."""
    tokens = []
    for step, logits in enumerate(logits_per_step):
        params = [p for p, _ in companions] + [row_params]
        seeds = [s for _, s in companions] + [seed]
        steps = [step + 3 * j for j in range(len(companions))] + [step]
        noise = torch.randn(len(companions), logits.shape[0], generator=torch.Generator().manual_seed(step))
        batch_logits = torch.cat([noise, logits[None]])
        tokens.append(sample(batch_logits, params, seeds=seeds, steps=steps).token_ids[-1].item())
    return tokens


@pytest.mark.parametrize("row_params", [SamplingParams(temperature=0.9), SamplingParams(top_k=5, top_p=0.8),
                                        SamplingParams(top_p=0.7, min_p=0.05)])
def test_seeded_row_gives_the_same_tokens_alone_or_in_any_batch(row_params):
    steps = [torch.randn(300, generator=torch.Generator().manual_seed(100 + s)) for s in range(25)]
    alone = _run_seeded(steps, row_params, 42, [])
    crowd = [(SamplingParams(temperature=0.0), 1), (SamplingParams(top_k=3), 2), (SamplingParams(top_p=0.3), 3),
             (SamplingParams(presence_penalty=1.0, temperature=1.2), 4), (SamplingParams(min_p=0.5), 42)]
    assert _run_seeded(steps, row_params, 42, crowd) == alone
    assert _run_seeded(steps, row_params, 42, crowd[:2]) == alone
    assert _run_seeded(steps, row_params, 43, []) != alone


def _chi_square(tokens, probs):
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    return ((observed - expected) ** 2 / expected).sum().item()


def test_draws_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature = 0.7
    probs = torch.softmax(logits / temperature, dim=0)
    n = 8000
    params = [SamplingParams(temperature=temperature)] * n
    across_steps = sample(logits.expand(n, -1), params, seeds=[99] * n, steps=list(range(n))).token_ids
    across_seeds = sample(logits.expand(n, -1), params, seeds=list(range(n)), steps=[5] * n).token_ids
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4. A draw at temperature 1 instead would score in the hundreds.
    assert _chi_square(across_steps, probs) < 30
    assert _chi_square(across_seeds, probs) < 30
    assert _chi_square(across_seeds, torch.softmax(logits, dim=0)) > 100


def _reference_support(logits, temperature, top_k, top_p, min_p):
    probs = torch.softmax(logits / temperature, dim=0)
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k > 0 else order
    renorm = probs[keep] / probs[keep].sum()
    mass, nucleus = 0.0, []
    for token, p in zip(keep, renorm.tolist()):
        if mass >= top_p:
            break
        nucleus.append(token)
        mass += p
    return {t for t in nucleus if probs[t] >= min_p * probs.max()}


@pytest.mark.parametrize("top_k, top_p, min_p", [(4, 1.0, 0.0), (-1, 0.6, 0.0), (-1, 1.0, 0.25), (6, 0.8, 0.0),
                                                 (5, 0.9, 0.2), (-1, 0.75, 0.1), (2, 1.0, 0.0)])
def test_top_k_top_p_min_p_keep_exactly_the_reference_support(top_k, top_p, min_p):
    logits = torch.tensor([1.0, 3.0, -0.5, 2.2, 0.3, 2.9, -2.0, 1.7, 0.9, -1.1, 2.5, 0.0])
    temperature = 1.3
    n = 6000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * n
    tokens = sample(logits.expand(n, -1), params, seeds=list(range(n)), steps=[0] * n).token_ids
    support = _reference_support(logits, temperature, top_k, top_p, min_p)
    assert set(tokens.tolist()) == support
    kept = torch.tensor(sorted(support))
    probs = torch.zeros(12).index_copy_(0, kept, torch.softmax(logits[kept] / temperature, dim=0))
    counts = torch.bincount(tokens, minlength=12)[kept].double()
    expected = probs[kept].double() * n
    assert ((counts - expected) ** 2 / expected).sum().item() < 35  # <= 11 dof: P(chi2 > 35) < 3e-4


def test_top_p_nucleus_of_more_than_a_thousand_tokens():
    """A flat distribution's nucleus holds most of the vocabulary: every token in it can be drawn, none past it."""
    vocab = 3000
    logits = torch.linspace(1.0, 0.0, vocab)
    probs = torch.softmax(logits, dim=0)
    nucleus = int((torch.cumsum(probs, 0) - probs < 0.9).sum())
    assert nucleus > 1024
    n = 3000
    tokens = sample(logits.expand(n, -1), [SamplingParams(top_p=0.9)] * n, seeds=list(range(n))).token_ids
    assert tokens.max().item() < nucleus
    assert tokens.max().item() > 1024


def _reference_penalties(logits, params, output_ids, prompt_ids):
    out = logits.clone()
    for r, p in enumerate(params):
        for t in set(output_ids[r]) | set(prompt_ids[r]):
            x = out[r, t].item()
            out[r, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(output_ids[r]):
            out[r, t] -= p.frequency_penalty * output_ids[r].count(t) + p.presence_penalty
    return out


def test_penalties_match_a_per_row_reference_and_logprobs_see_them():
    g = torch.Generator().manual_seed(3)
    vocab = 40
    logits = torch.randn(5, vocab, generator=g) * 3
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=3),
              SamplingParams(temperature=0.0, presence_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=-1),
              SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=0)]
    output_ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 12, 4, 9, 0)]
    prompt_ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 3, 8, 6, 2)]
    prompt_ids[0].append(vocab + 100)  # an id the model does not have is ignored
    out = sample(logits, params, output_ids=output_ids, prompt_ids=prompt_ids)
    ref = _reference_penalties(logits, params, output_ids, [p if i != 0 else p[:-1] for i, p in enumerate(prompt_ids)])
    assert out.token_ids.tolist() == ref.argmax(-1).tolist()
    ref_logp = torch.log_softmax(ref, dim=-1)
    torch.testing.assert_close(out.logprobs, ref_logp.gather(1, out.token_ids[:, None]).squeeze(1))
    values, ids = out.top_logprobs
    assert ids.shape == (5, 3)
    torch.testing.assert_close(values, ref_logp.topk(3, dim=-1).values)


def test_logprobs_are_before_temperature_and_cuts():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.4, top_k=3, logprobs=2)] * 4
    out = sample(logits, params, seeds=[1, 2, 3, 4])
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    torch.testing.assert_close(out.top_logprobs[0], raw.topk(2, dim=-1).values)
    assert out.top_logprobs[1].tolist() == raw.topk(2, dim=-1).indices.tolist()


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 9], logits[0, 8], logits[0, 7] = 5.0, 4.0, 3.0  # 9: eos, 8: a stop token id
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[8])
    assert sample(logits, [p], steps=[1], eos_ids=[9]).token_ids.item() == 7
    assert sample(logits, [p], steps=[2], eos_ids=[9]).token_ids.item() == 9
    ignore = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[8], ignore_eos=True)
    assert sample(logits, [ignore], steps=[0], eos_ids=[9]).token_ids.item() == 9
    sampled = [SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[8])] * 500
    tokens = sample(logits.expand(500, -1), sampled, seeds=list(range(500)), steps=[4] * 500, eos_ids=[9, 100])
    assert not bool(torch.isin(tokens.token_ids, torch.tensor([8, 9])).any())


def test_all_greedy_batch_builds_no_sampling_tensors():
    batch = SamplingBatch.build([SamplingParams(temperature=0.0)] * 4, [0] * 4, [3] * 4, [[1, 2]] * 4, None,
                                100, "cpu", [5])
    assert batch.all_greedy
    assert (batch.temperature, batch.uniforms, batch.penalties, batch.banned, batch.top_k_cut) == (None,) * 5


@pytest.mark.parametrize("params", [SamplingParams(top_p=0.9), SamplingParams(top_k=5),
                                    SamplingParams(top_k=5, top_p=0.5)], ids=["top_p", "top_k", "top_k_top_p"])
def test_a_nan_row_does_not_fail_the_batch(params):
    """A row of NaN logits (a broken forward) once made the top-k / top-p cut index -1: an error for the whole
    batch (a device assert on CUDA). It now draws some token; the other rows draw what they draw alone."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = sample(logits[1:], [params] * 2, seeds=[2, 3]).token_ids
    logits[0] = float("nan")
    tokens = sample(logits, [params] * 3, seeds=[1, 2, 3]).token_ids
    assert 0 <= tokens[0] < 50 and torch.equal(tokens[1:], alone)


def test_logit_bias_is_added_before_everything_else_and_only_to_its_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    best = logits.argmax(dim=-1)
    forced, banned = (int(best[0]) + 7) % 50, int(best[1])
    params = [SamplingParams(temperature=0.0, logit_bias={forced: 100.0}, logprobs=0),
              SamplingParams(temperature=0.0, logit_bias={banned: -100.0}, logprobs=0),
              SamplingParams(temperature=0.0, logprobs=0)]
    out = sample(logits.clone(), params)
    second = int(logits[1].topk(2).indices[1])
    assert out.token_ids.tolist() == [forced, second, int(best[2])]
    assert out.logprobs[0].item() > -1e-3  # the logprobs are of the biased distribution
    # Sampled rows: a token at -100 is never drawn, whatever the seed.
    top = int(logits[0].argmax())
    row = [SamplingParams(temperature=1.0, logit_bias={top: -100.0})] * 2000
    drawn = sample(logits[0].expand(2000, -1).clone(), row, seeds=list(range(2000))).token_ids
    assert top not in drawn.tolist()
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias={3: 150.0})
    assert e.value.param == "logit_bias"
