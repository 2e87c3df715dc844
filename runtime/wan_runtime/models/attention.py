"""Non-causal multi-head attention over (B, S, H, Dh) tensors, scale 1/sqrt(Dh).

The kernel is picked per backend by :func:`select_implementation`: XLA (CPU, float32, fallback),
cuDNN flash attention (GPU, bf16/fp16) or Pallas splash attention (TPU, bf16). Sequences can be
padded to :func:`preferred_multiple` and the padding masked out with ``key_mask``.
"""
from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)
_SPLASH = "jax.experimental.pallas.ops.tpu.splash_attention"
_SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; splash needs multiples of 128 lanes


def preferred_multiple(backend: str | None = None) -> int:
    """Sequence-length multiple the backend's attention kernel wants (tokens are padded up to it).

    TPU 128: splash attention tiles q / kv in blocks that are multiples of the 128 lanes and
    must divide the sequence. GPU 128: cuDNN flash attention tiles of 64 / 128 rows. CPU 1: no padding.
    """
    return {"tpu": 128, "gpu": 128}.get(backend or jax.default_backend(), 1)


def _splash_module():
    """jax's Pallas TPU splash-attention package, or None when it cannot be imported."""
    try:
        return importlib.import_module(_SPLASH)
    except ImportError:
        return None


def select_implementation(q: jax.Array, k: jax.Array, mask: jax.Array | None = None, *,
                          backend: str | None = None) -> str:
    """'cudnn' (flash attention) on GPU for bf16/fp16 with a head dim it supports; 'splash' on TPU
    for bf16 with Dh and both sequence lengths multiples of 128 when the kernel imports; else 'xla'.

    A dense ``mask`` always selects XLA (a key-padding mask is supported by every kernel)."""
    backend = backend or jax.default_backend()
    dh = q.shape[-1]
    if mask is not None or q.dtype not in _LOW_PRECISION:
        return "xla"
    if backend == "gpu" and dh % 8 == 0 and dh <= 128:
        return "cudnn"
    if (backend == "tpu" and q.dtype == jnp.bfloat16 and dh % 128 == 0 and q.shape[1] % 128 == 0
            and k.shape[1] % 128 == 0 and _splash_module() is not None):
        return "splash"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              mask: jax.Array | None = None, implementation: str | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v.  q: (B, Sq, H, Dh), k/v: (B, Sk, H, Dh) -> (B, Sq, H, Dh).

    ``key_mask``: optional (B, Sk) bool key-padding mask, True = real key; the real keys come first
    (right padding: cuDNN uses only the per-row count, as ``key_value_seq_lengths``). Every query
    row, padded ones included, attends to the real keys only, so all outputs stay finite.
    ``mask``: optional dense boolean mask, broadcastable to (B, H, Sq, Sk), True = attend (XLA only).
    Low-precision inputs: logits and softmax are accumulated in float32 by XLA / cuDNN / splash.
    Float32 inputs: all matmuls run at full float32 precision (no TF32 / bf16 passes).
    """
    impl = implementation or select_implementation(q, k, mask)
    if impl == "splash":
        if mask is not None:
            raise ValueError("splash attention takes only a key-padding mask")
        return splash_attention(q, k, v, key_mask)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {impl!r}")
    lengths = None
    if key_mask is not None and impl == "cudnn":
        lengths = key_mask.sum(-1, dtype=jnp.int32)                          # (B,) real keys
    elif key_mask is not None:
        km = key_mask[:, None, None, :]                                      # (B, 1, 1, Sk)
        mask = km if mask is None else jnp.logical_and(mask, km)
    kw = dict(mask=mask, key_value_seq_lengths=lengths, implementation=impl)
    if q.dtype == jnp.float32:
        with jax.default_matmul_precision("highest"):
            return jax.nn.dot_product_attention(q, k, v, **kw)
    return jax.nn.dot_product_attention(q, k, v, **kw)


# ------------------------------------------------------------------------------------------
# TPU: Pallas splash attention.  UNTESTED ON TPU HARDWARE: the tests run this kernel only in
# Pallas interpret mode on CPU (numerics / plumbing); speed, block sizes, and multi-device
# (it is the single-device kernel: sharded inputs would need a shard_map around it) are unchecked.
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, sq: int, sk: int, interpret: bool):
    sa = _splash_module()
    bq, bkv = (next(b for b in _SPLASH_BLOCKS if n % b == 0) for n in (sq, sk))
    mask = sa.MultiHeadMask([sa.FullMask((sq, sk))] * heads)                 # dense: no block skipping
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv)   # forward-only blocks
    return sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, key_mask=None, *, interpret: bool = False):
    """:func:`attention` through the splash kernel (Sq, Sk multiples of 128). The key-padding mask
    becomes segment ids: queries are segment 0, real keys 0, padded keys 1."""
    sa = _splash_module()
    (B, sq, H, dh), sk = q.shape, k.shape[1]
    kernel = _splash_kernel(H, sq, sk, interpret)
    q = (q.astype(jnp.float32) / math.sqrt(dh)).astype(q.dtype)            # splash does not scale
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))                  # (B, H, S, Dh)
    if key_mask is None:
        o = jax.vmap(kernel)(q, k, v)
    else:
        seg = sa.SegmentIds(q=jnp.zeros((B, sq), jnp.int32), kv=(~key_mask).astype(jnp.int32))
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)
    return o.transpose(0, 2, 1, 3).astype(q.dtype)
