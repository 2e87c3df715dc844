"""The default bf16 path against the float32 path, for every family.

bf16: the default conversion (bf16 weights, the `converted` fixture) run with ``dtype="bfloat16"``, the
accelerators' default dtypes (bf16 transformer and text encoder, float32 VAE and scheduler; on CPU the
default is float32, ``Dtypes.default``). float32: a float32 conversion run with
``dtype="float32"``. Same initial latents, same image; PSNR of the uint8 frames (peak 255).
(Random tiny weights: this checks the bf16 path end to end, not real-model quality.)
"""
import jax
import numpy as np
import pytest

from wan_runtime import families
from wan_runtime.pipeline import WanPipeline

PROMPT, NEGATIVE = "a small robot walks along a busy city street at night", "blurry, static"
STEPS, FRAMES = 4, 5

# family -> (height, width, image?): every family (32 x 48; TI2V-5B, whose VAE is x16: 32 x 64), with an image
# where it takes one
CASES = {f.name: (32, 64 if f.image_mode == "expand" else 48, f.image_input != "none") for f in families.FAMILIES}
# measured 52.6 (wan2.1-t2v), 56.6 (wan2.1-i2v), 54.8 (wan2.2-t2v-a14b), 54.8 (wan2.2-i2v-a14b), 58.1 dB
# (wan2.2-ti2v-5b, with image): the floor is ~3 dB under the lowest
PSNR_FLOOR_DB = 49.5


def _image():
    from PIL import Image

    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


@pytest.fixture(scope="module")
def f32_checkpoints(converted_f32):
    return converted_f32  # the session's float32 conversions (tests/conftest.py)


def _run(pipe, family, latents, image):
    height, width, _ = CASES[family]
    kw = dict(guidance_scale_2=3.0) if len(pipe.experts) == 2 else {}
    return pipe(PROMPT, NEGATIVE, height=height, width=width, num_frames=FRAMES, num_inference_steps=STEPS,
                guidance_scale=5.0, latents=latents, image=image, output_type="uint8", **kw).frames


def _weight_dtypes(pipe):
    return {str(a.dtype) for a in jax.tree.leaves(pipe.params["transformer"])}


def test_psnr_helper():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # mse = 255^2 / 96 -> 10 log10(96)
    assert abs(psnr_db(a, b) - 10 * np.log10(96)) < 1e-9
    assert psnr_db(a, a) == float("inf")


@pytest.mark.parametrize("family", list(CASES))
def test_bf16_close_to_float32(family, converted, f32_checkpoints, measured):
    height, width, with_image = CASES[family]
    image = _image() if with_image else None
    bf16 = WanPipeline.from_converted(converted[family], dtype="bfloat16")  # the bf16 defaults, explicit
    f32 = WanPipeline.from_converted(f32_checkpoints(family), dtype="float32")
    assert "bfloat16" in _weight_dtypes(bf16) and bf16.dtypes.transformer == "bfloat16"
    assert _weight_dtypes(f32) == {"float32"} and f32.dtypes.transformer == "float32"
    latents = np.random.default_rng(0).standard_normal(bf16.latent_shape(height, width, FRAMES), dtype=np.float32)
    ours, ref = _run(bf16, family, latents, image), _run(f32, family, latents, image)
    assert ours.dtype == ref.dtype == np.uint8 and ours.shape == ref.shape == (FRAMES, height, width, 3)
    psnr = psnr_db(ours, ref)
    print(f"{family}: bf16 vs float32 PSNR {psnr:.1f} dB")
    measured(f"bf16/{family}/psnr_db", psnr, steps=STEPS, frames=FRAMES, height=height, width=width)
    assert psnr >= PSNR_FLOOR_DB, f"{family}: PSNR {psnr:.1f} dB"  # measured 52.6-58.1 dB (see PSNR_FLOOR_DB)
