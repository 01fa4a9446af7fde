"""FlashAttention-4's varlen forward, from the optional `flash-attn-4` package (CuTe DSL kernels), for the vision
tower's bidirectional attention on Hopper.

At head_dim 96 cuDNN's SDPA runs at ~300-380 TFLOP/s on the H100. One FA4 launch over all of a batch's
sequences (two 720p images: 2 x 2704 + 12 x 1296 tokens, 16 heads) took 0.48-0.52 ms against 0.67-0.73 ms for
cuDNN's two calls, each pair measured in one call. FA4's own tile choice (192 x 144 at head_dim 96) is kept: the
fastest of ten tiles on one H100; on another, timed first, 19 % behind 192 x 112; the two rankings did not agree
(docs/benchmarks.md, session 18).
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a Hopper GPU and an importable `flash_attn.cute`."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        importlib.import_module("flash_attn.cute")  # loads CUTLASS's DSL: a few seconds, once
    except Exception as e:  # a broken optional package must not stop the server: SDPA serves instead
        log.info("FlashAttention-4 not used for the vision tower (%s: %s)", type(e).__name__, e)
        return False
    return True


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Bidirectional attention within each sequence: q, k, v [T, heads, head_dim] (contiguous last dim; other
    strides free), cu_seqlens int32 [S + 1] on their device -> [T, heads, head_dim]."""
    from flash_attn.cute import flash_attn_varlen_func

    out, _ = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                    max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return out
