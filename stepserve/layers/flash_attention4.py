"""FlashAttention-4's varlen forward, from the optional `flash-attn-4` package (CuTe DSL kernels), for the vision
tower's bidirectional attention on Hopper.

At head_dim 96 cuDNN's SDPA runs at ~300-380 TFLOP/s on the H100. One FA4 launch over all of a batch's
sequences (two 720p images: 2 x 2704 + 12 x 1296 tokens, 16 heads) took 0.50 ms against 0.73 ms for cuDNN's
two calls, measured in one call (docs/benchmarks.md, session 18).
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)

# The launch config for head_dim 96 (the tower's). FA4's sm90 default tile is 192 x 144; 192 x 112 was the
# fastest of nine configs over the tower's sequence lengths (0.497 ms against 0.593, same call).
HEAD_DIM_96 = {"tile_mn": (192, 112), "mma_pv_is_rs": False, "intra_wg_overlap": True}


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: a Hopper GPU and an importable `flash_attn.cute`."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        importlib.import_module("flash_attn.cute.interface")  # loads CUTLASS's DSL: a few seconds, once
    except Exception as e:  # a broken optional package must not stop the server: SDPA serves instead
        log.info("FlashAttention-4 not used for the vision tower (%s: %s)", type(e).__name__, e)
        return False
    return True


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int) -> torch.Tensor:
    """Bidirectional attention within each sequence: q, k, v [T, heads, head_dim] (contiguous last dim; other
    strides free), cu_seqlens int32 [S + 1] on their device -> [T, heads, head_dim]."""
    # The private entry point takes a launch config; the public one does not (the `fa4` extra pins the version).
    from flash_attn.cute.interface import _flash_attn_fwd

    config = HEAD_DIM_96 if q.shape[-1] == 96 else {}
    return _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                           max_seqlen_k=max_seqlen, **config)[0]
