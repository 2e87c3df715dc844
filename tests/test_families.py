"""Every Wan family through the one pipeline vs diffusers' pipelines (float32, same initial latents)."""
import numpy as np
import pytest

from wan_convert.convert import convert
from wan_runtime import schedulers
from wan_runtime.pipeline import InputError, WanPipeline

PROMPT, NEGATIVE = "a red fox runs through fresh snow", "blurry, static"

# family -> (height, width, image?, extra diffusers kwargs, extra wan-jax kwargs)
CASES = {
    "wan2.2-t2v-a14b": (32, 48, False, {"guidance_scale_2": 3.0}, {"guidance_scale_2": 3.0}),
    "wan2.2-ti2v-5b": (32, 64, False, {}, {}),
    "wan2.2-ti2v-5b+image": (32, 64, True, {}, {}),
    "wan2.1-i2v": (32, 48, True, {}, {}),
    "wan2.2-i2v-a14b": (32, 48, True, {"guidance_scale_2": 3.0}, {"guidance_scale_2": 3.0}),
}
STEPS, FRAMES, GUIDANCE = 4, 9, 4.0


def _image():
    from PIL import Image

    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))


def _diffusers(repo, family, latents, height, width, image, extra):
    torch = pytest.importorskip("torch")
    from diffusers import WanImageToVideoPipeline, WanPipeline as DWan

    pipe = DWan.from_pretrained(repo, dtype=torch.float32) if "-i2v" not in family else \
        WanImageToVideoPipeline.from_pretrained(repo, dtype=torch.float32)
    if image is not None and family.startswith("wan2.2-ti2v"):
        comps = {k: v for k, v in pipe.components.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler",
                                                                   "transformer", "transformer_2")}
        pipe = WanImageToVideoPipeline(**comps, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_frames=FRAMES,
              num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents), output_type="np",
              max_sequence_length=512, **extra)
    if image is not None:
        kw["image"] = image
    return np.asarray(pipe(**kw).frames[0], np.float32)


@pytest.fixture(scope="module")
def f32(tiny_repos, tmp_path_factory):
    root = tmp_path_factory.mktemp("f32fam")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = convert(str(tiny_repos[family]), root / family, weights_dtype="float32").output
        return cache[family]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_family_matches_diffusers(case, tiny_repos, f32):
    family = case.split("+")[0]
    height, width, with_image, dkw, jkw = CASES[case]
    pipe = WanPipeline.from_converted(f32(family), dtype="float32")
    z, s = pipe.vcfg.z_dim, pipe.vae_scale_spatial
    latents = np.random.default_rng(0).standard_normal((1, z, (FRAMES - 1) // 4 + 1, height // s, width // s),
                                                       dtype=np.float32)
    image = _image() if with_image else None
    ours = pipe(PROMPT, NEGATIVE, height=height, width=width, num_frames=FRAMES, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, latents=latents, image=image, **jkw)
    if len(pipe.experts) == 2:  # the run really crosses the expert boundary
        sched = schedulers.make_schedule("unipc", STEPS, pipe.scheduler_config.get("flow_shift", 3.0))
        k = schedulers.expert_boundary_index(sched.timesteps, pipe.boundary_ratio)
        assert 0 < k < STEPS, k
    ref = _diffusers(tiny_repos[family], family, latents, height, width, image, dkw)
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max())
    print(f"{case}: max abs error {err:.2e}")
    assert err <= 1e-3, f"{case}: max abs error {err}"


def test_image_required_and_refused(f32):
    t2v = WanPipeline.from_converted(f32("wan2.2-t2v-a14b"), dtype="float32")
    with pytest.raises(InputError, match="--image"):
        t2v(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=1, image=_image())
    i2v = WanPipeline.from_converted(f32("wan2.2-i2v-a14b"), dtype="float32")
    with pytest.raises(InputError, match="--image"):
        i2v(PROMPT, height=32, width=48, num_frames=5, num_inference_steps=1)
