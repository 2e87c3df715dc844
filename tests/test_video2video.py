"""Video-to-video on a text-to-video checkpoint: whole-pipeline parity with diffusers' WanVideoToVideoPipeline
on the tiny Wan 2.1 T2V repo (float32), through the Python API and wan-run, at two strengths; controls that
must move the frames >= MOVE tolerances; input checks before loading.

The same noise on both sides: diffusers' ``latents`` argument replaces the noised video latents (its video is
then ignored), so it cannot carry the noise; its ``randn_tensor`` is replaced by one that returns ours, and our
``latents`` argument is the noise added to the video's latents (tests below check that it is).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.reliability.conftest import assert_one_line_error, invoke
from tests.test_families import MOVE
from tests.test_pipeline import PROMPT
from wan_runtime import schedulers
from wan_runtime.pipeline import InputError, WanPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}
FAMILY = "wan2.1-t2v"
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE = 32, 48, 9, 4, 5.0
NEGATIVE = "blurry, static"
STRENGTHS = (0.8, 0.5)  # 3 and 2 of the 4 steps: UniPC warms up (first order, no corrector) at different steps
# frames max abs, 10x the measured (float32, UniPC; range over runs): 2.4-3.3e-6 at both strengths
TOL = 3e-5


def _video(seed=1, size=(HEIGHT, WIDTH)):
    """Smooth colour ramps with a little noise: uint8 frames (F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(FRAMES), np.arange(size[0]), np.arange(size[1]), indexing="ij")
    base = np.stack([x * 5 + t * 9, y * 7 + t * 3, (x + y) * 3 + t * 11], -1) % 256
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _noise(seed=2):
    return np.random.default_rng(seed).standard_normal((1, 16, 3, 4, 6), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(tiny_repos):
    """strength -> diffusers' frames (F, H, W, 3) float32 in [0, 1], from PIL frames and our noise."""
    torch = pytest.importorskip("torch")
    import PIL.Image
    import diffusers.pipelines.wan.pipeline_wan_video2video as v2v

    pipe = v2v.WanVideoToVideoPipeline.from_pretrained(tiny_repos[FAMILY], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    noise = _noise()
    original, v2v.randn_tensor = v2v.randn_tensor, lambda shape, **kw: torch.from_numpy(noise.copy())
    try:
        out = {}
        for s in STRENGTHS:
            frames = pipe(video=[PIL.Image.fromarray(f) for f in _video()], prompt=PROMPT, negative_prompt=NEGATIVE,
                          height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE, strength=s,
                          output_type="np", max_sequence_length=512).frames[0]
            out[s] = np.asarray(frames, np.float32)
    finally:
        v2v.randn_tensor = original
    return out


@pytest.fixture(scope="module")
def pipe(converted_f32):
    return WanPipeline.from_converted(converted_f32(FAMILY), dtype="float32")


def _ours(pipe, strength, **kw):
    args = dict(video=_video(), strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=_noise()) | kw
    return np.asarray(pipe(PROMPT, NEGATIVE, **args).frames, np.float32)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_api_matches_diffusers(reference, pipe, strength, measured):
    ours = _ours(pipe, strength)
    assert ours.shape == reference[strength].shape == (FRAMES, HEIGHT, WIDTH, 3)
    err = float(np.abs(ours - reference[strength]).max())
    print(f"video-to-video, strength {strength}: frames max abs {err:.2e}")
    measured(f"pipeline/{FAMILY}-v2v-s{strength:g}/frames_max_abs", err, reference="diffusers float32", steps=STEPS)
    assert err <= TOL, err


def test_controls_are_visible(reference, pipe, measured, monkeypatch):
    """Changed in our pipeline only, each lands >= MOVE x TOL from diffusers' frames: the other strength, other
    noise, UniPC warmed up from step 0 instead of the first step that runs (the schedule's tables built without
    ``start``), and (at strength 0.5, where the video's latents weigh 0.25 against the noise's 0.75; at 0.8 it
    is 0.1 and this random model moves the frames only 3.7e-3) the input video inverted."""
    moved = {"strength": (0, _ours(pipe, STRENGTHS[1])), "noise": (0, _ours(pipe, STRENGTHS[0], latents=_noise(3))),
             "video": (1, _ours(pipe, STRENGTHS[1], video=255 - _video()))}  # strength 0.5: the video's share 0.25
    make = schedulers.make_schedule
    monkeypatch.setattr(schedulers, "make_schedule", lambda kind, n, shift, start=0, **kw: make(kind, n, shift, **kw))
    moved["warmup_from_step_0"] = (0, _ours(pipe, STRENGTHS[0]))
    for name, (i, frames) in moved.items():
        d = float(np.abs(frames - reference[STRENGTHS[i]]).max())
        print(f"control {name}: frames moved {d:.2e}")
        measured(f"pipeline/{FAMILY}-v2v/{name}_frames_moved", d, steps=STEPS, control=True)
        assert d >= MOVE * TOL, (name, d)


def test_cli_matches_diffusers(reference, converted_f32, tmp_path):
    """wan-run --video frames.npy --strength: the frames count and size come from the video."""
    np.save(tmp_path / "in.npy", _video())
    np.save(tmp_path / "noise.npy", _noise()[0])
    r = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted_f32(FAMILY)),
                        "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--guidance",
                        str(GUIDANCE), "--dtype", "float32", "--video", str(tmp_path / "in.npy"), "--strength",
                        str(STRENGTHS[0]), "--latents", str(tmp_path / "noise.npy"), "--output",
                        str(tmp_path / "x.npy")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    err = float(np.abs(np.load(tmp_path / "x.npy") - reference[STRENGTHS[0]]).max())
    print(f"wan-run --video: frames max abs {err:.2e}")
    assert err <= TOL, err


def test_cli_mp4_in_mp4_out(converted, tmp_path):
    """An mp4 in (another size: --height/--width resize it, as diffusers), an mp4 and its sidecar out."""
    from wan_runtime.video import read_video, write_mp4

    write_mp4(tmp_path / "in.mp4", _video(size=(48, 64)), fps=8)
    assert read_video(tmp_path / "in.mp4").shape == (FRAMES, 48, 64, 3)
    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted[FAMILY]),
                        "--prompt", "a red fox", "--steps", "2", "--video", str(tmp_path / "in.mp4"), "--strength",
                        "0.7", "--height", "32", "--width", "48", "--output", str(out)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert read_video(out).shape == (FRAMES, 32, 48, 3)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["settings"]["strength"] == 0.7 and side["settings"]["video"] == str(tmp_path / "in.mp4")


def test_noise_is_the_latents_argument(pipe):
    """``latents`` with a video is the noise: strength 1 runs the whole schedule from the noise alone
    (sigma 1 - 1e-6: the video's share is 1e-6), so it lands next to the text-to-video run from it."""
    v2v = _ours(pipe, 1.0)
    t2v = np.asarray(pipe(PROMPT, NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS,
                          guidance_scale=GUIDANCE, latents=_noise()).frames, np.float32)
    assert float(np.abs(v2v - t2v).max()) < 1e-3


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("v2v-inputs")
    np.save(d / "v9.npy", _video())
    np.save(d / "v8.npy", _video()[:8])
    np.save(d / "float.npy", _video().astype(np.float32))
    (d / "garbage.mp4").write_text("not a video")
    import PIL.Image
    PIL.Image.new("RGB", (48, 32), (200, 30, 30)).save(d / "ref.png")
    return d


# (id, family, flags, needles): wan-run refuses before loading, one line naming the flag, exit 2
CASES = [
    ("strength-without-video", FAMILY, ["--strength", "0.5"], ["--strength", "needs --video"]),
    ("strength-zero", FAMILY, ["--video", "{d}/v9.npy", "--strength", "0"], ["--strength", "(0, 1]"]),
    ("strength-over-1", FAMILY, ["--video", "{d}/v9.npy", "--strength", "1.5"], ["--strength", "(0, 1]"]),
    ("strength-runs-no-step", FAMILY, ["--video", "{d}/v9.npy", "--strength", "0.2"], ["--strength", "no step"]),
    ("video-frames-not-4k+1", FAMILY, ["--video", "{d}/v8.npy"], ["--video", "8 frames", "4k+1"]),
    ("frames-differ-from-video", FAMILY, ["--video", "{d}/v9.npy", "--frames", "5"], ["--frames", "9 frames"]),
    ("video-missing", FAMILY, ["--video", "{d}/none.mp4"], ["--video", "none.mp4", "not found"]),
    ("video-unreadable", FAMILY, ["--video", "{d}/garbage.mp4"], ["--video", "garbage.mp4"]),
    ("video-float-frames", FAMILY, ["--video", "{d}/float.npy"], ["--video", "uint8"]),
    ("mask-without-video", FAMILY, ["--mask", "{d}/v9.npy"], ["--mask", "needs --video"]),
    ("mask-on-t2v", FAMILY, ["--video", "{d}/v9.npy", "--mask", "{d}/v9.npy"], ["--mask", "not a VACE model"]),
    ("reference-on-t2v", FAMILY, ["--reference", "{d}/ref.png"], ["--reference", "not a VACE model"]),
    ("conditioning-scale-on-t2v", FAMILY, ["--conditioning-scale", "0.5"], ["--conditioning-scale", "VACE"]),
    ("conditioning-scale-not-numbers", FAMILY, ["--conditioning-scale", "a,b"], ["--conditioning-scale", "'a,b'"]),
    ("video-on-i2v", "wan2.1-i2v", ["--video", "{d}/v9.npy"], ["--video", "image-to-video"]),
    ("video-and-image-on-ti2v", "wan2.2-ti2v-5b", ["--video", "{d}/v9.npy", "--image", "{d}/ref.png"],
     ["--image", "not with --video"]),
    ("cache-with-video", FAMILY, ["--video", "{d}/v9.npy", "--cache", "cfg"], ["--cache", "video-to-video"]),
]


def _no_restore(*a, **k):
    raise AssertionError("checkpoint.restore was called: the check must come before loading weights")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_video_input_fails_before_loading(case, converted, bad_inputs, tmp_path, monkeypatch):
    _, family, flags, needles = case
    monkeypatch.setattr("wan_runtime.checkpoint.restore", _no_restore)
    r = invoke("wan-run", "--checkpoint", converted[family], "--prompt", "a red fox", "--steps", "4",
               "--output", tmp_path / "x.mp4", *[f.format(d=bad_inputs) for f in flags])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert_one_line_error("wan-run", r.exit_code, r.stderr, *needles)


def test_api_checks_video_inputs_before_compiling(converted):
    pipe = WanPipeline.from_converted(converted[FAMILY], dtype="float32")
    for kwargs, match in [(dict(strength=0.5), "--strength"), (dict(video=_video()[:8]), "--video"),
                          (dict(video=_video(), num_frames=5), "--frames"),
                          (dict(video=_video(), strength=0.1, num_inference_steps=4), "--strength"),
                          (dict(video=[1, 2, 3]), "--video"), (dict(video=_video(), mask=_video()), "--mask")]:
        with pytest.raises(InputError, match=match):
            pipe("a red fox", **kwargs)
    assert pipe.compiled == ()


def test_batch_matches_solo(pipe):
    """Two videos, each from its own input video and seed, in one batch: each equals its own run; an input video
    for one video of a batch and not the other is refused."""
    from wan_runtime.video import load_inputs

    inputs = [load_inputs(_video()), load_inputs(255 - _video())]
    configs = [pipe.config(inputs=x, strength=0.5, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=i)
               for i, x in enumerate(inputs)]
    prompts = [PROMPT, "a cat"]
    batch = pipe.generate_batch(prompts, configs, videos=inputs)
    for i in range(2):
        d = float(np.abs(batch[i].frames - pipe.generate(prompts[i], configs[i], video=inputs[i]).frames).max())
        print(f"video-to-video batch video {i}: frames max abs against its own run {d:.2e}")
        assert d <= 5e-6, d
    with pytest.raises(InputError, match="--video"):
        pipe.generate_batch(prompts, configs, videos=[inputs[0], None])
