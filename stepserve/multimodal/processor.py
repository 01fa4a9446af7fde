"""Step3-VL multi-crop preprocessing and image placeholder expansion (models.md A.5, A.6).

One RGB image becomes a 728x728 global view plus zero or more 504x504 crops cut from a resized "crop
canvas", and one `<im_patch>` placeholder in the prompt becomes the image's token layout:
    per crop: <patch_start> 81 x <im_patch> <patch_end> [<patch_newline> at the end of each crop row but the last]
    then:     <im_start> 169 x <im_patch> <im_end>
The geometry follows StepFun's reference processor, including the HF window rule `long <= 728`.

The processor (image workers, or host threads) does only the uint8 work that needs PIL: pad and clamp (rare:
thin or huge images), plus the content hash; for most images the global view is the decoded image itself.
`pixel_inputs` does the rest on the model's device: the crop canvas resize (PIL's integer arithmetic, bit for
bit: `pil_resize`), cropping, and the float work (normalize, antialiased resize to 728 / 504). So the host
makes no float images and ships only the decoded image (2.7 MB for 1280x720, not the 7.3 MB of its crops or
the 25 MB of float crops). On a 2-core CPU a 1280x720 image's processor time went from 24 ms (float crops on
the host) to 15 ms (uint8 crops) to ~3 ms (the view and its hash).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stepserve.errors import InvalidRequestError
from stepserve.multimodal.pil_resize import pil_bilinear_resize

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


@dataclass
class ImageInput:
    view: torch.Tensor  # uint8 [H, W, 3]: the global view before its resize to 728x728
    plan: CropPlan  # the crops' geometry: `pixel_inputs` cuts them from the view on the model's device
    token_ids: list[int]  # the expansion of this image's one <im_patch> placeholder
    hash: str  # content key of the decoded RGB image (encoder cache, prefix cache)
    size: tuple[int, int]  # (W, H) of the image as given

    @property
    def num_crops(self) -> int:
        return self.plan.num_crops

    @property
    def newline_mask(self) -> list[bool]:  # per crop: a <patch_newline> follows it
        return self.plan.newline_mask

    @property
    def num_feature_rows(self) -> int:  # count of <im_patch> in token_ids
        return CROP_ROWS * self.plan.num_crops + GLOBAL_ROWS

    @property
    def crops(self) -> torch.Tensor:
        """uint8 [num_crops, window, window, 3]: the crops before their resize to 504x504, cut from the view on
        its device (each access cuts them again; the model gets them from `pixel_inputs`)."""
        return crop_windows(self.view, self.plan)


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

    def __call__(self, image: Image.Image, key: str | None = None) -> ImageInput:
        """`key`: the image's cache key when the caller has one (`encoded_key` of the bytes it was decoded
        from); by default the decoded pixels are hashed (`image_hash`)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = plan_crops(*image.size)
        view = _global_view(image, plan)
        view_pixels = _hwc_uint8(view)
        token_ids: list[int] = []
        for newline in plan.newline_mask:
            token_ids += self._crop_tokens
            if newline:
                token_ids.append(self.ids.patch_newline)
        token_ids += self._global_tokens
        # Most views are the image itself: its array is then hashed too, not copied out of PIL a second time.
        hash_ = key or image_hash(view_pixels if view is image else _hwc_uint8(image))
        return ImageInput(view=view_pixels, plan=plan, token_ids=token_ids, hash=hash_, size=image.size)


def image_hash(pixels: torch.Tensor) -> str:
    """Key of decoded RGB pixels (uint8 [H, W, 3]), so the same picture sent as PNG, bytes or PIL maps to one
    cache entry. Hashes the array the view is made of anyway: PIL's `tobytes` would copy the image once more."""
    h, w, _ = pixels.shape
    digest = hashlib.blake2b(f"RGB:{w}x{h}:".encode(), digest_size=16)
    digest.update(pixels.numpy())
    return digest.hexdigest()


def encoded_key(data: bytes) -> str:
    """Key of an image by the encoded bytes it was decoded from. Equal bytes decode to equal pixels, so equal keys
    still mean equal pixels; a client that sends the same data URL again (each turn of a chat does) still hits
    the caches. The price: one picture sent in two encodings gets two entries. The gain: a 1280x720 JPEG's
    ~0.7 MB hash in 0.65 ms instead of its 2.7 MB of pixels in 2.5 ms (2-core CPU). The prefix keeps these
    keys apart from `image_hash` keys."""
    return "encoded:" + hashlib.blake2b(data, digest_size=16).hexdigest()


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


def crop_windows(view: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """uint8 [num_crops, window, window, 3] on view's device: the view resized to the crop canvas as PIL's
    bilinear resize does it, cut into the plan's windows (steps 3-4 of models.md A.6)."""
    w = plan.window
    if w == 0:
        return view.new_empty(0, CROP_SIZE, CROP_SIZE, 3)
    canvas = pil_bilinear_resize(view, plan.canvas)
    width, height = plan.canvas
    if width < w or height < w:  # zeros past the canvas reproduce PIL's black padding of crops that overhang it
        padded = view.new_zeros(max(height, w), max(width, w), 3)
        padded[:height, :width] = canvas
        canvas = padded
    return torch.stack([canvas[y:y + w, x:x + w] for x, y in plan.origins()])


def _hwc_uint8(image: Image.Image) -> torch.Tensor:
    # HWC as PIL stores it: the reorder to CHW is fused into the float conversion on the device.
    # np.array, not asarray: PIL's array view is read-only, which torch warns about.
    return torch.from_numpy(np.array(image))


def pixel_inputs(images: Sequence[ImageInput], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The vision tower's inputs: pixel_values [n, 3, 728, 728] and patch_pixel_values [crops, 3, 504, 504]
    (None when no image has crops), crops in image order, on `device` in `dtype`.

    Only the views cross to `device`; the crops are cut there (integer arithmetic: the same bytes as PIL's on any
    device). Normalization and resize run on `device` in float32 in the reference's op order, so on the CPU the
    result is bit-identical to the reference processor's; same-sized inputs form one batch, so the GPU sees a
    few launches per distinct size, not per image.
    """
    views = _to_device([im.view for im in images], device)
    crops = [crop_windows(v, im.plan) for v, im in zip(views, images) if im.num_crops]
    pixel_values = _normalized_resized([v[None] for v in views], GLOBAL_SIZE).to(dtype)
    return pixel_values, _normalized_resized(crops, CROP_SIZE).to(dtype) if crops else None


def _to_device(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 tensors to `device`: on CUDA one copy from one pinned buffer, not waiting for the GPU."""
    if device.type != "cuda":
        return [p.to(device) for p in parts]
    # A copy from pageable memory first waits for all work queued on the stream (with overlap scheduling, the
    # previous step); from pinned memory it returns at once. Dropping `staging` before the copy ran is safe: the
    # caching host allocator records an event on the stream and reuses the block only after it.
    sizes = [p.numel() for p in parts]
    staging = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    torch.cat([p.reshape(-1) for p in parts], out=staging)
    flat = staging.to(device, non_blocking=True)
    return [chunk.view(p.shape) for p, chunk in zip(parts, flat.split(sizes))]


def _normalized_resized(parts: list[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 [k, h, w, 3] parts -> float32 [sum k, 3, size, size] in order, one batch per distinct (h, w)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(parts):
        groups.setdefault((p.shape[1], p.shape[2]), []).append(i)
    if len(groups) == 1:
        return _resize(_normalized(parts), size)
    rows: dict[int, torch.Tensor] = {}
    for members in groups.values():
        batch = _resize(_normalized([parts[i] for i in members]), size)
        rows.update(zip(members, batch.split([parts[i].shape[0] for i in members])))
    return torch.cat([rows[i] for i in range(len(parts))])


def _normalized(parts: list[torch.Tensor]) -> torch.Tensor:
    hwc = parts[0] if len(parts) == 1 else torch.cat(parts)
    n, h, w, _ = hwc.shape
    # Contiguous NCHW like torchvision's ToTensor (the memory format decides which interpolate kernel runs),
    # filled by one copy that also converts; then the reference's op order (x/255 - mean) / std, kept exactly.
    x = torch.empty(n, 3, h, w, dtype=torch.float32, device=hwc.device).copy_(hwc.permute(0, 3, 1, 2))
    mean, std = _stats(x.device)
    return x.div_(255).sub_(mean).div_(std)


@cache
def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return MEAN.to(device), STD.to(device)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear antialiased resize of a normalized [N,3,h,w] batch; torchvision returns equal sizes untouched."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
