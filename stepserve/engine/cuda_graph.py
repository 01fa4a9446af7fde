"""CUDA graphs for decode steps: one captured forward + logits per padded batch size.

A decode step launches hundreds of small kernels; replaying a graph removes the per-launch CPU cost.
Inputs live in static buffers that each replay reads; rows past the real batch are padding that write
their K/V into a scratch slot nobody reads and attend over one token.
"""

from __future__ import annotations

import logging

import torch

from stepserve.layers.attention import ForwardContext, forward_context

log = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_bs + 1, 16))
    return [s for s in sizes if s <= max_bs]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_bs: int, max_pages_per_seq: int, max_context: int,
                 scratch_slot: int, device: torch.device, kv_scale: float = 1.0):
        self.model, self.device, self.kv_scale = model, device, kv_scale
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.max_context, self.scratch_slot = max_context, scratch_slot
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_pages_per_seq, dtype=torch.int32, device=device)
        self.cu_q_lens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(cu_q_lens=self.cu_q_lens[: bs + 1], kv_lens=self.kv_lens[:bs],
                              block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
                              max_q_len=1, max_kv_len=self.max_context, q_lens_cpu=[1] * bs, kv_lens_cpu=[1] * bs,
                              kv_scale=self.kv_scale)

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(self._context(bs)):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        return self.model.compute_logits(hidden)

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

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            kv_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Inputs for the real batch (on the device); returns logits [bs, V] (a view: read before the next run)."""
        bs = input_ids.shape[0]
        padded = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(slot_mapping)
        self.slot_mapping[bs:padded].fill_(self.scratch_slot)
        self.kv_lens[:bs].copy_(kv_lens)
        self.kv_lens[bs:padded].fill_(1)
        self.block_tables[:padded].zero_()
        self.block_tables[:bs, : block_tables.shape[1]].copy_(block_tables)
        self.graphs[padded].replay()
        return self.logits[padded][:bs]
