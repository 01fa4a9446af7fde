"""The sampler: logits [B, V] -> one token per row, in a fixed number of batched tensor passes.

Order per row: logit_bias, repetition / presence / frequency penalties, min_tokens bans, (logprobs are read here),
temperature, top-k, top-p, min-p, draw. Greedy rows (temperature 0 or top_k 1) take the argmax.

The draw is an inverse-CDF sample with ONE uniform per row, u = hash(seed, step), computed with integer
ops on the [B] seeds. Row i's token therefore depends only on its own logits, seed and step: the same
seeded request gives the same tokens alone or in any batch, run to run, and unseeded requests use the
same path with a seed the engine picks. One uniform per row costs three passes over [B, V] (max, exp,
cumsum) where Gumbel-max with per-token hashed noise would cost ~15 integer passes.

Top-k / top-p / min-p become one cut value per row: tokens whose scaled logit is below it are dropped
(ties with the cut value are kept). Cut values come from the sorted head of each row (torch.topk) for
top-k rows, from the whole sorted row for top-p rows without top-k (on CUDA a search kernel finds the same
value without sorting: `top_p_cut`). No step reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from stepserve.engine.sampling_params import SamplingParams
from stepserve.host_copy import to_device
from stepserve.layers.dispatch import dispatched

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_STEP_SALT = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xor-shift-multiply) on values held in int64.

    Both multipliers are below 2**31, so no product leaves int64 and every device computes the same bits.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniforms(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """One uniform in [0, 1) per row, a pure function of (seed, step): float32 [B] on the CPU."""
    seeds = [s & _MASK64 for s in seeds]
    lo = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64)
    hi = torch.tensor([s >> 32 for s in seeds], dtype=torch.int64)
    h = _mix32(torch.tensor(steps, dtype=torch.int64) ^ _STEP_SALT)
    h = _mix32(_mix32(h ^ hi) ^ lo)
    return ((h >> 8).double() * 2.0**-24).float()  # 24 bits: exact in float32 and strictly below 1


def mask_padded_vocab(logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Logits [B, V] with the padded vocabulary rows (ids at or past num_tokens: no token has them) at -inf, in
    place: they are never sampled."""
    if num_tokens < logits.shape[-1]:
        logits[:, num_tokens:] = float("-inf")
    return logits


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # int64 [B]
    logprobs: torch.Tensor | None  # float32 [B]: the sampled token's logprob
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (values [B, k], ids [B, k]), best first


@dataclass
class _Cut:
    """Rows that need a top-k and/or top-p cut, with their parameters."""

    rows: torch.Tensor | None  # int64 [b]; None: every row of the batch
    top_k: torch.Tensor | None  # int64 [b]; None for the top-p-only group
    top_p: torch.Tensor  # float32 [b]; 2.0 (never reached) where off
    max_k: int | None  # the largest top_k: sorted candidates taken per row; None for the top-p-only group


@dataclass
class _Penalties:
    """Sparse: (row, token id) pairs, one per occurrence, so the work scales with the tokens, not with B x V."""

    repetition: torch.Tensor  # float32 [B]
    presence: torch.Tensor  # float32 [B]
    frequency: torch.Tensor  # float32 [B]
    seen: tuple[torch.Tensor, torch.Tensor] | None  # prompt and output pairs of rows with a repetition penalty
    generated: tuple[torch.Tensor, torch.Tensor] | None  # output pairs of rows with presence / frequency


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step; each field is None when no row needs it, so `sample` skips it."""

    all_greedy: bool
    greedy_rows: torch.Tensor | None  # int64 [g]: argmax rows in a batch that also samples
    temperature: torch.Tensor | None  # [B, 1]; 1.0 on greedy rows
    uniforms: torch.Tensor | None  # [B, 1]
    log_min_p: torch.Tensor | None  # [B, 1]; -inf where min_p is off
    top_k_cut: _Cut | None  # rows with top-k (and maybe top-p)
    top_p_cut: _Cut | None  # rows with top-p and no top-k
    penalties: _Penalties | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf this step
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, float32 logit_bias values)
    num_logprobs: int | None  # the largest top-logprobs count asked for; None when no row wants logprobs

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], output_ids: list[list[int]],
              prompt_ids: list[list[int]] | None, vocab_size: int, device: torch.device | str,
              eos_ids: Sequence[int] = ()) -> SamplingBatch:
        """Collect the rows' SamplingParams into tensors on `device`.

        steps[i]: tokens row i has generated so far. eos_ids: the model's end-of-sequence ids; while a row
        has fewer than min_tokens tokens they and its stop_token_ids are banned (eos only without ignore_eos).
        prompt_ids is read only for rows with a repetition penalty.
        """
        greedy, sampled, top_k_rows, top_p_rows, pen_rows, ban_pairs, biases = [], [], [], [], [], [], []
        any_min_p, num_logprobs = False, None
        for i, p in enumerate(params):
            if p.greedy:
                greedy.append(i)
            else:
                sampled.append(i)
                if 1 <= p.top_k < vocab_size:
                    top_k_rows.append(i)
                elif p.top_p < 1.0:
                    top_p_rows.append(i)
                any_min_p = any_min_p or p.min_p > 0.0
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                pen_rows.append(i)
            if steps[i] < p.min_tokens:
                ids = p.stop_token_ids if p.ignore_eos else chain(p.stop_token_ids, eos_ids)
                ban_pairs.extend((i, t) for t in ids if 0 <= t < vocab_size)
            if p.logprobs is not None:
                num_logprobs = max(num_logprobs or 0, p.logprobs)
            biases.extend((i, t, b) for t, b in p.logit_bias.items() if t < vocab_size)

        def tensor(values, dtype=torch.int64) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        def column(values) -> torch.Tensor:
            return tensor(values, torch.float32).unsqueeze(1)

        def row_index(rows: list[int]) -> torch.Tensor | None:
            return None if len(rows) == len(params) else tensor(rows)

        batch = cls(all_greedy=not sampled, greedy_rows=None, temperature=None, uniforms=None, log_min_p=None,
                    top_k_cut=None, top_p_cut=None, penalties=None, num_logprobs=num_logprobs,
                    banned=tensor(list(zip(*ban_pairs))).unbind(0) if ban_pairs else None, bias=None)
        if biases:
            rows, ids, values = zip(*biases)
            batch.bias = tensor(rows), tensor(ids), tensor(values, torch.float32)
        if pen_rows:
            batch.penalties = _build_penalties(params, pen_rows, output_ids, prompt_ids, vocab_size, device)
        if not sampled:
            return batch
        if greedy:
            batch.greedy_rows = tensor(greedy)
        batch.temperature = column([1.0 if p.greedy else p.temperature for p in params])
        batch.uniforms = to_device(uniforms(seeds, steps).unsqueeze(1), device)
        if any_min_p:
            batch.log_min_p = column([math.log(p.min_p) if not p.greedy and p.min_p > 0 else -math.inf
                                      for p in params])
        if top_k_rows:
            ks = [params[i].top_k for i in top_k_rows]
            top_p = [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in top_k_rows]
            batch.top_k_cut = _Cut(row_index(top_k_rows), tensor(ks), tensor(top_p, torch.float32), max(ks))
        if top_p_rows:
            batch.top_p_cut = _Cut(row_index(top_p_rows), None,
                                   tensor([params[i].top_p for i in top_p_rows], torch.float32), None)
        return batch


def _build_penalties(params: list[SamplingParams], rows: list[int], output_ids: list[list[int]],
                     prompt_ids: list[list[int]] | None, vocab_size: int, device) -> _Penalties:
    rep_rows = [i for i in rows if params[i].repetition_penalty != 1.0]
    gen_rows = [i for i in rows if params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0]
    seen = None
    if rep_rows:
        lists = [output_ids[i] for i in rep_rows]
        if prompt_ids is not None:
            rep_rows, lists = rep_rows * 2, lists + [prompt_ids[i] for i in rep_rows]
        seen = _flat_ids(rep_rows, lists, vocab_size, device)
    generated = _flat_ids(gen_rows, [output_ids[i] for i in gen_rows], vocab_size, device) if gen_rows else None

    def per_row(name: str) -> torch.Tensor:
        return to_device(torch.tensor([getattr(p, name) for p in params], dtype=torch.float32), device)

    return _Penalties(per_row("repetition_penalty"), per_row("presence_penalty"), per_row("frequency_penalty"),
                      seen, generated)


def _flat_ids(rows: list[int], id_lists: list[list[int]], vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) of every in-vocabulary id; numpy flattens ~10x faster than torch.tensor on a Python list."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    keep = (ids >= 0) & (ids < vocab_size)
    return to_device(torch.from_numpy(row_of[keep]), device), to_device(torch.from_numpy(ids[keep]), device)


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _put(x: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> None:
    if rows is None:
        x.copy_(values)
    else:
        x.index_copy_(0, rows, values)


class Sampler:
    """Stateless; `sample` overwrites `logits` (penalties, bans, then the sampling weights) to save [B, V] copies."""

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        """Logprobs are of the distribution after logit_bias, penalties and min_tokens bans, before temperature
        and cuts."""
        if batch.bias is not None:
            rows, ids, values = batch.bias
            logits.index_put_((rows, ids), values, accumulate=True)  # both float32
        if batch.penalties is not None:
            _apply_penalties(logits, batch.penalties)
        if batch.banned is not None:
            logits.index_put_(batch.banned, logits.new_full((), -math.inf))
        logp = torch.log_softmax(logits, dim=-1) if batch.num_logprobs is not None else None
        tokens = _argmax(logits) if batch.all_greedy else _draw(logits, batch)
        if logp is None:
            return SampleResult(tokens, None, None)
        top = logp.topk(batch.num_logprobs, dim=-1) if batch.num_logprobs > 0 else None
        return SampleResult(tokens, logp.gather(1, tokens.unsqueeze(1)).squeeze(1),
                            (top.values, top.indices) if top is not None else None)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.max(dim=-1).indices  # first maximum, like argmax, and twice as fast on the CPU


def _apply_penalties(logits: torch.Tensor, pen: _Penalties) -> None:
    """Repetition as in HF (divide positive / multiply negative logits of tokens in prompt or output); presence
    and frequency as OpenAI defines them, on output tokens. A token repeated in the pairs is written several
    times with the same value (gather, then write), so the non-accumulating writes are well defined."""
    if pen.seen is not None:
        rows, ids = pen.seen
        old, r = logits[rows, ids], pen.repetition[rows]
        logits[rows, ids] = torch.where(old > 0, old / r, old * r)
    if pen.generated is not None:
        rows, ids = pen.generated
        logits[rows, ids] = logits[rows, ids] - pen.presence[rows]
        logits.index_put_((rows, ids), -pen.frequency[rows], accumulate=True)


def _draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    greedy = _argmax(logits.index_select(0, batch.greedy_rows)) if batch.greedy_rows is not None else None
    scaled = logits.div_(batch.temperature)
    row_max = scaled.amax(dim=-1, keepdim=True)
    cut = _cut_values(scaled, row_max, batch)
    if cut is not None:
        scaled.masked_fill_(scaled < cut, -math.inf)
    cdf = scaled.sub_(row_max).exp_().cumsum_(dim=-1)  # in place: no [B, V] temporaries
    total = cdf[:, -1:]
    # u < 1, but u * total can round up to total; the clamp keeps the pick on a token of nonzero weight.
    target = torch.minimum(batch.uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    # clamped: NaN weights from a broken forward must not index past the vocabulary
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    if greedy is not None:
        tokens.index_copy_(0, batch.greedy_rows, greedy)
    return tokens


def _cut_values(scaled: torch.Tensor, row_max: torch.Tensor, batch: SamplingBatch) -> torch.Tensor | None:
    """[B, 1] per-row lowest kept scaled logit (top-k, top-p and min-p together), or None if no row cuts."""
    if batch.log_min_p is None and batch.top_k_cut is None and batch.top_p_cut is None:
        return None
    cut = row_max + batch.log_min_p if batch.log_min_p is not None else torch.full_like(row_max, -math.inf)
    for group in (batch.top_k_cut, batch.top_p_cut):
        if group is not None:
            _put(cut, group.rows, torch.maximum(_take(cut, group.rows), _group_cut(_take(scaled, group.rows), group)))
    return cut


@dispatched
def top_p_cut(scaled: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [b, V], top_p [b] -> [b, 1]: the lowest scaled logit that top-p keeps in each row.

    The nucleus can hold any number of tokens, so the whole row is sorted. Looking in the best few first would
    need the rows they do not cover on the host (nonzero): the host waiting for the GPU."""
    vals = scaled.sort(dim=-1, descending=True).values
    return _nucleus_cut(vals, None, top_p, vals.logsumexp(dim=-1, keepdim=True))


def _group_cut(sub: torch.Tensor, group: _Cut) -> torch.Tensor:
    if group.top_k is None:
        return top_p_cut(sub, group.top_p)
    vals = sub.topk(group.max_k, dim=-1).values
    in_k = torch.arange(group.max_k, device=sub.device) < group.top_k.unsqueeze(1)
    # top-p renormalises over the top-k survivors
    log_norm = vals.masked_fill(~in_k, -math.inf).logsumexp(dim=-1, keepdim=True)
    return _nucleus_cut(vals, in_k, group.top_p, log_norm)


def _nucleus_cut(vals: torch.Tensor, in_k: torch.Tensor | None, top_p: torch.Tensor,
                 log_norm: torch.Tensor) -> torch.Tensor:
    """On descending candidates (in_k: the top-k ones, None for the whole row): the value of the last token kept
    by top-p (the token that crosses top_p is kept; if the mass never reaches top_p, the last candidate)."""
    probs = torch.exp(vals - log_norm)
    if in_k is not None:
        probs.masked_fill_(~in_k, 0.0)
    keep = (probs.cumsum(dim=-1) - probs) < top_p.unsqueeze(1)
    if in_k is not None:
        keep &= in_k
    # At least one: a NaN row (a broken forward) keeps nothing, and index -1 would take the whole batch down.
    return vals.gather(1, keep.sum(dim=-1, keepdim=True).clamp_(min=1) - 1)
