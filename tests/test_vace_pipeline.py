"""VACE in the one pipeline: whole-pipeline parity with diffusers' WanVACEPipeline on the tiny VACE repos (float32,
the same initial latents: VACE's ``latents`` argument is the noise, reference frames included), for reference
images only, a control video only, video + mask, all three (with a per-layer conditioning scale), and across
the expert boundary of the two-expert repo; each with controls that must move the frames >= MOVE tolerances.
Then the conditioning stage alone against diffusers' own functions, the paths the loop shares with the other
families (no K/V cache, step caching, a mesh, batches), wan-run with the VACE flags, and the input checks before
loading.
"""
import functools
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
from wan_runtime import caching, families, schedulers
from wan_runtime.pipeline import InputError, WanPipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}
ONE, TWO = (f.name for f in sorted((f for f in families.FAMILIES if f.vace), key=lambda f: f.experts))
HEIGHT, WIDTH, FRAMES, STEPS, GUIDANCE = 32, 48, 9, 4, 5.0
NEGATIVE = "blurry, static"
# frames max abs, ~10x the measured (float32, UniPC): 0.7-3.2e-6 over the cases
TOL = 3e-5


def _video(seed=1):
    """Smooth colour ramps with a little noise: uint8 frames (F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(FRAMES), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    base = np.stack([x * 5 + t * 9, y * 7 + t * 3, (x + y) * 3 + t * 11], -1) % 256
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _mask():
    """White (generate) in a box that moves right, black (keep) elsewhere, a grey edge under the 0.5 threshold."""
    m = np.zeros((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    for f in range(FRAMES):
        m[f, 8:24, 8 + 2 * f:28 + 2 * f] = 255
        m[f, 7, 8 + 2 * f:28 + 2 * f] = 100  # 0.39 after preprocessing: kept out by the threshold, not the fold
    return m


def _references():
    """Two images of other sizes and aspect ratios (fitted into the frame on white, as diffusers does)."""
    import PIL.Image

    rng = np.random.default_rng(5)
    return [PIL.Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in ((40, 56, 3), (24, 72, 3))]


#: case -> (family, inputs, settings); conditioning scale as diffusers takes it (a float or one per VACE layer)
CASES = {
    "references": (ONE, dict(reference_images="refs"), dict(conditioning_scale=0.7)),
    "video": (ONE, dict(video="video"), dict(conditioning_scale=0.7)),
    "video_mask": (ONE, dict(video="video", mask="mask"), dict(conditioning_scale=0.7)),
    "all": (ONE, dict(video="video", mask="mask", reference_images="refs"), dict(conditioning_scale=[0.7, 1.3])),
    "experts": (TWO, dict(video="video", mask="mask", reference_images="refs"),
                dict(conditioning_scale=0.7, guidance_scale_2=3.0)),
}


def _inputs(spec, pil=False):
    import PIL.Image

    made = {"video": _video, "mask": _mask, "refs": _references}
    out = {k: made[v]() for k, v in spec.items()}
    if pil:  # diffusers takes videos as lists of PIL frames
        out = {k: [PIL.Image.fromarray(f) for f in v] if k in ("video", "mask") else v for k, v in out.items()}
    return out


def _noise(case, seed=2):
    refs = len(_references()) if "reference_images" in CASES[case][1] else 0
    return np.random.default_rng(seed).standard_normal((1, 16, 3 + refs, 4, 6), dtype=np.float32)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_repos):
    """family -> diffusers' WanVACEPipeline (float32), loaded once."""
    torch = pytest.importorskip("torch")
    from diffusers import WanVACEPipeline

    @functools.lru_cache(maxsize=None)
    def pipe(family):
        p = WanVACEPipeline.from_pretrained(tiny_repos[family], dtype=torch.float32)
        p.set_progress_bar_config(disable=True)
        return p
    return pipe


@pytest.fixture(scope="module")
def reference(diffusers_pipe):
    """case -> diffusers' frames (F, H, W, 3) float32 in [0, 1]; each case run once, on first use."""
    import torch

    @functools.lru_cache(maxsize=None)
    def run(case):
        family, spec, settings = CASES[case]
        frames = diffusers_pipe(family)(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(_noise(case)),
            output_type="np", **_inputs(spec, pil=True), **settings).frames[0]
        return np.asarray(frames, np.float32)
    return run


@pytest.fixture(scope="module")
def pipes(converted_f32):
    @functools.lru_cache(maxsize=None)
    def get(family, mesh=None):
        return WanPipeline.from_converted(converted_f32(family), mesh=mesh, dtype="float32")
    return get


def _ours(pipe, case, inputs=None, **kw):
    _, spec, settings = CASES[case]
    args = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=_noise(case)) | settings | kw
    gen = pipe(PROMPT, NEGATIVE, **(_inputs(spec) if inputs is None else inputs), **args)
    return gen, np.asarray(gen.frames, np.float32)


def _err(frames, ref):
    assert frames.shape == ref.shape == (FRAMES, HEIGHT, WIDTH, 3)
    return float(np.abs(frames - ref).max())


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case, pipes, reference, measured):
    family = CASES[case][0]
    gen, frames = _ours(pipes(family), case)
    err = _err(frames, reference(case))
    print(f"VACE {case}: frames max abs {err:.2e}")
    measured(f"pipeline/{family}-{case}/frames_max_abs", err, reference="diffusers float32", steps=STEPS)
    assert err <= TOL, err
    assert gen.config.frames == FRAMES and gen.latents.shape[2] == 3  # reference frames cut before decoding
    if family == TWO:  # both experts ran: the boundary falls inside the schedule
        c = gen.config
        k = schedulers.expert_boundary_index(schedulers.make_schedule(c.scheduler, STEPS, c.flow_shift).timesteps,
                                             c.boundary)
        assert 0 < k < STEPS, k


def _controls(case):
    """Settings changed in our pipeline only: each must move the frames >= MOVE x TOL from diffusers'. The
    control video's content moves these random models' frames little (inverted: 1.3e-3, dropped: 1.0e-3; its
    share of the control tokens is small next to the latents'), nor does the references' order: the content is
    checked where it is large, at the control latents (``test_control_latents_match_diffusers``)."""
    _, spec, settings = CASES[case]
    out = {"conditioning_scale": dict(conditioning_scale=1.0)}
    if spec == {"reference_images": "refs"}:  # (their order moves these frames little: test_control_latents)
        out["references_dropped"] = dict(inputs={}, latents=_noise(case)[:, :, 2:])  # the video frames' noise
    if "mask" in spec:
        out["mask_dropped"] = dict(inputs={k: v for k, v in _inputs(spec).items() if k != "mask"})
    if isinstance(settings["conditioning_scale"], list):
        out["scales_swapped"] = dict(conditioning_scale=settings["conditioning_scale"][::-1])
    if "guidance_scale_2" in settings:
        out["guidance_2"] = dict(guidance_scale_2=GUIDANCE)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_controls_are_visible(case, pipes, reference, measured):
    family, ref = CASES[case][0], reference(case)
    for name, kw in _controls(case).items():
        d = _err(_ours(pipes(family), case, **kw)[1], ref)
        print(f"VACE {case}, control {name}: frames moved {d:.2e}")
        measured(f"pipeline/{family}-{case}/{name}_frames_moved", d, steps=STEPS, control=True)
        assert d >= MOVE * TOL, (name, d)


def test_control_latents_match_diffusers(pipes, diffusers_pipe, measured):
    """The conditioning stage alone (video, mask and references -> control latents) against diffusers' own
    preprocess_conditions, prepare_video_latents and prepare_masks; controls: the references in the other order,
    the video inverted, the mask dropped, each >= MOVE x the tolerance away."""
    import torch
    from wan_runtime.pipeline import Timings
    from wan_runtime.video import load_inputs

    ref_pipe, spec = diffusers_pipe(ONE), CASES["all"][1]
    with torch.no_grad():
        video, mask, refs = ref_pipe.preprocess_conditions(**_inputs(spec, pil=True), batch_size=1, height=HEIGHT,
                                                           width=WIDTH, num_frames=FRAMES, dtype=torch.float32,
                                                           device="cpu")
        want = torch.cat([ref_pipe.prepare_video_latents(video, mask, refs, None, "cpu"),
                          ref_pipe.prepare_masks(mask, refs, None)], dim=1).numpy()
    pipe = pipes(ONE)

    def ours(inputs):
        inputs = load_inputs(inputs["video"], inputs["mask"], inputs["reference_images"])
        config = pipe.config(inputs=inputs, num_inference_steps=STEPS)
        return np.asarray(pipe.prepare_vace_condition(inputs, config, Timings()).cond)

    got = ours(_inputs(spec))
    assert got.shape == want.shape == (1, 96, 5, 4, 6)
    err = float(np.abs(got - want).max())
    print(f"VACE control latents: max abs {err:.2e}")
    measured(f"pipeline/{ONE}-control-latents/max_abs", err, reference="diffusers float32")
    assert err <= 1e-5, err
    for name, change in (("references_reversed", {"reference_images": _references()[::-1]}),
                         ("video_inverted", {"video": 255 - _video()}), ("mask_dropped", {"mask": None})):
        moved = float(np.abs(ours(_inputs(spec) | change) - want).max())
        print(f"VACE control latents, control {name}: moved {moved:.2e}")
        assert moved >= MOVE * 1e-5, (name, moved)


@pytest.mark.parametrize("size,frame", [((45, 61), (32, 48)), ((100, 30), (32, 48)), ((17, 200), (64, 96)),
                                        ((9, 9), (32, 48))])
def test_reference_image_fit(size, frame):
    """A reference image of any size (floored to multiples of 8, fitted with torch's bilinear resize, centred on
    white) as diffusers' preprocess_conditions makes it, in numpy."""
    import PIL.Image
    import torch
    from diffusers.video_processor import VideoProcessor
    from wan_runtime.image import reference_preprocess

    img = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, size + (3,), dtype=np.uint8))
    x = VideoProcessor(vae_scale_factor=8).preprocess(img, None, None)
    (h, w), (H, W) = x.shape[-2:], frame
    scale = min(H / h, W / w)
    nh, nw = int(h * scale), int(w * scale)
    want = torch.ones(3, H, W)
    want[:, (H - nh) // 2:(H - nh) // 2 + nh, (W - nw) // 2:(W - nw) // 2 + nw] = torch.nn.functional.interpolate(
        x, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    assert float(np.abs(reference_preprocess(img, H, W) - want.numpy()).max()) <= 2e-5  # measured <= 8.8e-6


def test_without_kv_cache(pipes, reference):
    """kv_cache off: the loop recomputes the main and the VACE blocks' K/V from the context every step."""
    err = _err(_ours(pipes(ONE).replace(kv_cache=False), "all")[1], reference("all"))
    print(f"VACE without the K/V cache: frames max abs {err:.2e}")
    assert err <= TOL, err


def test_step_caching_passes_the_hints(pipes, reference):
    """Through the step-caching path: a first-block cache that never skips (thresh 0; the first block runs
    apart, without its hint, which is added before the rest) lands where the dense loop does; skipping
    policies run and skip."""
    pipe = pipes(ONE)
    gen, frames = _ours(pipe, "all", cache=caching.FirstBlockCache(thresh=0.0))
    assert gen.block_runs.tolist() == [STEPS, STEPS]
    err = _err(frames, reference("all"))
    print(f"VACE with a first-block cache that never skips: frames max abs {err:.2e}")
    assert err <= TOL, err
    for policy in (caching.FirstBlockCache(thresh=1e9), caching.CFGCache(interval=2, start=1)):
        gen, frames = _ours(pipe, "all", cache=policy)
        assert np.isfinite(frames).all() and gen.block_runs.sum() < 2 * STEPS, (policy.name, gen.block_runs)


@pytest.mark.parametrize("mesh", ["data=2,context=2", "fsdp=2,tensor=2"])
def test_mesh_matches_diffusers(pipes, reference, mesh):
    """On 4 of the 8 simulated devices: CFG rows split over data, the tokens over context (or the weights over
    fsdp and tensor)."""
    err = _err(_ours(pipes(TWO, mesh), "experts")[1], reference("experts"))
    print(f"VACE on mesh {mesh}: frames max abs {err:.2e}")
    assert err <= TOL, err


def test_batch_matches_solo(pipes):
    """Two videos with their own controls (and seeds) in one batch (CFG rows [c1, c2, u1, u2] sharing each
    video's control): each equals its own run; a batch whose videos have different reference counts is refused."""
    from wan_runtime.video import load_inputs

    pipe = pipes(ONE)
    inputs = [load_inputs(_video(), _mask(), _references()[:1]), load_inputs(255 - _video(), None, _references()[1:])]
    configs = [pipe.config(inputs=x, num_inference_steps=2, guidance_scale=GUIDANCE, seed=i)
               for i, x in enumerate(inputs)]
    prompts = [PROMPT, "a cat"]
    batch = pipe.generate_batch(prompts, configs, videos=inputs)
    for i in range(2):
        solo = pipe.generate(prompts[i], configs[i], video=inputs[i])
        d = float(np.abs(batch[i].frames - solo.frames).max())
        print(f"VACE batch video {i}: frames max abs against its own run {d:.2e}")
        assert d <= 5e-6, d
    assert float(np.abs(batch[0].frames - batch[1].frames).max()) > 1e-2  # the two videos differ
    with pytest.raises(InputError, match="--reference"):
        pipe.generate_batch(prompts, configs, videos=[inputs[0], load_inputs(_video())])


def test_cli_matches_diffusers(converted_f32, reference, tmp_path):
    """wan-run --video --mask --reference --conditioning-scale (one value per layer): the frames of the "all"
    case; the frame count and size come from the control video."""
    _references()[0].save(tmp_path / "r0.png")
    _references()[1].save(tmp_path / "r1.png")
    np.save(tmp_path / "video.npy", _video())
    np.save(tmp_path / "mask.npy", _mask())
    np.save(tmp_path / "noise.npy", _noise("all"))
    out = tmp_path / "x.npy"
    r = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted_f32(ONE)),
                        "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--guidance",
                        str(GUIDANCE), "--dtype", "float32", "--video", str(tmp_path / "video.npy"), "--mask",
                        str(tmp_path / "mask.npy"), "--reference", str(tmp_path / "r0.png"), "--reference",
                        str(tmp_path / "r1.png"), "--conditioning-scale", "0.7,1.3", "--latents",
                        str(tmp_path / "noise.npy"), "--output", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    err = _err(np.load(out), reference("all"))
    print(f"wan-run VACE: frames max abs {err:.2e}")
    assert err <= TOL, err
    side = json.loads(out.with_suffix(".json").read_text())["settings"]
    assert side["conditioning_scale"] == [0.7, 1.3] and side["references"] == [str(tmp_path / "r0.png"),
                                                                             str(tmp_path / "r1.png")]


def test_cli_mp4_control(converted, tmp_path):
    """An mp4 control video and mask, a reference image, an mp4 out (the default bf16 checkpoint)."""
    from wan_runtime.video import read_video, write_mp4

    write_mp4(tmp_path / "control.mp4", _video(), fps=8)
    write_mp4(tmp_path / "mask.mp4", _mask(), fps=8)
    _references()[0].save(tmp_path / "ref.png")
    out = tmp_path / "out.mp4"
    r = subprocess.run([sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted[TWO]), "--prompt",
                        "a red fox", "--steps", "2", "--video", str(tmp_path / "control.mp4"), "--mask",
                        str(tmp_path / "mask.mp4"), "--reference", str(tmp_path / "ref.png"), "--output", str(out)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert read_video(out).shape == (FRAMES, HEIGHT, WIDTH, 3)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("vace-inputs")
    np.save(d / "video.npy", _video())
    np.save(d / "mask5.npy", _mask()[:5])
    np.save(d / "mask-small.npy", _mask()[:, :16, :32])
    np.save(d / "v8.npy", _video()[:8])
    _references()[0].save(d / "ref.png")
    return d


# (id, family, flags, needles): wan-run refuses before loading, one line naming the flag, exit 2
CASES_BAD = [
    ("strength-on-vace", ONE, ["--video", "{d}/video.npy", "--strength", "0.5"], ["--strength", "VACE"]),
    ("image-on-vace", ONE, ["--image", "{d}/ref.png"], ["--image", "--reference"]),
    ("mask-without-video", ONE, ["--mask", "{d}/mask5.npy"], ["--mask", "needs --video"]),
    ("mask-frames-differ", ONE, ["--video", "{d}/video.npy", "--mask", "{d}/mask5.npy"],
     ["--mask", "5 frames", "9 frames"]),
    ("mask-size-differs", TWO, ["--video", "{d}/video.npy", "--mask", "{d}/mask-small.npy"],
     ["--mask", "32x16", "48x32"]),
    ("video-not-4k+1", ONE, ["--video", "{d}/v8.npy"], ["--video", "8 frames", "4k+1"]),
    ("frames-differ-from-video", ONE, ["--video", "{d}/video.npy", "--frames", "5"], ["--frames", "9 frames"]),
    ("video-of-another-aspect", ONE, ["--video", "{d}/video.npy", "--height", "32", "--width", "32"],
     ["--video", "48x32", "--width 32"]),
    ("scale-count", ONE, ["--conditioning-scale", "1,2,3"], ["--conditioning-scale", "3 values", "2 VACE layers"]),
    ("scale-nan", ONE, ["--conditioning-scale", "nan"], ["--conditioning-scale", "finite"]),
    ("reference-missing", ONE, ["--reference", "{d}/none.png"], ["--reference", "none.png", "not found"]),
]


@pytest.mark.parametrize("case", CASES_BAD, ids=[c[0] for c in CASES_BAD])
def test_bad_vace_input_fails_before_loading(case, converted, bad_inputs, tmp_path, monkeypatch):
    _, family, flags, needles = case

    def no_restore(*a, **k):
        raise AssertionError("checkpoint.restore was called: the check must come before loading weights")

    monkeypatch.setattr("wan_runtime.checkpoint.restore", no_restore)
    r = invoke("wan-run", "--checkpoint", converted[family], "--prompt", "a red fox", "--steps", "4",
               "--output", tmp_path / "x.mp4", *[f.format(d=bad_inputs) for f in flags])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert_one_line_error("wan-run", r.exit_code, r.stderr, *needles)
