"""Routes a layer function to a registered device kernel, falling back to its plain-torch reference.

The model calls `rms_norm(...)`, `apply_rotary(...)`, ... without knowing the device. The kernels package
registers Triton versions with `register_kernel(name, fn)` (same signature as the reference); they are used
for CUDA tensors only, so CPU runs and the tests always take the reference path.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

_KERNELS: dict[str, Callable] = {}


def register_kernel(name: str, fn: Callable | None) -> None:
    """Use `fn` for CUDA inputs of the layer function `name`; None goes back to the reference."""
    if fn is None:
        _KERNELS.pop(name, None)
    else:
        _KERNELS[name] = fn


def dispatched(reference: Callable) -> Callable:
    """Wrap a reference whose first argument is a tensor (or a tuple led by one, such as `layers.quant.Fp8Rows`);
    the wrapper keeps it as `.reference`."""
    name = reference.__name__

    @functools.wraps(reference)
    def call(x: torch.Tensor | tuple, *args, **kwargs):
        kernel = _KERNELS.get(name)
        if kernel is not None and (x if isinstance(x, torch.Tensor) else x[0]).is_cuda:
            return kernel(x, *args, **kwargs)
        return reference(x, *args, **kwargs)

    call.reference = reference
    return call
