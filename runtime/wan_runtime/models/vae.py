"""Wan VAE (diffusers ``AutoencoderKLWan``: Wan 2.1, and Wan 2.2 with ``is_residual``) in JAX.

Channels-last inside: activations are (B, T, H, W, C); conv kernels keep the torch layout (O, I, *k).
The encoder and the decoder are a *plan* — a tuple of :class:`Op` derived from the config exactly as
``wan_runtime.format.vae_tree`` derives the param tree — walked by a small interpreter (:func:`_walk`).

Time is causal and chunked as in diffusers: chunk 0 (one frame) runs alone with ``first`` semantics,
then a ``lax.scan`` runs every later chunk (one latent frame when decoding, four video frames when
encoding) carrying the feature cache: a flat tuple, in walk order, of the last ``kt - 1`` input frames
of every causal conv (zeros before the video starts, which is the causal zero padding), and the last
frame of every temporal downsampler. Shapes inside the scan are static.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

Params = Mapping[str, Any]
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Static ``AutoencoderKLWan`` config (diffusers names and defaults)."""

    z_dim: int = 16
    base_dim: int = 96
    decoder_base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
        base = cfg.get("base_dim", 96)
        return cls(
            z_dim=cfg.get("z_dim", 16), base_dim=base, decoder_base_dim=cfg.get("decoder_base_dim") or base,
            dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))), num_res_blocks=cfg.get("num_res_blocks", 2),
            attn_scales=tuple(float(s) for s in cfg.get("attn_scales", ())),
            temperal_downsample=tuple(bool(t) for t in cfg.get("temperal_downsample", (False, True, True))),
            is_residual=bool(cfg.get("is_residual", False)),
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            patch_size=cfg.get("patch_size"),
            scale_factor_temporal=cfg.get("scale_factor_temporal") or 4,
            scale_factor_spatial=cfg.get("scale_factor_spatial") or 8,
            latents_mean=tuple(cfg.get("latents_mean", ())), latents_std=tuple(cfg.get("latents_std", ())),
        )


# --------------------------------------------------------------------------------------------
# Plan: the module walk, derived from the config.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Op:
    """One step of the walk. ``kind``:

    conv   WanCausalConv3d (cached)          res    WanResidualBlock (two cached convs)
    attn   WanAttentionBlock (per frame)      head   RMS norm + SiLU
    down   WanResample downsample2d/3d        up     WanResample upsample2d/3d  (``mode`` "2d" | "3d")
    block  ``body`` ops, plus a parameter-free shortcut (``mode`` "avgdown" | "dupup" | "": Wan 2.2)
    """

    kind: str
    path: str
    mode: str = ""
    body: tuple["Op", ...] = ()
    cout: int = 0  # shortcut output channels
    ft: int = 1  # shortcut temporal factor
    fs: int = 1  # shortcut spatial factor


def _mid(prefix: str) -> list[Op]:
    return [Op("res", f"{prefix}.resnets.0"), Op("attn", f"{prefix}.attentions.0"), Op("res", f"{prefix}.resnets.1")]


def encoder_plan(cfg: VAEConfig) -> tuple[Op, ...]:
    """``WanEncoder3d``: conv_in, down blocks (flat list for 2.1, residual blocks for 2.2), mid, head."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    n, nres = len(cfg.dim_mult), cfg.num_res_blocks
    ops, k, scale = [Op("conv", "encoder.conv_in")], 0, 1.0
    for s, cout in enumerate(dims[1:]):
        down = s != n - 1
        tdown = down and cfg.temperal_downsample[s]
        mode = "3d" if tdown else "2d"
        if cfg.is_residual:
            p = f"encoder.down_blocks.{s}"
            body = [Op("res", f"{p}.resnets.{r}") for r in range(nres)]
            body += [Op("down", f"{p}.downsampler", mode)] if down else []
            ops.append(Op("block", p, "avgdown", tuple(body), cout, 2 if tdown else 1, 2 if down else 1))
            continue
        for _ in range(nres):
            ops.append(Op("res", f"encoder.down_blocks.{k}"))
            k += 1
            if scale in cfg.attn_scales:
                ops.append(Op("attn", f"encoder.down_blocks.{k}"))
                k += 1
        if down:
            ops.append(Op("down", f"encoder.down_blocks.{k}", mode))
            k, scale = k + 1, scale / 2.0
    return tuple(ops + _mid("encoder.mid_block") + [Op("head", "encoder.norm_out"), Op("conv", "encoder.conv_out")])


def decoder_plan(cfg: VAEConfig) -> tuple[Op, ...]:
    """``WanDecoder3d``: conv_in, mid, up blocks (2.2: + DupUp3D shortcut), head."""
    dims = [cfg.decoder_base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    n, tup = len(cfg.dim_mult), cfg.temperal_downsample[::-1]
    ops = [Op("conv", "decoder.conv_in")] + _mid("decoder.mid_block")
    for s, cout in enumerate(dims[1:]):
        p, up = f"decoder.up_blocks.{s}", s != n - 1
        mode = "3d" if up and tup[s] else "2d"
        body = [Op("res", f"{p}.resnets.{r}") for r in range(cfg.num_res_blocks + 1)]
        if up:
            body.append(Op("up", f"{p}.upsampler" if cfg.is_residual else f"{p}.upsamplers.0", mode))
        short = "dupup" if cfg.is_residual and up else ""
        ops.append(Op("block", p, short, tuple(body), cout, 2 if mode == "3d" else 1, 2))
    return tuple(ops + [Op("head", "decoder.norm_out"), Op("conv", "decoder.conv_out")])


# --------------------------------------------------------------------------------------------
# Layers. x: (B, T, H, W, C) in the compute dtype dt.
# --------------------------------------------------------------------------------------------
def _prec(dt):
    return lax.Precision.HIGHEST if dt == F32 else None


def _conv(x, p, dt, stride=None, pad=None):
    """Conv2d on (N, H, W, C) or Conv3d on (B, T, H, W, C) with a torch (O, I, *k) kernel."""
    w = p["weight"]
    nd = w.ndim - 2
    dn = ("NDHWC", "OIDHW", "NDHWC") if nd == 3 else ("NHWC", "OIHW", "NHWC")
    pad = [(q, q) if isinstance(q, int) else q for q in (pad or (0,) * nd)]
    y = lax.conv_general_dilated(x, w.astype(dt), stride or (1,) * nd, pad, dimension_numbers=dn,
                                 precision=_prec(dt))
    return y + p["bias"].astype(dt)


def _pointwise(x, p, dt):
    """1x1(x1) conv: '...i,oi->...o'."""
    w = p["weight"].reshape(p["weight"].shape[:2]).astype(dt)
    return jnp.einsum("...i,oi->...o", x, w, precision=_prec(dt)) + p["bias"].astype(dt)


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
    kt, kh, kw = p["weight"].shape[2:]
    prev = cache.take()
    if prev is None:  # before the video: the causal zero padding
        prev = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([prev, x], axis=1)
    cache.put(x[:, x.shape[1] - (kt - 1):])
    return _conv(x, p, dt, pad=(0, kh // 2, kw // 2))


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
    x = _per_frame(lambda f: _conv(f, p["resample"]["1"], dt, stride=(2, 2), pad=((0, 1), (0, 1))), x)
    if mode == "3d":
        prev = cache.take()
        cache.put(x[:, -1:])
        if not first:  # the first chunk only fills the cache
            x = _conv(jnp.concatenate([prev, x], axis=1), p["time_conv"], dt, stride=(2, 1, 1))
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
    return _per_frame(lambda f: _conv(f, p["resample"]["1"], dt, pad=(1, 1)), x)


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


def _walk(ops, params, x, cache, first, dt):
    """Interpret a plan on one chunk."""
    for op in ops:
        p = _at(params, op.path)
        if op.kind == "conv":
            x = _causal_conv(x, p, cache, dt)
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
            y = _walk(op.body, params, x, cache, first, dt)
            if op.mode == "avgdown":
                y = y + _avg_down(x, op.cout, op.ft, op.fs)
            elif op.mode == "dupup":
                y = y + _dup_up(x, op.cout, op.ft, op.fs, first)
            x = y
        else:
            raise ValueError(f"unknown op {op.kind}")
    return x


def _chunked(ops, params, x, chunk, dt):
    """Chunk 0 = frame 0 alone (first), then a scan over the next (T-1)//chunk chunks of ``chunk`` frames."""
    B, T = x.shape[:2]
    c0 = _Cache()
    out = _walk(ops, params, x[:, :1], c0, True, dt)
    n = (T - 1) // chunk  # trailing frames that do not fill a chunk are dropped, as in diffusers
    if n == 0:
        return out
    xs = jnp.moveaxis(x[:, 1:1 + n * chunk].reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    def step(carry, xc):
        c = _Cache(carry)
        y = _walk(ops, params, xc, c, False, dt)
        return tuple(c.new), y

    _, ys = lax.scan(step, tuple(c0.new), xs)  # (n, B, t, H, W, C)
    ys = jnp.moveaxis(ys, 0, 1).reshape(B, -1, *ys.shape[3:])
    return jnp.concatenate([out, ys], axis=1)


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
@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def decode(params: Params, cfg: VAEConfig, z: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """Raw (un-normalised) latents (B, z_dim, F', H', W') -> video (B, C, 1 + 4(F'-1), H, W) in [-1, 1], float32."""
    dt = jnp.dtype(dtype)
    x = _pointwise(jnp.moveaxis(z, 1, -1).astype(dt), params["post_quant_conv"], dt)  # (B, F', H', W', z)
    y = _chunked(decoder_plan(cfg), params, x, 1, dt)
    if cfg.patch_size:
        y = _unpatchify(y, cfg.patch_size)
    return jnp.moveaxis(jnp.clip(y, -1.0, 1.0), -1, 1).astype(F32)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def encode(params: Params, cfg: VAEConfig, video: jax.Array, *, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Video (B, C, F, H, W) in [-1, 1] -> (mean, logvar), each (B, z_dim, 1 + (F-1)//4, H/s, W/s), float32;
    logvar clamped to [-30, 20] (DiagonalGaussianDistribution)."""
    dt = jnp.dtype(dtype)
    x = jnp.moveaxis(video, 1, -1).astype(dt)
    if cfg.patch_size:
        x = _patchify(x, cfg.patch_size)
    h = _pointwise(_chunked(encoder_plan(cfg), params, x, 4, dt), params["quant_conv"], dt).astype(F32)
    mean, logvar = jnp.split(jnp.moveaxis(h, -1, 1), 2, axis=1)
    return mean, jnp.clip(logvar, -30.0, 20.0)
