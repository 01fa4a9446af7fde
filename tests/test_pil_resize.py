"""`resize_like_pil` (the torch port that GPUs run) gives exactly the bytes of the installed PIL's
`Image.resize(size, BILINEAR)`; `crop_windows` cuts the crops the reference cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepserve.multimodal import pil_resize
from stepserve.multimodal.pil_resize import pil_bilinear_resize, resize_like_pil
from stepserve.multimodal.processor import crop_windows, plan_crops


def pil(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def random_pixels(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (in W, H) -> (out W, H): the seed's crop canvas, shrinking, stretching, one axis only, 1-pixel images, a
# height shrunk by more than twice the width's shrink (Pillow 13 runs that vertical pass first), huge factors.
SHAPES = [((1280, 720), (1512, 1008)), ((1024, 1024), (1008, 1008)), ((605, 300), (504, 300)),
          ((300, 605), (300, 504)), ((1, 1), (504, 504)), ((3, 5), (7, 2)), ((1300, 1100), (1512, 1008)),
          ((255, 191), (204, 108)), ((251, 297), (268, 289)), ((734, 250), (4, 805)), ((4000, 3000), (3024, 2268)),
          ((17, 900), (900, 17))]


@pytest.mark.parametrize("src,dst", SHAPES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SHAPES])
def test_matches_pil_bit_for_bit(src, dst):
    pixels = random_pixels(*src, seed=src[0] * 7 + dst[1])
    got = resize_like_pil(torch.from_numpy(pixels), dst)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (dst[1], dst[0], 3)
    assert np.array_equal(got.numpy(), pil(pixels, dst))


def test_matches_pil_on_random_sizes():
    rng = np.random.default_rng(0)
    for i in range(60):
        src, dst = [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(2)]
        pixels = random_pixels(*src, seed=i)
        assert np.array_equal(resize_like_pil(torch.from_numpy(pixels), dst).numpy(), pil(pixels, dst)), (src, dst)


def test_pass_order_matters_and_follows_pillow(monkeypatch):
    # The height shrinks by 39 pixels, the width grows: Pillow 13 goes vertical first, older Pillow horizontal
    # first, and the two orders round some pixels differently. So the rule is needed, and follows the version.
    pixels, dst = random_pixels(251, 297, seed=1), (268, 258)
    want = pil(pixels, dst)
    got = resize_like_pil(torch.from_numpy(pixels), dst).numpy()
    monkeypatch.setattr(pil_resize, "_VERTICAL_FIRST_RULE", not pil_resize._VERTICAL_FIRST_RULE)
    other = resize_like_pil(torch.from_numpy(pixels), dst).numpy()
    assert np.array_equal(got, want) and not np.array_equal(other, want)
    assert np.abs(other.astype(int) - want).max() == 1


def test_same_size_returns_the_input():
    pixels = torch.from_numpy(random_pixels(40, 30, seed=2))
    assert pil_bilinear_resize(pixels, (40, 30)) is pixels
    assert torch.equal(resize_like_pil(pixels, (40, 30)), pixels)


def test_cpu_tensors_are_resized_by_pil_itself():
    pixels = random_pixels(300, 200, seed=3)
    got = pil_bilinear_resize(torch.from_numpy(pixels), (504, 301))
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), pil(pixels, (504, 301)))


@pytest.mark.parametrize("w,h", [(1280, 720), (1300, 1100), (1000, 300), (728, 400), (33, 1000), (605, 1100)])
def test_crops_equal_pil_canvas_crops(w, h):
    # The crops as the reference cuts them: PIL canvas resize, then PIL crop boxes (black where they overhang).
    pixels = random_pixels(w, h, seed=w + h)
    plan = plan_crops(w, h)
    view = Image.fromarray(pixels)
    assert plan.size == (w, h) and not plan.padded  # the view is the image: no pad, no clamp
    canvas = view.resize(plan.canvas, Image.Resampling.BILINEAR)
    want = np.stack([np.array(canvas.crop((x, y, x + plan.window, y + plan.window))) for x, y in plan.origins()])
    assert np.array_equal(crop_windows(torch.from_numpy(pixels), plan).numpy(), want)
