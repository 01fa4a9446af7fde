"""L2 prefetch of a weight that the decode step reads after a latency-bound stretch.

At batch 1 the step between the qkv GEMV and o_proj (norm + rope + KV store, split-KV attention, its reduce) is a
chain of small kernels, each waiting on the one before: several microseconds in which HBM moves little.
`prefetch_weight(o_proj.weight)` issued right after qkv asks the memory system to bring o_proj's bytes into L2
meanwhile (Hopper's `cp.async.bulk.prefetch.L2`: fire-and-forget, no registers, no result), so o_proj then
streams them from L2. A hint only: nothing waits for it and nothing depends on it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from stepserve.kernels import pdl

CHUNK = 4096  # bytes per bulk prefetch (one per thread)
THREADS = 128
# Decode steps of at most this many tokens prefetch; beyond that the attention reads enough KV to keep HBM busy.
MAX_TOKENS = 8


@triton.jit
def _prefetch_l2_kernel(base_ptr, num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # the next kernel may start at once: it waits for this one, which waits for the one before
        tl.extra.cuda.gdc_launch_dependents()
    idx = tl.minimum(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), num_chunks - 1)  # past the end: the last again
    ptrs = base_ptr + idx.to(tl.int64) * CHUNK
    size = tl.full([BLOCK], CHUNK, tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)
    if USE_PDL:  # complete only after the kernel before has: later kernels' waits rely on the chain
        tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9  # bulk prefetch is sm_90+


def prefetch_weight(weight: torch.Tensor, tokens: int) -> None:
    """`layers.linear.prefetch_weight` on CUDA: queue L2 prefetches of `weight`'s bytes (contiguous) when the
    step has at most MAX_TOKENS tokens, on Hopper or later; otherwise nothing."""
    device = weight.device
    if tokens > MAX_TOKENS or not weight.is_contiguous() or triton.knobs.runtime.interpret or \
            not _supported(device.index if device.index is not None else torch.cuda.current_device()):
        return
    num_chunks = weight.numel() * weight.element_size() // CHUNK
    if num_chunks == 0:
        return
    use_pdl = pdl.enabled(device)
    _prefetch_l2_kernel[(triton.cdiv(num_chunks, THREADS),)](weight.view(torch.uint8), num_chunks, CHUNK=CHUNK,
                                                             BLOCK=THREADS, USE_PDL=use_pdl, num_warps=THREADS // 32,
                                                             launch_pdl=use_pdl)
