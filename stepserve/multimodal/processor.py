"""Step3-VL multi-crop preprocessing and image placeholder expansion (models.md A.5, A.6).

One RGB image becomes a 728x728 global view plus zero or more 504x504 crops cut from a resized "crop
canvas", and one `<im_patch>` placeholder in the prompt becomes the image's token layout:
    per crop: <patch_start> 81 x <im_patch> <patch_end> [<patch_newline> at the end of each crop row but the last]
    then:     <im_start> 169 x <im_patch> <im_end>
The geometry follows StepFun's reference processor, including the HF window rule `long <= 728`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stepserve.errors import InvalidRequestError

GLOBAL_SIZE = 728
CROP_SIZE = 504
MAX_IMAGE_SIZE = 3024
GLOBAL_ROWS = 169  # vision feature rows of the global view
CROP_ROWS = 81  # vision feature rows of one crop
THIN_SIDE = 32  # images thinner than this with aspect > 4 are square-padded first
EXACT_PAD_MAX_SIDE = 4096  # larger thin-image pads are approximated (see _global_view): a 4096^2 canvas is 48 MiB
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@dataclass(frozen=True)
class ImageTokenIds:
    im_patch: int
    im_start: int
    im_end: int
    patch_start: int
    patch_end: int
    patch_newline: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ImageTokenIds:
        strings = {"im_patch": "<im_patch>", "im_start": "<im_start>", "im_end": "<im_end>",
                   "patch_start": "<patch_start>", "patch_end": "<patch_end>", "patch_newline": "<patch_newline>"}
        ids = {name: tokenizer.convert_tokens_to_ids(s) for name, s in strings.items()}
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = [strings[name] for name, i in ids.items() if i is None or i == unk]
        if missing:
            raise ValueError(f"tokenizer has no id for the image tokens {missing}; is this a Step3-VL tokenizer?")
        return cls(**ids)


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # float32 [3, 728, 728]
    patch_pixel_values: torch.Tensor  # float32 [num_crops, 3, 504, 504]
    newline_mask: list[bool]  # per crop: a <patch_newline> follows it
    num_crops: int
    token_ids: list[int]  # the expansion of this image's one <im_patch> placeholder
    num_feature_rows: int  # 81 * num_crops + 169 = count of <im_patch> in token_ids
    hash: str  # content key of the decoded RGB image (encoder cache, prefix cache)
    size: tuple[int, int]  # (W, H) of the image as given


@dataclass(frozen=True)
class CropPlan:
    """Geometry of one image, a function of its size only."""

    padded: int  # side of the black square the image is pasted into first, or 0 for no pad
    size: tuple[int, int]  # (W, H) after pad and clamp: the global view before its final resize
    window: int  # crop side on the canvas; 0 means no crops
    canvas: tuple[int, int]  # (W, H) the global view is resized to before cropping
    grid: tuple[int, int]  # crops per row, crop rows

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def newline_mask(self) -> list[bool]:
        x_num = self.grid[0]
        return [(i + 1) % x_num == 0 and i + 1 < self.num_crops for i in range(self.num_crops)]

    def origins(self) -> list[tuple[int, int]]:
        """Top-left corner of each crop on the canvas, row-major."""
        xs, ys = (_starts(self.canvas[0], self.window), _starts(self.canvas[1], self.window))
        return [(x, y) for y in ys for x in xs]


def plan_crops(width: int, height: int) -> CropPlan:
    if width < 1 or height < 1:
        raise InvalidRequestError(f"image has an empty size {width}x{height}")
    padded = 0
    if min(width, height) < THIN_SIDE and (width / height > 4 or width / height < 1 / 4):
        padded = width = height = max(width, height)
    if max(width, height) > MAX_IMAGE_SIZE:
        # Same float expression as the reference, so the int() truncation lands on the same side.
        scale = MAX_IMAGE_SIZE / max(width, height)
        width, height = int(width * scale), int(height * scale)
        if min(width, height) == 0:  # the reference fails here too (a zero-sized resize)
            raise InvalidRequestError("image aspect ratio is too extreme to process")
    window = _window(max(width, height), min(width, height))
    if window == 0:
        return CropPlan(padded, (width, height), 0, (width, height), (0, 0))
    canvas = (_canvas_side(width, window), _canvas_side(height, window))
    grid = (len(_starts(canvas[0], window)), len(_starts(canvas[1], window)))
    return CropPlan(padded, (width, height), window, canvas, grid)


def _window(long: int, short: int) -> int:
    if long <= GLOBAL_SIZE:
        return short if long / short > 1.5 else 0
    return min(short, CROP_SIZE) if long / short > 4 else CROP_SIZE


def _canvas_side(side: int, window: int) -> int:
    ratio = side / window
    if ratio < 1:
        return side
    n = int(ratio) + 1 if ratio - side // window > 0.2 else int(ratio)
    return window * n


def _starts(side: int, window: int) -> list[int]:
    if side <= window:
        return [0]
    starts = [window * i for i in range(math.ceil((side - window) / window + 1))]
    starts[-1] = min(starts[-1], side - window)
    return starts


class ImageProcessor:
    """Turns decoded images into model inputs. Stateless apart from the token ids; safe to call from threads."""

    def __init__(self, token_ids: ImageTokenIds):
        self.ids = token_ids
        t = token_ids
        self._crop_tokens = [t.patch_start] + [t.im_patch] * CROP_ROWS + [t.patch_end]
        self._global_tokens = [t.im_start] + [t.im_patch] * GLOBAL_ROWS + [t.im_end]

    def num_image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one image of this (EXIF-corrected) size; no pixels are touched."""
        plan = plan_crops(width, height)
        return len(self._crop_tokens) * plan.num_crops + max(plan.grid[1] - 1, 0) + len(self._global_tokens)

    def __call__(self, image: Image.Image) -> ImageInput:
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = plan_crops(*image.size)
        view = _global_view(image, plan)
        pixel_values = _resize(_normalized(_chw_uint8(view)[None]), GLOBAL_SIZE)[0]
        patches = _crops(view, plan)
        mask = plan.newline_mask
        token_ids: list[int] = []
        for newline in mask:
            token_ids += self._crop_tokens
            if newline:
                token_ids.append(self.ids.patch_newline)
        token_ids += self._global_tokens
        return ImageInput(pixel_values=pixel_values, patch_pixel_values=patches, newline_mask=mask,
                          num_crops=plan.num_crops, token_ids=token_ids,
                          num_feature_rows=CROP_ROWS * plan.num_crops + GLOBAL_ROWS, hash=image_hash(image),
                          size=image.size)


def image_hash(image: Image.Image) -> str:
    """Key of the decoded pixels, so the same picture sent as PNG, bytes or PIL maps to one cache entry."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def expand_prompt(token_ids: list[int], images: list[ImageInput], image_token_id: int) -> list[int]:
    """Replace the i-th `<im_patch>` placeholder in `token_ids` with images[i].token_ids."""
    count = token_ids.count(image_token_id)
    if count != len(images):
        raise InvalidRequestError(f"the prompt has {count} image placeholder(s) but {len(images)} image(s) were "
                                  "given", param="messages")
    out: list[int] = []
    next_image = iter(images)
    for t in token_ids:
        if t == image_token_id:
            out += next(next_image).token_ids
        else:
            out.append(t)
    return out


def _global_view(image: Image.Image, plan: CropPlan) -> Image.Image:
    """The image after the thin-image pad and the size clamp (steps 1-2 of models.md A.6)."""
    if plan.padded and plan.padded <= EXACT_PAD_MAX_SIDE:
        square = Image.new("RGB", (plan.padded, plan.padded))
        square.paste(image, (0, 0))
        return square if square.size == plan.size else square.resize(plan.size, Image.Resampling.BILINEAR)
    if plan.padded:
        # The reference pads to the full square and then shrinks it. That square can be the pixel limit squared,
        # so past EXACT_PAD_MAX_SIDE the strip is shrunk by the same factor and pasted on the small square
        # instead. Token counts are identical; pixels differ near the strip's far edge.
        scale = plan.size[0] / plan.padded
        w, h = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        square = Image.new("RGB", plan.size)
        square.paste(image.resize((w, h), Image.Resampling.BILINEAR), (0, 0))
        return square
    return image if image.size == plan.size else image.resize(plan.size, Image.Resampling.BILINEAR)


def _crops(view: Image.Image, plan: CropPlan) -> torch.Tensor:
    if plan.window == 0:
        return torch.empty(0, 3, CROP_SIZE, CROP_SIZE)
    canvas = view if view.size == plan.canvas else view.resize(plan.canvas, Image.Resampling.BILINEAR)
    src = _chw_uint8(canvas)
    w = plan.window
    # Zeros outside the canvas reproduce PIL's black padding of crops that overhang it.
    crops = torch.zeros(plan.num_crops, 3, w, w, dtype=torch.uint8)
    for i, (x, y) in enumerate(plan.origins()):
        part = src[:, y:y + w, x:x + w]
        crops[i, :, :part.shape[1], :part.shape[2]] = part
    return _resize(_normalized(crops), CROP_SIZE)


def _chw_uint8(image: Image.Image) -> torch.Tensor:
    # Contiguous CHW like torchvision's ToTensor: the memory format decides which interpolate kernel runs.
    # np.array, not asarray: PIL's array view is read-only, which torch warns about.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def _normalized(x: torch.Tensor) -> torch.Tensor:
    # The reference's op order (x/255 - mean) / std, kept exactly so results match bit for bit.
    return x.float().div_(255).sub_(MEAN).div_(STD)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear antialiased resize of a normalized [N,3,h,w] batch; torchvision returns equal sizes untouched."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
