"""Whole-pipeline parity with diffusers' WanPipeline on the tiny Wan 2.1 T2V checkpoint (float32, same latents).

One diffusers run per guidance (``output_type="latent"``, then decoded here with diffusers' VAE and video
processor, as its pipeline does) serves three tests: the ``wan-run`` CLI's frames, the Python API's final
latents and frames, and the controls (guidance / negative prompt changed in our pipeline only must land
>= 100 tolerances away, so a bug with the same effect cannot pass).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from wan_convert.convert import convert
from tests.test_families import MOVE, check_control, check_parity
from wan_runtime.pipeline import DEFAULT_NEGATIVE, WanPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}

# A long prompt and Wan's standard negative prompt: the tiny random transformer's cross-attention is near
# uniform over the 512 text tokens (zero padding included), so a ~10-token prompt reaches the output ~50x
# diluted and guidance hardly moves it; ~100 / ~200 tokens make guidance and the negative prompt visible.
PROMPT = ("A red fox runs through fresh snow in a quiet forest at dawn. Waves crash on a rocky beach under a purple "
          "sky. A small robot walks along a busy city street at night, neon lights reflecting in puddles.")
NEGATIVE = DEFAULT_NEGATIVE
HEIGHT, WIDTH, FRAMES, STEPS = 32, 48, 9, 3
GUIDANCES = (5.0, 1.0)

# guidance -> tolerances (latents max abs, latents relative L2, frames max abs), ~10-30x the figures measured
# (float32, UniPC, 3 steps), given beside each row in the same order (range over two runs). The CLI's frames get the same frames
# tolerance as the API's (same pipeline, one more process).
TOL = {
    5.0: (2e-4, 4e-5, 1.5e-4),  # measured 1.0-1.1e-5, 2.0-2.2e-6, 6.1-8.5e-6 (the CLI's frames: the same)
    1.0: (4e-5, 8e-6, 3e-5),  # measured 2.0e-6, 3.9e-7, 1.8e-6 (the CLI's frames: the same)
}


def _initial_latents():
    return np.random.default_rng(0).standard_normal((1, 16, 3, 4, 6), dtype=np.float32)  # 9 frames, 32 x 48 px


@pytest.fixture(scope="module")
def f32_checkpoint(tiny_repos, tmp_path_factory):
    return convert(str(tiny_repos["wan2.1-t2v"]), tmp_path_factory.mktemp("f32") / "ck", weights_dtype="float32").output


@pytest.fixture(scope="module")
def reference(tiny_repos):
    """guidance -> (diffusers' final latents, its frames (F, H, W, 3) in [0, 1]); one diffusers run each."""
    torch = pytest.importorskip("torch")
    from diffusers import WanPipeline as DiffusersWan

    pipe = DiffusersWan.from_pretrained(tiny_repos["wan2.1-t2v"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    mean = torch.tensor(pipe.vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    out = {}
    for g in GUIDANCES:
        lat = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=g, latents=torch.from_numpy(_initial_latents()),
                   output_type="latent", max_sequence_length=512).frames
        with torch.no_grad():
            video = pipe.vae.decode(lat / inv_std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
        out[g] = (lat.numpy().astype(np.float32), np.asarray(frames, np.float32))
    return out


@pytest.fixture(scope="module")
def api_pipe(f32_checkpoint):
    return WanPipeline.from_converted(f32_checkpoint, dtype="float32")


def _api(pipe, guidance, negative=NEGATIVE):
    gen = pipe(PROMPT, negative, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
               guidance_scale=guidance, latents=_initial_latents())
    return np.asarray(gen.latents, np.float32), np.asarray(gen.frames, np.float32)


def _errors(lat, frames, ref_lat, ref_frames):
    assert lat.shape == ref_lat.shape and frames.shape == ref_frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    d = (lat - ref_lat).astype(np.float64)
    return (float(np.abs(d).max()), float(np.linalg.norm(d) / np.linalg.norm(ref_lat.astype(np.float64))),
            float(np.abs(frames - ref_frames).max()))


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_cli_npy_matches_diffusers(reference, f32_checkpoint, tmp_path, guidance, measured):
    np.save(tmp_path / "lat.npy", _initial_latents()[0])  # without the batch axis, as the CLI allows
    cmd = [sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(f32_checkpoint), "--prompt", PROMPT,
           "--negative-prompt", NEGATIVE, "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES),
           "--steps", str(STEPS), "--guidance", str(guidance), "--dtype", "float32", "--latents",
           str(tmp_path / "lat.npy"), "--output", str(tmp_path / "x.npy")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    ours = np.load(tmp_path / "x.npy")
    ref = reference[guidance][1]
    assert ours.shape == ref.shape == (FRAMES, HEIGHT, WIDTH, 3)
    err = float(np.abs(ours - ref).max())
    print(f"wan-run, guidance {guidance}: frames max abs error {err:.2e}")
    measured(f"pipeline/wan2.1-t2v-cli-g{guidance:g}/frames_max_abs", err, reference="diffusers float32", steps=STEPS)
    assert err <= TOL[guidance][2], f"max abs error {err}"  # measured: see TOL
    assert "TIMING SUMMARY" in r.stdout + r.stderr
    side = json.loads((tmp_path / "x.json").read_text())
    assert side["prompt"] == PROMPT and side["negative_prompt"] == NEGATIVE and side["settings"]["steps"] == STEPS


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_api_latents_match_diffusers(reference, api_pipe, guidance, measured):
    errors = _errors(*_api(api_pipe, guidance), *reference[guidance])
    check_parity(f"wan2.1-t2v-g{guidance:g}", errors, TOL[guidance], measured, steps=STEPS)  # measured: see TOL


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_api_controls_are_visible(reference, api_pipe, guidance, measured):
    """Our pipeline with the guidance turned off (on, for the guidance-1 reference) or another negative
    prompt lands >= MOVE tolerances from diffusers, in the latents and in the frames (which the CLI test
    compares with the same tolerance)."""
    controls = {"guidance_on" if guidance == 1.0 else "guidance_off": dict(guidance=GUIDANCES[0] if guidance == 1.0 else 1.0)}
    if guidance > 1.0:  # with guidance 1 there is no unconditional pass, so no negative prompt to see
        controls["negative_prompt"] = dict(guidance=guidance, negative="")
    tol_max, tol_rel, tol_frames = TOL[guidance]
    for name, kw in controls.items():
        errors = _errors(*_api(api_pipe, **kw), *reference[guidance])
        check_control(f"guidance {guidance} {name}", f"pipeline/wan2.1-t2v-g{guidance:g}/{name}_frames_moved", errors,
                      (tol_max, tol_rel, tol_frames), measured, STEPS)


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
