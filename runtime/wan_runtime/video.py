"""Frames to files: mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg), .npy, and the sidecar JSON."""
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
