"""Preprocessing of RGB frames and flow stacks into backbone inputs (test and train time).

Conventions:
- Inputs are uint8 and channels-last as decoded: RGB frames (N, H, W, 3); flow stacks
  (N, L, H, W, 2), (x, y) last, quantised by `datp.flows` as `q = round(255 (f + b) / (2 b))`, so
  zero flow is q = 128.
- Flow channels are interleaved x1, y1, x2, y2, ... (TSN): channel 2i is x of pair i.
- Values: RGB `(q / 255 - mean) / std` with the backbone's mean/std; flow `(q - 128) / 128`
  (exact in float32), so zero flow is exactly 0 and values lie in [-1, 127/128]. On torchvision's
  [0, 1] scale the flow normalisation is mean = std = 128/255 (`FLOW_MEAN`, `FLOW_STD`).
- Geometry (resize: bilinear, antialiased; crops) runs on float32, never rounded back to uint8:
  RGB is scaled to [0, 1], resized and cropped, then normalised, which is exactly torchvision's
  ImageClassification preset applied to float input (resizing uint8 would round every pixel, and
  torchvision's uint8 kernel is off by up to 1 level). Flow is normalised, then resized and cropped.
  Flow values are not rescaled when the image is resized (TSN treats flow as images).
- A horizontal flip of flow negates x after normalisation: `-(q - 128) / 128 = ((256 - q) - 128) /
  128`, i.e. q -> 256 - q (not representable in uint8 for q = 0). TSN and mmaction2 invert the
  uint8 image, 255 - q, which moves zero flow to -1/128; datp does not.
- Test outputs are (N, K, C, S, S): K = 1 (centre crop) or 10 views per segment, to be averaged
  per segment downstream. Train transforms apply one random draw to all N segments of a video
  (TSN's Group* transforms) and take a `torch.Generator`.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_MEAN = FLOW_STD = 128 / 255
TSN_SCALES = (1.0, 0.875, 0.75, 0.66)


def rgb_to_float(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, H, W) float32 `q / 255` in [0, 1] (not yet normalised)."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"RGB frames must be uint8 (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def interleave_flow(stacks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, L, H, W, 2) uint8 flow stacks -> (N, 2L, H, W) uint8, channels x1, y1, x2, y2, ..."""
    stacks = torch.as_tensor(stacks)
    if stacks.dtype != torch.uint8 or stacks.ndim != 5 or stacks.shape[-1] != 2:
        raise ValueError(f"flow stacks must be uint8 (N, L, H, W, 2), got {stacks.dtype} {tuple(stacks.shape)}")
    N, L, H, W, _ = stacks.shape
    return stacks.permute(0, 1, 4, 2, 3).reshape(N, 2 * L, H, W)  # (N, L, 2, H, W) -> (N, 2L, H, W)


def flow_to_float(stacks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, L, H, W, 2) uint8 flow stacks -> (N, 2L, H, W) float32 `(q - 128) / 128`, interleaved."""
    return (interleave_flow(stacks).to(torch.float32) - 128.0) / 128.0


def hflip(x: torch.Tensor, *, flow: bool) -> torch.Tensor:
    """Mirror left-right; for flow also negate x (the even channels).

    Args:
        x: (..., C, H, W) normalised float input (left unchanged).
        flow: whether channels are interleaved flow x1, y1, x2, y2, ...

    Returns:
        (..., C, H, W).
    """
    out = x.flip(-1)
    if flow:
        if not out.is_floating_point():
            raise ValueError("flip flow after flow_to_float: negating x of uint8 flow needs 256 - q")
        out[..., 0::2, :, :] *= -1
    return out


def crop_views(
    x: torch.Tensor, *, resize: int | None = 256, crop: int = 224, num_crops: int = 1
) -> torch.Tensor:
    """Resize the short side, then take the centre crop or ten crops.

    Args:
        x: (N, C, H, W) float images.
        resize: the short side after resizing (aspect kept, long side `int(resize * long / short)`),
            or None to keep the size.
        crop: the square crop size S.
        num_crops: 1 (centre) or 10: torchvision's `ten_crop` order: top-left, top-right,
            bottom-left, bottom-right, centre, then the same five of the mirrored image.

    Returns:
        (N, K, C, S, S), K = num_crops; views 5..9 are mirrored (flow x not yet negated).
    """
    if resize is not None:
        x = F.resize(x, resize, antialias=True)
    if min(x.shape[-2:]) < crop:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than crop={crop}; resize them first")
    if num_crops == 1:
        return F.center_crop(x, [crop])[:, None]
    if num_crops == 10:
        return torch.stack(F.ten_crop(x, [crop]), dim=1)
    raise ValueError(f"num_crops={num_crops}; choose 1 (centre crop) or 10 (ten-crop)")


def rgb_to_tensor(
    frames: np.ndarray | torch.Tensor,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resize: int | None = 256,
    crop: int = 224,
    num_crops: int = 1,
) -> torch.Tensor:
    """Test-time RGB preprocessing.

    Args:
        frames: (N, H, W, 3) uint8 frames, one per segment.
        mean, std: the backbone's normalisation on the [0, 1] scale.
        resize, crop, num_crops: as in `crop_views`.

    Returns:
        (N, K, 3, S, S) float32.
    """
    x = crop_views(rgb_to_float(frames), resize=resize, crop=crop, num_crops=num_crops)
    return F.normalize(x, list(mean), list(std))


def flow_to_tensor(
    stacks: np.ndarray | torch.Tensor, *, resize: int | None = 256, crop: int = 224, num_crops: int = 1
) -> torch.Tensor:
    """Test-time flow preprocessing; mirrored ten-crop views get x negated.

    Args:
        stacks: (N, L, H, W, 2) uint8 quantised flow, one stack per segment.
        resize, crop, num_crops: as in `crop_views`.

    Returns:
        (N, K, 2L, S, S) float32, channels x1, y1, ..., xL, yL.
    """
    out = crop_views(flow_to_float(stacks), resize=resize, crop=crop, num_crops=num_crops)
    if num_crops == 10:
        out[:, 5:, 0::2] *= -1  # views 5..9 are mirrored: flow x changes sign
    return out


def random_crop(x: torch.Tensor, *, size: int, generator: torch.Generator) -> torch.Tensor:
    """The same uniformly placed square crop of every image.

    Args:
        x: (N, C, H, W), H and W >= size.
        size: crop size S.
        generator: random source.

    Returns:
        (N, C, S, S).
    """
    H, W = x.shape[-2:]
    if min(H, W) < size:
        raise ValueError(f"images of {(H, W)} are smaller than crop size {size}; resize them first")
    top = int(torch.randint(H - size + 1, (), generator=generator))
    left = int(torch.randint(W - size + 1, (), generator=generator))
    return x[..., top : top + size, left : left + size]


def random_hflip(x: torch.Tensor, *, flow: bool, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror every image (negating flow x) with probability p, one draw for all of x."""
    flip = bool(torch.rand((), generator=generator) < p)
    return hflip(x, flow=flow) if flip else x


def multi_scale_crop(
    x: torch.Tensor,
    *,
    size: int = 224,
    scales: tuple[float, ...] = TSN_SCALES,
    max_distort: int = 1,
    fix_crop: bool = True,
    more_fix_crop: bool = True,
    generator: torch.Generator,
) -> torch.Tensor:
    """TSN's GroupMultiScaleCrop: a crop of random scale and aspect, resized to S x S.

    Crop sides are `int(min(H, W) * s)` for s in `scales` (snapped to S when within 3 pixels); the
    width and height scale indices differ by at most `max_distort`. With `fix_crop` the crop sits at
    one of 5 (13 with `more_fix_crop`) fixed positions on a 4 x 4 grid, else anywhere.

    Args:
        x: (N, C, H, W) float images.
        size: output size S.
        scales, max_distort, fix_crop, more_fix_crop: TSN's options.
        generator: random source; one draw for all N images.

    Returns:
        (N, C, S, S), same dtype.
    """
    H, W = x.shape[-2:]
    sides = [int(min(H, W) * s) for s in scales]
    sides = [size if abs(side - size) < 3 else side for side in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[int(torch.randint(len(pairs), (), generator=generator))]
    if fix_crop:
        ws, hs = (W - crop_w) // 4, (H - crop_h) // 4
        grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
        if more_fix_crop:
            grid += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
        gx, gy = grid[int(torch.randint(len(grid), (), generator=generator))]
        left, top = gx * ws, gy * hs
    else:
        left = int(torch.randint(W - crop_w + 1, (), generator=generator))
        top = int(torch.randint(H - crop_h + 1, (), generator=generator))
    return F.resize(x[..., top : top + crop_h, left : left + crop_w], [size, size], antialias=True)


def _train_views(
    x: torch.Tensor, *, resize: int | None, size: int, multi_scale: bool, rng: torch.Generator
) -> torch.Tensor:
    if resize is not None:
        x = F.resize(x, resize, antialias=True)
    if multi_scale:
        return multi_scale_crop(x, size=size, generator=rng)
    return random_crop(x, size=size, generator=rng)


def rgb_train(
    frames: np.ndarray | torch.Tensor,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resize: int | None = 256,
    size: int = 224,
    multi_scale: bool = True,
    generator: torch.Generator,
) -> torch.Tensor:
    """Train-time RGB preprocessing of one video's segments: resize, TSN multi-scale (or plain random)
    crop, normalise, random flip; one random draw for all N segments.

    Args:
        frames: (N, H, W, 3) uint8, one frame per segment of one video.
        mean, std: the backbone's normalisation on the [0, 1] scale.
        resize: short side before cropping (None keeps the size).
        size: output size S.
        multi_scale: `multi_scale_crop` with TSN's defaults, else `random_crop`.
        generator: random source.

    Returns:
        (N, 3, S, S) float32.
    """
    x = _train_views(rgb_to_float(frames), resize=resize, size=size, multi_scale=multi_scale, rng=generator)
    return random_hflip(F.normalize(x, list(mean), list(std)), flow=False, generator=generator)


def flow_train(
    stacks: np.ndarray | torch.Tensor,
    *,
    resize: int | None = 256,
    size: int = 224,
    multi_scale: bool = True,
    generator: torch.Generator,
) -> torch.Tensor:
    """Train-time flow preprocessing, as `rgb_train` (a flip negates x).

    Args:
        stacks: (N, L, H, W, 2) uint8, one stack per segment of one video.
        resize, size, multi_scale, generator: as in `rgb_train`.

    Returns:
        (N, 2L, S, S) float32.
    """
    x = _train_views(flow_to_float(stacks), resize=resize, size=size, multi_scale=multi_scale, rng=generator)
    return random_hflip(x, flow=True, generator=generator)
