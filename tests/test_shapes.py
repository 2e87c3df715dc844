"""Full-size published configs, checked with jax.eval_shape (no weights, no memory): the param trees
the converter writes feed the runtime's VAEs at real video sizes. (Transformer, UMT5-XXL and CLIP
ViT-H/14 full-size shapes are checked in their own test files.)"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan_runtime import format as fmt
from wan_runtime.models import vae as V

WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], in_channels=12, out_channels=12, is_residual=True,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)


def _abstract(tree):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, fmt.np_dtype(leaf.dtype)), tree,
                        is_leaf=lambda x: isinstance(x, fmt.Leaf))


@pytest.mark.parametrize("name,cfg,frames,height,width,n_params", [
    ("wan2.1 480p", WAN21_VAE, 81, 480, 832, 126_892_531),
    ("wan2.2 704p", WAN22_VAE, 121, 704, 1280, 704_688_668),
])
def test_vae_full_size(name, cfg, frames, height, width, n_params):
    tree = fmt.vae_tree(cfg, "bfloat16")
    n = sum(int(np.prod(leaf.shape)) for leaf in fmt.flatten(tree).values())
    assert n == n_params, n  # diffusers' parameter count (reference section 3), exactly
    vcfg = V.VAEConfig.from_config(cfg)
    s = cfg.get("scale_factor_spatial", 8)
    z = jax.ShapeDtypeStruct((1, cfg["z_dim"], (frames - 1) // 4 + 1, height // s, width // s), jnp.float32)
    out = jax.eval_shape(functools.partial(V.decode, cfg=vcfg, dtype=jnp.bfloat16), _abstract(tree), z=z)
    assert out.shape == (1, 3, frames, height, width)
    video = jax.ShapeDtypeStruct((1, 3, frames, height, width), jnp.float32)
    mean, logvar = jax.eval_shape(functools.partial(V.encode, cfg=vcfg, dtype=jnp.bfloat16), _abstract(tree), video=video)
    assert mean.shape == logvar.shape == z.shape
