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

# float32 vs diffusers, relative L2, over every case below (Wan 2.1 and 2.2, base_dim 8): decode measured
# 3.1e-7 - 8.8e-7 (the worst: test_channel_changes, Wan 2.1); encode mean / logvar 1.6e-7 - 3.7e-7.
DECODE_TOL, ENCODE_TOL = 1e-5, 5e-6
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


def key(cfg, *parts, kind="component"):
    """Stable key for the `measured` record: component/vae2.1|vae2.2/... (float32 parity with diffusers); other
    figures under their own prefix (bf16/component/..., optimization/vae_chunk/...)."""
    return "/".join((kind, "vae2.2" if cfg.is_residual else "vae2.1") + parts)


def torch_decode(model, z):
    with torch.no_grad():
        return model.decode(torch.from_numpy(z)).sample.numpy()


def torch_encode(model, x):
    with torch.no_grad():
        d = model.encode(torch.from_numpy(x)).latent_dist
    return d.mean.numpy(), d.logvar.numpy()


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 2), (2, 3)])  # 6 frames: test_chunks
def test_decode(tiny, batch, frames, measured):
    model, params, cfg = tiny
    hw = (2, 3) if cfg.is_residual else (4, 6)  # 32 x 48 px for both (spatial factor 16 / 8)
    z = np.random.RandomState(10 * batch + frames).randn(batch, cfg.z_dim, frames, *hw).astype(np.float32)
    ref = torch_decode(model, z)
    run = V.decode if frames == 1 else functools.partial(fast, V.decode)  # one case through the public path
    out = np.asarray(run(params, cfg, jnp.asarray(z)))
    assert out.shape == ref.shape == (batch, 3, 1 + 4 * (frames - 1), 32, 48)
    err = rel(out, ref)
    measured(key(cfg, "decode", f"b{batch}f{frames}", "rel_l2"), err)
    assert err <= DECODE_TOL, err


@pytest.mark.parametrize("batch,frames", [(1, 1), (1, 5), (2, 9)])
def test_encode(tiny, batch, frames, measured):
    model, params, cfg = tiny
    x = np.random.RandomState(frames).uniform(-1, 1, (batch, 3, frames, 32, 48)).astype(np.float32)
    ref_mean, ref_logvar = torch_encode(model, x)
    mean, logvar = fast(V.encode, params, cfg, jnp.asarray(x))
    assert mean.shape == logvar.shape == ref_mean.shape
    errs = rel(mean, ref_mean), rel(logvar, ref_logvar)
    measured(key(cfg, "encode", f"b{batch}f{frames}", "mean_rel_l2"), errs[0])
    measured(key(cfg, "encode", f"b{batch}f{frames}", "logvar_rel_l2"), errs[1])
    assert max(errs) <= ENCODE_TOL, errs


def test_bfloat16(tiny, measured):
    """bf16 compute runs and is no further from the fp32 oracle than diffusers' own bf16 decode (x1.5)."""
    model, params, cfg = tiny
    hw = (2, 3) if cfg.is_residual else (4, 6)
    z = np.random.RandomState(0).randn(1, cfg.z_dim, 2, *hw).astype(np.float32)
    ref = torch_decode(model, z)
    with torch.no_grad():
        ref_bf16 = copy.deepcopy(model).to(torch.bfloat16).decode(torch.from_numpy(z).bfloat16()).sample.float()
    out = V.decode.lower(params, cfg, jnp.asarray(z), dtype=jnp.bfloat16).compile(compiler_options=FAST)(params, z)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    ours, theirs = rel(out, ref), rel(ref_bf16.numpy(), ref)
    measured(key(cfg, "decode", "rel_l2", kind="bf16/component"), ours)
    measured(key(cfg, "decode", "diffusers_rel_l2", kind="bf16/component"), theirs)
    # measured 8.1e-3 vs 9.5e-3 (Wan 2.1), 1.04e-2 vs 1.22e-2 (Wan 2.2): ratio 0.85. bf16 rounding (2^-8 = 3.9e-3
    # per op) dominates both, so the bound is a ratio to diffusers' bf16 error in the same run
    assert ours <= 1.5 * theirs, (ours, theirs)


@pytest.mark.parametrize("residual", [False, True], ids=["wan2.1", "wan2.2"])
def test_channel_changes(residual, measured):
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
    z = np.random.RandomState(1).randn(1, cfg.z_dim, 2, *ref_mean.shape[-2:]).astype(np.float32)
    dec = fast(V.decode, params, cfg, jnp.asarray(z))
    errs = rel(mean, ref_mean), rel(logvar, ref_logvar), rel(dec, torch_decode(model, z))
    for name, err in zip(("encode/mean_rel_l2", "encode/logvar_rel_l2", "decode/rel_l2"), errs):
        measured(key(cfg, "channel_changes", name), err)
    assert max(errs[:2]) <= ENCODE_TOL and errs[2] <= DECODE_TOL, errs


# Chunked scan. More latent frames (or 4-frame groups) per scan step is the same math, but XLA's CPU
# convolutions pick their blocking from the operand shapes, so a longer time extent can change the float32
# summation order (seen on a lone conv, same output frames, other time extent: ~1e-6 relative). Measured
# here (base_dim 8): decode 3.4e-7 - 3.6e-7, encode 1.5e-7 - 2.6e-7 relative -- the float32 noise floor of
# these models, the size of their distance to diffusers (above).
CHUNK_TOL = 5e-6


def test_chunks(tiny, measured):
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
    assert dec[1].shape == (1, 3, 21, 16, 16) and enc[1][0].shape == (1, cfg.z_dim, 6, *hw)
    err = rel(dec[1], torch_decode(model, z))
    measured(key(cfg, "decode", "b1f6", "rel_l2"), err)
    assert err <= DECODE_TOL, err
    for c in (2, 3, 4):
        err = rel(dec[c], dec[1])
        measured(key(cfg, "decode", f"chunk{c}_vs_chunk1", "rel_l2", kind="optimization/vae_chunk"), err)
        assert dec[c].shape == dec[1].shape and err <= CHUNK_TOL, (c, err)
    errs = rel(enc[4][0], enc[1][0]), rel(enc[4][1], enc[1][1])
    measured(key(cfg, "encode", "chunk4_vs_chunk1", "mean_rel_l2", kind="optimization/vae_chunk"), errs[0])
    measured(key(cfg, "encode", "chunk4_vs_chunk1", "logvar_rel_l2", kind="optimization/vae_chunk"), errs[1])
    assert max(errs) <= CHUNK_TOL, errs


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_memory_flat(chunk, measured):
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
    growth = mem[41].temp_size_in_bytes / mem[21].temp_size_in_bytes - 1
    measured(f"optimization/vae_chunk/vae2.1/decode_memory/chunk{chunk}/temp_growth_41_vs_21", growth,
             temp_mib=mem[21].temp_size_in_bytes / 2**20, output_mib_f21=mem[21].output_size_in_bytes / 2**20,
             output_mib_f41=mem[41].output_size_in_bytes / 2**20)
    # measured +2.7e-6 (64 bytes of 22.5 MiB, chunk 1) and 0 (chunk 3). Even the smallest decoder activation
    # (8 channels at the 16 x 16 latent size, 8 KiB a frame) kept for the 20 extra frames would add 7e-3
    assert abs(growth) <= 1e-3, growth
    assert mem[41].output_size_in_bytes > 1.9 * mem[21].output_size_in_bytes
