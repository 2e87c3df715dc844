"""One pipeline for every Wan family: prompts -> text embeddings -> denoise (one lax.scan) -> VAE -> frames.

Families differ by config and small hooks, never by copied pipeline code:
- experts: Wan 2.2 A14B has two transformers; inside the scanned loop ``lax.cond`` picks the expert
  (``transformer`` while t >= boundary_ratio * 1000) and its guidance scale.

The per-generation work outside the loop is done once: text embeddings (positive and negative in one
batch), the text embedder and every block's cross-attention K/V (``transformer.cross_kv``), RoPE tables.
Guidance scales are traced values, so one executable serves every guidance.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint as ckpt_lib
from .compile_cache import ExecutableCache
from . import schedulers
from . import distributed as dist
from . import sharding as shd
from .models import transformer as tr
from .models import umt5
from .models import vae as vae_lib
from .text import Tokenizer, embed_tokens, tokenize_prompts

DEFAULT_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


class InputError(ValueError):
    """A generation request that cannot run (names the argument / flag)."""


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """Compute dtypes per component, and optional weight dtypes: by default weights keep the dtype they
    were converted to; ``weights`` / ``vae_weights`` recast them once after restore (norms and the
    other float32 modules stay float32: the converter's rule, format.stored_dtype)."""

    transformer: str = "bfloat16"
    text_encoder: str = "bfloat16"
    vae: str = "float32"
    scheduler: str = "float32"
    weights: str | None = None  # transformer(s), text and image encoders
    vae_weights: str | None = None

    @classmethod
    def all(cls, name: str) -> "Dtypes":
        return cls(name, name, name, "float32", name, name)


def cast_weights(tree, dtype: str):
    """Recast a restored param tree by the converter's dtype rule, on device, in one compiled program
    (one compile, kept by the persistent cache; leaf by leaf it was a compile per distinct shape, ~2 s
    at the first float32 load of a process). Elementwise, so every leaf keeps its sharding."""
    from .format import flatten, stored_dtype, unflatten

    flat = flatten(tree)
    todo = tuple((p, stored_dtype(p, dtype)) for p, a in flat.items() if a.dtype != jnp.dtype(stored_dtype(p, dtype)))
    if not todo:
        return tree
    return unflatten({**flat, **_cast_leaves({p: flat[p] for p, _ in todo}, todo)})


@functools.partial(jax.jit, static_argnames=("todo",))
def _cast_leaves(leaves, todo):
    return {p: leaves[p].astype(d) for p, d in todo}


@dataclasses.dataclass(frozen=True)
class _Static:
    """Hashable static configuration of the jitted denoise loop.

    mode: how image conditioning enters the transformer input (the only per-family hook in the loop):
      "t2v"    latents alone;
      "concat" Wan 2.1/2.2 I2V: latents ++ [4 mask channels, VAE latents of image + zero frames];
      "expand" Wan 2.2 TI2V with an image: latent frame 0 is replaced by the image latents, and its
               tokens get timestep 0 (per-token timesteps).
    """

    tcfg: tr.WanTransformerConfig
    n_experts: int
    cfg: bool
    dtype: Any
    sched_dtype: Any
    mode: str = "t2v"
    kv_cache: bool = True
    n_image: int = 0  # CLIP tokens at the front of the context (Wan 2.1 I2V)
    caching: bool = False  # step caching: per-step plan + cached block residuals
    policy: str = "plan"  # "plan" (MagCache, CFG cache), "teacache_e0" / "teacache_e", "firstblock"
    layout: Any = None  # sharding.Layout: activation shardings, context-parallel attention


def _model_input(x, cond, mask, st: _Static):
    if st.mode == "concat":
        return jnp.concatenate([x, cond.astype(x.dtype)], axis=1)
    if st.mode == "expand":
        return (1 - mask) * cond + mask * x
    return x


def _model_eval(params, tcfg, kv, x, t, cond, mask, rope, grid, st: _Static, plan=None, cache=None):
    """Flow prediction for latents x (1, C, F, H, W): cond and uncond as one batch of two.

    ``kv`` is every block's precomputed cross-attention K/V, or (kv_cache off) the context it is made
    from, in which case the projections are recomputed here, every step (the reference behaviour).
    With step caching, ``plan`` = (compute cond, compute uncond, uncond from the CFG cache) for this step
    and ``cache`` holds each branch's last block residual, the last cond - uncond difference and block-run
    counters; a branch that is not computed reuses its residual (embeddings and head still run)."""
    if not st.kv_cache:
        kv = tr.cross_kv(params, tcfg, kv, st.dtype, st.n_image)
    xin = _model_input(x, cond, mask, st)
    xin = jnp.concatenate([xin, xin]) if st.cfg else xin
    b = xin.shape[0]
    tokens = tr.patchify(params, st.tcfg, xin.astype(st.dtype), st.dtype)
    if st.mode == "expand":  # diffusers: (mask[0][0][:, ::2, ::2] * t).flatten(), per token
        pt, ph, pw = st.tcfg.patch_size
        tt = (mask[0, 0, ::pt, ::ph, ::pw] * t).reshape(-1)
        timestep = jnp.broadcast_to(tt, (b, tt.shape[0]))
    else:
        timestep = jnp.full((b,), t, jnp.float32)
    temb, temb_proj = tr.embed_time(params, st.tcfg, timestep, st.dtype)
    if not st.caching:
        h = tr.run_blocks(params, tokens, temb_proj, rope, kv, st.tcfg, st.dtype, layout=st.layout)
        return tr.unpatchify_head(params, st.tcfg, h, temb, grid), cache  # (b, C, F, H, W) float32
    if st.policy == "plan":
        h, cache = _blocks_with_cache(params, tokens, temb_proj, rope, kv, st, (plan[0], plan[1]), cache)
    elif st.policy.startswith("teacache"):  # skip when the rescaled embedding change accumulates < thresh
        e = (temb_proj if st.policy == "teacache_e0" else temb).astype(jnp.float32)
        axes = tuple(range(1, e.ndim))
        prev = cache["prev_e"]
        rel = jnp.abs(e - prev).mean(axes) / jnp.maximum(jnp.abs(prev).mean(axes), 1e-30)
        acc = cache["acc"] + jnp.polyval(cache["coef"], rel)
        compute = plan[0] | (acc >= cache["thresh"]) | (cache["thresh"] <= 0)  # thresh 0: never skip
        cache = {**cache, "acc": jnp.where(compute, 0.0, acc), "prev_e": e}
        h, cache = _blocks_with_cache(params, tokens, temb_proj, rope, kv, st, _rows(compute), cache)
    else:  # firstblock: run block 0; skip the rest when its residual changed less than thresh
        h1 = tr.run_blocks({"blocks": jax.tree.map(lambda a: a[:1], params["blocks"])}, tokens, temb_proj, rope,
                           jax.tree.map(lambda a: a[:1], kv), st.tcfg, st.dtype, layout=st.layout)
        r1 = (h1 - tokens).astype(jnp.float32)
        prev = cache["r1"]
        change = jnp.abs(r1 - prev).mean((1, 2)) / jnp.maximum(jnp.abs(prev).mean((1, 2)), 1e-30)
        compute = plan[0] | (change >= cache["thresh"])
        cache = {**cache, "r1": jnp.where(compute[:, None, None], r1, prev)}
        rest = {**params, "blocks": jax.tree.map(lambda a: a[1:], params["blocks"])}
        h, cache = _blocks_with_cache(rest, h1, temb_proj, rope, jax.tree.map(lambda a: a[1:], kv), st,
                                      _rows(compute), cache)
    v = tr.unpatchify_head(params, st.tcfg, h, temb, grid)
    if st.cfg:  # CFG cache: rebuild the unconditional prediction from the last full step's difference
        v_u = jnp.where(plan[2], v[:1] - cache["diff"], v[1:])
        diff = jnp.where(plan[0] & plan[1], v[:1] - v[1:], cache["diff"])
        v, cache = jnp.concatenate([v[:1], v_u]), {**cache, "diff": diff}
    return v, cache


def _rows(compute):
    """Per-row compute flags -> (cond, uncond) as _blocks_with_cache takes them (one row: no uncond)."""
    return (compute[0], compute[1] if compute.shape[0] > 1 else jnp.bool_(False))


def _blocks_with_cache(params, tokens, temb_proj, rope, kv, st: _Static, flags, cache):
    """Run the blocks only for the batch rows (cond, uncond) the plan computes; the others reuse their
    cached residual. A lax.switch over the (at most) four cases, so a skipped row costs no block."""
    rows = tokens.shape[0]

    def case(computed):
        def f(_):
            out = None
            if computed:  # contiguous rows: [0], [1] or [0, 1]
                lo, hi = computed[0], computed[-1] + 1
                kv_s = jax.tree.map(lambda a: a[:, lo:hi], kv)
                out = tr.run_blocks(params, tokens[lo:hi], temb_proj[lo:hi], rope, kv_s, st.tcfg, st.dtype,
                                    layout=st.layout)
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


def _denoise(experts, kvs, x, sstate, cache, cond, mask, arrays, timesteps, guidance, boundary, rope, plan, start,
             count, *, st: _Static, tcfgs, grid):
    """Steps [start, start + count) of the sampling loop, as one loop inside one executable.

    The step count is a traced value and the schedule tables are padded to MAX_STEPS, so the same
    executable serves every number of steps, every guidance and every boundary: a generation is one
    call (count = all steps), or one call per step when a progress bar wants per-step updates, and a
    2-step warmup compiles what a 50-step run needs. Wan 2.2's two experts: ``lax.cond`` per step.
    With step caching, ``plan`` (bool [MAX_STEPS, 3], made on the host by wan_runtime.caching) says per
    step which branches run their blocks, and ``cache`` is carried (see _model_eval).
    """
    def body(j, carry):
        x, sstate, cache = carry
        i = start + j
        t = timesteps[i]

        def run(k):
            def f(cache):
                v, cache = _model_eval(experts[k], tcfgs[k], kvs[k], x, t, cond, mask, rope, grid, st,
                                       None if plan is None else plan[i], cache)
                if st.cfg:
                    v = v[1:] + guidance[k] * (v[:1] - v[1:])
                return v, cache
            return f

        if st.n_experts == 1:
            v, cache = run(0)(cache)
        else:
            v, cache = jax.lax.cond(i < boundary, run(0), run(1), cache)
        x, sstate = schedulers.step(arrays, sstate, i, v, x, dtype=st.sched_dtype)
        if cache is not None and "ratios" in cache:
            cache = {**cache, "ratios": cache["ratios"].at[i].set(cache["ratio"])}
        return x, sstate, cache

    return jax.lax.fori_loop(0, count, body, (x, sstate, cache))


def _finish(x, cond, mask, *, st: _Static):
    """After the loop: TI2V re-pastes the image latents into frame 0, as diffusers does."""
    return (1 - mask) * cond + mask * x if st.mode == "expand" else x


MAX_STEPS = 1000  # schedule tables are padded to this length (a few KB)


def _pad_schedule(arrays, timesteps):
    pad = lambda a: np.pad(np.asarray(a), [(0, MAX_STEPS - np.shape(a)[0])] + [(0, 0)] * (np.ndim(a) - 1))  # noqa: E731
    return jax.tree.map(pad, arrays), pad(np.asarray(timesteps, np.float32))


def _conditions(experts, text_emb, image_emb, tcfgs, dtype, kv_cache=True):
    """Per expert: text (and CLIP image) context, then every block's cross-attention K/V (computed once);
    with kv_cache off, the context the loop recomputes them from."""
    out = []
    for p, c in zip(experts, tcfgs):
        ctx, n_image = tr.embed_text(p, c, text_emb, dtype), 0
        if image_emb is not None and c.image_dim:
            img = tr.embed_image(p, c, image_emb, dtype)
            img = jnp.broadcast_to(img, (ctx.shape[0],) + img.shape[1:])
            ctx, n_image = jnp.concatenate([img.astype(ctx.dtype), ctx], axis=1), img.shape[1]
        out.append(tr.cross_kv(p, c, ctx, dtype, n_image) if kv_cache else ctx)
    return tuple(out)


def _encode_condition(vae_params, video, mean, inv_std, *, vcfg, dtype):
    """VAE-encode the conditioning video and normalise it as diffusers does ("argmax": the mean)."""
    z, _ = vae_lib.encode(vae_params, vcfg, video, dtype=dtype)
    return (z - mean) * inv_std


def _decode(vae_params, latents, mean, inv_std, *, vcfg, dtype, as_uint8: bool, chunk: int = 1, layout=None):
    z = latents.astype(jnp.float32) / inv_std + mean  # diffusers: latents / (1 / std) + mean
    video = vae_lib.decode(vae_params, vcfg, z, dtype=dtype, chunk=chunk, layout=layout)  # (B, 3, F, H, W) in [-1, 1]
    frames = jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    if as_uint8:
        return jnp.round(frames * 255.0).astype(jnp.uint8)
    return frames


def validate_request(ckpt: ckpt_lib.Checkpoint, height: int, width: int, num_frames: int, num_inference_steps: int,
                     guidance_scale: float, guidance_scale_2: float | None = None, flow_shift: float | None = None,
                     latents_shape: Sequence[int] | None = None) -> None:
    """Checks that need only the checkpoint's configs (so a bad flag fails before any weights load)."""
    from .format import family_components

    needed = family_components(ckpt.family)
    missing = [c for c in needed if c not in ckpt.components]
    if missing:
        raise InputError(f"--checkpoint: {ckpt.root} has no {missing[0]} (a partial checkpoint, converted with "
                         f"--only?); a {ckpt.family} generation needs {', '.join(needed)}")
    tokenizer = ckpt.root / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        raise InputError(f"--checkpoint: {tokenizer} is missing; re-convert the source")
    vae_cfg, t_cfg = ckpt.config("vae"), ckpt.config("transformer")
    mult = int(vae_cfg.get("scale_factor_spatial", 8)) * int(t_cfg.get("patch_size", (1, 2, 2))[1])
    if height <= 0 or height % mult:
        raise InputError(f"--height: {height} is not a positive multiple of {mult} (VAE x patch factor)")
    if width <= 0 or width % mult:
        raise InputError(f"--width: {width} is not a positive multiple of {mult} (VAE x patch factor)")
    t = int(vae_cfg.get("scale_factor_temporal", 4))
    if num_frames < 1 or (num_frames - 1) % t:
        raise InputError(f"--frames: {num_frames} is not of the form {t}k+1 (e.g. {max(0, (num_frames - 1) // t) * t + 1})")
    if num_inference_steps < 1:
        raise InputError(f"--steps: must be >= 1, got {num_inference_steps}")
    for flag, g in (("--guidance", guidance_scale), ("--guidance-2", guidance_scale_2)):
        if g is not None and not (np.isfinite(g) and g >= 0):
            raise InputError(f"{flag}: must be a finite number >= 0, got {g}")
    if flow_shift is not None and not (np.isfinite(flow_shift) and flow_shift > 0):
        raise InputError(f"--flow-shift: must be a finite number > 0, got {flow_shift}")
    if latents_shape is not None:
        s = int(vae_cfg.get("scale_factor_spatial", 8))
        want = (int(t_cfg.get("out_channels") or t_cfg["in_channels"]), (num_frames - 1) // t + 1, height // s, width // s)
        if tuple(latents_shape) not in (want, (1, *want)):
            raise InputError(f"--latents: shape {list(latents_shape)} but this request needs {list(want)} "
                             f"(or {[1, *want]})")


def image_input_kind(ckpt: ckpt_lib.Checkpoint) -> str:
    """"required" (I2V: mask + image latents concatenated to the input), "optional" (TI2V: first-frame
    latents) or "none" (T2V), from the checkpoint's configs."""
    z = int(ckpt.config("vae").get("z_dim", 16))
    if int(ckpt.config("transformer")["in_channels"]) == 2 * z + 4:
        return "required"
    return "optional" if ckpt.model_index.get("expand_timesteps") else "none"


def check_image_input(image_input: str, family: str, has_image: bool) -> None:
    if image_input == "required" and not has_image:
        raise InputError(f"--image: {family} is an image-to-video model; pass --image")
    if image_input == "none" and has_image:
        raise InputError(f"--image: {family} is a text-to-video model and takes no image")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """JAX's persistent compilation cache, on by default: a second run of the same shapes compiles
    nothing. ``path`` (or $WAN_JAX_COMPILATION_CACHE) picks the folder; "off" disables it."""
    path = path or os.environ.get("WAN_JAX_COMPILATION_CACHE") or pathlib.Path.home() / ".cache" / "wan-jax" / "xla"
    if str(path) == "off":
        return None
    path = pathlib.Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass
class Timings:
    load: float = 0.0
    compile: float = 0.0
    conditioning: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.compile + self.conditioning + self.denoise + self.decode

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d["total"] = self.total
        return {k: round(v, 4) for k, v in d.items()}

    def summary(self) -> str:
        rows = [f"  {k:<13}{v:9.3f} s" for k, v in self.as_dict().items()]
        return "TIMING SUMMARY\n" + "\n".join(rows)


class WanPipeline:
    """Generate video from a converted checkpoint. Argument names follow diffusers' WanPipeline."""

    def __init__(self, ckpt: ckpt_lib.Checkpoint, params: dict, mesh, dtypes: Dtypes, load_seconds: float = 0.0,
                 executables: ExecutableCache | None = None, context_attention: str = "auto"):
        self.ckpt = ckpt
        self.executables = executables or ExecutableCache(None)
        self.params = params
        self.mesh = mesh
        #: activation shardings on the mesh; context_attention: "auto", "allgather", "ulysses" or "ring"
        self.layout = shd.Layout(mesh if mesh is not None and mesh.devices.size > 1 else None, context_attention)
        self.dtypes = dtypes
        self.timings = Timings(load=load_seconds)
        self.experts = [c for c in ("transformer", "transformer_2") if c in params]
        self.tcfgs = tuple(tr.WanTransformerConfig.from_config(ckpt.config(c)) for c in self.experts)
        self.ucfg = umt5.UMT5Config.from_config(ckpt.config("text_encoder"))
        self.vae_config = ckpt.config("vae")
        self.vcfg = vae_lib.VAEConfig.from_config(self.vae_config)
        self.tokenizer = Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")
        sched_path = ckpt.root / "scheduler" / "scheduler_config.json"
        self.scheduler_config = json.loads(sched_path.read_text()) if sched_path.exists() else {}
        self.boundary_ratio = ckpt.model_index.get("boundary_ratio")
        self.image_input = image_input_kind(ckpt)
        #: cross-attention K/V of every block computed once per generation (off: every step)
        self.kv_cache = True
        #: latent frames per VAE decode scan step (memory is flat in the frame count for any value)
        self.vae_chunk = 1
        #: steps per executable call: None = the whole loop in one call; 1 = a call per step
        self.steps_per_call: int | None = None
        self._compiled: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_converted(cls, path, *, mesh: str | Mapping[str, int] | None = None, dtype: str | Dtypes = "bfloat16",
                       parallel_restore: bool = True, compilation_cache: str | None = None,
                       executable_cache: bool | None = None, context_attention: str = "auto") -> "WanPipeline":
        """Restore a converted checkpoint (components in parallel threads) onto ``mesh`` (a process's
        devices, or every process's after ``jax.distributed.initialize``: each process reads only the
        shards of its own devices)."""
        t0 = time.perf_counter()
        cache_dir = enable_compilation_cache(compilation_cache)
        ck = ckpt_lib.open_checkpoint(path)
        mesh_shape = shd.parse_mesh(mesh)
        jmesh = shd.make_mesh(mesh_shape)
        params, _ = ckpt_lib.restore(ck, ck.components, jmesh, parallel=parallel_restore)
        dtypes = dtype if isinstance(dtype, Dtypes) else Dtypes.all(dtype) if dtype == "float32" else Dtypes()
        for c in params:
            want = dtypes.vae_weights if c == "vae" else dtypes.weights
            if want:
                params[c] = cast_weights(params[c], want)
        jax.block_until_ready(params)
        if executable_cache is None:
            executable_cache = os.environ.get("WAN_JAX_EXECUTABLE_CACHE", "0") == "1"
        exe = ExecutableCache(cache_dir / "executables" if cache_dir and executable_cache else None)
        return cls(ck, params, jmesh, dtypes, time.perf_counter() - t0, exe, context_attention)

    # ------------------------------------------------------------------ helpers
    @property
    def vae_scale_spatial(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial", 8))

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal", 4))

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        c = self.tcfgs[0].out_channels
        s, t = self.vae_scale_spatial, self.vae_scale_temporal
        return (1, c, (num_frames - 1) // t + 1, height // s, width // s)

    def validate(self, height: int, width: int, num_frames: int, num_inference_steps: int, guidance_scale: float,
                 guidance_scale_2: float | None = None, flow_shift: float | None = None, seed: int = 0):
        validate_request(self.ckpt, height, width, num_frames, num_inference_steps, guidance_scale, guidance_scale_2,
                         flow_shift)
        if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**32):
            # the PRNG key takes 32 bits: a larger seed would silently repeat a smaller one's video
            raise InputError(f"--seed: must be an integer in [0, 2**32), got {seed!r}")

    def _image_conditions(self, image, height, width, num_frames, shape, mean, inv_std):
        """Image -> (mode, condition latents, mask, CLIP tokens), as diffusers' WanImageToVideoPipeline."""
        from . import image as image_lib

        img = image_lib.load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
        first = jnp.asarray(image_lib.video_preprocess(img, height, width))  # (1, 3, 1, H, W) in [-1, 1]
        _, _, f_lat, h_lat, w_lat = shape
        enc = functools.partial(_encode_condition, vcfg=self.vcfg, dtype=jnp.dtype(self.dtypes.vae))
        if self.image_input == "required":  # I2V: image then zero frames, plus 4 mask channels (frame 0 known)
            video = jnp.concatenate([first, jnp.zeros(first.shape[:2] + (num_frames - 1, height, width), first.dtype)], 2)
            z = self._compile(("encode", video.shape), enc, self.params["vae"], video, mean, inv_std)(
                self.params["vae"], video, mean, inv_std)
            z = jnp.asarray(dist.to_host(z))  # small; the host-side assembly below then works across processes too
            known = jnp.zeros((1, self.vae_scale_temporal, f_lat, h_lat, w_lat), jnp.float32).at[:, :, 0].set(1.0)
            mode, cond, mask = "concat", jnp.concatenate([known, z], axis=1), None
        else:  # TI2V: latent frame 0 is the image's
            z = self._compile(("encode", first.shape), enc, self.params["vae"], first, mean, inv_std)(
                self.params["vae"], first, mean, inv_std)
            z = jnp.asarray(dist.to_host(z))
            mask = jnp.ones((1, 1, f_lat, h_lat, w_lat), jnp.float32).at[:, :, 0].set(0.0)
            mode, cond = "expand", z
        image_emb = None
        if self.tcfgs[0].image_dim:  # Wan 2.1 I2V: CLIP ViT-H penultimate tokens
            from .models import clip

            ccfg = clip.CLIPVisionConfig.from_config(self.ckpt.config("image_encoder"))
            proc = json.loads((self.ckpt.root / "image_processor" / "preprocessor_config.json").read_text())
            pixels = jnp.asarray(image_lib.clip_preprocess(img, proc))
            cdt = jnp.dtype(self.dtypes.transformer)
            clip_fn = self._compile(("clip", pixels.shape, cdt.name), lambda p, x: clip.encode_image(p, ccfg, x, dtype=cdt),
                                    self.params["image_encoder"], pixels)
            image_emb = clip_fn(self.params["image_encoder"], pixels)
        return mode, cond, mask, image_emb

    def _compile(self, key, fn, *args):
        """AOT-compile once per key (or load the executable a previous process compiled); the time is
        booked as compile time, apart from run time. Several processes: host inputs enter replicated."""
        multi = dist.multi_process()
        if multi:
            args = self._global(args)
        if key not in self._compiled:
            t0 = time.perf_counter()
            context = repr((self.ucfg, self.tcfgs, self.vcfg, self.ckpt.manifest.get("dtype_policy")))
            self._compiled[key] = self.executables.get_or_compile(key, context, fn, *args)
            self.timings.compile += time.perf_counter() - t0
        compiled = self._compiled[key]
        return (lambda *a: compiled(*self._global(a))) if multi else compiled

    def _global(self, tree):
        return jax.tree.map(lambda x: dist.to_global(x, self.mesh), tree)

    def warmup(self, height: int, width: int, num_frames: int, *, image=None, output_type: str = "uint8",
               max_sequence_length: int = 512) -> float:
        """Compile every executable a generation of this size needs, with a 2-step run (guidance > 1, both
        Wan 2.2 experts: the expert ``lax.cond`` holds both branches). Later runs of any step count and
        guidance compile nothing. Returns the seconds spent."""
        t0 = time.perf_counter()
        self("warmup", "", height=height, width=width, num_frames=num_frames, num_inference_steps=2,
             guidance_scale=2.0, guidance_scale_2=2.0, image=image, output_type=output_type,
             max_sequence_length=max_sequence_length)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str, negative_prompt: str | None = None, *, height: int = 480, width: int = 832,
                 num_frames: int = 81, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 guidance_scale_2: float | None = None, seed: int = 0, latents=None, flow_shift: float | None = None,
                 scheduler: str = "unipc", max_sequence_length: int = 512, output_type: str = "np",
                 image=None, cache=None, step_plan=None, progress: Callable[[int], None] | None = None):
        """Returns frames (F, H, W, 3): float32 in [0, 1] for output_type="np", uint8 for "uint8".

        ``image`` (a path or PIL image) conditions image-to-video models (Wan 2.1/2.2 I2V, TI2V-5B).
        ``step_plan`` (bool (steps, 3): compute cond blocks, compute uncond blocks, uncond from the CFG
        cache) turns on step caching; ``cache`` (a caching.CacheConfig) makes that plan from a policy
        (MagCache with a calibration curve, CFG cache). Neither: dense."""
        self.validate(height, width, num_frames, num_inference_steps, guidance_scale, guidance_scale_2, flow_shift, seed)
        check_image_input(self.image_input, self.ckpt.family, image is not None)
        self.timings.compile = 0.0  # per generation (load is the pipeline's)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("--prompt: empty prompt")
        negative_prompt = "" if negative_prompt is None else negative_prompt
        guidance_scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        do_cfg = guidance_scale > 1.0 or (len(self.experts) > 1 and guidance_scale_2 > 1.0)
        dt = self.dtypes
        shape = self.latent_shape(height, width, num_frames)
        if latents is None:
            latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        else:
            latents = np.asarray(latents, np.float32)
            if latents.ndim == len(shape) - 1:
                latents = latents[None]
            if tuple(latents.shape) != shape:
                raise InputError(f"--latents: shape {list(latents.shape)} but this request needs {list(shape[1:])} "
                                 f"(or {list(shape)})")
            latents = jnp.asarray(latents)
        # ---- conditioning: text encoder (pos + neg in one batch), text embedder + cross K/V per expert
        t0, c0 = time.perf_counter(), self.timings.compile
        prompts = [prompt, negative_prompt] if do_cfg else [prompt]
        ids, tmask, self.last_truncated = tokenize_prompts(self.tokenizer, prompts, max_sequence_length)
        self.last_token_counts = tmask.sum(axis=1)
        ids, tmask = jnp.asarray(ids), jnp.asarray(tmask)
        ucfg, tdt = self.ucfg, jnp.dtype(dt.text_encoder)
        text_fn = self._compile(("text", ids.shape, dt.text_encoder), lambda p, i, m: embed_tokens(p, ucfg, i, m, tdt),
                                self.params["text_encoder"], ids, tmask)
        text_emb = text_fn(self.params["text_encoder"], ids, tmask)
        experts = tuple(self.params[c] for c in self.experts)
        mean = jnp.asarray(self.vae_config.get("latents_mean", [0.0] * self.vcfg.z_dim), jnp.float32).reshape(1, -1, 1, 1, 1)
        inv_std = 1.0 / jnp.asarray(self.vae_config.get("latents_std", [1.0] * self.vcfg.z_dim), jnp.float32).reshape(1, -1, 1, 1, 1)
        mode, cond, mask, image_emb = "t2v", None, None, None
        if image is not None:
            mode, cond, mask, image_emb = self._image_conditions(image, height, width, num_frames, shape, mean, inv_std)
        cond_fn = self._compile(("conditions", text_emb.shape, None if image_emb is None else image_emb.shape,
                                 self.kv_cache, dt.transformer),
                                functools.partial(_conditions, tcfgs=self.tcfgs, dtype=jnp.dtype(dt.transformer),
                                                  kv_cache=self.kv_cache), experts, text_emb, image_emb)
        kvs = cond_fn(experts, text_emb, image_emb)
        jax.block_until_ready(kvs)
        self.timings.conditioning = time.perf_counter() - t0 - (self.timings.compile - c0)
        # ---- schedule (host, padded to MAX_STEPS) and the denoise loop
        shift = float(flow_shift if flow_shift is not None else self.scheduler_config.get("flow_shift", 3.0))
        sched = schedulers.make_schedule(scheduler, num_inference_steps, shift)
        arrays, timesteps = _pad_schedule(sched.arrays, sched.timesteps)
        boundary = (schedulers.expert_boundary_index(sched.timesteps, self.boundary_ratio)
                    if len(self.experts) > 1 and self.boundary_ratio is not None else num_inference_steps)
        grid = (shape[2] // self.tcfgs[0].patch_size[0], shape[3] // self.tcfgs[0].patch_size[1],
                shape[4] // self.tcfgs[0].patch_size[2])
        rope = tr.rope_tables(self.tcfgs[0], grid)
        n_image = int(image_emb.shape[1]) if image_emb is not None and self.tcfgs[0].image_dim else 0
        self.last_warnings = []
        if cache is not None and step_plan is None and cache.policy != "none":
            from . import caching as caching_lib

            calibration = caching_lib.load_calibration(cache.calibration) if cache.policy == "magcache" else None
            step_plan = caching_lib.step_plan(cache, num_inference_steps, calibration=calibration,
                                              boundary_index=boundary if len(self.experts) > 1 else None,
                                              do_cfg=do_cfg)
            if cache.policy == "magcache":
                warn = caching_lib.calibration_warning(caching_lib.model_entry(calibration, cache.model),
                                                       num_inference_steps, shift,
                                                       self.boundary_ratio if len(self.experts) > 1 else None)
                if warn:
                    self.last_warnings.append(warn)
        caching = step_plan is not None
        policy = "plan"
        if caching and cache is not None and cache.policy == "teacache":
            policy = "teacache_e0" if str(cache.model).startswith("ret_steps_") else "teacache_e"
        elif caching and cache is not None and cache.policy == "firstblock":
            policy = "firstblock"
        st = _Static(self.tcfgs[0], len(self.experts), do_cfg, jnp.dtype(dt.transformer), jnp.dtype(dt.scheduler), mode,
                     self.kv_cache, n_image, caching, policy, self.layout)
        plan, cache_state = None, None
        if caching:
            plan = np.zeros((MAX_STEPS, 3), bool)
            plan[:num_inference_steps] = np.asarray(step_plan, bool).reshape(num_inference_steps, 3)
            plan = jnp.asarray(plan)
            rows = 2 if do_cfg else 1
            s_tok = grid[0] * grid[1] * grid[2]
            cache_state = {"r": jnp.zeros((rows, s_tok, self.tcfgs[0].dim), st.dtype),
                     "diff": jnp.zeros((1, self.tcfgs[0].out_channels) + shape[2:], jnp.float32),
                     "ran": jnp.zeros((rows,), jnp.int32), "ratio": jnp.ones((rows,), jnp.float32),
                     "ratios": jnp.ones((MAX_STEPS, rows), jnp.float32)}
            if policy.startswith("teacache"):
                from . import caching as caching_lib

                coef = caching_lib.teacache_coefficients(caching_lib.load_calibration(cache.calibration), cache.model)
                d = self.tcfgs[0].dim
                cache_state["prev_e"] = jnp.zeros((rows, 6, d) if policy == "teacache_e0" else (rows, d), jnp.float32)
                if mode == "expand":  # per-token timestep embeddings
                    cache_state["prev_e"] = jnp.zeros((rows, s_tok) + cache_state["prev_e"].shape[1:], jnp.float32)
                cache_state.update(acc=jnp.zeros((rows,), jnp.float32), coef=jnp.asarray(coef, jnp.float32),
                                   thresh=jnp.float32(cache.teacache_thresh))
            elif policy == "firstblock":
                cache_state.update(r1=jnp.zeros((rows, s_tok, self.tcfgs[0].dim), jnp.float32),
                                   thresh=jnp.float32(cache.firstblock_thresh))
        guidance = jnp.asarray([guidance_scale, guidance_scale_2], jnp.float32)
        sstate = schedulers.init_state(sched.arrays, latents, st.sched_dtype)
        consts = (experts, kvs)
        carry = (latents, sstate, cache_state)
        rest = (cond, mask, arrays, jnp.asarray(timesteps), guidance, jnp.int32(boundary), rope, plan)
        fn = functools.partial(_denoise, st=st, tcfgs=self.tcfgs, grid=grid)
        denoise = self._compile(("denoise", st, grid, shape, scheduler, text_emb.shape), fn, *consts, *carry, *rest,
                                jnp.int32(0), jnp.int32(1))
        t0 = time.perf_counter()
        per_call = 1 if (progress is not None or self.steps_per_call == 1) else (self.steps_per_call or num_inference_steps)
        for start in range(0, num_inference_steps, per_call):
            count = min(per_call, num_inference_steps - start)
            carry = denoise(*consts, *carry, *rest, jnp.int32(start), jnp.int32(count))
            if progress is not None:
                jax.block_until_ready(carry)
                progress(start + count - 1)
        self.last_block_runs = None if cache_state is None else dist.to_host(carry[2]["ran"])  # per branch (cond, uncond)
        #: per step and branch, mean ||r_t|| / ||r_(t-1)|| of the block residual (MagCache calibration)
        self.last_mag_ratios = None if cache_state is None else dist.to_host(carry[2]["ratios"])[:num_inference_steps]
        fin = self._compile(("finish", st, shape), functools.partial(_finish, st=st), carry[0], cond, mask)
        out = fin(carry[0], cond, mask)
        jax.block_until_ready(out)
        self.timings.denoise = time.perf_counter() - t0
        self.last_latents = out
        # ---- VAE decode, frames on device
        as_uint8 = output_type == "uint8"
        dec = functools.partial(_decode, vcfg=self.vcfg, dtype=jnp.dtype(dt.vae), as_uint8=as_uint8, chunk=self.vae_chunk,
                                layout=self.layout)
        decode = self._compile(("decode", shape, dt.vae, as_uint8, self.vae_chunk), dec, self.params["vae"], out, mean, inv_std)
        t0 = time.perf_counter()
        frames = dist.to_host(decode(self.params["vae"], out, mean, inv_std))[0]
        self.timings.decode = time.perf_counter() - t0
        return frames
