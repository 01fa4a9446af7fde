"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts while its predecessor drains.

A decode step replays ~430 small kernels; without PDL each one starts only after the previous one has fully
finished and flushed, a gap of a few microseconds that is most of a small kernel's cost. A kernel launched
with `launch_pdl` may be scheduled as soon as every program of the kernel before it has called
`gdc_launch_dependents` (or exited); `gdc_wait` then blocks until that kernel has completed and its writes
are visible. The rules that keep a chain of such kernels correct:

- read nothing an earlier kernel may have written, and write nothing an earlier kernel may still read,
  before `wait_for_predecessor` (loads of weights and constant tables may come first);
- call it in every program: a kernel completes only after all of its programs passed the wait, which is
  what makes "the previous kernel completed" imply "every earlier kernel completed".

Kernels take `USE_PDL: tl.constexpr` and launch with `launch_pdl=`, both set from `enabled(device)`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of compute capability 9.0 or later, not under
    the Triton interpreter, and not turned off with STEPSERVE_PDL=0 (read at each launch, so a benchmark can
    capture one graph with and one without)."""
    if device.type != "cuda" or triton.knobs.runtime.interpret or os.environ.get("STEPSERVE_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_predecessor(USE_PDL: tl.constexpr):
    """Wait until the previous kernel in the stream has completed, then let the next one be scheduled.

    The next kernel's programs then take SM slots as this kernel's programs retire and run up to their own
    wait: their launch latency and prologue (e.g. weight loads) overlap this kernel's work.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
