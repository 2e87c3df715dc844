"""Whole-pipeline parity with diffusers' WanPipeline on the tiny checkpoints (float32, same latents)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from wan_convert.convert import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}


@pytest.fixture(scope="module")
def f32_checkpoint(tiny_repos, tmp_path_factory):
    return convert(str(tiny_repos["wan2.1-t2v"]), tmp_path_factory.mktemp("f32") / "ck", weights_dtype="float32").output


def _diffusers_frames(repo, latents, prompt, negative, steps, guidance, height, width, frames):
    torch = pytest.importorskip("torch")
    from diffusers import WanPipeline as DiffusersWan

    pipe = DiffusersWan.from_pretrained(repo, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
               num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
               output_type="np", max_sequence_length=512)
    return np.asarray(out.frames[0], np.float32)  # (F, H, W, 3) in [0, 1]


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_cli_npy_matches_diffusers(tiny_repos, f32_checkpoint, tmp_path, guidance):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 16, 3, 4, 6), dtype=np.float32)  # 9 frames, 32 x 48 px
    np.save(tmp_path / "lat.npy", latents[0])  # without the batch axis, as the CLI allows
    prompt, negative = "a red fox runs through fresh snow", "blurry, static"
    cmd = [sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(f32_checkpoint), "--prompt", prompt,
           "--negative-prompt", negative, "--height", "32", "--width", "48", "--frames", "9", "--steps", "3",
           "--guidance", str(guidance), "--dtype", "float32", "--latents", str(tmp_path / "lat.npy"),
           "--output", str(tmp_path / "x.npy")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    ours = np.load(tmp_path / "x.npy")
    ref = _diffusers_frames(tiny_repos["wan2.1-t2v"], latents, prompt, negative, 3, guidance, 32, 48, 9)
    assert ours.shape == ref.shape == (9, 32, 48, 3)
    err = np.abs(ours - ref).max()
    print(f"wan2.1-t2v guidance {guidance}: max abs error {err:.2e}")
    assert err <= 1e-3, f"max abs error {err}"
    assert "TIMING SUMMARY" in r.stdout + r.stderr
    side = json.loads((tmp_path / "x.json").read_text())
    assert side["prompt"] == prompt and side["settings"]["steps"] == 3


def test_demo_mp4_and_sidecar(tmp_path):
    """The README's demo path: bundled tiny repo -> convert -> wan-run -> mp4 + sidecar."""
    imageio = pytest.importorskip("imageio.v3")
    ck = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "wan_convert.cli", str(ROOT / "assets" / "tiny-wan2.1-t2v"), str(ck), "-q"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "demo.mp4"
    r = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(ck), "--preset", "tiny",
                        "--prompt", "a red fox", "--output", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    frames = imageio.imread(out, plugin="pyav") if _has_pyav() else _read_ffmpeg(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert frames.shape == (side["settings"]["frames"], side["settings"]["height"], side["settings"]["width"], 3)
    assert side["model"]["family"] == "wan2.1-t2v" and side["seed"] == 0
    assert set(side["timings"]) >= {"load", "compile", "conditioning", "denoise", "decode", "total"}


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def _read_ffmpeg(path) -> np.ndarray:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)
