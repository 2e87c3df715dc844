"""Wan VAE (diffusers ``AutoencoderKLWan``: Wan 2.1, and Wan 2.2 with ``is_residual``) in JAX.

Channels-last inside: activations are (B, T, H, W, C). The param tree keeps the torch layouts; each call
first maps the kernels, once and outside the scan, to channels-last compute layouts in the compute dtype
(:func:`_prepare`): inside a loop body XLA:CPU does not re-layout a loop-invariant OIHW kernel and falls
back to a naive convolution loop (measured 30x slower decode). Conv3d runs as per-frame Conv2d with the
time taps stacked on channels (XLA:CPU's Conv3d is ~4x slower).
The encoder and the decoder are a *plan*: the tuple of ``configs.VAEOp`` that describes the architecture
(``configs.vae_encoder_ops`` / ``vae_decoder_ops``, the same walk the param tree is built from), run by a
small interpreter (:func:`_walk`).

Time is causal and chunked as in diffusers: chunk 0 (one frame) runs alone with ``first`` semantics,
then a ``lax.scan`` runs the later frames, ``chunk`` units per step (a unit is one latent frame when
decoding, four video frames when encoding; diffusers' is chunk=1), carrying the feature cache: a flat
tuple, in walk order, of the last ``kt - 1`` input frames of every causal conv (zeros before the video
starts, which is the causal zero padding), and the last frame of every temporal downsampler, plus the
output buffer each step writes into. Shapes inside the scan are static; working memory does not grow
with the number of frames.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ..configs import VAEConfig, VAEOp, vae_decoder_ops, vae_encoder_ops

Params = Mapping[str, Any]
F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Layers. x: (B, T, H, W, C) in the compute dtype dt.
# --------------------------------------------------------------------------------------------
#: float32 matmul/conv precision while a decode or encode is traced: "highest" (full float32) or "default"
#: (the backend's: TF32 on Ampere+ GPUs, full float32 on CPU); set by decode/encode's ``precision``
_PRECISION = contextvars.ContextVar("vae_precision", default="highest")
PRECISIONS = ("highest", "default")


def _prec(dt):
    return lax.Precision.HIGHEST if dt == F32 and _PRECISION.get() == "highest" else None


def default_precision(backend: str | None = None) -> str:
    """"default" on GPU (float32 convs on TF32 tensor cores), "highest" elsewhere (CPU: the same numbers)."""
    return "default" if (backend or jax.default_backend()) == "gpu" else "highest"


@contextlib.contextmanager
def _precision_scope(precision: str):
    """Trace a decode or encode under ``precision`` ("highest" or "default")."""
    if precision not in PRECISIONS:
        raise ValueError(f"--vae-precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def _prepare(params, dt):
    """Kernels in compute layout and dtype: 1x1(x1) (O, I, 1..) -> (I, O); Conv2d (O, I, kh, kw) -> HWIO
    (kh, kw, I, O); Conv3d (O, I, kt, kh, kw) -> (kh, kw, kt*I, O), time taps folded into the input
    channels (index k*I + i). Biases and gammas unchanged."""
    def leaf(path, a):
        if path[-1].key != "weight" or a.ndim < 4:
            return a
        if all(k == 1 for k in a.shape[2:]):
            return a.reshape(a.shape[:2]).T.astype(dt)
        if a.ndim == 4:
            return jnp.transpose(a, (2, 3, 1, 0)).astype(dt)
        O, I, kt, kh, kw = a.shape
        return jnp.transpose(a, (3, 4, 2, 1, 0)).reshape(kh, kw, kt * I, O).astype(dt)
    return jax.tree_util.tree_map_with_path(leaf, params)


def _conv2d(x, w, dt, stride=(1, 1), pad=(1, 1)):
    """Conv2d on (N, H, W, C) with an HWIO kernel, no bias; float32 accumulation and output."""
    pad = [(q, q) if isinstance(q, int) else q for q in pad]
    return lax.conv_general_dilated(x, w, stride, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=_prec(dt), preferred_element_type=F32)


def _conv3d(x, p, dt, stride_t=1):
    """Conv3d on (B, T, H, W, C), no time padding, 'same' spatial padding, as one per-frame Conv2d over the
    kt time taps stacked on channels: y[t] = conv2d(cat_k x[st*t + k], w) + b (XLA:CPU runs Conv2d several
    times faster than Conv3d)."""
    w = p["weight"]  # (kh, kw, kt*I, O)
    kh, kw = w.shape[:2]
    kt = w.shape[2] // x.shape[-1]
    n = (x.shape[1] - kt) // stride_t + 1  # output frames
    x = jnp.concatenate([x[:, k:k + stride_t * (n - 1) + 1:stride_t] for k in range(kt)], axis=-1)
    y = _per_frame(lambda f: _conv2d(f, w, dt, pad=(kh // 2, kw // 2)), x)
    return (y + p["bias"].astype(F32)).astype(dt)


def _pointwise(x, p, dt):
    """1x1(x1) conv with an (I, O) kernel: '...i,io->...o'."""
    return jnp.einsum("...i,io->...o", x, p["weight"], precision=_prec(dt)) + p["bias"].astype(dt)


def _per_frame(fn, x):
    """Apply a (N, H, W, C) -> (N, H', W', C') map to every frame."""
    B, T = x.shape[:2]
    y = fn(x.reshape(B * T, *x.shape[2:]))
    return y.reshape(B, T, *y.shape[1:])


def _rms(x, gamma, dt):
    """WanRMS_norm: L2-normalise over channels (eps 1e-12, fp32) * sqrt(C) * gamma."""
    xf = x.astype(F32)
    n = xf / jnp.maximum(jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True)), 1e-12)
    return (n * math.sqrt(x.shape[-1]) * gamma.astype(F32)).astype(dt)


class _Cache:
    """Feature cache in walk order: ``take`` reads the previous chunk's slot (None before the video),
    ``put`` writes this chunk's; ``new`` is the carry for the next chunk."""

    def __init__(self, old=None):
        self._old = None if old is None else iter(old)
        self.new: list = []

    def take(self):
        return None if self._old is None else next(self._old)

    def put(self, a):
        self.new.append(a)


def _causal_conv(x, p, cache, dt):
    """WanCausalConv3d with the cache: cat(last kt-1 input frames, x), no temporal padding."""
    kt = p["weight"].shape[2] // x.shape[-1]  # (kh, kw, kt*I, O)
    prev = cache.take()
    if prev is None:  # before the video: the causal zero padding
        prev = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([prev, x], axis=1)
    cache.put(x[:, x.shape[1] - (kt - 1):])
    return _conv3d(x, p, dt)


def _resblock(x, p, cache, dt):
    h = _pointwise(x, p["conv_shortcut"], dt) if "conv_shortcut" in p else x
    x = _causal_conv(jax.nn.silu(_rms(x, p["norm1"]["gamma"], dt)), p["conv1"], cache, dt)
    x = _causal_conv(jax.nn.silu(_rms(x, p["norm2"]["gamma"], dt)), p["conv2"], cache, dt)
    return x + h


def _attention(x, p, dt):
    """Single-head self-attention over the H*W tokens of each frame."""
    B, T, H, W, C = x.shape
    qkv = _pointwise(_rms(x, p["norm"]["gamma"], dt), p["to_qkv"], dt).reshape(B * T, H * W, 3 * C)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    s = jnp.einsum("nqc,nkc->nqk", q, k, precision=_prec(dt), preferred_element_type=F32) / math.sqrt(C)
    a = jax.nn.softmax(s, axis=-1).astype(dt)
    o = jnp.einsum("nqk,nkc->nqc", a, v, precision=_prec(dt)).reshape(B, T, H, W, C)
    return x + _pointwise(o, p["proj"], dt)


def _downsample(x, p, mode, cache, first, dt):
    """ZeroPad2d((0,1,0,1)) + Conv2d stride 2 per frame; 3d: then time_conv stride 2 over cat(last frame, x)."""
    r = p["resample"]["1"]
    x = _per_frame(lambda f: (_conv2d(f, r["weight"], dt, (2, 2), ((0, 1), (0, 1))) + r["bias"]).astype(dt), x)
    if mode == "3d":
        prev = cache.take()
        cache.put(x[:, -1:])
        if not first:  # the first chunk only fills the cache
            x = _conv3d(jnp.concatenate([prev, x], axis=1), p["time_conv"], dt, stride_t=2)
    return x


def _upsample(x, p, mode, cache, first, dt):
    """3d: time_conv (C -> 2C, frames interleaved, T -> 2T; skipped on the first chunk), then per frame
    nearest-exact x2 (== repeat for a factor of 2, exact in any dtype) and Conv2d 3x3."""
    if mode == "3d":
        if first:  # diffusers' "Rep": the time_conv history starts after chunk 0
            cache.take()
            cache.put(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))
        else:
            x = _causal_conv(x, p["time_conv"], cache, dt)  # (B, T, H, W, 2C)
            B, T, H, W, C2 = x.shape
            x = x.reshape(B, T, H, W, 2, C2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C2 // 2)
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    r = p["resample"]["1"]
    return _per_frame(lambda f: (_conv2d(f, r["weight"], dt) + r["bias"]).astype(dt), x)


def _avg_down(x, cout, ft, fs):
    """AvgDown3D: front-pad T to a multiple of ft, fold (ft, fs, fs) into channels, mean over groups."""
    B, T, H, W, C = x.shape
    x = jnp.pad(x, ((0, 0), ((-T) % ft, 0), (0, 0), (0, 0), (0, 0)))
    T = x.shape[1] // ft
    x = x.reshape(B, T, ft, H // fs, fs, W // fs, fs, C).transpose(0, 1, 3, 5, 7, 2, 4, 6)  # B,T,H,W,C,ft,fs,fs
    return x.reshape(B, T, H // fs, W // fs, cout, -1).mean(-1, dtype=F32).astype(x.dtype)


def _dup_up(x, cout, ft, fs, first):
    """DupUp3D: repeat channels, unfold (ft, fs, fs) into time/space; the first chunk keeps the last frame."""
    B, T, H, W, C = x.shape
    x = jnp.repeat(x, cout * ft * fs * fs // C, axis=-1).reshape(B, T, H, W, cout, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, T * ft, H * fs, W * fs, cout)
    return x[:, ft - 1:] if first else x


def _at(params, path):
    for k in path.split("."):
        params = params[k]
    return params


def _walk(ops: tuple[VAEOp, ...], params, x, cache, first, dt, shard=None):
    """Interpret a plan on one chunk. ``shard``: a sharding constraint applied to every op's output."""
    for op in ops:
        p = _at(params, op.path)
        if op.kind == "conv":
            x = _causal_conv(x, p, cache, dt)
        elif op.kind == "proj":
            x = _pointwise(x, p, dt)
        elif op.kind == "res":
            x = _resblock(x, p, cache, dt)
        elif op.kind == "attn":
            x = _attention(x, p, dt)
        elif op.kind == "head":
            x = jax.nn.silu(_rms(x, p["gamma"], dt))
        elif op.kind == "down":
            x = _downsample(x, p, op.mode, cache, first, dt)
        elif op.kind == "up":
            x = _upsample(x, p, op.mode, cache, first, dt)
        elif op.kind == "block":
            y = _walk(op.body, params, x, cache, first, dt, shard)
            if op.mode == "avgdown":
                y = y + _avg_down(x, op.cout, op.ft, op.fs)
            elif op.mode == "dupup":
                y = y + _dup_up(x, op.cout, op.ft, op.fs, first)
            x = y
        else:
            raise ValueError(f"unknown op {op.kind}")
        if shard is not None:
            x = shard(x)
    return x


def _read(src, s, w, end, ragged):
    """Frames [s, s + w) of ``src`` (time on axis 2); frames at or past ``end`` read as zeros (padding).
    Ragged case: the window start is clamped to ``end - w`` (static shapes), then rolled back into place."""
    if not ragged:
        return lax.dynamic_slice_in_dim(src, s, w, axis=2)
    a = jnp.minimum(s, end - w)
    d = s - a  # frames of the wanted window past the end
    x = jnp.roll(lax.dynamic_slice_in_dim(src, a, w, axis=2), -d, axis=2)
    j = lax.broadcasted_iota(jnp.int32, (1, 1, w) + (1,) * (src.ndim - 3), 2)
    return jnp.where(j < w - d, x, jnp.zeros((), x.dtype))


def _write(buf, y, s, ragged):
    """``buf[:, :, s:s + w] = y`` (time on axis 2), dropping the frames of ``y`` that fall past the end of ``buf``."""
    if not ragged:
        return lax.dynamic_update_slice_in_dim(buf, y, s, axis=2)
    w = y.shape[2]
    a = jnp.minimum(s, buf.shape[2] - w)
    d = s - a  # frames of y past the end: keep what buf holds in [a, s)
    j = lax.broadcasted_iota(jnp.int32, (1, 1, w) + (1,) * (y.ndim - 3), 2)
    y = jnp.where(j >= d, jnp.roll(y, d, axis=2), lax.dynamic_slice_in_dim(buf, a, w, axis=2))
    return lax.dynamic_update_slice_in_dim(buf, y, a, axis=2)


def _chunked(ops, params, src, pre, post, unit, chunk, dt, shard=None):
    """Run a plan causally over ``src`` (B, C, T, ...), time on axis 2.

    Frame 0 alone (``first``), then a scan over the n = (T - 1) // unit later units of ``unit`` frames,
    ``chunk`` units per step (trailing frames that do not fill a unit are dropped, as in diffusers). If n is
    not a multiple of ``chunk`` the last step is zero-padded past the end and its extra outputs are dropped:
    every op is causal in time (causal convs, per-frame maps, time convs and up/downsampling that only look
    back), so the real frames do not see the padding. ``pre`` maps raw frames to the channels-last compute
    input, ``post`` maps the walk output to the float32 result layout (B, C', t', ...). Each step reads its
    window from ``src`` and writes its output in place into one buffer carried by the scan, so the working
    memory does not grow with T. ``shard`` constrains every channels-last activation (spatial sharding).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    c0 = _Cache()
    y0 = post(_walk(ops, params, pre(src[:, :, :1]), c0, True, dt, shard))
    n = (src.shape[2] - 1) // unit
    if n == 0:
        return y0
    chunk = min(chunk, n)
    w, steps, ragged = chunk * unit, -(-n // chunk), n % chunk != 0

    def body(cache, x):
        c = _Cache(cache)
        y = post(_walk(ops, params, pre(x), c, False, dt, shard))
        return tuple(c.new), y

    window = jax.ShapeDtypeStruct((*src.shape[:2], w, *src.shape[3:]), src.dtype)
    k = jax.eval_shape(body, tuple(c0.new), window)[1].shape[2] // chunk  # output frames per unit
    t0 = y0.shape[2]
    buf = jnp.zeros((*y0.shape[:2], t0 + n * k, *y0.shape[3:]), F32)
    buf = lax.dynamic_update_slice_in_dim(buf, y0, 0, axis=2)

    def step(carry, i):
        cache, buf = carry
        cache, y = body(cache, _read(src, 1 + i * w, w, 1 + n * unit, ragged))
        return (cache, _write(buf, y, t0 + i * chunk * k, ragged)), None

    (_, buf), _ = lax.scan(step, (tuple(c0.new), buf), jnp.arange(steps))
    return buf


def _patchify(x, p):  # (B,T,H,W,C) -> (B,T,H/p,W/p,C*p*p), channel = c*p*p + pw*p + ph
    B, T, H, W, C = x.shape
    x = x.reshape(B, T, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(B, T, H // p, W // p, C * p * p)


def _unpatchify(x, p):  # inverse of _patchify
    B, T, H, W, Cp = x.shape
    x = x.reshape(B, T, H, W, Cp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(B, T, H * p, W * p, Cp // (p * p))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _channels_last(x, dt):  # (B, C, T, H, W) -> (B, T, H, W, C) in dt
    return jnp.moveaxis(x, 1, -1).astype(dt)


def _channels_first(y):  # (B, T, H, W, C) -> (B, C, T, H, W) float32
    return jnp.moveaxis(y, -1, 1).astype(F32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "layout", "precision"))
def decode(params: Params, cfg: VAEConfig, z: jax.Array, *, dtype=jnp.float32, chunk: int = 1,
           layout=None, precision: str = "highest") -> jax.Array:
    """Raw (un-normalised) latents (B, z_dim, F', H', W') -> video (B, C, 1 + 4(F'-1), H, W) in [-1, 1], float32.
    ``chunk``: latent frames per scan step after frame 0 (same result; more frames per step = larger convs,
    more working memory). ``layout`` (a ``sharding.Layout`` over several devices): every activation is
    split along its width (else height) across all devices, the batch redundant; XLA's SPMD partitioner
    exchanges the conv halos. ``precision``: of float32 convs, "highest" or "default" (the backend's)."""
    shard = None if layout is None or not layout.active else (lambda x: layout.spatial(x, 2, 3))
    dt = jnp.dtype(dtype)
    p, params = cfg.patch_size, _prepare(params, dt)

    def pre(zc):  # (B, z, t, H', W') -> (B, t, H', W', z)
        return _channels_last(zc, dt)

    def post(y):
        return _channels_first(jnp.clip(_unpatchify(y, p) if p else y, -1.0, 1.0))

    with _precision_scope(precision):
        return _chunked(vae_decoder_ops(cfg), params, z, pre, post, 1, chunk, dt, shard)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "precision"))
def encode(params: Params, cfg: VAEConfig, video: jax.Array, *, dtype=jnp.float32,
           chunk: int = 1, precision: str = "highest") -> tuple[jax.Array, jax.Array]:
    """Video (B, C, F, H, W) in [-1, 1] -> (mean, logvar), each (B, z_dim, 1 + (F-1)//4, H/s, W/s), float32;
    logvar clamped to [-30, 20] (DiagonalGaussianDistribution). ``chunk``: 4-frame groups per scan step."""
    dt = jnp.dtype(dtype)
    p, params = cfg.patch_size, _prepare(params, dt)

    def pre(xc):
        x = _channels_last(xc, dt)
        return _patchify(x, p) if p else x

    with _precision_scope(precision):  # moments: after quant_conv
        moments = _chunked(vae_encoder_ops(cfg), params, video, pre, _channels_first, 4, chunk, dt)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return mean, jnp.clip(logvar, -30.0, 20.0)
