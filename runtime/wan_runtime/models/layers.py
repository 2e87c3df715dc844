"""The layers every Wan model shares: a linear map over a stored weight, LayerNorm and RMSNorm.

``dense`` is the one place a stored weight becomes a matmul operand. Weights keep the torch (out, in)
layout of the param tree and are cast to the compute dtype at use (the weight-cast-at-use rule), so a
checkpoint stored in bfloat16 serves a float32 run and the reverse. Norms compute in float32.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

F32 = jnp.float32


def weight(w: Any, dtype) -> jax.Array:
    """A stored weight leaf as a matmul operand in ``dtype``: today an array, cast.

    This is the hook for structured weights. A quantized leaf such as ``{"weight": int8/fp8 (out, in),
    "scale": float32 (out,)}`` is dequantized here (``weight.astype(dtype) * scale[..., None]``), and a
    LoRA-augmented one (``{"weight", "lora_a", "lora_b", "alpha"}``) merged here; the model files only
    ever hand the leaf to :func:`dense`, so neither needs a change outside this module (the param-tree
    builder in ``wan_runtime.format`` declares the structure, ``wan_convert`` writes it)."""
    return w.astype(dtype)


def _bias_view(bias: jax.Array, spec: str) -> jax.Array:
    """``bias`` (the weight's axes less the contracted one) lined up with the output axes of ``spec``."""
    inputs, out = spec.split("->")
    if "..." in out:  # output axes end with the bias axes: plain broadcasting
        return bias
    w_axes = inputs.split(",")[1]
    kept = [a for a in w_axes if a in out]  # the weight's axes that reach the output, in order
    return bias[tuple(slice(None) if a in kept else None for a in out)]


def dense(x: jax.Array, p: Mapping[str, Any], dtype, *, spec: str = "...i,oi->...o", precision=None) -> jax.Array:
    """torch Linear (or a conv written as one contraction): ``einsum(spec, x, W) + b`` in ``dtype``.

    p: the module's params, ``{"weight": (out, in) [, "bias": (out,)]}``; a stacked layer axis or a conv
    kernel's extra axes go in ``spec`` (e.g. ``"bsi,loi->lbso"``, ``"bcfphqwr,dcpqr->bfhwd"``), and the
    bias is lined up with the weight's axes that reach the output. x and W are cast to ``dtype`` (W
    through :func:`weight`); ``precision`` goes to the einsum."""
    y = jnp.einsum(spec, x.astype(dtype), weight(p["weight"], dtype), precision=precision)
    if "bias" in p:
        y = y + _bias_view(p["bias"].astype(dtype), spec)
    return y


def layer_norm(x: jax.Array, eps: float, p: Mapping[str, Any] | None = None) -> jax.Array:
    """torch LayerNorm (biased variance) over the last axis in float32, affine when ``p`` is given
    (``{"weight", "bias"}``); returns float32."""
    x = x.astype(F32)
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(jnp.square(x - mu).mean(-1, keepdims=True) + eps)
    return y if p is None else y * p["weight"].astype(F32) + p["bias"].astype(F32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype=None) -> jax.Array:
    """RMSNorm / T5LayerNorm over the last axis in float32 (no mean subtraction): x / rms(x) * w, in
    ``dtype`` (default: x's dtype)."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * w.astype(F32)
    return y.astype(x.dtype if dtype is None else dtype)
