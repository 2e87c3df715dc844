"""CLIP vision tower (transformers ``CLIPVisionModel``) as a pure JAX function over the param tree of
:func:`wan_runtime.format.image_encoder_tree`.

Wan 2.1 I2V conditions on ``hidden_states[-2]``: the residual stream after L-1 of the L layers (the last
layer, post_layernorm and visual_projection never run).

    x = pre_layrnorm([class | patch_embedding(pixels)] + position_embedding)      (B, N+1, H)
    per layer:  x = x + out_proj(attn(layer_norm1(x)))
                x = x + fc2(act(fc1(layer_norm2(x))))
LayerNorms run in float32; the residual stream and matmuls in the compute dtype.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ..configs import CLIP_ACTIVATIONS, CLIPVisionConfig
from .attention import attention
from .layers import dense, layer_norm

#: transformers ACT2FN names (``configs.CLIP_ACTIVATIONS``, which the config accepts) -> JAX activations.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
assert tuple(ACTIVATIONS) == CLIP_ACTIVATIONS


def encode_image(params: Mapping[str, Any], cfg: CLIPVisionConfig, pixel_values: jax.Array, *,
                 dtype=jnp.float32) -> jax.Array:
    """pixel_values (B, C, S, S) (CLIP-normalised) -> penultimate hidden states (B, N+1, H) float32."""
    dtype = jnp.dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    B, C, S, S2 = pixel_values.shape
    if (C, S, S2) != (cfg.num_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"pixel_values {pixel_values.shape}: expected (B, {cfg.num_channels}, "
                         f"{cfg.image_size}, {cfg.image_size})")
    H, nh, p = cfg.hidden_size, cfg.num_heads, cfg.patch_size
    g = S // p
    act = ACTIVATIONS[cfg.hidden_act]

    def lin(x, q):  # torch (out, in) weight + bias
        return dense(x, q, dtype, spec="bsi,oi->bso", precision=precision)

    def norm(x, q):
        return layer_norm(x, cfg.eps, q).astype(dtype)

    # Embeddings: non-overlapping p x p patches, the conv as one contraction, row-major over the grid.
    e = params["embeddings"]
    x = pixel_values.astype(dtype)[:, :, : g * p, : g * p].reshape(B, C, g, p, g, p)
    patches = dense(x, e["patch_embedding"], dtype, spec="bcipjq,ocpq->bijo", precision=precision).reshape(B, g * g, H)
    cls = jnp.broadcast_to(e["class_embedding"].astype(dtype), (B, 1, H))
    x = jnp.concatenate([cls, patches], axis=1) + e["position_embedding"]["weight"].astype(dtype)[None]
    x = norm(x, params["pre_layrnorm"])  # hidden_states[0]
    N = x.shape[1]

    def layer(x, q):
        a = q["self_attn"]
        h = norm(x, q["layer_norm1"])
        qh, kh, vh = (lin(h, a[n]).reshape(B, N, nh, H // nh) for n in ("q_proj", "k_proj", "v_proj"))
        x = x + lin(attention(qh, kh, vh).reshape(B, N, H), a["out_proj"])
        h = norm(x, q["layer_norm2"])
        return x + lin(act(lin(h, q["mlp"]["fc1"])), q["mlp"]["fc2"]), None

    # hidden_states[-2]: only the first L-1 layers.
    first = jax.tree_util.tree_map(lambda w: w[: cfg.num_layers - 1], params["layers"])
    x, _ = jax.lax.scan(layer, x, first)
    return x.astype(jnp.float32)
