"""CUDA graphs for decode steps: one captured forward + logits per padded batch size.

A decode step launches hundreds of small kernels; replaying a graph removes the per-launch CPU cost.
Inputs live in static buffers that each replay reads; rows past the real batch are padding that write
their K/V into a scratch slot nobody reads and attend over one token.
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


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_bs: int, max_pages_per_seq: int, max_context: int,
                 scratch_slot: int, device: torch.device, kv_scale: float = 1.0, num_tokens: int | None = None):
        self.model, self.device, self.kv_scale, self.num_tokens = model, device, kv_scale, num_tokens
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.max_context, self.scratch_slot = max_context, scratch_slot
        n = self.max_bs
        # A step's inputs reach the graph in two host-to-device copies from pinned buffers (each separate copy or
        # fill between two replays costs the GPU a few microseconds): the per-row fields, and the page table.
        # Two host buffers alternate, so the host fills one while the other's copy may still be queued.
        self._host = [_StepInputs(n, max_pages_per_seq, torch.device("cpu"), pin=device.type == "cuda")
                      for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if device.type == "cuda" else []  # capture: CUDA only
        self._turn = 0
        self.inputs = _StepInputs(n, max_pages_per_seq, device)
        self.inputs.slot_mapping.fill_(scratch_slot)
        self.inputs.kv_lens.fill_(1)
        self.cu_q_lens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

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

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
                # Warm up: compile kernels and let cuBLAS pick its workspaces outside the capture.
                self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.logits[bs] = self._forward(bs)
                self.pool = graph.pool()
                self.graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

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
        host, copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # this buffer's previous copy has left it (normally long ago)
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
        return self.logits[padded][:bs]


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
