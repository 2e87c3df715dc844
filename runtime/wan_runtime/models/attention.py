"""Non-causal multi-head attention over (B, S, H, Dh) tensors, scale 1/sqrt(Dh).

The kernel is picked per backend by :func:`select_implementation`: cuDNN flash attention (GPU,
bf16/fp16), Pallas splash attention (TPU, bf16), and everywhere else (CPU, float32, other head dims)
:func:`blocked_attention`, an online softmax over key blocks with the queries in blocks, whose working
memory is O(B * H * block^2), not O(B * H * Sq * Sk): a 14B forward at 480p would otherwise hold
hundreds of GiB of float32 scores. Sequences can be padded to :func:`preferred_multiple` and the padding
masked out with ``key_mask``.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)
_SPLASH = "jax.experimental.pallas.ops.tpu.splash_attention"
_SPLASH_BLOCKS = (512, 256, 128)  # tile sizes tried, largest first; splash needs multiples of 128 lanes
#: query and key block of the blocked fallback: float32 logits of one block pair are B*H*512*512*4 bytes
BLOCK = 512
#: TPU pads to splash's largest tile when that adds at most 1 / PAD_FRACTION of the tokens
PAD_FRACTION = 32


def preferred_multiple(backend: str | None = None, seq_len: int | None = None) -> int:
    """Sequence-length multiple the backend's attention kernel wants (tokens are padded up to it).

    TPU: splash attention tiles q / kv in blocks that are multiples of the 128 lanes and must divide
    the sequence, and runs fastest on its largest tile (512, ``_SPLASH_BLOCKS``): 512 when padding
    ``seq_len`` up to a multiple of 512 adds at most 1/32 (~3%) of it, else 128 (or ``seq_len`` None).
    E.g. 720p x 81 frames, 75,600 tokens: 75,776 (+0.2%, 512-tiles) rather than 75,648 (128-tiles
    only, 75,648 = 2^7 x 591); 640 tokens stay at 640 (512 would add 60%).
    GPU 128: cuDNN flash attention tiles of 64 / 128 rows. CPU 1: no padding.
    ``seq_len``: the tokens one kernel call sees (per device when the sequence is split)."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        big = _SPLASH_BLOCKS[0]
        fits = seq_len is not None and seq_len > 0 and (-seq_len % big) * PAD_FRACTION <= seq_len
        return big if fits else _SPLASH_BLOCKS[-1]
    return {"gpu": 128}.get(backend, 1)


def _splash_module():
    """jax's Pallas TPU splash-attention package, or None when it cannot be imported."""
    try:
        return importlib.import_module(_SPLASH)
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def cudnn_usable() -> bool:
    """cuDNN fused attention needs a CUDA GPU of compute capability >= 8.0 (ROCm has no cuDNN; older
    GPUs fail inside the kernel). Says once, in one log line, when a GPU does not qualify."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    platform = str(getattr(device.client, "platform_version", "")).lower()
    capability = getattr(device, "compute_capability", None)
    try:
        ok = "rocm" not in platform and "hip" not in platform and float(capability) >= 8.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        logging.getLogger("wan_runtime").warning(
            "attention: %s (compute capability %s) cannot run cuDNN fused attention; using the blocked fallback",
            device.device_kind, capability)
    return ok


def select_implementation(q: jax.Array, k: jax.Array, mask: jax.Array | None = None, *,
                          backend: str | None = None, cudnn: bool | None = None) -> str:
    """'cudnn' (flash attention) on GPU for bf16/fp16 with a head dim it supports; 'splash' on TPU
    for bf16 with Dh and both sequence lengths multiples of 128 when the kernel imports; else 'blocked'.

    A dense ``mask`` selects plain XLA ('xla': the caller already holds an Sq x Sk mask; a key-padding
    mask is supported by every kernel). ``cudnn``: whether the GPU can run it (default: :func:`cudnn_usable`)."""
    backend = backend or jax.default_backend()
    dh = q.shape[-1]
    if mask is not None:
        return "xla"
    if q.dtype not in _LOW_PRECISION:
        return "blocked"
    if backend == "gpu" and dh % 8 == 0 and dh <= 128 and (cudnn_usable() if cudnn is None else cudnn):
        return "cudnn"
    if (backend == "tpu" and q.dtype == jnp.bfloat16 and dh % 128 == 0 and q.shape[1] % 128 == 0
            and k.shape[1] % 128 == 0 and _splash_module() is not None):
        return "splash"
    return "blocked"


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
    if impl == "blocked":
        if mask is not None:
            raise ValueError("blocked attention takes only a key-padding mask")
        return blocked_attention(q, k, v, key_mask)
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
# The memory-bounded fallback: online softmax over key blocks, queries in blocks.
# ------------------------------------------------------------------------------------------
def fold_block(q, k, v, key_mask, state, scale: float, precision):
    """Fold one block of keys into the running (max, sum, weighted values) of an online softmax.
    q (B, Sq, H, Dh) (float32, or the compute dtype), k/v (B, Sk, H, Dh), key_mask (B, Sk) or None;
    state = (mx, den (B, H, Sq) float32, acc (B, Sq, H, Dh) float32). The running max starts finite, so
    a block whose keys are all masked adds exactly nothing."""
    mx, den, acc = state
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, -jnp.inf)
    new = jnp.maximum(mx, logits.max(-1))
    p = jnp.exp(logits - new[..., None])
    corr = jnp.exp(mx - new)
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return new, den * corr + p.sum(-1), acc * jnp.moveaxis(corr, 1, 2)[..., None] + pv


def softmax_state(q):
    """The empty online-softmax state for queries q (B, Sq, H, Dh)."""
    b, s, h, _ = q.shape
    return (jnp.full((b, h, s), -1e30, jnp.float32), jnp.zeros((b, h, s), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))


def finish_state(state, dtype, return_lse: bool = False):
    """Normalise a folded state into the attention output (and its log-sum-exp (B, H, Sq); a row that saw
    no real key has output 0 and a log-sum-exp of about -1e30, finite, so merging it adds nothing)."""
    mx, den, acc = state
    den = jnp.maximum(den, 1e-30)
    out = (acc / jnp.moveaxis(den, 1, 2)[..., None]).astype(dtype)
    return (out, mx + jnp.log(den)) if return_lse else out


def _pad_to(x, n: int, axis: int = 1):
    extra = -x.shape[axis] % n
    return x if not extra else jnp.pad(x, [(0, extra) if i == axis else (0, 0) for i in range(x.ndim)])


def blocked_attention(q, k, v, key_mask=None, *, block_q: int = BLOCK, block_k: int = BLOCK,
                      return_lse: bool = False, out_dtype=None):
    """:func:`attention` as an online softmax: queries in blocks of ``block_q`` (``lax.map``, one after
    the other), each folding the keys in blocks of ``block_k`` (``lax.scan``), so the largest temporary is
    one block pair's float32 logits (B, H, block_q, block_k). Float32 inputs: full float32 matmuls.
    ``return_lse``: also the log-sum-exp of each query row's logits (B, H, Sq), for merging partial
    results (ring attention); ``out_dtype``: the output's dtype (default q's)."""
    (b, sq, h, dh), sk = q.shape, k.shape[1]
    out_dtype = out_dtype or q.dtype
    f32 = q.dtype == jnp.float32
    prec = jax.lax.Precision.HIGHEST if f32 else None
    scale = 1.0 / math.sqrt(dh)
    bq, bk = min(block_q, sq), min(block_k, sk)
    km = key_mask if key_mask is not None or sk % bk == 0 else jnp.ones((b, sk), bool)
    k, v = _pad_to(k, bk), _pad_to(v, bk)
    km = None if km is None else _pad_to(km, bk)
    nk = k.shape[1] // bk
    kb = lambda x: x.reshape(b, nk, bk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  (nk, B, bk, ...)
    keys = (kb(k), kb(v), None if km is None else kb(km))

    def one_query_block(qb):
        qb = qb.astype(jnp.float32) if f32 else qb
        if nk == 1:
            return fold_block(qb, k, v, km, softmax_state(qb), scale, prec)

        def step(state, blk):
            return fold_block(qb, blk[0], blk[1], blk[2], state, scale, prec), None
        return jax.lax.scan(step, softmax_state(qb), keys)[0]

    qp = _pad_to(q, bq)
    nq = qp.shape[1] // bq
    if nq == 1:
        return finish_state(one_query_block(qp), out_dtype, return_lse)
    states = jax.lax.map(one_query_block, qp.reshape(b, nq, bq, h, dh).swapaxes(0, 1))
    mx, den, acc = (jnp.moveaxis(x, 0, 2 if x.ndim == 4 else 1) for x in states)  # blocks back in sequence order
    state = (mx.reshape(b, h, nq * bq)[..., :sq], den.reshape(b, h, nq * bq)[..., :sq],
             acc.reshape(b, nq * bq, h, dh)[:, :sq])
    return finish_state(state, out_dtype, return_lse)


def merge_partial(out, lse, out2, lse2):
    """Two attention results over disjoint key sets, each normalised with its log-sum-exp, as one."""
    new = jnp.logaddexp(lse, lse2)
    w = lambda x: jnp.moveaxis(jnp.exp(x - new), 1, 2)[..., None]  # noqa: E731  (B, Sq, H, 1)
    return out * w(lse) + out2 * w(lse2), new


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
