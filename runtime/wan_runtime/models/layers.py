"""The layers every Wan model shares: a linear map over a stored weight, LayerNorm and RMSNorm.

``dense`` is the one place a stored weight becomes a matmul operand. Weights keep the torch (out, in)
layout of the param tree and are cast to the compute dtype at use (the weight-cast-at-use rule), so a
checkpoint stored in bfloat16 serves a float32 run and the reverse. Norms compute in float32.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Mapping

import jax
import jax.numpy as jnp

F32 = jnp.float32
E4M3 = jnp.float8_e4m3fn
_FP8_MATMUL = contextvars.ContextVar("fp8_matmul", default=False)


@contextlib.contextmanager
def fp8_matmul(on: bool = True):
    """While tracing under it, :func:`dense` multiplies float8_e4m3fn weights by fp8 activations (per-token
    absmax scales) with float32 accumulation: the fp8 tensor cores of GPUs of compute capability >= 8.9
    (``wan-run --fp8-matmul``; the pipeline refuses it elsewhere)."""
    token = _FP8_MATMUL.set(on)
    try:
        yield
    finally:
        _FP8_MATMUL.reset(token)


def weight(w: Any, dtype) -> jax.Array:
    """A stored weight leaf as a matmul operand in ``dtype``: cast (exact from fp8 / int8 values; a
    quantized weight's per-output-channel scale is applied to the matmul's output by :func:`dense`)."""
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
    through :func:`weight`); ``precision`` goes to the einsum.

    A quantized weight (fp8 / int8 with ``weight_scale``, one float32 per output channel: format.py) is
    multiplied as stored values and its scale applied to the output, in float32: sum_i x_i (q_oi s_o) =
    s_o sum_i x_i q_oi, so no dequantized copy of the weight is made beyond the operand cast XLA fuses
    into the dot."""
    if _FP8_MATMUL.get() and p["weight"].dtype == E4M3 and "weight_scale" in p:
        y = _fp8_einsum(spec, x, p["weight"]).astype(dtype)
    else:
        y = jnp.einsum(spec, x.astype(dtype), weight(p["weight"], dtype), precision=precision)
    if "weight_scale" in p:
        y = (y.astype(F32) * _bias_view(p["weight_scale"].astype(F32), spec)).astype(dtype)
    if "bias" in p:
        y = y + _bias_view(p["bias"].astype(dtype), spec)
    return y


def fp8_matmul_support() -> str | None:
    """None if this process's devices can run fp8 matmuls (CUDA, compute capability >= 8.9), else why not."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return f"{device.platform} devices have no fp8 tensor cores"
    capability = getattr(device, "compute_capability", None)
    try:
        ok = float(capability) >= 8.9
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"{device.device_kind} (compute capability {capability}) has no fp8 tensor cores (>= 8.9)"


def _fp8_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(spec, x, w)`` with x quantized to e4m3 per token (absmax over the contracted axis, scale
    applied back to the float32 result); ``w`` is already e4m3 (its own scale is applied by the caller)."""
    xs, ws = spec.split("->")[0].split(",")
    axis = next(i for i, a in enumerate(xs.replace("...", "")) if a in ws)
    axis = axis - len(xs.replace("...", "")) if "..." in xs else axis
    x32 = x.astype(F32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=axis, keepdims=True), 1e-12) * (1.0 / 448.0)
    xq = (x32 / scale).astype(E4M3)
    y = jnp.einsum(spec, xq, w, preferred_element_type=F32)
    return y * scale  # (..., 1) against (..., out): right-aligned broadcasting, any leading output axes


_FP8_AS = jnp.dtype(jnp.uint8)  # float8 weights cross a layer scan as their bytes (scan_layers)


def scan_layers(step, carry, stacked):
    """``jax.lax.scan(step, carry, stacked)`` over stacked layers (params, and whatever rides along), with
    every float8_e4m3fn leaf crossing the loop as its bytes (uint8, a free bitcast) and handed to ``step``
    as float8 again. A backend without native fp8 slicing (XLA:CPU) would otherwise convert the whole
    stacked weights to f16 once, out of the loop (measured: +22 GiB of temporaries for an fp8 A14B
    expert at 720p). Every scan over quantized blocks goes through here (transformer, UMT5)."""
    def body(c, layer):
        return step(c, jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, E4M3) if a.dtype == _FP8_AS else a,
                                    layer))

    return jax.lax.scan(body, carry, jax.tree.map(
        lambda a: jax.lax.bitcast_convert_type(a, _FP8_AS) if a.dtype == E4M3 else a, stacked))


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
