"""CUDA graphs for engine steps: decode steps per padded batch size, prefill (or mixed) steps per padded token count.

A step launches hundreds of small kernels; replaying a graph removes the per-launch CPU cost. Inputs live in
static buffers that each replay reads; rows past the real batch are padding that write their K/V into a scratch
slot nobody reads (and, in a decode step, attend over one token).
"""

from __future__ import annotations

import logging

import torch

from stepserve.engine.sampling import mask_padded_vocab
from stepserve.layers.attention import ForwardContext, forward_context

log = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 16))
    return [s for s in sizes if s <= max_bs]


class _StepGraphs:
    """One graph per size, captured largest first into one memory pool (`pool`: one to share with graphs that
    never replay at the same time), and the inputs' staging: a step's inputs reach the graph in two host-to-device
    copies from pinned buffers (each separate copy or fill between two replays costs the GPU a few microseconds),
    the per-row fields and the page table. Two host buffers alternate, so the host fills one while the other's
    copy may still be queued. A subclass defines `_forward(size)`: the work one graph captures, its output."""

    def __init__(self, sizes: list[int], host: list, device: torch.device, pool: tuple | None):
        self.sizes, self.device, self.pool = sizes, device, pool
        self._host = host
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if device.type == "cuda" else []  # capture: CUDA only
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
                # Warm up: compile kernels and let cuBLAS pick its workspaces outside the capture.
                self._forward(size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[size] = self._forward(size)
                self.pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs (%s) for sizes %s", type(self).__name__, self.sizes)

    def _staging(self):
        """The host buffer to fill for this step, and the event its copy records."""
        host, copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # this buffer's previous copy has left it (normally long ago)
        return host, copied


class DecodeGraphs(_StepGraphs):
    """Pure decode steps: the whole model and its logits, per padded batch size."""

    def __init__(self, model: torch.nn.Module, max_bs: int, max_pages_per_seq: int, max_context: int,
                 scratch_slot: int, device: torch.device, kv_scale: float = 1.0, num_tokens: int | None = None,
                 pool: tuple | None = None):
        sizes = graph_batch_sizes(max_bs)
        n = sizes[-1]
        host = [_StepInputs(n, max_pages_per_seq, torch.device("cpu"), pin=device.type == "cuda") for _ in range(2)]
        super().__init__(sizes, host, device, pool)
        self.model, self.kv_scale, self.num_tokens = model, kv_scale, num_tokens
        self.max_bs = n
        self.max_context, self.scratch_slot = max_context, scratch_slot
        self.inputs = _StepInputs(n, max_pages_per_seq, device)
        self.inputs.slot_mapping.fill_(scratch_slot)
        self.inputs.kv_lens.fill_(1)
        self.cu_q_lens = torch.arange(n + 1, dtype=torch.int32, device=device)

    def _context(self, bs: int) -> ForwardContext:
        x = self.inputs
        return ForwardContext(cu_q_lens=self.cu_q_lens[: bs + 1], kv_lens=x.kv_lens[:bs],
                              block_tables=x.block_tables[:bs], slot_mapping=x.slot_mapping[:bs],
                              max_q_len=1, max_kv_len=self.max_context, q_lens_cpu=[1] * bs, kv_lens_cpu=[1] * bs,
                              kv_scale=self.kv_scale)

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(self._context(bs)):
            hidden = self.model(self.inputs.input_ids[:bs], self.inputs.positions[:bs])
        logits = self.model.compute_logits(hidden)
        return logits if self.num_tokens is None else mask_padded_vocab(logits, self.num_tokens)

    def can_run(self, bs: int) -> bool:
        return bs <= self.max_bs and bool(self.graphs)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], kv_lens: list[int],
            tables: list[list[int]], pending_at: list[int], pending_rows: list[int],
            last_sampled: torch.Tensor | None) -> torch.Tensor:
        """One decode step of len(input_ids) sequences; input_ids[pending_at[i]] is replaced by
        last_sampled[pending_rows[i]] (a token still on the device). Returns logits [bs, V] with the padded
        vocabulary rows at -inf (a view: read before the next run)."""
        bs = len(input_ids)
        padded = next(s for s in self.sizes if s >= bs)
        host, copied = self._staging()
        k = len(pending_at)
        host.fill(input_ids, positions, slots, kv_lens, tables, pending_at + pending_rows, padded, self.scratch_slot)
        width = max(len(t) for t in tables)
        self.inputs.rows.copy_(host.rows, non_blocking=True)
        self.inputs.block_tables[:bs, :width].copy_(host.block_tables[:bs, :width], non_blocking=True)
        copied.record()
        if k:
            ids, at = self.inputs.input_ids, self.inputs.pending[: 2 * k]
            ids[at[:k]] = last_sampled[at[k:]]
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]


class _StepInputs:
    """A decode step's inputs for up to n sequences: int64 ids, positions, slots and pending-token rows, and int32
    kv lens, as views of one byte buffer `rows` (one copy moves them all), plus the int32 page table [n, pages]."""

    def __init__(self, n: int, pages: int, device: torch.device, pin: bool = False):
        self.rows = torch.zeros(44 * n, dtype=torch.uint8, device=device, pin_memory=pin)
        wide = self.rows[: 40 * n].view(torch.int64)
        self.input_ids, self.positions, self.slot_mapping = wide[:n], wide[n : 2 * n], wide[2 * n : 3 * n]
        self.pending = wide[3 * n :]  # pending positions in the batch, then their rows in the last sampled ids
        self.kv_lens = self.rows[40 * n :].view(torch.int32)
        self.block_tables = torch.zeros(n, pages, dtype=torch.int32, device=device, pin_memory=pin)

    def fill(self, input_ids: list[int], positions: list[int], slots: list[int], kv_lens: list[int],
             tables: list[list[int]], pending: list[int], padded: int, scratch_slot: int) -> None:
        """Host side: write a batch of bs sequences; rows bs..padded are padding (the scratch slot, one key)."""
        bs = len(input_ids)
        ids, pos, slot, pend, lens, table = (t.numpy() for t in (self.input_ids, self.positions, self.slot_mapping,
                                                                 self.pending, self.kv_lens, self.block_tables))
        ids[:bs], pos[:bs], slot[:bs], lens[:bs] = input_ids, positions, slots, kv_lens
        # Padding rows: token 0 at position 0 (this buffer may hold an older step's placeholder ids there).
        ids[bs:padded], pos[bs:padded], slot[bs:padded], lens[bs:padded] = 0, 0, scratch_slot, 1
        pend[: len(pending)] = pending
        for row, pages in zip(table, tables):
            row[: len(pages)] = pages


def prefill_token_counts(max_tokens: int) -> list[int]:
    """Token counts captured for prefill steps: a step replays the smallest at or above its own, so above 128
    they are 128 apart (a step pads by less than 128 tokens of GEMM rows)."""
    sizes = [16, 32, 64] + list(range(128, max_tokens + 1, 128))
    return [s for s in sizes if s <= max_tokens]


class PrefillGraphs(_StepGraphs):
    """Steps with prefill chunks (and any decodes before them) of up to `max_tokens` tokens: the decoder's layers
    captured per padded token count. The caller computes the input embeddings (image rows merged) before a replay
    and the logits of the rows it samples after it.

    Each capture attends over `min(tokens, max_seqs)` sequences through the extend kernel alone: sequences past
    the step's own are empty (their q offsets repeat the step's token count), and the extend kernel gives them no
    tiles. Captured steps therefore never split their decodes off into the decode kernel, as an eager step with
    `MIN_MIXED_DECODES` of them does."""

    def __init__(self, decoder: torch.nn.Module, hidden_size: int, dtype: torch.dtype, max_tokens: int, max_seqs: int,
                 max_pages_per_seq: int, max_context: int, scratch_slot: int, device: torch.device,
                 kv_scale: float = 1.0, pool: tuple | None = None):
        sizes = prefill_token_counts(max_tokens)
        n, b = sizes[-1], min(max_seqs, sizes[-1])
        host = [_PrefillInputs(n, b, max_pages_per_seq, torch.device("cpu"), device.type == "cuda") for _ in range(2)]
        super().__init__(sizes, host, device, pool)
        self.decoder, self.kv_scale = decoder, kv_scale
        self.max_seqs = b
        self.max_context, self.scratch_slot = max_context, scratch_slot
        self.inputs = _PrefillInputs(n, b, max_pages_per_seq, device)
        self.inputs.slot_mapping.fill_(scratch_slot)
        self.embeds = torch.zeros(n, hidden_size, dtype=dtype, device=device)

    def _seqs(self, tokens: int) -> int:
        return min(tokens, self.max_seqs)

    def _forward(self, tokens: int) -> torch.Tensor:
        x, b = self.inputs, self._seqs(tokens)
        # Host lists as for one sequence of all the tokens: the only host data the captured kernels' launches read
        # is whether the step starts with decodes (it does not, so none are split off) and its token count.
        ctx = ForwardContext(cu_q_lens=x.cu_q_lens[: b + 1], kv_lens=x.kv_lens[:b], block_tables=x.block_tables[:b],
                             slot_mapping=x.slot_mapping[:tokens], max_q_len=tokens, max_kv_len=self.max_context,
                             q_lens_cpu=[tokens] + [0] * (b - 1), kv_lens_cpu=[self.max_context] + [0] * (b - 1),
                             kv_scale=self.kv_scale)
        with forward_context(ctx):
            return self.decoder(x.positions[:tokens], self.embeds[:tokens])

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        if not self.graphs or num_tokens > self.sizes[-1]:
            return False
        return num_seqs <= self._seqs(next(s for s in self.sizes if s >= num_tokens))

    def run(self, embeds: torch.Tensor, positions: list[int], slots: list[int], q_lens: list[int],
            kv_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """The decoder over a step's input embeddings [T, H] (T = sum(q_lens)): final hidden states [T, H], a view
        of the graph's output (read before the next run)."""
        tokens = len(positions)
        padded = next(s for s in self.sizes if s >= tokens)
        host, copied = self._staging()
        host.fill(positions, slots, q_lens, kv_lens, tables, padded, self.scratch_slot)
        b, width = len(q_lens), max(len(t) for t in tables)
        self.inputs.rows.copy_(host.rows, non_blocking=True)
        self.inputs.block_tables[:b, :width].copy_(host.block_tables[:b, :width], non_blocking=True)
        copied.record()
        self.embeds[:tokens].copy_(embeds)
        self.graphs[padded].replay()
        return self.outputs[padded][:tokens]


class _PrefillInputs:
    """A prefill step's inputs for up to n tokens of up to b sequences: int64 positions and slots, int32 q offsets
    and kv lens, as views of one byte buffer `rows` (one copy moves them all), plus the int32 page table."""

    def __init__(self, n: int, b: int, pages: int, device: torch.device, pin: bool = False):
        offsets = -(-(b + 1) // 4) * 4  # int32 entries before kv_lens: 16-byte aligned, as Triton specializes
        self.rows = torch.zeros(16 * n + 4 * (offsets + b), dtype=torch.uint8, device=device, pin_memory=pin)
        wide = self.rows[: 16 * n].view(torch.int64)
        self.positions, self.slot_mapping = wide[:n], wide[n:]
        narrow = self.rows[16 * n :].view(torch.int32)
        self.cu_q_lens, self.kv_lens = narrow[: b + 1], narrow[offsets:]
        self.block_tables = torch.zeros(b, pages, dtype=torch.int32, device=device, pin_memory=pin)

    def fill(self, positions: list[int], slots: list[int], q_lens: list[int], kv_lens: list[int],
             tables: list[list[int]], padded: int, scratch_slot: int) -> None:
        """Host side: a step of len(positions) tokens; tokens up to `padded` are padding (position 0, the scratch
        slot) and the sequences past the step's are empty (q offsets at the token count)."""
        t, b = len(positions), len(q_lens)
        pos, slot, cu, lens, table = (x.numpy() for x in (self.positions, self.slot_mapping, self.cu_q_lens,
                                                          self.kv_lens, self.block_tables))
        pos[:t], slot[:t] = positions, slots
        pos[t:padded], slot[t:padded] = 0, scratch_slot
        cu[0] = 0
        cu[1 : b + 1] = q_lens
        cu[: b + 1] = cu[: b + 1].cumsum()
        cu[b + 1 :] = t
        lens[:b] = kv_lens
        for row, pages in zip(table, tables):
            row[: len(pages)] = pages
