"""Non-causal multi-head attention over (B, S, H, Dh) tensors, scale 1/sqrt(Dh).

The kernel is picked per backend by :func:`select_implementation`; that is the hook for a
TPU / Pallas (splash) kernel later: add a branch there and a case in :func:`attention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def select_implementation(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> str:
    """'cudnn' (flash attention) on GPU for bf16/fp16 with a head dim it supports, else 'xla'."""
    dh = q.shape[-1]
    if (jax.default_backend() == "gpu" and q.dtype in _LOW_PRECISION and mask is None
            and dh % 8 == 0 and dh <= 128):
        return "cudnn"
    # TODO(tpu): return "pallas" here once a splash-attention kernel is wired in below.
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v.  q: (B, Sq, H, Dh), k/v: (B, Sk, H, Dh) -> (B, Sq, H, Dh).

    ``mask``: optional boolean, broadcastable to (B, H, Sq, Sk), True = attend.
    Low-precision inputs: logits and softmax are accumulated in float32 by XLA / cuDNN.
    Float32 inputs: all matmuls run at full float32 precision (no TF32 / bf16 passes).
    """
    impl = implementation or select_implementation(q, k, mask)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}")
    if q.dtype == jnp.float32:
        with jax.default_matmul_precision("highest"):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
