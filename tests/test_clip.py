"""Image-encoder path: CLIP vision tower vs transformers, CLIP / VAE image preprocessing vs transformers / diffusers."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from wan_convert.mapping import tree_from_state_dict

from wan_runtime import format as fmt
from wan_runtime import image
from wan_runtime.models import clip

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 3e-6  # float32 CLIP tower vs transformers, relative L2: measured 1.3e-7 (quick_gelu), 1.7e-7 (gelu)


def _tools():
    import make_tiny_checkpoint  # tools/ is on sys.path (conftest.py)

    return make_tiny_checkpoint


from tests.test_transformer import rel as rel_err  # noqa: E402


def _perturb(model, seed=1):
    """As make_tiny_checkpoint.build_pipeline: no norm scale / bias is trivially one / zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _random_image(h, w, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    enc, proc = _tools().build_clip()
    return _perturb(enc), proc


def _gelu_clip():
    torch.manual_seed(1)
    cfg = CLIPVisionConfig(hidden_size=16, projection_dim=8, num_hidden_layers=3, num_attention_heads=4,
                           image_size=12, intermediate_size=24, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6)
    return _perturb(CLIPVisionModelWithProjection(cfg).eval(), seed=2)


def _check_tower(enc, batch, measured, case):
    cfg_dict = enc.config.to_dict()
    params = tree_from_state_dict("image_encoder", {k: v.detach().numpy() for k, v in enc.state_dict().items()},
                                  cfg_dict, "float32")
    cfg = clip.CLIPVisionConfig.from_config(cfg_dict)
    S = cfg.image_size
    pixels = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = enc(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == cfg.num_layers + 1
    ref = out.hidden_states[-2].numpy()
    ours = jax.jit(lambda p, x: clip.encode_image(p, cfg, x))(params, jnp.asarray(pixels.numpy()))
    assert ours.shape == ref.shape == (batch, cfg.num_patches + 1, cfg.hidden_size) and ours.dtype == jnp.float32
    err = rel_err(ours, ref)
    measured(f"component/clip/{case}/rel_l2", err)
    assert err <= RTOL, err
    # The last layer must not run: the final hidden state is a different tensor (measured 0.71 / 0.24 from the
    # penultimate one, so the parity bound above would catch a tower that ran it).
    assert rel_err(out.hidden_states[-1].numpy(), ref) > 1e-2
    return params, cfg, pixels, ref


def test_tower_quick_gelu(tiny_clip, tmp_path, measured):
    enc, _ = tiny_clip
    assert enc.config.hidden_act == "quick_gelu"
    params, cfg, pixels, ref = _check_tower(enc, 2, measured, "quick_gelu")
    # The default bf16 path (bf16 weights, bf16 compute) is no further from the float32 oracle than transformers'
    # own bf16 model (from_pretrained(torch_dtype=bfloat16)): measured 5.0e-3 vs 5.0e-3 (ratio 1.01). bf16
    # rounding (2^-8 = 3.9e-3 per op) dominates both, so the bound is a ratio to the reference's error in this run.
    params16 = tree_from_state_dict("image_encoder", {k: v.detach().numpy() for k, v in enc.state_dict().items()},
                                    enc.config.to_dict(), "bfloat16")
    bf = clip.encode_image(params16, cfg, jnp.asarray(pixels.numpy()), dtype=jnp.bfloat16)
    enc.save_pretrained(tmp_path)
    with torch.no_grad():
        ref16 = CLIPVisionModelWithProjection.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)(
            pixel_values=pixels.bfloat16(), output_hidden_states=True).hidden_states[-2].float().numpy()
    ours, theirs = rel_err(bf, ref), rel_err(ref16, ref)
    measured("bf16/component/clip/rel_l2", ours)
    measured("bf16/component/clip/transformers_rel_l2", theirs)
    assert bf.dtype == jnp.float32 and ours <= 1.5 * theirs, (ours, theirs)


def test_tower_gelu_three_layers(measured):
    _check_tower(_gelu_clip(), 1, measured, "gelu_3_layers")


def test_config_from_full_clip_config(tiny_clip):
    enc, _ = tiny_clip
    vision = enc.config.to_dict()
    assert clip.CLIPVisionConfig.from_config({"vision_config": vision}) == clip.CLIPVisionConfig.from_config(vision)
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPVisionConfig.from_config({**vision, "hidden_act": "relu6"})


def test_vit_h14_shapes():
    cfg_dict = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024)
    tree = jax.tree_util.tree_map(lambda l: jax.ShapeDtypeStruct(l.shape, jnp.dtype(l.dtype)),
                                  fmt.image_encoder_tree(cfg_dict), is_leaf=lambda l: isinstance(l, fmt.Leaf))
    cfg = clip.CLIPVisionConfig.from_config(cfg_dict)
    out = jax.eval_shape(lambda p, x: clip.encode_image(p, cfg, x, dtype=jnp.bfloat16),
                         tree, jax.ShapeDtypeStruct((1, 3, 224, 224), jnp.float32))
    assert out.shape == (1, 257, 1280) and out.dtype == jnp.float32


@pytest.mark.parametrize("size", [(40, 56), (64, 48)])
def test_clip_preprocess(tiny_clip, tmp_path, size):
    _, proc = tiny_clip
    proc.save_pretrained(tmp_path)
    reloaded = CLIPImageProcessor.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    img = _random_image(*size, seed=size[0])
    ref = reloaded(images=img, return_tensors="np")["pixel_values"]
    ours = image.clip_preprocess(img, config)
    assert ours.shape == ref.shape == (1, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_clip_preprocess_rgba_and_padding():
    """Alpha composited onto white; a crop larger than the resized image is zero-padded."""
    rgba = np.random.default_rng(5).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    img = PIL.Image.fromarray(rgba, "RGBA")
    config = dict(size={"height": 16, "width": 24}, crop_size={"height": 20, "width": 20}, resample=2)
    proc = CLIPImageProcessor(**config)
    ref = proc(images=img, return_tensors="np")["pixel_values"]
    ours = image.clip_preprocess(img, config)
    assert ours.shape == ref.shape == (1, 3, 20, 20)
    np.testing.assert_array_equal(ours, ref)


def test_video_preprocess():
    img = _random_image(50, 70, seed=7)
    ref = VideoProcessor(vae_scale_factor=8).preprocess(img, height=32, width=48).numpy()
    ours = image.video_preprocess(img, 32, 48)
    assert ref.shape == (1, 3, 32, 48) and ours.shape == (1, 3, 1, 32, 48) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[:, :, 0], ref)
    assert ours.min() >= -1 and ours.max() <= 1


def test_load_image(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="nope.png"):
        image.load_image(missing)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        image.load_image(bad)
    good = tmp_path / "good.png"
    PIL.Image.fromarray(np.zeros((5, 7, 4), np.uint8), "RGBA").save(good)
    img = image.load_image(str(good))
    assert img.mode == "RGB" and img.size == (7, 5)
