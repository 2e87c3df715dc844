"""UMT5 encoder (transformers ``UMT5EncoderModel``) as a pure JAX function over the param tree of
:func:`wan_runtime.format.text_encoder_tree`.

Per layer (pre-norm, residual stream in the compute dtype):
    x = x + o(softmax(q k^T + bias_l + mask) v)      no 1/sqrt(d) scaling; bias_l: this layer's relative
                                                     position bias (UMT5 has one table per layer)
    x = x + wo(gelu_tanh(wi_0 h) * wi_1 h),  h = rms_norm(x)
Norms, attention logits and softmax run in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "UMT5Config":
        """From a transformers ``UMT5Config`` dict (text_encoder/config.json)."""
        act = cfg.get("feed_forward_proj", "gated-gelu")
        if act != "gated-gelu":
            raise ValueError(f"UMT5 feed_forward_proj {act!r} is not supported (Wan uses 'gated-gelu')")
        return cls(
            vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
            num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            eps=cfg.get("layer_norm_epsilon", 1e-6),
        )


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


def _rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype) -> jax.Array:
    """T5LayerNorm: x / rms(x) * w, no mean subtraction, in float32, then cast."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * x).astype(dtype)


def encode(params: Mapping[str, Any], cfg: UMT5Config, input_ids: jax.Array, attention_mask: jax.Array, *,
           dtype=jnp.float32) -> jax.Array:
    """input_ids, attention_mask (B, S) -> last_hidden_state (B, S, d_model) float32."""
    dtype = jnp.dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    B, S = input_ids.shape
    H, Dk = cfg.num_heads, cfg.d_kv

    def lin(x, w, spec="bsi,oi->bso"):  # torch (out, in) weights
        return jnp.einsum(spec, x, w.astype(dtype), precision=precision)

    buckets = jnp.asarray(relative_position_buckets(S, S, cfg.num_buckets, cfg.max_distance))  # (S, S)
    # Additive padding mask over keys, as transformers' eager mask: 0 or float32 min.
    mask_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    def layer(x, p):
        a = p["attn"]
        h = _rms_norm(x, p["attn_norm"]["weight"], cfg.eps, dtype)
        q, k, v = (lin(h, a[n]["weight"]).reshape(B, S, H, Dk) for n in ("q", "k", "v"))
        bias = jnp.take(a["relative_attention_bias"]["weight"].astype(jnp.float32), buckets, axis=0)  # (S, S, H)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
        logits = logits + bias.transpose(2, 0, 1)[None] + mask_bias
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=precision).reshape(B, S, H * Dk)
        x = x + lin(o, a["o"]["weight"])

        f = p["ffn"]
        h = _rms_norm(x, p["ffn_norm"]["weight"], cfg.eps, dtype)
        g = jax.nn.gelu(lin(h, f["wi_0"]["weight"]), approximate=True) * lin(h, f["wi_1"]["weight"])
        return x + lin(g, f["wo"]["weight"]), None

    x = jnp.take(params["shared"]["weight"], input_ids, axis=0).astype(dtype)  # (B, S, d)
    x, _ = jax.lax.scan(layer, x, params["blocks"])
    return _rms_norm(x, params["final_norm"]["weight"], cfg.eps, jnp.float32)
