"""Image inputs for image-to-video: file -> PIL, and PIL -> the two model inputs (PIL + numpy only).

* :func:`clip_preprocess`: the image encoder's pixels, as transformers' ``CLIPImageProcessor`` (PIL backend)
  with the checkpoint's image_processor/preprocessor_config.json: convert RGB, resize (shortest edge,
  bicubic, on uint8), center crop, rescale 1/255, normalise with the CLIP mean / std.
* :func:`video_preprocess`: the VAE's first frame, as diffusers' ``VideoProcessor.preprocess`` in
  ``WanImageToVideoPipeline``: PIL Lanczos resize to (width, height), then [0, 255] -> [-1, 1].
* :func:`reference_preprocess`: a VACE reference image, as ``WanVACEPipeline.preprocess_conditions``: fitted
  into the frame (bilinear, aspect kept) on a white canvas.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import PIL.Image
import PIL.ImageOps

#: transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the CLIPImageProcessor defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as RGB, applying its EXIF orientation (as diffusers' ``load_image``)."""
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {os.fspath(path)!r}")
    try:
        with PIL.Image.open(path) as img:
            return PIL.ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB; transparency is composited onto white (transformers' ``convert_to_rgb``)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        white = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _resize_size(h: int, w: int, size: Any) -> tuple[int, int]:
    """Output (height, width) for a CLIPImageProcessor ``size``: shortest edge (int or dict) or height/width."""
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge") and not size.get("longest_edge"):
        s = int(size["shortest_edge"])
        short, long = min(h, w), max(h, w)
        new_long = int(s * long / short)  # truncates, as transformers
        return (new_long, s) if w <= h else (s, new_long)
    raise ValueError(f"unsupported image processor size {size!r}")


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(C, H, W) -> (C, ch, cw) center crop, zero padding first if the image is smaller."""
    _, h, w = x.shape
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        top, left = math.ceil(ph / 2), math.ceil(pw / 2)
        x = np.pad(x, ((0, 0), (top, ph - top), (left, pw - left)))
        _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top: top + ch, left: left + cw]


def clip_preprocess(img: PIL.Image.Image, processor_config: Mapping[str, Any]) -> np.ndarray:
    """PIL image -> CLIP pixel_values (1, 3, S, S) float32, per a preprocessor_config.json dict."""
    c = processor_config
    img = _to_rgb(img) if c.get("do_convert_rgb", True) else img
    if c.get("do_resize", True):
        h, w = _resize_size(img.height, img.width, c.get("size", {"shortest_edge": 224}))
        img = img.resize((w, h), resample=PIL.Image.Resampling(int(c.get("resample", PIL.Image.BICUBIC))))
    x = np.asarray(img).transpose(2, 0, 1)  # (3, H, W) uint8
    if c.get("do_center_crop", True):
        crop = c.get("crop_size", 224)
        ch, cw = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        x = _center_crop(x, int(ch), int(cw))
    if c.get("do_rescale", True):
        x = (x.astype(np.float64) * c.get("rescale_factor", 1 / 255)).astype(np.float32)
    x = x.astype(np.float32)
    if c.get("do_normalize", True):
        mean = np.asarray(c.get("image_mean", CLIP_MEAN), np.float32)[:, None, None]
        std = np.asarray(c.get("image_std", CLIP_STD), np.float32)[:, None, None]
        x = (x - mean) / std
    return x[None]


def video_preprocess(img: PIL.Image.Image, height: int, width: int, *, vae_scale_factor: int = 8) -> np.ndarray:
    """PIL image -> the I2V first frame (1, 3, 1, height, width) float32 in [-1, 1].

    As diffusers, height and width are first floored to multiples of ``vae_scale_factor``.
    """
    height, width = height - height % vae_scale_factor, width - width % vae_scale_factor
    img = img.convert("RGB").resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
    x = np.asarray(img).astype(np.float32) / np.float32(255.0)  # (H, W, 3)
    x = np.float32(2.0) * x - np.float32(1.0)
    return x.transpose(2, 0, 1)[None, :, None]


def reference_preprocess(img: PIL.Image.Image, height: int, width: int, *, vae_scale_factor: int = 8) -> np.ndarray:
    """A VACE reference image -> (3, height, width) float32 in [-1, 1], as diffusers' WanVACEPipeline: the
    image processor at the image's own size (floored to multiples of ``vae_scale_factor``: a Lanczos resize,
    then [-1, 1]), a bilinear resize (torch's ``interpolate``, align_corners=False) to fit inside
    height x width with its aspect kept, centred on a white canvas."""
    h, w = img.height - img.height % vae_scale_factor, img.width - img.width % vae_scale_factor
    x = video_preprocess(img, h, w, vae_scale_factor=vae_scale_factor)[0, :, 0]  # (3, h, w)
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    canvas = np.ones((3, height, width), np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = _bilinear(_bilinear(x, new_h, axis=1), new_w, axis=2)
    return canvas


def _bilinear(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear resampling of one axis to ``size`` samples as torch's bilinear ``interpolate`` (align_corners
    False, no antialias) computes it: source = max((i + 0.5) * in / out - 0.5, 0) in float32."""
    n = x.shape[axis]
    if n == size:
        return x
    src = np.maximum((np.arange(size, dtype=np.float32) + np.float32(0.5)) * np.float32(n / size) - np.float32(0.5),
                     np.float32(0))
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = np.minimum(src - lo.astype(np.float32), np.float32(1))
    shape = [1] * x.ndim
    shape[axis] = size
    frac = frac.reshape(shape)
    return (np.float32(1) - frac) * np.take(x, lo, axis=axis) + frac * np.take(x, hi, axis=axis)
