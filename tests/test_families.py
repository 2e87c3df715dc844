"""Every Wan family through the one pipeline vs diffusers' pipelines (float32, same initial latents).

Each case compares the final latents (diffusers ``output_type="latent"``) and the decoded frames (those
latents decoded here with diffusers' own VAE and video processor, as its pipeline does). A sibling test
proves the comparison can see what it guards: our pipeline with guidance off, another negative prompt,
another guidance for the second expert, or the expert boundary one step later, lands >= 100x the
tolerance away from diffusers, so a bug with the same effect cannot pass.
"""
import numpy as np
import pytest

from wan_runtime import schedulers
from wan_runtime.pipeline import DEFAULT_NEGATIVE, InputError, WanPipeline

STEPS, FRAMES, GUIDANCE, GUIDANCE_2 = 4, 9, 6.0, 2.0
# Long prompts, on purpose. Text is padded to 512 tokens with zero embeddings, and the random tiny
# transformer's cross-attention is near uniform, so a prompt of ~10 tokens reaches the output ~50x diluted:
# guidance off then moved the final latents by only ~5e-4 relative L2, too little for the controls below to
# stand 100 tolerances clear. With ~100 / ~200 tokens they move ~5-10x more. (A shorter max_sequence_length
# would do it too, but diffusers' Wan 2.1 I2V attention hard-codes 512 text tokens to split off the CLIP ones.)
PROMPT = ("A cat and a dog baking a cake together in a kitchen. The cat is carefully measuring flour, while the dog "
          "is stirring the batter with a wooden spoon. The kitchen is cozy, with sunlight streaming through the window.")
NEGATIVE = DEFAULT_NEGATIVE  # Wan's standard negative prompt

# case -> (family, height, width, image?)
CASES = {
    "wan2.2-t2v-a14b": ("wan2.2-t2v-a14b", 32, 48, False),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", 32, 64, False),
    "wan2.2-ti2v-5b+image": ("wan2.2-ti2v-5b", 32, 64, True),
    "wan2.1-i2v": ("wan2.1-i2v", 32, 48, True),
    "wan2.2-i2v-a14b": ("wan2.2-i2v-a14b", 32, 48, True),
}

# case -> tolerances (latents max abs, latents relative L2, frames max abs), each 10-30x the figure measured
# on this machine (float32, UniPC, 4 steps, guidance 6 / 2), given beside each row in the same order: the
# range over two runs (threaded float32 reductions: the figures vary up to ~2x run to run).
TOL = {
    "wan2.2-t2v-a14b": (4e-5, 1e-5, 3e-5),  # measured 2.5-3.3e-6, 6.7-7.3e-7, 0.8-2.0e-6
    "wan2.2-ti2v-5b": (1e-4, 2e-5, 2e-5),  # measured 6.0-6.4e-6, 1.3e-6, 0.8-1.1e-6
    "wan2.2-ti2v-5b+image": (1.2e-4, 2e-5, 1.5e-5),  # measured 4.6-7.6e-6, 1.3e-6, 6.6-7.2e-7
    "wan2.1-i2v": (1.5e-4, 3e-5, 2e-5),  # measured 8.8-9.9e-6, 1.8-2.0e-6, 1.2e-6
    "wan2.2-i2v-a14b": (6e-5, 1.5e-5, 3e-5),  # measured 3.6-4.3e-6, 0.9-1.0e-6, 1.0-2.0e-6
}
MOVE = 100  # a control must land at least this many tolerances away from diffusers


def _image():
    from PIL import Image

    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def _latents(pipe, height, width):
    z, s = pipe.vcfg.z_dim, pipe.vae_scale_spatial
    shape = (1, z, (FRAMES - 1) // 4 + 1, height // s, width // s)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _two_experts(family):
    return family.endswith("a14b")


def _diffusers_run(repo, family, latents, height, width, image, prepare=None):
    """diffusers' final latents (output_type="latent") and those latents decoded as its pipeline does.
    ``prepare(pipe)``: called on diffusers' pipeline before the run (e.g. to load LoRAs)."""
    torch = pytest.importorskip("torch")
    from diffusers import WanImageToVideoPipeline, WanPipeline as DWan

    pipe = (WanImageToVideoPipeline if "-i2v" in family else DWan).from_pretrained(repo, dtype=torch.float32)
    if image is not None and family.startswith("wan2.2-ti2v"):
        comps = {k: v for k, v in pipe.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler",
                                                                   "transformer", "transformer_2")}
        pipe = WanImageToVideoPipeline(**comps, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=FRAMES,
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents.copy()),
              output_type="latent", max_sequence_length=512)
    if _two_experts(family):
        kw["guidance_scale_2"] = GUIDANCE_2
    if image is not None:
        kw["image"] = image
    lat = pipe(**kw).frames
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(lat / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")[0]
    return lat.numpy().astype(np.float32), np.asarray(frames, np.float32)


@pytest.fixture(scope="module")
def f32(converted_f32):
    return converted_f32  # the session's float32 conversions (tests/conftest.py)


@pytest.fixture(scope="module")
def pipes(f32):
    """One float32 WanPipeline per family, shared by every test here."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = WanPipeline.from_converted(f32(family), dtype="float32")
        return cache[family]
    return get


@pytest.fixture(scope="module")
def reference(tiny_repos, pipes):
    """Per case: (initial latents, image, diffusers' final latents, diffusers' frames); one diffusers run each."""
    cache = {}

    def get(case):
        if case not in cache:
            family, height, width, with_image = CASES[case]
            latents = _latents(pipes(family), height, width)
            image = _image() if with_image else None
            cache[case] = (latents, image, *_diffusers_run(tiny_repos[family], family, latents, height, width, image))
        return cache[case]
    return get


def _ours(pipe, case, latents, image, negative=NEGATIVE, **kw):
    """Our final latents and frames for ``case`` (a CASES key, or its (family, height, width, image?) tuple)."""
    family, height, width, _ = CASES[case] if isinstance(case, str) else case
    if _two_experts(family):
        kw.setdefault("guidance_scale_2", GUIDANCE_2)
    kw.setdefault("guidance_scale", GUIDANCE)
    gen = pipe(PROMPT, negative, height=height, width=width, num_frames=FRAMES, num_inference_steps=STEPS,
               latents=latents, image=image, max_sequence_length=512, **kw)
    return np.asarray(gen.latents, np.float32), np.asarray(gen.frames, np.float32)


def _errors(lat, frames, ref_lat, ref_frames):
    assert lat.shape == ref_lat.shape and frames.shape == ref_frames.shape
    d = (lat - ref_lat).astype(np.float64)
    return (float(np.abs(d).max()), float(np.linalg.norm(d) / np.linalg.norm(ref_lat.astype(np.float64))),
            float(np.abs(frames - ref_frames).max()))


def _boundary(pipe, boundary_ratio=None):
    """(timesteps, first low-noise step) of a run with the checkpoint's boundary, or ``boundary_ratio``."""
    config = pipe.config(image=pipe.family.image_input == "required", boundary_ratio=boundary_ratio)
    sched = schedulers.make_schedule("unipc", STEPS, config.flow_shift)
    return sched.timesteps, schedulers.expert_boundary_index(sched.timesteps, config.boundary)


@pytest.mark.parametrize("case", list(CASES))
def test_family_matches_diffusers(case, pipes, reference, measured):
    family = CASES[case][0]
    pipe = pipes(family)
    if _two_experts(family):  # the run really crosses the expert boundary
        k = _boundary(pipe)[1]
        assert 0 < k < STEPS, k
    latents, image, ref_lat, ref_frames = reference(case)
    errors = _errors(*_ours(pipe, case, latents, image), ref_lat, ref_frames)
    check_parity(case, errors, TOL[case], measured, steps=STEPS, frames=FRAMES)  # measured: see TOL


def check_parity(case, errors, tolerances, measured, **info):
    """(latents max abs, latents relative L2, frames max abs) against diffusers: recorded, and each within
    its tolerance."""
    print(f"{case}: latents max abs {errors[0]:.2e} rel L2 {errors[1]:.2e}; frames max abs {errors[2]:.2e}")
    for what, err, tol in zip(("latents_max_abs", "latents_rel_l2", "frames_max_abs"), errors, tolerances):
        measured(f"pipeline/{case}/{what}", err, reference="diffusers float32", **info)
        assert err <= tol, f"{case}: {what} {err} > {tol}"


@pytest.mark.parametrize("case", list(CASES))
def test_family_controls_are_visible(case, pipes, reference, measured):
    """Each setting the parity test guards, changed in OUR pipeline only, moves the latents and the frames
    >= MOVE x the tolerance away from diffusers: a bug that drops the setting cannot pass the parity test."""
    family = CASES[case][0]
    pipe = pipes(family)
    latents, image, ref_lat, ref_frames = reference(case)
    controls = {
        "guidance_off": dict(guidance_scale=1.0, guidance_scale_2=1.0),  # one unguided pass per step
        "negative_prompt": dict(negative=""),  # what an ignored negative prompt encodes
    }
    if _two_experts(family):
        controls["guidance_2"] = dict(guidance_scale_2=GUIDANCE)  # the low-noise expert given the first's guidance
        controls["boundary_plus_1"] = dict(boundary_shift=1)
    tol_max, tol_rel, tol_frames = TOL[case]
    for name, kw in controls.items():
        if kw.pop("boundary_shift", 0):  # one more step on the high-noise expert: ratio just under t[k]
            timesteps, k = _boundary(pipe)
            kw["boundary_ratio"] = (float(timesteps[k]) - 0.5) / 1000
            assert _boundary(pipe, kw["boundary_ratio"])[1] == k + 1
        errors = _errors(*_ours(pipe, case, latents, image, **kw), ref_lat, ref_frames)
        check_control(f"{case} {name}", f"pipeline/{case}/{name}_frames_moved", errors, (tol_max, tol_rel, tol_frames),
                      measured, STEPS)


def check_control(label, key, errors, tolerances, measured, steps):
    """A negative control: how far the bug's effect moved (latents max abs, latents relative L2, frames max
    abs), recorded, and each at least MOVE times its tolerance."""
    print(f"{label}: latents max abs {errors[0]:.2e} rel L2 {errors[1]:.2e}; frames max abs {errors[2]:.2e}")
    measured(key, errors[2], steps=steps, control=True)
    for what, moved, tol in zip(("latents", "latents (rel L2)", "frames"), errors, tolerances):
        assert moved >= MOVE * tol, f"{label}: {what} moved only {moved}"


def test_image_required_and_refused(pipes):
    t2v = pipes("wan2.2-t2v-a14b")
    with pytest.raises(InputError, match="--image"):
        t2v(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=1, image=_image())
    i2v = pipes("wan2.2-i2v-a14b")
    with pytest.raises(InputError, match="--image"):
        i2v(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=1)
