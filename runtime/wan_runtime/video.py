"""Video files and frames: mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg) and .npy in and out, the
sidecar JSON, and video inputs (video-to-video, VACE control videos and masks) as the model takes them:

* :func:`load_frames`: a path (an mp4 or any video ffmpeg reads, or .npy), a list of PIL images or an array
  -> uint8 frames (F, H, W, 3);
* :func:`video_preprocess` / :func:`mask_preprocess`: frames -> (1, 3, F, H, W) float32, as diffusers'
  ``VideoProcessor.preprocess_video`` (PIL Lanczos resize per frame, [0, 255] -> [-1, 1]; a mask then
  (x + 1) / 2 clamped to [0, 1]).
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 16, quality: int = 8) -> None:
    """frames: uint8 (F, H, W, 3). Written to a temporary sibling and renamed, so no half file remains."""
    import imageio_ffmpeg

    path = pathlib.Path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.mp4")
    _, h, w, _ = frames.shape
    with warnings.catch_warnings():  # ffmpeg is a subprocess; JAX warns about fork() in threaded programs
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        # macro_block_size=1 keeps the exact size; yuv420p needs even sizes
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, quality=quality, macro_block_size=1,
                                             pix_fmt_out="yuv444p" if (w % 2 or h % 2) else "yuv420p",
                                             ffmpeg_log_level="error")
        writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_npy(path: str | os.PathLike, frames: np.ndarray) -> None:
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, frames)
    os.replace(tmp, path)


def write_sidecar(video_path: str | os.PathLike, record: dict) -> pathlib.Path:
    """The settings record beside a video (``.json``), written to a temporary sibling and renamed."""
    side = pathlib.Path(video_path).with_suffix(".json")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, side)
    return side


def read_video(path: str | os.PathLike) -> np.ndarray:
    """A video file's frames, uint8 (F, H, W, 3) RGB, decoded by imageio-ffmpeg's ffmpeg; ``.npy``: the array."""
    import imageio_ffmpeg

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"video file not found: {os.fspath(path)!r}")
    if path.suffix == ".npy":
        return np.load(path)
    try:
        with warnings.catch_warnings():  # as write_mp4
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
            w, h = next(reader)["size"]
            frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    except (OSError, RuntimeError, StopIteration, KeyError) as e:
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read video {os.fspath(path)!r}: {why}") from None
    if not frames:
        raise ValueError(f"video {os.fspath(path)!r} has no frames")
    return np.stack(frames)


def load_frames(video) -> np.ndarray:
    """A video input as uint8 frames (F, H, W, 3): a file (:func:`read_video`), a list of PIL images (converted
    to RGB), or a uint8 array (F, H, W, 3), (F, H, W, 1) or (F, H, W) (a grey channel is repeated)."""
    if isinstance(video, (str, os.PathLike)):
        video = read_video(video)
    elif isinstance(video, (list, tuple)):
        if not video or not all(hasattr(f, "convert") for f in video):
            raise ValueError("a video is a file, a non-empty list of PIL images or a uint8 array (F, H, W, 3)")
        if len({f.size for f in video}) > 1:
            raise ValueError(f"its frames have {len({f.size for f in video})} different sizes")
        video = np.stack([np.asarray(f.convert("RGB")) for f in video])
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"video frames must be uint8 (F, H, W, 3), got {video.dtype}")
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4 or video.shape[-1] not in (1, 3) or 0 in video.shape:
        raise ValueError(f"video frames must be uint8 (F, H, W, 3), got shape {list(video.shape)}")
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def video_preprocess(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames (F, H, W, 3) -> (1, 3, F, height, width) float32 in [-1, 1]: each frame as diffusers'
    ``VideoProcessor.preprocess_video`` (the image processor's PIL Lanczos resize, then 2 x / 255 - 1)."""
    import PIL.Image

    from .image import video_preprocess as frame_preprocess

    return np.concatenate([frame_preprocess(PIL.Image.fromarray(f), height, width) for f in frames], axis=2)


def mask_preprocess(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """A VACE mask's uint8 frames -> (1, 3, F, height, width) float32 in [0, 1] (white: generate), as
    diffusers' WanVACEPipeline: preprocessed as a video, then (x + 1) / 2 clamped."""
    x = video_preprocess(frames, height, width)
    return np.clip((x + np.float32(1)) / np.float32(2), np.float32(0), np.float32(1))


def load_inputs(video=None, mask=None, reference_images=None):
    """A generation's video inputs loaded, as a ``runconfig.VideoInputs`` (frames uint8 (F, H, W, 3) by
    :func:`load_frames`, reference images (PIL images or paths) as RGB PIL images), or None without any.
    Errors are ``InputError`` naming the flag."""
    from .image import load_image
    from .runconfig import InputError, VideoInputs

    if video is None and mask is None and not reference_images:
        return None
    frames = []
    for flag, x in (("--video", video), ("--mask", mask)):
        try:
            frames.append(None if x is None else load_frames(x))
        except ValueError as e:
            raise InputError(f"{flag}: {e}") from None
    one = hasattr(reference_images, "convert") or isinstance(reference_images, (str, os.PathLike))
    refs = [reference_images] if one else list(reference_images or ())
    try:
        refs = [r.convert("RGB") if hasattr(r, "convert") else load_image(r) for r in refs]
    except ValueError as e:
        raise InputError(f"--reference: {e}") from None
    return VideoInputs(frames[0], frames[1], tuple(refs))
