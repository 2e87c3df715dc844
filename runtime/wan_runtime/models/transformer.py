"""The Wan 2.1 / 2.2 video diffusion transformer (diffusers ``WanTransformer3DModel``) in pure JAX.

Params are the nested dict of ``wan_runtime.format.transformer_tree``, the config a
``configs.WanTransformerConfig`` (re-exported here): blocks stacked on a leading
layer axis L, linear weights in torch (out, in) layout. Shapes: B batch, C channels, (F, H, W) latent
grid, (F', H', W') = grid / patch, S = F'H'W' video tokens, D = heads * Dh model width, Sc context
tokens. The forward is split so a denoise loop can precompute per generation (``rope_tables``,
``embed_text`` / ``embed_image`` + ``cross_kv``) and per step (``embed_time``), and a caching
policy can wrap ``run_blocks`` (block residual = its output minus its input).

VACE (``WanVACETransformer3DModel``, a config with ``vace_layers``): the control latents are
patch-embedded (``vace_patchify``), the VACE blocks run first as their own chain on the patch-embedded
latents (``vace_hints``, their cross-attention K/V from ``cross_kv_vace``), and ``run_blocks`` adds hint
k times its scale after main block ``vace_layers[k]``.

Numerics follow diffusers: weights are cast to the compute dtype at use (``layers.dense``), while the time embedder,
modulation (scale_shift_table + temb), LayerNorms, RMSNorms and RoPE run in float32.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..configs import WanTransformerConfig
from . import context_parallel
from .attention import preferred_multiple
from .layers import dense, layer_norm, rms_norm, scan_layers

F32 = jnp.float32


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------
def split_heads(x, heads):  # (..., S, D) -> (..., S, H, Dh)
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


# ------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _rope_np(head_dim: int, theta: float, grid: tuple[int, int, int]):
    hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * hw, hw, hw)  # [t | h | w], e.g. 128 -> 44 / 42 / 42
    axes = []
    for d, n in zip(dims, grid):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        axes.append(np.arange(n, dtype=np.float64)[:, None] * freqs)       # (n, d/2)
    f, h, w = grid
    ang = np.concatenate([np.broadcast_to(axes[0][:, None, None], (f, h, w, dims[0] // 2)),
                          np.broadcast_to(axes[1][None, :, None], (f, h, w, dims[1] // 2)),
                          np.broadcast_to(axes[2][None, None, :], (f, h, w, dims[2] // 2))], -1)
    ang = ang.reshape(f * h * w, head_dim // 2)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    cos.flags.writeable = sin.flags.writeable = False  # shared by the cache
    return cos, sin


def rope_tables(cfg: WanTransformerConfig, grid: tuple[int, int, int]):
    """(cos, sin), each (S, Dh/2) float32, for the post-patch grid (F', H', W'); cached per shape.

    Pair j of a head (channels 2j, 2j+1) rotates by angle pos_axis * theta^(-2k/d_axis), the axis
    chosen by j's slot in [t | h | w] (diffusers ``WanRotaryPosEmbed``, whose tables repeat each
    value twice; here each is stored once).
    """
    return _rope_np(cfg.head_dim, float(cfg.rope_theta), tuple(int(g) for g in grid))


def apply_rope(x, rope):
    """Interleaved-pair rotation of x (B, S, H, Dh) in float32; result in x's dtype."""
    cos, sin = (t[:, None, :] for t in rope)                     # (S, 1, Dh/2)
    x1, x2 = jnp.moveaxis(x.astype(F32).reshape(*x.shape[:-1], -1, 2), -1, 0)
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return out.reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------
def timestep_sinusoid(t, dim: int):
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): (...,) -> (..., dim) [cos | sin]."""
    half = dim // 2
    expo = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(expo.astype(np.float64)).astype(np.float32)  # float32 table, correctly rounded
    arg = t.astype(F32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], -1)


def embed_time(params, cfg: WanTransformerConfig, timestep, dtype=F32):
    """timestep (B,) or per-token (B, S) -> temb (B[, S], D) in dtype, timestep_proj (B[, S], 6, D) in dtype.

    The time embedder runs in float32 (linear, SiLU, linear); time_proj = linear(SiLU(temb))."""
    ce = params["condition_embedder"]
    h = timestep_sinusoid(jnp.asarray(timestep), cfg.freq_dim)
    h = dense(jax.nn.silu(dense(h, ce["time_embedder"]["linear_1"], F32)), ce["time_embedder"]["linear_2"], F32)
    temb = h.astype(dtype)
    proj = dense(jax.nn.silu(temb), ce["time_proj"], dtype)
    return temb, proj.reshape(*proj.shape[:-1], 6, cfg.dim)


def embed_text(params, cfg: WanTransformerConfig, text_emb, dtype=F32):
    """text_emb (B, St, text_dim) -> context (B, St, D): linear, GELU(tanh), linear."""
    te = params["condition_embedder"]["text_embedder"]
    return dense(jax.nn.gelu(dense(text_emb, te["linear_1"], dtype), approximate=True), te["linear_2"], dtype)


def embed_image(params, cfg: WanTransformerConfig, image_emb, dtype=F32):
    """CLIP tokens (B, Si, image_dim) -> (B, Si, D): LN(1e-5), linear, GELU(exact), linear, LN(1e-5).

    FLF2V (pos_embed_seq_len): (2B, Si, I) is viewed as (B, 2Si, I) and pos_embed is added."""
    ie = params["condition_embedder"]["image_embedder"]
    x = image_emb
    if "pos_embed" in ie:
        x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + ie["pos_embed"].astype(x.dtype)
    x = layer_norm(x, 1e-5, ie["norm1"]).astype(dtype)
    x = dense(jax.nn.gelu(dense(x, ie["ff"]["fc_in"], dtype), approximate=False), ie["ff"]["fc_out"], dtype)
    return layer_norm(x, 1e-5, ie["norm2"]).astype(dtype)


def cross_kv(params, cfg: WanTransformerConfig, context, dtype=F32, n_image: int = 0, *, stack: str = "blocks"):
    """Per-layer cross-attention K/V, computed once per generation (the cross-attention KV cache).

    context (B, Sc, D) = [image tokens (n_image) | text tokens], as diffusers concatenates them.
    Returns {"k", "v"}: (L, B, St, H, Dh) for the text tokens, plus {"k_img", "v_img"}:
    (L, B, n_image, H, Dh) through add_k_proj / add_v_proj when the model has them and n_image > 0.
    K is RMS-normed over the full D (norm_k / norm_added_k) before the head split.
    stack: the stacked blocks whose K/V these are: "blocks" (the main ones, L = num_layers) or
    "vace_blocks" (VACE's, L = len(vace_layers): :func:`cross_kv_vace`).
    """
    a = params[stack]["attn2"]
    ctx = context.astype(dtype)

    def kv(x, pk, pv, norm):  # x (B, s, D_in); stacked weights (L, D, D_in) -> (L, B, s, H, Dh)
        k, v = (dense(x, p, dtype, spec="bsi,loi->lbso") for p in (pk, pv))
        if norm is not None:
            k = rms_norm(k, norm[:, None, None], cfg.eps)
        return split_heads(k, cfg.num_heads), split_heads(v, cfg.num_heads)

    out = dict(zip(("k", "v"), kv(ctx[:, n_image:], a["to_k"], a["to_v"],
                                  a["norm_k"]["weight"] if cfg.qk_norm else None)))
    if n_image and "add_k_proj" in a:
        out["k_img"], out["v_img"] = kv(ctx[:, :n_image], a["add_k_proj"], a["add_v_proj"],
                                        a["norm_added_k"]["weight"])
    return out


def cross_kv_vace(params, cfg: WanTransformerConfig, context, dtype=F32, n_image: int = 0):
    """The VACE blocks' cross-attention K/V (:func:`cross_kv` of ``params["vace_blocks"]``): leaves
    (V, B, St, H, Dh), V = len(cfg.vace_layers), what :func:`vace_hints` takes as ``kv_vace``."""
    return cross_kv(params, cfg, context, dtype, n_image, stack="vace_blocks")


def patchify(params, cfg: WanTransformerConfig, latents, dtype=F32):
    """Conv3d with stride = kernel: latents (B, C, F, H, W) -> tokens (B, S, D), S in (F', H', W') order."""
    return _patch_embed(params["patch_embedding"], cfg, latents, dtype)


def vace_patchify(params, cfg: WanTransformerConfig, control, dtype=F32):
    """VACE control latents (B, vace_in_channels, F, H, W) -> control tokens (B, S_control, D), as
    :func:`patchify` with ``vace_patch_embedding``."""
    return _patch_embed(params["vace_patch_embedding"], cfg, control, dtype)


def _patch_embed(p, cfg: WanTransformerConfig, latents, dtype):
    B, C, F, H, W = latents.shape
    pt, ph, pw = cfg.patch_size
    x = latents.astype(dtype).reshape(B, C, F // pt, pt, H // ph, ph, W // pw, pw)
    x = dense(x, p, dtype, spec="bcfphqwr,dcpqr->bfhwd")  # weight (D, C, pt, ph, pw)
    return x.reshape(B, -1, cfg.dim)


def unpatchify_head(params, cfg: WanTransformerConfig, x, temb, grid):
    """Output head: norm_out (LN, no affine, fp32) modulated by scale_shift_table + temb, proj_out,
    then tokens (B, S, Cout*pt*ph*pw) -> (B, Cout, F, H, W) float32."""
    dtype = x.dtype
    t = temb[:, None] if temb.ndim == 2 else temb                              # (B, S|1, D)
    mod = params["scale_shift_table"].astype(F32) + t[:, :, None, :].astype(F32)  # (B, S|1, 2, D)
    shift, scale = mod[:, :, 0], mod[:, :, 1]
    x = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(dtype)
    x = dense(x, params["proj_out"], dtype)
    B, (f, h, w), (pt, ph, pw) = x.shape[0], grid, cfg.patch_size
    x = x.reshape(B, f, h, w, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, -1, f * pt, h * ph, w * pw).astype(F32)


# ------------------------------------------------------------------------------------------
# blocks
# ------------------------------------------------------------------------------------------
def block(p, x, temb_proj, rope, kv, cfg: WanTransformerConfig, dtype, *, key_mask=None, layout=None):
    """One WanTransformerBlock. p: one layer of params['blocks'] (or of params['vace_blocks']); x (B, S, D)
    in dtype; temb_proj (B, 6, D) or (B, S, 6, D); rope (cos, sin); kv: one layer of ``cross_kv``;
    key_mask: optional (B, S) bool, False = padding token, kept out of the self-attention keys;
    layout: a ``sharding.Layout`` whose sequence axes split S (context-parallel self-attention)."""
    H = cfg.num_heads
    if layout is not None:
        x = layout.constrain(x, ("batch", "seq", "act_embed"))
    tp = temb_proj[:, None] if temb_proj.ndim == 3 else temb_proj             # (B, S|1, 6, D)
    mod = p["scale_shift_table"].astype(F32) + tp.astype(F32)
    shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))

    def qnorm(q, attn, name):
        return rms_norm(q, attn[name]["weight"], cfg.eps) if cfg.qk_norm else q

    # 1. self-attention (RoPE after the q/k RMSNorm over the full D)
    a = p["attn1"]
    h = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(dtype)
    q = apply_rope(split_heads(qnorm(dense(h, a["to_q"], dtype), a, "norm_q"), H), rope)
    k = apply_rope(split_heads(qnorm(dense(h, a["to_k"], dtype), a, "norm_k"), H), rope)
    v = split_heads(dense(h, a["to_v"], dtype), H)
    if layout is not None and layout.seq_shards > 1:
        mode = context_parallel.choose_mode(layout.context_attention, H, layout.count("act_heads") if
                                            H % layout.count("act_heads") == 0 else 1, layout.seq_shards)
        o = context_parallel.self_attention(q, k, v, key_mask, layout, mode).reshape(x.shape)
    else:  # the sequence is not split: no exchange between devices
        o = context_parallel.local_attention(q, k, v, layout, key_mask).reshape(x.shape)
    x = (x.astype(F32) + dense(o, a["to_out"], dtype) * gate).astype(dtype)

    # 2. cross-attention on the precomputed K/V (image branch added before to_out); no gate
    a = p["attn2"]
    h = (layer_norm(x, cfg.eps, p["norm2"]) if cfg.cross_attn_norm else x).astype(dtype)
    q = split_heads(qnorm(dense(h, a["to_q"], dtype), a, "norm_q"), H)
    o = context_parallel.local_attention(q, kv["k"], kv["v"], layout)
    if "k_img" in kv:
        o = o + context_parallel.local_attention(q, kv["k_img"], kv["v_img"], layout)
    x = x + dense(o.reshape(x.shape), a["to_out"], dtype)

    # 3. feed-forward (GELU tanh)
    h = (layer_norm(x, cfg.eps) * (1 + c_scale) + c_shift).astype(dtype)
    f = dense(jax.nn.gelu(dense(h, p["ffn"]["fc_in"], dtype), approximate=True), p["ffn"]["fc_out"], dtype)
    return (x.astype(F32) + f.astype(F32) * c_gate).astype(dtype)


def _pad_axis(a, n, axis):
    return jnp.pad(a, [(0, n if i == axis else 0) for i in range(a.ndim)])


def _padded(x, temb_proj, rope, layout, pad_to):
    """The S tokens of x (B, S, D), rope and a per-token temb_proj zero-padded for the attention kernel
    (see :func:`run_blocks`) and placed on the layout; returns them, the key mask (None: no padding) and
    the pad."""
    S = x.shape[1]
    multiple = pad_to or preferred_multiple(seq_len=S if layout is None else S // layout.seq_shards)
    if layout is not None:
        multiple *= layout.seq_shards
    pad = -S % multiple
    key_mask = None
    if pad:
        x = _pad_axis(x, pad, 1)                                               # (B, S + pad, D)
        rope = tuple(_pad_axis(jnp.asarray(t), pad, 0) for t in rope)          # (S + pad, Dh/2)
        if temb_proj.ndim == 4:
            temb_proj = _pad_axis(temb_proj, pad, 1)                           # (B, S + pad, 6, D)
        key_mask = jnp.broadcast_to(jnp.arange(S + pad) < S, x.shape[:2])      # (B, S + pad)
    if layout is not None:
        x = layout.constrain(x, ("batch", "seq", "act_embed"))
        rope = tuple(layout.constrain(jnp.asarray(t), ("seq", None)) for t in rope)
        if temb_proj.ndim == 4:
            temb_proj = layout.constrain(temb_proj, ("batch", "seq", None, "act_embed"))
    return x, temb_proj, rope, key_mask, pad


def hint_slots(cfg: WanTransformerConfig, layers: int, first_layer: int = 0) -> np.ndarray:
    """(layers,) int32: for each of main blocks first_layer .. first_layer + layers - 1, the VACE hint
    added after it (k where ``vace_layers[k]`` is that block), -1 for none."""
    slots = np.full(layers, -1, np.int32)
    for k, layer in enumerate(cfg.vace_layers):
        if first_layer <= layer < first_layer + layers:
            slots[layer - first_layer] = k
    return slots


def run_blocks(params, x, temb_proj, rope, kv, cfg: WanTransformerConfig, dtype, *, pad_to: int | None = None,
               layout=None, hints=None, hint_scale=None, first_layer: int = 0):
    """All blocks: ``lax.scan`` (``layers.scan_layers``) over the stacked layer axis of params['blocks'] and of kv.

    pad_to: the S tokens (x, rope, per-token temb_proj) are zero-padded to a multiple of it for the
    attention kernel (None: ``preferred_multiple`` of the backend and the tokens per shard, 1: no
    padding) and cut back after. Only self-attention mixes tokens and it masks the padded keys out,
    so the result does not depend on pad_to (up to float reassociation). With a ``layout`` that
    splits the sequence over n devices, the multiple is n times that (every shard gets whole tiles).

    VACE: hints (V, B, S, D) from :func:`vace_hints`, hint_scale a float or (V,) (default 1): after main
    block ``vace_layers[k]``, x += hints[k] * hint_scale[k] (a per-layer table of :func:`hint_slots` rides
    the scan). first_layer: the model index of params['blocks'][0] when a caller runs a slice of the
    layers (e.g. a step cache's first block apart). Without hints the scan is the plain Wan one.
    """
    S = x.shape[1]
    x, temb_proj, rope, key_mask, pad = _padded(x, temb_proj, rope, layout, pad_to)
    xs = (params["blocks"], kv)
    if hints is not None:
        hints = _pad_axis(hints.astype(dtype), pad, 2) if pad else hints.astype(dtype)  # (V, B, S + pad, D)
        if layout is not None:
            hints = layout.constrain(hints, (None, "batch", "seq", "act_embed"))
        scale = jnp.broadcast_to(jnp.asarray(1.0 if hint_scale is None else hint_scale, F32),
                                 (len(cfg.vace_layers),)).astype(dtype)
        xs += (jnp.asarray(hint_slots(cfg, jax.tree.leaves(params["blocks"])[0].shape[0], first_layer)),)

    def step(x, layer):
        p, kv_l, *slot = layer
        x = block(p, x, temb_proj, rope, kv_l, cfg, dtype, key_mask=key_mask, layout=layout)
        if slot:  # VACE: hint k after the block that slot k names
            i = jnp.maximum(slot[0], 0)
            x = jnp.where(slot[0] >= 0, x + hints[i] * scale[i], x)
        return x, None

    x, _ = scan_layers(step, x, xs)  # fp8 weights cross the loop as their bytes
    return x[:, :S] if pad else x


def vace_hints(params, cfg: WanTransformerConfig, x, control, temb_proj, rope, kv_vace, dtype, layout=None, *,
               pad_to: int | None = None, n_image: int = 0):
    """The VACE chain: hints (V, B, S, D) in dtype, V = len(cfg.vace_layers), for :func:`run_blocks`.

    x (B, S, D): the patch-embedded latents (before any main block); control (B, Sc <= S, D): the control
    tokens (:func:`vace_patchify`), zero-padded to S. Block 0's state is ``vace_proj_in(control) + x``;
    each VACE block (the same :func:`block` as the main ones, in a ``layers.scan_layers`` over
    params['vace_blocks']) passes its state on and gives hint k = its ``proj_out`` of it. kv_vace: the
    VACE blocks' K/V (:func:`cross_kv_vace`), or (kv cache off) the context (B, Sc, D) they are made from
    (n_image CLIP tokens first). pad_to and layout: as in :func:`run_blocks`.
    """
    S, Sc = x.shape[1], control.shape[1]
    if Sc > S:
        raise ValueError(f"VACE control has {Sc} tokens, more than the {S} of the latents")
    if not isinstance(kv_vace, Mapping):
        kv_vace = cross_kv_vace(params, cfg, kv_vace, dtype, n_image)
    c = _pad_axis(control.astype(dtype), S - Sc, 1)
    c = dense(c, params["vace_proj_in"], dtype) + x.astype(dtype)
    c, temb_proj, rope, key_mask, pad = _padded(c, temb_proj, rope, layout, pad_to)

    def step(c, layer):
        p, kv_l = layer
        c = block(p, c, temb_proj, rope, kv_l, cfg, dtype, key_mask=key_mask, layout=layout)
        return c, dense(c, p["proj_out"], dtype)

    _, hints = scan_layers(step, c, (params["vace_blocks"], kv_vace))
    return hints[:, :, :S] if pad else hints


def forward(params, cfg: WanTransformerConfig, latents, timestep, text_emb, image_emb=None, *, dtype=F32,
            pad_to: int | None = None, layout=None, control=None, control_scale=None):
    """Predicted flow (B, Cout, F, H, W) float32 for latents (B, Cin, F, H, W), timestep (B,) or (B, S),
    text_emb (B, St, text_dim) and, for Wan 2.1 I2V, CLIP image tokens image_emb (B, Si, image_dim).
    VACE: control latents (B, vace_in_channels, F, H, W) and control_scale (a float or one per VACE
    layer; diffusers' control_hidden_states(_scale)). pad_to: token padding multiple, see :func:`run_blocks`."""
    _, _, F, H, W = latents.shape
    pt, ph, pw = cfg.patch_size
    grid = (F // pt, H // ph, W // pw)
    rope = rope_tables(cfg, grid)
    x = patchify(params, cfg, latents, dtype)
    temb, temb_proj = embed_time(params, cfg, timestep, dtype)
    context, n_image = embed_text(params, cfg, text_emb, dtype), 0
    if image_emb is not None:
        img = embed_image(params, cfg, image_emb, dtype)
        context, n_image = jnp.concatenate([img, context], axis=1), img.shape[1]
    kv = cross_kv(params, cfg, context, dtype, n_image)
    hints = None
    if control is not None:
        hints = vace_hints(params, cfg, x, vace_patchify(params, cfg, control, dtype), temb_proj, rope,
                           cross_kv_vace(params, cfg, context, dtype, n_image), dtype, layout, pad_to=pad_to)
    x = run_blocks(params, x, temb_proj, rope, kv, cfg, dtype, pad_to=pad_to, layout=layout, hints=hints,
                   hint_scale=control_scale)
    return unpatchify_head(params, cfg, x, temb, grid)
