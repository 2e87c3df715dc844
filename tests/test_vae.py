"""Parity of wan_runtime.models.vae with diffusers' AutoencoderKLWan (Wan 2.1 and 2.2), float32 on CPU.

Most cases compile the jitted functions' own lowering at XLA backend optimisation level 0 (the same
program, ~3x faster to compile on CPU); single-frame decodes go through the public jitted function.
"""

import copy
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
from wan_convert.mapping import tree_from_state_dict

from wan_runtime.format import Leaf, vae_tree
from wan_runtime.models import vae as V

_spec = importlib.util.spec_from_file_location(
    "make_tiny_checkpoint", pathlib.Path(__file__).parents[1] / "tools" / "make_tiny_checkpoint.py")
mtc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mtc)

DECODE_TOL, ENCODE_TOL = 1e-4, 1e-5
FAST = {"xla_backend_optimization_level": 0}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convert(model):
    """Perturb 1-D params and gammas (as build_pipeline does), then convert to the runtime tree."""
    import make_tiny_checkpoint

    make_tiny_checkpoint.perturb(model, torch.Generator().manual_seed(1))
    cfg = dict(model.config)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, tree_from_state_dict("vae", sd, cfg, "float32"), V.VAEConfig.from_config(cfg)


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def tiny(request):
    torch.manual_seed(0)
    return convert(mtc.build_vae(wan22=request.param == "wan2.2"))


def fast(fn, params, cfg, x):
    return fn.lower(params, cfg, x).compile(compiler_options=FAST)(params, x)


def torch_decode(model, z):
    with torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


def torch_encode(model, x):
    with torch.no_grad():
        d = model.encode(torch.from_numpy(x)).latent_dist
    return d.mean.numpy(), d.logvar.numpy()


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 2), (2, 3)])  # 6 frames: test_chunks
def test_decode(tiny, batch, frames):
    model, params, cfg = tiny
    hw = (2, 3) if cfg.is_residual else (4, 6)  # 32 x 48 px for both (spatial factor 16 / 8)
    z = np.random.RandomState(10 * batch + frames).randn(batch, cfg.z_dim, frames, *hw).astype(np.float32)
    ref = torch_decode(model, z)
    run = V.decode if frames == 1 else functools.partial(fast, V.decode)  # one case through the public path
    out = np.asarray(run(params, cfg, jnp.asarray(z)))
    assert out.shape == ref.shape == (batch, 3, 1 + 4 * (frames - 1), 32, 48)
    assert rel(out, ref) <= DECODE_TOL


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 5), (2, 9)])
def test_encode(tiny, batch, frames):
    model, params, cfg = tiny
    x = np.random.RandomState(frames).uniform(-1, 1, (batch, 3, frames, 32, 48)).astype(np.float32)
    ref_mean, ref_logvar = torch_encode(model, x)
    mean, logvar = fast(V.encode, params, cfg, jnp.asarray(x))
    assert mean.shape == logvar.shape == ref_mean.shape
    assert rel(mean, ref_mean) <= ENCODE_TOL and rel(logvar, ref_logvar) <= ENCODE_TOL


def test_bfloat16(tiny):
    """bf16 compute runs and is no further from the fp32 oracle than diffusers' own bf16 decode (x1.5)."""
    model, params, cfg = tiny
    hw = (2, 3) if cfg.is_residual else (4, 6)
    z = np.random.RandomState(0).randn(1, cfg.z_dim, 2, *hw).astype(np.float32)
    ref = torch_decode(model, z)
    with torch.no_grad():
        ref_bf16 = copy.deepcopy(model).to(torch.bfloat16).decode(torch.from_numpy(z).bfloat16()).sample.float()
    out = V.decode.lower(params, cfg, jnp.asarray(z), dtype=jnp.bfloat16).compile(compiler_options=FAST)(params, z)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert rel(out, ref) <= 1.5 * rel(ref_bf16.numpy(), ref)


@pytest.mark.parametrize("residual", [False, True], ids=["wan2.1", "wan2.2"])
def test_channel_changes(residual):
    """dim_mult [1,2,2,2], 2 res blocks: conv_shortcut, Avg/Dup groups != factor; 2.1 with attention
    at scale 0.5; 2.2 with decoder_base_dim != base_dim."""
    torch.manual_seed(0)
    kw = dict(base_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2, temperal_downsample=[False, True, True])
    if residual:
        kw.update(z_dim=8, decoder_base_dim=6, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                  latents_mean=[0.0] * 8, latents_std=[1.0] * 8, scale_factor_spatial=16)
    else:
        kw.update(z_dim=4, attn_scales=[0.5])
    model, params, cfg = convert(AutoencoderKLWan(**kw).eval())
    for block in model.encoder.down_blocks:  # diffusers passes the cache to attention blocks, which
        if isinstance(block, WanAttentionBlock):  # do not take it (original Wan: attention gets x only)
            block.forward = lambda x, feat_cache=None, feat_idx=None, f=block.forward: f(x)
    x = np.random.RandomState(0).uniform(-1, 1, (1, 3, 5, 32, 48)).astype(np.float32)
    ref_mean, ref_logvar = torch_encode(model, x)
    mean, logvar = fast(V.encode, params, cfg, jnp.asarray(x))
    assert rel(mean, ref_mean) <= ENCODE_TOL and rel(logvar, ref_logvar) <= ENCODE_TOL
    z = np.random.RandomState(1).randn(1, cfg.z_dim, 2, *ref_mean.shape[-2:]).astype(np.float32)
    assert rel(fast(V.decode, params, cfg, jnp.asarray(z)), torch_decode(model, z)) <= DECODE_TOL


# Chunked scan. More latent frames (or 4-frame groups) per scan step is the same math, but XLA's CPU
# convolutions pick their blocking from the operand shapes, so a longer time extent can change the float32
# summation order (seen on a lone conv, same output frames, other time extent: ~1e-6 relative). Measured
# here: <= 1e-7 (Wan 2.1) and 2.5e-7 (Wan 2.2) relative, some chunks bitwise -- the float32 noise floor of
# these models (2.2 decoder, float32 vs float64: diffusers 2.5e-7, ours 2.8e-7).
CHUNK_TOL = 1e-6


def test_chunks(tiny):
    """decode/encode with chunk 2, 3, 4 equal chunk 1: n = 5 units after frame 0, so every chunk is ragged
    (the last step zero-padded, its extra outputs dropped); chunk 1 on 6 latent frames matches diffusers."""
    model, params, cfg = tiny
    hw = (1, 1) if cfg.is_residual else (2, 2)  # 16 x 16 px
    z = np.random.RandomState(5).randn(1, cfg.z_dim, 6, *hw).astype(np.float32)
    x = np.random.RandomState(6).uniform(-1, 1, (1, 3, 23, 16, 16)).astype(np.float32)  # 2 trailing frames dropped
    dec, enc = {}, {}
    for c in (1, 2, 3, 4):
        dec[c] = np.asarray(V.decode.lower(params, cfg, z, chunk=c).compile(compiler_options=FAST)(params, z))
        if c in (1, 4):  # encode: one ragged case (4 groups per step, the last step 1 real + 3 padded)
            enc[c] = V.encode.lower(params, cfg, x, chunk=c).compile(compiler_options=FAST)(params, x)
    assert rel(dec[1], torch_decode(model, z)) <= DECODE_TOL
    assert dec[1].shape == (1, 3, 21, 16, 16) and enc[1][0].shape == (1, cfg.z_dim, 6, *hw)
    for c in (2, 3, 4):
        print(f"chunk {c}: decode rel err vs chunk 1 {rel(dec[c], dec[1]):.1e}")
        assert dec[c].shape == dec[1].shape and rel(dec[c], dec[1]) <= CHUNK_TOL
    errs = rel(enc[4][0], enc[1][0]), rel(enc[4][1], enc[1][1])
    print(f"chunk 4: encode mean / logvar rel err vs chunk 1 {errs[0]:.1e} / {errs[1]:.1e}")
    assert max(errs) <= CHUNK_TOL


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_memory_flat(chunk):
    """XLA buffer assignment (compile only, abstract weights): the working memory (temp) of decoding with
    the tiny Wan 2.1 VAE at 128 x 128 px is the same for 21 and 41 latent frames; the output (the video) grows."""
    cfg_dict = dict(mtc.build_vae(wan22=False).config)
    cfg = V.VAEConfig.from_config(cfg_dict)
    shapes = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype), vae_tree(cfg_dict, "float32"),
                          is_leaf=lambda l: isinstance(l, Leaf))
    mem = {}
    for f in (21, 41):
        z = jax.ShapeDtypeStruct((1, cfg.z_dim, f, 16, 16), jnp.float32)
        mem[f] = V.decode.lower(shapes, cfg, z, chunk=chunk).compile(compiler_options=FAST).memory_analysis()
        print(f"F'={f} chunk={chunk}: temp {mem[f].temp_size_in_bytes / 2**20:.2f} MiB, "
              f"output {mem[f].output_size_in_bytes / 2**20:.2f} MiB")
    assert abs(mem[41].temp_size_in_bytes / mem[21].temp_size_in_bytes - 1) <= 0.05
    assert mem[41].output_size_in_bytes > 1.9 * mem[21].output_size_in_bytes
