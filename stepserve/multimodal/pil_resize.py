"""PIL's bilinear resize of an 8-bit RGB image, `Image.resize(size, Image.Resampling.BILINEAR)`, bit for bit on
any device: PIL itself on the CPU, a port to torch integer ops elsewhere.

The crop canvas of the multi-crop processor is such a resize in the reference. With PIL it ran in the image
workers (~9 ms of a 1280x720 image's ~26 ms on a 2-core CPU) and made the workers ship the crops back (7.3 MB)
instead of the decoded image (2.7 MB); on the GPU it is a few small kernels. On the CPU the port is ~3x
slower than PIL (gathers and int32 temporaries), so there PIL does it.

What PIL computes: two separable passes, each rounded to uint8. An output pixel of a
pass is a weighted sum of a few neighbouring input pixels; the weights are worked out in float64 and then
fixed to integers with 22 fraction bits; the sum starts at half a unit, is shifted back by 22 bits and
clipped to 0..255. The same integer arithmetic in int32 gives PIL's bytes on any device: bilinear weights are
non-negative and sum to about 2^22, so no sum exceeds 255 * 2^22 + 2^21 < 2^31.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch
from PIL import Image

from stepserve.host_copy import to_device

_FRACTION_BITS = 22
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as the width
# (fewer rows for the horizontal pass); earlier versions always start horizontally. The order moves some pixels
# by one, so the installed version's order is followed.
_VERTICAL_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13


def pil_bilinear_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [size[1], size[0], 3] (size is (W, H), as PIL takes it), on image's device;
    `image` itself if it has that size already."""
    if tuple(size) == (image.shape[1], image.shape[0]):
        return image
    if image.device.type == "cpu":
        return torch.from_numpy(np.array(Image.fromarray(image.numpy()).resize(size, Image.Resampling.BILINEAR)))
    return resize_like_pil(image, size)


def resize_like_pil(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`pil_bilinear_resize` in torch integer ops, on any device (uint8 [H, W, C], any C)."""
    width, height = size
    shrink_w, shrink_h = image.shape[1] - width, image.shape[0] - height
    passes = [(1, width), (0, height)]
    if _VERTICAL_FIRST_RULE and shrink_h > 0 and shrink_h > 2 * shrink_w:
        passes.reverse()
    out = image
    for dim, n in passes:
        if n != out.shape[dim]:  # PIL skips a pass whose size does not change (its weights would be exact anyway)
            out = _pass(out, dim, n)
    return out


def _pass(image: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """Resample `dim` (0: rows, 1: columns) of uint8 `image` to `out_size`."""
    index, weights = to_device(torch.from_numpy(_taps(image.shape[dim], out_size)), image.device)
    shape = [1] * image.dim()
    shape[dim] = out_size
    acc = None
    for j in range(index.shape[0]):
        term = image.index_select(dim, index[j]).to(torch.int32).mul_(weights[j].view(shape))
        acc = term if acc is None else acc.add_(term)
    acc.add_(1 << (_FRACTION_BITS - 1)).bitwise_right_shift_(_FRACTION_BITS)
    return acc.clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=256)
def _taps(in_size: int, out_size: int) -> np.ndarray:
    """int32 [2, k, out_size]: for each of an output pixel's k taps, the input pixel it reads and its fixed-point
    weight. A tap past the image's edge reads the last pixel with weight 0.

    Each step is the float64 operation PIL performs, in PIL's order, so every weight rounds the same way."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the filter reaches 1 input pixel each way, stretched by the factor when shrinking
    k = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    raw = np.zeros((k, out_size))
    total = np.zeros(out_size)
    for j in range(k):  # summed one tap at a time from 0.0, as PIL does: the normalization rounds identically
        t = np.abs(((j + first) - center + 0.5) * (1.0 / support))
        raw[j] = np.where((j < count) & (t < 1.0), 1.0 - t, 0.0)
        total += raw[j]
    raw /= np.where(total != 0.0, total, 1.0)
    weights = np.trunc(0.5 + raw * (1 << _FRACTION_BITS))
    index = np.minimum(first + np.arange(k)[:, None], in_size - 1)
    return np.stack([index, weights]).astype(np.int32)
