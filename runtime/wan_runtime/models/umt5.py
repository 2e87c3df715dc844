"""UMT5 encoder (transformers ``UMT5EncoderModel``) as a pure JAX function over the param tree of
:func:`wan_runtime.format.text_encoder_tree`.

Per layer (pre-norm, residual stream in the compute dtype):
    x = x + o(softmax(q k^T + bias_l + mask) v)      no 1/sqrt(d) scaling; bias_l: this layer's relative
                                                     position bias (UMT5 has one table per layer)
    x = x + wo(gelu_tanh(wi_0 h) * wi_1 h),  h = rms_norm(x)
Norms, attention logits and softmax run in float32. Quantized block weights (fp8 / int8 with
``weight_scale``, ``format.text_encoder_tree``) are multiplied as stored by ``layers.dense``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..configs import UMT5Config
from .layers import dense, rms_norm, scan_layers


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) positions, (q_len, k_len) int32.

    Half the buckets per sign; of those, half exact distances and half log-spaced up to max_distance.
    The log branch is float32 and truncates, exactly as transformers computes it.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    n = np.abs(rel)
    ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + ratio.astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(n < max_exact, n, large)).astype(np.int32)


def encode(params: Mapping[str, Any], cfg: UMT5Config, input_ids: jax.Array, attention_mask: jax.Array, *,
           dtype=jnp.float32) -> jax.Array:
    """input_ids, attention_mask (B, S) -> last_hidden_state (B, S, d_model) float32."""
    dtype = jnp.dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    B, S = input_ids.shape
    H, Dk = cfg.num_heads, cfg.d_kv

    def lin(x, p):  # torch (out, in) weights, no bias
        return dense(x, p, dtype, spec="bsi,oi->bso", precision=precision)

    buckets = jnp.asarray(relative_position_buckets(S, S, cfg.num_buckets, cfg.max_distance))  # (S, S)
    # Additive padding mask over keys, as transformers' eager mask: 0 or float32 min.
    mask_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    def layer(x, p):
        a = p["attn"]
        h = rms_norm(x, p["attn_norm"]["weight"], cfg.eps, dtype)
        q, k, v = (lin(h, a[n]).reshape(B, S, H, Dk) for n in ("q", "k", "v"))
        bias = jnp.take(a["relative_attention_bias"]["weight"].astype(jnp.float32), buckets, axis=0)  # (S, S, H)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
        logits = logits + bias.transpose(2, 0, 1)[None] + mask_bias
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision).reshape(B, S, H * Dk)
        x = x + lin(o, a["o"])

        f = p["ffn"]
        h = rms_norm(x, p["ffn_norm"]["weight"], cfg.eps, dtype)
        g = jax.nn.gelu(lin(h, f["wi_0"]), approximate=True) * lin(h, f["wi_1"])
        return x + lin(g, f["wo"]), None

    x = jnp.take(params["shared"]["weight"], input_ids, axis=0).astype(dtype)  # (B, S, d)
    x, _ = scan_layers(layer, x, params["blocks"])  # quantized (fp8) weights cross the loop as their bytes
    return rms_norm(x, params["final_norm"]["weight"], cfg.eps, jnp.float32)
