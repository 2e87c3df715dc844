"""The denoise loop: every sampling step of a generation inside one compiled executable.

Families differ here by one hook, how the image condition enters the model input (``LoopSpec.mode``; VACE:
hints from the control tokens, computed per step from the step's tokens and added after the VACE layers). One
executable runs the steps of one expert: Wan 2.2 A14B calls it with the high-noise expert for the steps
before the boundary, then with the low-noise one (same shapes, so the same executable; only the active
expert need be on the device). Step caching enters through
one interface (``caching.Policy.decide``): per step and batch row, whether the transformer blocks run or
the row reuses its cached block residual (a ``lax.switch``, so a skipped row costs no block).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import caching, schedulers
from .models import transformer as tr

MAX_STEPS = 1000  # schedule tables and step plans are padded to this length (a few KB)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Hashable static configuration of the compiled loop.

    mode: how image conditioning enters the transformer input:
      "none"   latents alone;
      "concat" Wan 2.1/2.2 I2V: latents ++ [4 mask channels, VAE latents of image + zero frames];
      "expand" Wan 2.2 TI2V with an image: latent frame 0 is replaced by the image latents, and its
               tokens get timestep 0 (per-token timesteps).
      "vace"   VACE: ``cond`` is {"control": the expert's control tokens (B, S_c, D), "kv": its VACE blocks'
               K/V (kv_cache off: the context)}, ``mask`` the conditioning scale per VACE layer (V,); every
               step the VACE blocks turn the step's patch tokens and the control into hints (CFG rows share
               the control, each with its own text), which the main blocks add after the VACE layers.
    policy: the step-caching policy (``Policy.traced()``), None for a dense loop.
    """

    tcfg: tr.WanTransformerConfig
    cfg: bool
    dtype: Any
    sched_dtype: Any
    mode: str = "none"
    kv_cache: bool = True
    n_image: int = 0  # CLIP tokens at the front of the context (Wan 2.1 I2V)
    policy: caching.Policy | None = None
    layout: Any = None  # sharding.Layout: activation shardings, context-parallel attention


def model_input(x, cond, mask, st: LoopSpec):
    if st.mode == "concat":
        return jnp.concatenate([x, cond.astype(x.dtype)], axis=1)
    if st.mode == "expand":
        return (1 - mask) * cond + mask * x
    return x


def _timesteps(t, mask, b: int, st: LoopSpec):
    if st.mode == "expand":  # diffusers: (mask[0][0][:, ::2, ::2] * t).flatten(), per token
        pt, ph, pw = st.tcfg.patch_size
        tt = (mask[0, 0, ::pt, ::ph, ::pw] * t).reshape(-1)
        return jnp.broadcast_to(tt, (b, tt.shape[0]))
    return jnp.full((b,), t, jnp.float32)


def model_eval(params, tcfg, kv, x, t, cond, mask, rope, grid, st: LoopSpec, plan=None, cache=None):
    """Flow prediction for latents x (B, C, F, H, W) of B videos: with CFG, one batch of 2B rows, the B
    conditional rows then the B unconditional ones (the order of the text rows in ``kv``).

    ``kv`` is every block's precomputed cross-attention K/V, or (kv_cache off) the context it is made
    from, in which case the projections are recomputed here, every step (the reference behaviour).
    With step caching, ``plan`` is this step's row of the host plan (compute cond, compute uncond, uncond
    from the CFG cache) and ``cache`` holds each row's last block residual, the last cond - uncond
    difference, block-run counters and the policy's own state; it runs one video at a time (B = 1)."""
    if st.policy is not None and x.shape[0] > 1:
        raise ValueError(f"step caching runs one video at a time, not a batch of {x.shape[0]}")
    if not st.kv_cache:
        kv = tr.cross_kv(params, tcfg, kv, st.dtype, st.n_image)
    xin = model_input(x, cond, mask, st)
    xin = jnp.concatenate([xin, xin]) if st.cfg else xin
    tokens = tr.patchify(params, st.tcfg, xin.astype(st.dtype), st.dtype)
    temb, temb_proj = tr.embed_time(params, st.tcfg, _timesteps(t, mask, xin.shape[0], st), st.dtype)
    run = lambda p, x, kv_, **hints: tr.run_blocks(p, x, temb_proj, rope, kv_, st.tcfg, st.dtype,  # noqa: E731
                                                   layout=st.layout, **hints)
    if st.policy is None:
        h, hints = tokens, {}
        if st.mode == "vace":
            h, hints = vace_rows(params, st, tokens, temb_proj, rope, cond, mask, 0)(0, tokens.shape[0], tokens)
        return tr.unpatchify_head(params, st.tcfg, run(params, h, kv, **hints), temb, grid), cache

    def first_block():  # VACE: without its hint (diffusers adds the hints between the blocks)
        return run({"blocks": _layers(params["blocks"], 0, 1)}, tokens, _layers(kv, 0, 1))

    view = caching.StepView(tokens, temb, temb_proj, first_block)
    compute, state, x0, first = st.policy.decide(cache["policy"], plan, view)
    rest = {**params, "blocks": _layers(params["blocks"], first, None)}
    vace = vace_rows(params, st, tokens, temb_proj, rope, cond, mask, first) if st.mode == "vace" else None
    h, cache = blocks_with_cache(rest, x0, temb_proj, rope, _layers(kv, first, None), st, _rows(compute),
                                 {**cache, "policy": state}, vace)
    v = tr.unpatchify_head(params, st.tcfg, h, temb, grid)
    if st.cfg:  # CFG cache: rebuild the unconditional prediction from the last full step's difference
        v_u = jnp.where(plan[2], v[:1] - cache["diff"], v[1:])
        diff = jnp.where(plan[0] & plan[1], v[:1] - v[1:], cache["diff"])
        v, cache = jnp.concatenate([v[:1], v_u]), {**cache, "diff": diff}
    return v, cache


def vace_rows(params, st: LoopSpec, tokens, temb_proj, rope, cond, scale, first: int):
    """VACE: a function (lo, hi, x) -> (x, run_blocks' hint arguments) for batch rows [lo, hi) whose main
    blocks run from layer ``first`` on input x: the VACE chain's hints from those rows' patch ``tokens`` (the
    control tiled over the CFG rows; each row's own text K/V), and x with the hints of the layers before
    ``first`` added (a step cache's first block runs apart, without its hint)."""
    rows, control = tokens.shape[0], cond["control"]
    control = jnp.concatenate([control] * (rows // control.shape[0])) if control.shape[0] < rows else control
    kv = cond["kv"] if st.kv_cache else tr.cross_kv_vace(params, st.tcfg, cond["kv"], st.dtype, st.n_image)

    def hints(lo, hi, x):
        kv_rows = jax.tree.map(lambda a: a[:, lo:hi], kv)
        h = tr.vace_hints(params, st.tcfg, tokens[lo:hi], control[lo:hi], temb_proj[lo:hi], rope, kv_rows, st.dtype,
                          st.layout)
        for k, layer in enumerate(st.tcfg.vace_layers):
            if layer < first:
                x = x + h[k].astype(x.dtype) * scale[k].astype(x.dtype)
        return x, {"hints": h, "hint_scale": scale, "first_layer": first}
    return hints


def _layers(tree, lo: int, hi: int | None):
    """Layers [lo, hi) of stacked per-layer arrays (the leading axis)."""
    return tree if lo == 0 and hi is None else jax.tree.map(lambda a: a[lo:hi], tree)


def _rows(compute):
    """Per-row compute flags -> (cond, uncond) as blocks_with_cache takes them (one row: no uncond)."""
    return (compute[0], compute[1] if compute.shape[0] > 1 else jnp.bool_(False))


def blocks_with_cache(params, tokens, temb_proj, rope, kv, st: LoopSpec, flags, cache, vace=None):
    """Run the blocks only for the batch rows (cond, uncond) that compute; the others reuse their
    cached residual. A lax.switch over the (at most) four cases, so a skipped row costs no block (nor its
    VACE hints: ``vace``, from ``vace_rows``, runs inside the computing cases)."""
    rows = tokens.shape[0]

    def case(computed):
        def f(_):
            out = None
            if computed:  # contiguous rows: [0], [1] or [0, 1]
                lo, hi = computed[0], computed[-1] + 1
                kv_s = jax.tree.map(lambda a: a[:, lo:hi], kv)
                x, hints = (tokens[lo:hi], {}) if vace is None else vace(lo, hi, tokens[lo:hi])
                out = tr.run_blocks(params, x, temb_proj[lo:hi], rope, kv_s, st.tcfg, st.dtype,
                                    layout=st.layout, **hints)
            parts = [out[computed.index(r):computed.index(r) + 1] if r in computed
                     else tokens[r:r + 1] + cache["r"][r:r + 1].astype(tokens.dtype) for r in range(rows)]
            return jnp.concatenate(parts), jnp.array([r in computed for r in range(rows)], jnp.int32)
        return f

    if rows == 1:
        index, branches = flags[0].astype(jnp.int32), [case([]), case([0])]
    else:
        index = flags[0].astype(jnp.int32) * 2 + flags[1].astype(jnp.int32)
        branches = [case([]), case([1]), case([0]), case([0, 1])]
    h, ran = jax.lax.switch(index, branches, None)
    new = (h - tokens).astype(cache["r"].dtype)
    residual = jnp.where(ran[:, None, None] > 0, new, cache["r"])
    # MagCache calibration statistic: mean over tokens of ||r_t|| / ||r_(t-1)|| per branch (1.0 at first)
    norm = lambda r: jnp.linalg.norm(r.astype(jnp.float32), axis=-1)  # noqa: E731
    prev = norm(cache["r"])
    ratio = jnp.where(prev.min(axis=-1) > 0, (norm(new) / jnp.maximum(prev, 1e-30)).mean(axis=-1), 1.0)
    return h, {**cache, "r": residual, "ran": cache["ran"] + ran, "ratio": ratio}


def cache_state(policy: caching.Policy, rows: int, tokens: int, dim: int, latent_shape, dtype, per_token: bool):
    """The traced caching state a loop starts from: per row, the last block residual, block-run counters and
    residual-norm ratios; the last CFG difference; the policy's own state."""
    return {"r": jnp.zeros((rows, tokens, dim), dtype), "diff": jnp.zeros((1,) + tuple(latent_shape[1:]), jnp.float32),
            "ran": jnp.zeros((rows,), jnp.int32), "ratio": jnp.ones((rows,), jnp.float32),
            "ratios": jnp.ones((MAX_STEPS, rows), jnp.float32),
            "policy": jax.tree.map(jnp.asarray, policy.state(rows, tokens, dim, per_token))}


def pad_plan(plan: np.ndarray, steps: int) -> jax.Array:
    out = np.zeros((MAX_STEPS, 3), bool)
    out[:steps] = np.asarray(plan, bool).reshape(steps, 3)
    return jnp.asarray(out)


def denoise(params, kv, x, sstate, cache, cond, mask, arrays, timesteps, rope, plan, guidance, start, count, *,
            st: LoopSpec, grid):
    """Steps [start, start + count) of the sampling loop with one transformer (``params``, its K/V ``kv``
    and classifier-free ``guidance``), as one loop inside one executable.

    The step count is a traced value and the schedule tables are padded to MAX_STEPS, so the same
    executable serves every number of steps, every guidance and every expert boundary: a generation is
    one call per expert (count = its steps), or one call per step when a progress bar wants per-step
    updates, and a 2-step warmup compiles what a 50-step run needs.
    With step caching, ``plan`` (bool [MAX_STEPS, 3], made on the host by the policy) is read per step
    and ``cache`` is carried (see model_eval).
    """
    def body(j, carry):
        x, sstate, cache = carry
        i = start + j
        v, cache = model_eval(params, st.tcfg, kv, x, timesteps[i], cond, mask, rope, grid, st,
                              None if plan is None else plan[i], cache)
        if st.cfg:  # rows [cond of each video, uncond of each video]
            b = x.shape[0]
            v = v[b:] + guidance * (v[:b] - v[b:])
        x, sstate = schedulers.step(arrays, sstate, i, v, x, dtype=st.sched_dtype)
        if cache is not None:
            cache = {**cache, "ratios": cache["ratios"].at[i].set(cache["ratio"])}
        return x, sstate, cache

    return jax.lax.fori_loop(0, count, body, (x, sstate, cache))


def finish(x, cond, mask, *, st: LoopSpec):
    """After the loop: TI2V re-pastes the image latents into frame 0, as diffusers does."""
    return (1 - mask) * cond + mask * x if st.mode == "expand" else x


def pad_schedule(arrays, timesteps):
    pad = lambda a: np.pad(np.asarray(a), [(0, MAX_STEPS - np.shape(a)[0])] + [(0, 0)] * (np.ndim(a) - 1))  # noqa: E731
    return jax.tree.map(pad, arrays), pad(np.asarray(timesteps, np.float32))
