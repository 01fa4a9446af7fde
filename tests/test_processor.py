"""Step3-VL multi-crop preprocessing: geometry, token layout and pixel values (models.md A.5, A.6)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from stepserve.errors import InvalidRequestError
from stepserve.multimodal.image_io import load_image
from stepserve.multimodal.processor import ImageProcessor, ImageTokenIds, expand_prompt, pixel_inputs, plan_crops

IDS = ImageTokenIds(im_patch=151679, im_start=151680, im_end=151681, patch_start=151689, patch_end=151690,
                    patch_newline=151691)
PROC = ImageProcessor(IDS)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def synthetic_image(w: int, h: int) -> Image.Image:
    """Deterministic high-frequency RGB picture (integer arithmetic only, so it is the same everywhere)."""
    x = np.arange(w, dtype=np.int32)[None, :]
    y = np.arange(h, dtype=np.int32)[:, None]
    r = (x * 7 + y * 3) % 256
    g = (x * x // 5 + y * 11) % 256
    b = ((x ^ y) * 13 + x // 3) % 256
    return Image.fromarray(np.stack(np.broadcast_arrays(r, g, b), -1).astype(np.uint8), "RGB")


def pixels(out) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (global view [3, 728, 728], crops [n, 3, 504, 504]) as the model gets them on the CPU."""
    view, crops = pixel_inputs([out], torch.device("cpu"))
    return view[0], crops if crops is not None else torch.empty(0, 3, 504, 504)


def checksums(t: torch.Tensor | None) -> tuple[float, float, float]:
    """Total, crop-order-weighted total, and a strided |x| sum of a [n,3,S,S] batch."""
    if t is None or t.numel() == 0:
        return (0.0, 0.0, 0.0)
    d = t.double()
    per = d.sum(dim=(1, 2, 3))
    return (float(d.sum()), float((per * torch.arange(1, len(per) + 1)).sum()), float(d[..., ::7, ::5].abs().sum()))


# Worked examples of models.md A.6 (HF window rule `long <= 728`):
# (W, H, window, canvas, crops grid, newlines, prompt tokens, vision rows)
WORKED = [
    (1280, 720, 504, (1512, 1008), (3, 2), 1, 670, 655),
    (720, 1280, 504, (1008, 1512), (2, 3), 2, 671, 655),
    (1920, 1080, 504, (2016, 1008), (4, 2), 1, 836, 817),
    (3840, 2160, 504, (3024, 2016), (6, 4), 3, 2166, 2113),
    (1024, 1024, 504, (1008, 1008), (2, 2), 1, 504, 493),
    (800, 600, 504, (1008, 504), (2, 1), 0, 337, 331),
    (728, 400, 400, (800, 400), (2, 1), 0, 337, 331),
    (640, 480, 0, None, (0, 0), 0, 171, 169),
    (500, 500, 0, None, (0, 0), 0, 171, 169),
    (504, 504, 0, None, (0, 0), 0, 171, 169),
    (728, 728, 0, None, (0, 0), 0, 171, 169),
    (3024, 3024, 504, (3024, 3024), (6, 6), 5, 3164, 3085),
]


@pytest.mark.parametrize("w,h,window,canvas,grid,newlines,tokens,rows", WORKED)
def test_worked_examples(w, h, window, canvas, grid, newlines, tokens, rows):
    plan = plan_crops(w, h)
    assert plan.window == window
    if canvas is not None:
        assert plan.canvas == canvas
    assert plan.grid == grid
    assert sum(plan.newline_mask) == newlines
    assert PROC.num_image_tokens(w, h) == tokens
    assert 81 * plan.num_crops + 169 == rows


# Produced by running StepFun's reference `processing_step3.py` (Step3VLProcessor: ImagePatcher +
# Step3VisionProcessor, with torchvision's tensor Resize replaced by the same F.interpolate call because
# torchvision is not installed) on synthetic_image(W, H), outside this repository. Columns: W, H, crops,
# prompt tokens of the image, checksums(pixel_values), checksums(patch_pixel_values). At generation time
# stepserve's tensors were bit-identical to the reference for every row.
REFERENCE = [
    (1280, 720, 6, 670, (298010.0678, 298010.0678, 32571.4267), (857063.4107, 3006954.418, 107863.0238)),
    (720, 1280, 6, 671, (298528.0822, 298528.0822, 35455.8027), (858658.477, 3011047.0517, 107233.8218)),
    (1920, 1080, 8, 836, (298078.6433, 298078.6433, 28736.8121), (1144007.8575, 5153027.6348, 141267.644)),
    (3840, 2160, 24, 2166, (298750.5962, 298750.5962, 22326.9033), (3435995.8273, 42981680.5287, 385051.0406)),
    (1024, 1024, 4, 504, (298545.7701, 298545.7701, 33357.2665), (572714.5781, 1431768.2905, 70463.5632)),
    (800, 600, 2, 337, (297716.8553, 297716.8553, 36555.2021), (285458.0136, 428156.6361, 35101.9388)),
    (728, 400, 2, 337, (296936.8597, 296936.8597, 41164.5313), (284640.3843, 427036.1841, 33862.9437)),
    (640, 480, 0, 171, (297904.5942, 297904.5942, 37047.0841), (0.0, 0.0, 0.0)),
    (500, 500, 0, 171, (298345.351, 298345.351, 36744.0718), (0.0, 0.0, 0.0)),
    (504, 504, 0, 171, (298344.9689, 298344.9689, 36682.1185), (0.0, 0.0, 0.0)),
    (728, 728, 0, 171, (297851.4549, 297851.4549, 43149.7522), (0.0, 0.0, 0.0)),
    (729, 729, 4, 504, (297761.7571, 297761.7571, 36720.552), (570881.6787, 1428835.1904, 71368.2155)),
    (300, 200, 0, 171, (292778.2363, 292778.2363, 37273.1095), (0.0, 0.0, 0.0)),
    (4000, 3000, 30, 2665, (298505.218, 298505.218, 21457.3008), (4297211.1535, 66648270.4245, 475881.7621)),
    (1, 1, 0, 171, (-2662946.755, -2662946.755, 76293.2155), (0.0, 0.0, 0.0)),
    (2000, 10, 16, 1502, (-2648305.5164, -2648305.5164, 75852.3227), (-20308956.8519, -173299417.134, 582642.4608)),
    (10, 2000, 16, 1502, (-2648174.1296, -2648174.1296, 76025.9173), (-20307852.2006, -172786478.4531, 583154.1089)),
    (3024, 3024, 36, 3164, (298465.0866, 298465.0866, 23211.8083), (5149625.2002, 95289532.1206, 744129.4349)),
    (700, 40, 18, 1665, (278870.215, 278870.215, 37328.8966), (2406944.3448, 22857720.6351, 301795.9775)),
    (1000, 249, 4, 503, (297745.9401, 297745.9401, 34405.0229), (570759.3346, 1426411.4944, 66210.2908)),
    (33, 1000, 31, 2774, (297200.4419, 297200.4419, 38619.3403), (4415762.7867, 71749157.828, 575146.4332)),
    (20, 100, 0, 171, (-2092291.8982, -2092291.8982, 68683.498), (0.0, 0.0, 0.0)),
    (731, 180, 4, 503, (296067.2498, 296067.2498, 37284.1785), (567639.3418, 1426734.6908, 66526.2574)),
    (3025, 100, 31, 2744, (292577.177, 292577.177, 25332.8518), (4347477.1472, 69944408.6818, 479107.298)),
    (3100, 20, 36, 3164, (-2643944.8246, -2643944.8246, 75791.2643), (-45619755.5589, -848882956.5993, 1310689.1277)),
    (1000, 300, 2, 337, (296580.5991, 296580.5991, 34412.5258), (-863957.2043, -1296005.318, 51419.1274)),
    (1500, 400, 3, 420, (297009.8389, 297009.8389, 31558.301), (-451080.6318, -901251.7189, 66091.9153)),
]


@pytest.mark.parametrize("w,h,crops,tokens,global_sums,crop_sums", REFERENCE, ids=[f"{r[0]}x{r[1]}" for r in REFERENCE])
def test_matches_reference_processor(w, h, crops, tokens, global_sums, crop_sums):
    out = PROC(synthetic_image(w, h))
    assert out.num_crops == crops
    assert len(out.token_ids) == tokens == PROC.num_image_tokens(w, h)
    assert out.token_ids.count(IDS.im_patch) == out.num_feature_rows == 81 * crops + 169
    view, patches = pixels(out)
    assert view.shape == (3, 728, 728) and view.dtype == torch.float32
    assert patches.shape == (crops, 3, 504, 504)
    assert len(out.newline_mask) == crops
    for got, want in zip(checksums(view[None]) + checksums(patches), global_sums + crop_sums):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-2), (got, want)


def _independent(img: Image.Image, size: int) -> torch.Tensor:
    """ToTensor -> Normalize -> bilinear antialiased resize, written with numpy for the first two steps."""
    arr = (np.asarray(img).astype(np.float32) / np.float32(255) - MEAN) / STD
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0]


@pytest.mark.parametrize("w,h,global_size,canvas,crop_index,box", [
    (1280, 720, (1280, 720), (1512, 1008), 4, (504, 504, 1008, 1008)),  # interior crop, no resize
    (1000, 300, (1000, 300), (1008, 300), 1, (504, 0, 1008, 504)),  # crop overhangs the canvas: black below
    (728, 400, (728, 400), (800, 400), 1, (400, 0, 800, 400)),  # 400-pixel window upscaled to 504
    (4000, 3000, (3024, 2268), (3024, 2520), 29, (2520, 2016, 3024, 2520)),  # clamped, last crop
])
def test_pixels_match_independent_computation(w, h, global_size, canvas, crop_index, box):
    img = synthetic_image(w, h)
    got_view, got_crops = pixels(PROC(img))
    view = img if img.size == global_size else img.resize(global_size, Image.Resampling.BILINEAR)
    assert torch.equal(got_view, _independent(view, 728))
    crop = view.resize(canvas, Image.Resampling.BILINEAR).crop(box)
    assert torch.equal(got_crops[crop_index], _independent(crop, 504))


@pytest.mark.parametrize("w,h,view,crops", [
    (1280, 720, (720, 1280, 3), (6, 504, 504, 3)),
    (728, 400, (400, 728, 3), (2, 400, 400, 3)),  # crops keep their 400-pixel window until pixel_inputs
    (4000, 3000, (2268, 3024, 3), (30, 504, 504, 3)),  # the view after the clamp, before its resize
    (640, 480, (480, 640, 3), (0, 504, 504, 3)),
])
def test_pixels_are_stored_as_uint8_before_the_float_resize(w, h, view, crops):
    out = PROC(synthetic_image(w, h))
    assert out.view.dtype == out.crops.dtype == torch.uint8
    assert tuple(out.view.shape) == view and tuple(out.crops.shape) == crops
    assert out.view.is_contiguous() and out.crops.is_contiguous()


def test_pixel_inputs_of_a_batch_equal_each_image_alone():
    # Mixed sizes: same-sized views / crops are normalized and resized together, others apart, order kept.
    sizes = [(1280, 720), (728, 400), (640, 480), (1280, 720), (1000, 300), (728, 400)]
    outs = [PROC(synthetic_image(w, h)) for w, h in sizes]
    views, crops = pixel_inputs(outs, torch.device("cpu"))
    alone = [pixels(o) for o in outs]
    assert torch.equal(views, torch.stack([v for v, _ in alone]))
    assert torch.equal(crops, torch.cat([c for _, c in alone]))
    assert crops.shape[0] == sum(o.num_crops for o in outs)
    half, half_crops = pixel_inputs(outs, torch.device("cpu"), torch.bfloat16)
    assert half.dtype == half_crops.dtype == torch.bfloat16
    assert torch.equal(half, views.bfloat16()) and torch.equal(half_crops, crops.bfloat16())
    no_crops, none = pixel_inputs([outs[2]], torch.device("cpu"))
    assert none is None and torch.equal(no_crops[0], alone[2][0])


def test_token_layout_is_exact():
    out = PROC(synthetic_image(1280, 720))
    crop = [IDS.patch_start] + [IDS.im_patch] * 81 + [IDS.patch_end]
    nl = [IDS.patch_newline]
    global_view = [IDS.im_start] + [IDS.im_patch] * 169 + [IDS.im_end]
    assert out.token_ids == crop * 3 + nl + crop * 3 + global_view
    assert out.newline_mask == [False, False, True, False, False, False]
    assert out.size == (1280, 720)


@pytest.mark.parametrize("w,h,mask", [
    (1280, 720, [False, False, True, False, False, False]),
    (720, 1280, [False, True, False, True, False, False]),
    (800, 600, [False, False]),
    (2000, 10, [False, False, False, True] * 3 + [False] * 4),
    (640, 480, []),
])
def test_newline_after_each_crop_row_but_the_last(w, h, mask):
    assert plan_crops(w, h).newline_mask == mask


SWEEP = [(w, h) for w in (1, 7, 31, 33, 150, 503, 504, 505, 727, 728, 729, 1100) for h in (1, 20, 180, 400, 729)]


def test_num_image_tokens_equals_expansion_length():
    for w, h in SWEEP:
        out = PROC(synthetic_image(w, h))
        assert PROC.num_image_tokens(w, h) == len(out.token_ids), (w, h)
        assert out.token_ids.count(IDS.im_patch) == out.num_feature_rows
        assert out.token_ids.count(IDS.patch_newline) == sum(out.newline_mask)


def test_huge_thin_image_keeps_reference_token_count():
    # The reference pads 5000x20 to a 5000^2 square first; stepserve approximates that pad (same size result).
    out = PROC(synthetic_image(5000, 20))
    assert len(out.token_ids) == 3164 and out.num_crops == 36
    view, _ = pixels(out)
    black = torch.from_numpy(-MEAN / STD).view(3, 1)
    torch.testing.assert_close(view[:, -1, :], black.expand(3, 728))
    assert not torch.allclose(view[:, 0, :], black.expand(3, 728))


def test_too_extreme_aspect_ratio_is_a_client_error():
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        PROC.num_image_tokens(200_000, 40)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_image_modes_from_files_are_processed():
    rgb = synthetic_image(900, 500)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 900x500 displays as 500x900
    sources = {
        "palette": _encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba": _encoded(rgb.convert("RGBA"), "PNG"),
        "gray": _encoded(rgb.convert("L"), "JPEG"),
        "exif": _encoded(rgb, "JPEG", exif=exif),
    }
    for name, data in sources.items():
        img = load_image(data)
        out = PROC(img)
        want = (500, 900) if name == "exif" else (900, 500)
        assert out.size == want, name
        assert len(out.token_ids) == PROC.num_image_tokens(*want), name
    # A non-RGB PIL image handed straight to the processor is converted, as load_image would.
    gray = rgb.convert("L")
    assert torch.equal(PROC(gray).view, PROC(gray.convert("RGB")).view)


def test_hash_is_of_pixels_not_encoding():
    img = synthetic_image(320, 240)
    from_png = load_image(_encoded(img, "PNG"))
    from_webp = load_image(_encoded(img, "WEBP", lossless=True))
    assert PROC(img).hash == PROC(from_png).hash == PROC(from_webp).hash
    changed = img.copy()
    changed.putpixel((5, 5), (0, 0, 0))
    assert PROC(changed).hash != PROC(img).hash
    # Same bytes, different shape: not the same picture.
    assert PROC(img.resize((240, 320))).hash != PROC(img).hash


def test_expand_prompt_replaces_each_placeholder_in_order():
    a, b = PROC(synthetic_image(640, 480)), PROC(synthetic_image(1280, 720))
    prompt = [1, IDS.im_patch, 2, IDS.im_patch, 3]
    assert expand_prompt(prompt, [a, b], IDS.im_patch) == [1, *a.token_ids, 2, *b.token_ids, 3]
    assert expand_prompt([1, 2], [], IDS.im_patch) == [1, 2]
    with pytest.raises(InvalidRequestError) as e:
        expand_prompt(prompt, [a], IDS.im_patch)
    assert e.value.param == "messages" and "2 image placeholder(s) but 1 image(s)" in e.value.message


def _tokenizer(tokens: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{t: 151679 + i for i, t in enumerate(tokens)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]")


def test_token_ids_from_tokenizer():
    names = ["<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"]
    ids = ImageTokenIds.from_tokenizer(_tokenizer(names))
    assert ids == ImageTokenIds(151679, 151680, 151681, 151682, 151683, 151684)
    with pytest.raises(ValueError, match="<patch_newline>"):
        ImageTokenIds.from_tokenizer(_tokenizer(names[:-1]))
