"""One pipeline for every Wan family, in stages a reader can follow top to bottom:

    encode_prompt -> prepare_image_condition / prepare_vace_condition -> prepare_latents
    (-> prepare_video_latents) -> denoise -> decode

``WanPipeline.__call__`` resolves the settings into one ``RunConfig`` (runconfig.py) and ``generate``
composes the stages; the result is a ``Generation`` (frames, latents, timings, block runs, warnings).
``generate_batch`` runs the same stages for B videos of one settings class (``RunConfig.batch_key``) at
once, and ``generate`` is its batch of one: one code path.
Families differ by their ``families.Family`` entry (experts, how an image conditions the model, CLIP
tokens, VACE), never by copied pipeline code. Video inputs: on a text-to-video checkpoint an input video makes
a video-to-video run (diffusers' WanVideoToVideoPipeline: its latents noised at the first step that
``strength`` keeps, the schedule's tail denoised); on a VACE checkpoint it is the control (diffusers'
WanVACEPipeline: control video, mask and reference images VAE-encoded once into control latents).
The per-generation work outside the loop is done once: text embeddings (positive and negative in one batch),
the text embedder and every block's cross-attention K/V (per expert, at the start of its phase; VACE: its
control tokens and VACE blocks' K/V too), RoPE tables; the loop itself is one executable (denoise.py) for
every step count, guidance, boundary and expert. The offload mode (residency.py) decides which weights
leave the device between their uses: the encoders after the conditioning, the inactive Wan 2.2 expert.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import families, residency, schedulers
from . import lora as lora_lib
from . import checkpoint as ckpt_lib
from . import denoise as loop
from . import video as video_lib
from . import distributed as dist
from . import sharding as shd
from .compile_cache import ExecutableCache
from .models import transformer as tr
from .models import umt5
from .models import vae as vae_lib
from .runconfig import DEFAULT_NEGATIVE, Dtypes, InputError, RunConfig, group_batches  # noqa: F401  (the API's names)
from .runconfig import VideoInputs
from .text import Tokenizer, embed_tokens, tokenize_prompts


#: leaves recast together in one compiled program: at most this many bytes of old leaves (or one leaf)
CAST_SLICE_BYTES = 1 << 30


def cast_weights(tree, dtype: str, *, consume: bool = False, slice_bytes: int | None = None):
    """Recast a restored param tree by the converter's dtype rule, on device. Elementwise, so every leaf
    keeps its sharding. Leaves go in slices of at most ``slice_bytes`` (default ``CAST_SLICE_BYTES``, or
    one leaf if larger), one compiled program per slice (kept by the persistent cache; leaf by leaf it
    was a compile per distinct shape). ``consume``: the old leaves are deleted as soon as their slice is
    cast, so the device holds at most the old tree plus one slice of new leaves (a 14B float32 -> bf16
    recast no longer needs old + new)."""
    from .format import flatten, recast_dtype, unflatten

    flat = flatten(tree)
    want = {p: recast_dtype(p, a.dtype.name, dtype) for p, a in flat.items()}
    todo = tuple((p, d) for p, d in want.items() if flat[p].dtype.name != d)
    out, limit = dict(flat), slice_bytes or CAST_SLICE_BYTES
    for part in _slices(todo, {p: flat[p].nbytes for p, _ in todo}, limit):
        out.update(_cast_leaves({p: flat[p] for p, _ in part}, part))
        if consume:
            for p, _ in part:
                flat[p].delete()
    return unflatten(out) if todo else tree


def _quantize_experts(ck, params: dict, dtype: str) -> None:
    """``--quantize``: the transformers' block weights quantized in place of the restored ones."""
    from . import quant
    from .format import QUANT_DTYPES, component_dtype, component_tree, flatten

    if dtype not in QUANT_DTYPES:
        raise InputError(f"--quantize: {dtype!r} is not one of {', '.join(QUANT_DTYPES)}")
    for c in families.get(ck.family).expert_names:
        if c not in params:
            continue
        if component_dtype(ck.manifest["dtype_policy"], c) in QUANT_DTYPES:
            raise InputError(f"--quantize: {ck.root} is already quantized "
                             f"({component_dtype(ck.manifest['dtype_policy'], c)})")
        old = flatten(params[c])
        params[c] = quant.quantize_tree(params[c], component_tree(c, ck.config(c), dtype), dtype)
        new = flatten(params[c])
        for path, a in old.items():
            if new[path] is not a:
                a.delete()  # an unquantized block weight (the other leaves are the same arrays)


def _slices(todo, nbytes, limit):
    """Consecutive runs of ``todo`` whose old bytes stay within ``limit`` (a larger leaf alone)."""
    part, size = [], 0
    for item in todo:
        if part and size + nbytes[item[0]] > limit:
            yield tuple(part)
            part, size = [], 0
        part.append(item)
        size += nbytes[item[0]]
    if part:
        yield tuple(part)


@functools.partial(jax.jit, static_argnames=("todo",))
def _cast_leaves(leaves, todo):
    return {p: leaves[p].astype(d) for p, d in todo}


def _conditions(p, text_emb, image_emb, control, c, dtype, kv_cache=True):
    """One transformer's text (and CLIP image) context, then every block's cross-attention K/V (computed
    once); with kv_cache off, the context the loop recomputes them from. VACE (``control``: the control
    latents): also {"control": its control tokens, "kv": the VACE blocks' K/V (or the context)}."""
    ctx, n_image = tr.embed_text(p, c, text_emb, dtype), 0
    if image_emb is not None and c.image_dim:
        img = tr.embed_image(p, c, image_emb, dtype)
        img = jnp.tile(img, (ctx.shape[0] // img.shape[0], 1, 1))  # B videos' tokens for 2B rows with CFG
        ctx, n_image = jnp.concatenate([img.astype(ctx.dtype), ctx], axis=1), img.shape[1]
    kv = tr.cross_kv(p, c, ctx, dtype, n_image) if kv_cache else ctx
    if control is None:
        return kv
    vace_kv = tr.cross_kv_vace(p, c, ctx, dtype, n_image) if kv_cache else ctx
    return kv, {"control": tr.vace_patchify(p, c, control, dtype), "kv": vace_kv}


def _encode_condition(vae_params, video, mean, inv_std, *, vcfg, dtype, precision="highest"):
    """VAE-encode the conditioning video and normalise it as diffusers does ("argmax": the mean)."""
    z, _ = vae_lib.encode(vae_params, vcfg, video, dtype=dtype, precision=precision)
    return (z - mean) * inv_std


def _decode(vae_params, latents, mean, inv_std, *, vcfg, dtype, as_uint8: bool, chunk: int = 1, layout=None,
            precision="highest"):
    z = latents.astype(jnp.float32) / inv_std + mean  # diffusers: latents / (1 / std) + mean
    # (B, 3, F, H, W) in [-1, 1]
    video = vae_lib.decode(vae_params, vcfg, z, dtype=dtype, chunk=chunk, layout=layout, precision=precision)
    frames = jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    if as_uint8:
        return jnp.round(frames * 255.0).astype(jnp.uint8)
    return frames


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


class Timings:
    """Seconds per stage of one generation (load: the pipeline's restore; compile: apart from the rest)."""

    STAGES = ("load", "compile", "conditioning", "denoise", "decode")

    def __init__(self, load: float = 0.0):
        self.load, self.compile, self.conditioning, self.denoise, self.decode = load, 0.0, 0.0, 0.0, 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in self.STAGES)

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 4) for k in self.STAGES} | {"total": round(self.total, 4)}

    def summary(self) -> str:
        rows = [f"  {k:<13}{v:9.3f} s" for k, v in self.as_dict().items()]
        return "TIMING SUMMARY\n" + "\n".join(rows)


class TextCondition(NamedTuple):
    embeddings: jax.Array  # (B or 2B, max_sequence_length, d): the B prompts (then their negative prompts)
    token_counts: np.ndarray
    truncated: tuple[bool, ...]

    def video(self, i: int, n: int) -> tuple[np.ndarray, tuple[bool, ...]]:
        """Video i of a batch of n: its rows' token counts and truncation flags (prompt, negative prompt)."""
        rows = [i, n + i] if len(self.token_counts) > n else [i]
        return self.token_counts[rows], tuple(self.truncated[r] for r in rows)


class Condition(NamedTuple):
    """How an image or a VACE control enters the loop (``denoise.LoopSpec.mode``): "concat" / "expand": the
    image latents (``cond``), the TI2V mask (``mask``), the CLIP image tokens (Wan 2.1 I2V); "vace": the
    control latents (``cond``, (B, vace_in_channels, F', H', W')), the conditioning scale per VACE layer
    (``mask``, (V,)) and the reference images' latent frames in front (``trim``, cut before decoding)."""

    mode: str = "none"
    cond: Any = None
    mask: Any = None
    clip_tokens: Any = None
    trim: int = 0


class Denoised(NamedTuple):
    latents: jax.Array
    block_runs: np.ndarray | None  # per branch (cond, uncond): transformer-block runs (step caching)
    mag_ratios: np.ndarray | None  # (steps, branches): mean ||r_t|| / ||r_(t-1)|| of the block residual
    warnings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a generation returns: frames (F, H, W, 3), float32 in [0, 1] or uint8; the final latents
    (1, C, F', H', W', as decoded: VACE's reference frames cut); the resolved settings; per-stage timings;
    step-caching counters; warnings."""

    frames: np.ndarray
    latents: jax.Array
    config: RunConfig
    timings: "Timings"
    block_runs: np.ndarray | None = None
    mag_ratios: np.ndarray | None = None
    warnings: tuple[str, ...] = ()
    token_counts: np.ndarray | None = None
    truncated: tuple[bool, ...] = ()


#: the Python API's (diffusers') argument names -> RunConfig fields
API_NAMES = {"num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance",
             "guidance_scale_2": "guidance_2", "boundary_ratio": "boundary"}


#: the stages whose block matmuls ``fp8_matmul`` runs as fp8 x fp8 (the transformer's); the text encoder
#: stays weight-only (fp8 activations cost it 6.2e-2 relative error against 4.5e-2 with e4m3 weights alone)
FP8_MATMUL_STAGES = ("conditions", "denoise")


class WanPipeline:
    """Generate video from a converted checkpoint. Argument names follow diffusers' WanPipeline.

    Per pipeline (constructor / ``from_converted``): mesh, dtypes, ``kv_cache`` (cross-attention K/V once
    per generation), ``vae_chunk`` (latent frames per VAE decode scan step), ``vae_precision`` (float32
    VAE convs: "highest", or "default": TF32 on GPUs; None: "default" on GPU, else "highest"),
    ``steps_per_call`` (None: the whole loop in one executable call; 1: a call per step), ``preset``
    (defaults for every generation), ``offload`` (which weights leave the device between their uses:
    "none", "encoders", "experts", "all", or "auto": what fits; residency.py).
    Per generation: the arguments of ``__call__``."""

    def __init__(self, ckpt: ckpt_lib.Checkpoint, params: dict, mesh, dtypes: Dtypes, *, load_seconds: float = 0.0,
                 executables: ExecutableCache | None = None, context_attention: str = "auto", kv_cache: bool = True,
                 vae_chunk: int = 1, steps_per_call: int | None = None, preset: str | None = None,
                 vae_precision: str | None = None, offload: str = "auto", fp8_matmul: bool = False):
        self.ckpt, self.mesh, self.dtypes = ckpt, mesh, dtypes
        #: the components' weights, on the device or (offloaded between their uses) in host memory
        self.params = params if isinstance(params, residency.Weights) else residency.Weights(params)
        self.family = families.get(ckpt.family)
        self.executables = executables or ExecutableCache(None)
        #: activation shardings on the mesh; context_attention: "auto", "allgather", "ulysses" or "ring"
        self.layout = shd.Layout(mesh if mesh is not None and mesh.devices.size > 1 else None, context_attention)
        self.load_seconds = load_seconds
        self.kv_cache, self.vae_chunk, self.steps_per_call, self.preset = kv_cache, vae_chunk, steps_per_call, preset
        self.vae_precision = vae_precision or vae_lib.default_precision()
        self.fp8_matmul = fp8_matmul
        if fp8_matmul:
            from .models.layers import fp8_matmul_support

            why = fp8_matmul_support()
            if why:
                raise InputError(f"--fp8-matmul: {why}")
        if self.vae_precision not in vae_lib.PRECISIONS:
            raise InputError(f"--vae-precision: {vae_precision!r} is not one of {', '.join(vae_lib.PRECISIONS)}")
        self.experts = [c for c in self.family.expert_names if c in self.params]
        try:
            self.offload = residency.resolve(offload, self.params.trees())
        except residency.OffloadError as e:
            raise InputError(str(e)) from None
        self.moved = residency.offloaded(self.offload, self.params)
        self._release(*self.experts[1:])  # a second expert waits in host memory until its phase
        self.tcfgs = tuple(tr.WanTransformerConfig.from_config(ckpt.config(c)) for c in self.experts)
        self.ucfg = umt5.UMT5Config.from_config(ckpt.config("text_encoder"))
        self.vae_config = ckpt.config("vae")
        self.vcfg = vae_lib.VAEConfig.from_config(self.vae_config)
        self.tokenizer = Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")
        self._compiled: dict = {}
        self.planner = None  # plan.Recorder: compile and record every stage, run none (``wan-run --plan``)

    @classmethod
    def from_converted(cls, path, *, mesh: str | Mapping[str, int] | None = None, dtype: str | Dtypes | None = None,
                       parallel_restore: bool = True, compilation_cache: str | None = None,
                       executable_cache: bool | None = None, quantize: str | None = None,
                       **options) -> "WanPipeline":
        """Restore a converted checkpoint (components in parallel threads) onto ``mesh`` (a process's
        devices, or every process's after ``jax.distributed.initialize``: each process reads only the
        shards of its own devices). ``quantize`` ("float8_e4m3fn" or "int8"): quantize the transformer
        blocks' weights on the device once, by the converter's rule (quant.py), for a checkpoint that is
        not quantized. ``options``: the constructor's per-pipeline settings."""
        t0 = time.perf_counter()
        cache_dir = enable_compilation_cache(compilation_cache)
        ck = ckpt_lib.open_checkpoint(path)
        jmesh = shd.make_mesh(shd.parse_mesh(mesh))
        params, _ = ckpt_lib.restore(ck, ck.components, jmesh, parallel=parallel_restore)
        dtypes = Dtypes.of(dtype)
        if quantize:
            _quantize_experts(ck, params, quantize)
        for c in params:
            want = dtypes.vae_weights if c == "vae" else dtypes.weights
            if want:
                params[c] = cast_weights(params[c], want, consume=True)
        jax.block_until_ready(params)
        if executable_cache is None:
            executable_cache = os.environ.get("WAN_JAX_EXECUTABLE_CACHE", "0") == "1"
        exe = ExecutableCache(cache_dir / "executables" if cache_dir and executable_cache else None)
        return cls(ck, params, jmesh, dtypes, load_seconds=time.perf_counter() - t0, executables=exe, **options)

    def set_loras(self, loras=(), loras_2=()) -> None:
        """Apply LoRAs to the transformer (``loras``) and to Wan 2.2's low-noise expert (``loras_2``): each a
        ``lora.Lora`` or a "FILE[:STRENGTH]" string, in order; they replace any applied before (none:
        back to the plain weights). The weights without LoRAs are kept in host memory from the first call;
        each call recomputes the touched leaves from them on the device (``lora.apply``: one program per
        set of LoRA shapes, strengths traced), so another strength or LoRA compiles nothing, here or in
        the denoise loop (the weights are its arguments). Shared by ``replace``d pipelines."""
        if loras_2 and len(self.experts) < 2:
            raise InputError("--lora-2: this checkpoint has one transformer (--lora-2 is for Wan 2.2 A14B's "
                             "low-noise expert)")
        for c, given in zip(self.experts, (loras, loras_2)):
            given = tuple(lora_lib.read(*lora_lib.parse_spec(x)) if isinstance(x, str) else x for x in given)
            if not given and c not in self.params.unmerged:
                continue
            if c not in self.params.unmerged:
                self.params.unmerged[c] = residency.to_host(self.params[c])
            base = residency.to_device(self.params.unmerged[c])
            self.params[c] = lora_lib.apply(base, given) if given else base
            self.params.loras[c] = given

    @property
    def loras(self) -> dict[str, tuple]:
        """Per transformer: the LoRAs applied (``set_loras``)."""
        return dict(self.params.loras)

    def replace(self, **options) -> "WanPipeline":
        """The same restored weights (no copy) with other per-pipeline settings (kv_cache, vae_chunk,
        steps_per_call, preset, context_attention, vae_precision, offload); compiled stages are shared."""
        kw = dict(load_seconds=self.load_seconds, executables=self.executables, kv_cache=self.kv_cache,
                  vae_chunk=self.vae_chunk, steps_per_call=self.steps_per_call, preset=self.preset,
                  context_attention=self.layout.context_attention, vae_precision=self.vae_precision,
                  offload=self.offload, fp8_matmul=self.fp8_matmul)
        other = WanPipeline(self.ckpt, self.params, self.mesh, self.dtypes, **{**kw, **options})
        other._compiled = self._compiled
        return other

    # ------------------------------------------------------------------ settings
    def config(self, *, image: bool = False, cache=None, inputs: VideoInputs | None = None, **settings) -> RunConfig:
        """The validated RunConfig of a generation: the pipeline's preset and the checkpoint's own configs
        (and the input video's frame count and size) under ``settings`` (diffusers' names, or wan-run's).
        ``cache``: a ``caching.Policy``, or the name of one with its settings in ``settings`` (cache_thresh,
        ...). ``inputs``: the generation's video inputs (``video.load_inputs``)."""
        named = {API_NAMES.get(k, k): v for k, v in settings.items()}
        return RunConfig.resolve(self.ckpt, self.preset, image=image, cache=cache, inputs=inputs, **named)

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial", 8))

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal", 4))

    @property
    def compiled(self) -> tuple:
        """The keys of the stages compiled so far (this process)."""
        return tuple(self._compiled)

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        return RunConfig(height=height, width=width, frames=num_frames).latent_shape(self.ckpt)

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 image=None, video=None, mask=None, reference_images=None, latents=None, output_type: str = "np",
                 cache=None, progress: Callable[[int], None] | None = None, num_videos_per_prompt: int = 1,
                 **settings) -> "Generation | list[Generation]":
        """Generate from a prompt. ``settings``: height, width, num_frames, num_inference_steps,
        guidance_scale, guidance_scale_2, seed, flow_shift, scheduler, max_sequence_length, strength,
        conditioning_scale, ... (defaults: the pipeline's preset, else the checkpoint's own configs, else
        RunConfig's). ``image``: a path or PIL image for image-to-video models. ``video``: a file, a list of
        PIL images or uint8 frames (F, H, W, 3): on a text-to-video model the input of video-to-video
        (``strength``, default 0.8: the fraction of the schedule that runs), on a VACE model the control video;
        its frame count and size are num_frames, height and width unless given (a given size resizes it).
        VACE also takes ``mask`` (frames as the video's; white: generate), ``reference_images`` (PIL images
        or paths) and ``conditioning_scale`` (a float or one per VACE layer); without a video it conditions
        on a zero video and an all-ones mask, as diffusers. ``latents``: initial latents (C, F', H', W') or
        with a batch axis (video-to-video: the noise added to the video's latents; VACE: one more latent
        frame per reference image, in front). ``output_type``: "np" (float32 frames in [0, 1]) or "uint8".
        ``cache``: a step-caching ``caching.Policy`` (or a policy name). ``progress(i)`` is called after
        step i.

        Several videos: a list of prompts, or ``num_videos_per_prompt`` > 1, returns a list of Generation in
        prompt-major order (each prompt's videos together); the k-th video of the list uses seed ``seed + k``.
        ``negative_prompt`` and ``image`` are then one for every prompt, or a list with one per prompt (the
        video inputs: one for every prompt); ``latents``, if given, has one row per video: (N, C, F', H', W').
        The videos run as one batch (``generate_batch``: each equal to its own generation with its seed, up to
        float rounding), or one at a time under a step-caching policy. A str prompt with one video returns one
        Generation."""
        single = isinstance(prompt, str) and num_videos_per_prompt == 1
        inputs = video_lib.load_inputs(video, mask, reference_images)
        prompts, configs, images, inits = self._videos(prompt, negative_prompt, image, latents,
                                                       num_videos_per_prompt, cache, inputs, settings)
        keys = [c.batch_key(im is not None, inputs) for c, im in zip(configs, images)]
        gens = [g for batch in group_batches(keys) for g in
                self.generate_batch([prompts[i] for i in batch], [configs[i] for i in batch],
                                    images=[images[i] for i in batch], latents=[inits[i] for i in batch],
                                    videos=[inputs] * len(batch), output_type=output_type, progress=progress)]
        return gens[0] if single else gens

    def _videos(self, prompt, negative_prompt, image, latents, per_prompt: int, cache, inputs, settings: dict):
        """``__call__``'s videos, prompt-major: (prompts, configs, images, initial latents), one each; the
        k-th video's seed is the resolved seed + k."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or per_prompt < 1:
            raise InputError(f"--prompt: {len(prompts)} prompts, {per_prompt} videos per prompt (need >= 1 of each)")
        negatives, images = (_per_prompt(v, len(prompts), name) for v, name in
                             ((negative_prompt, "negative_prompt"), (image, "image")))
        configs = []
        for neg, img in zip(negatives, images):
            base = self.config(image=img is not None, cache=cache, inputs=inputs, negative_prompt=neg, **settings)
            for _ in range(per_prompt):  # the k-th video overall: seed + k
                seed = base.seed + len(configs)
                configs.append(dataclasses.replace(base, seed=seed).validate(self.ckpt, img is not None, inputs))
        n, repeat = len(configs), lambda xs: [x for x in xs for _ in range(per_prompt)]  # noqa: E731
        return repeat(prompts), configs, repeat(images), [latents] if n == 1 else _rows(latents, n)

    def generate(self, prompt: str, config: RunConfig, *, image=None, video: VideoInputs | None = None,
                 latents=None, output_type: str = "np", progress: Callable[[int], None] | None = None) -> Generation:
        """The stages of one generation, with a RunConfig already resolved and validated (with ``video``, the
        video inputs): ``generate_batch``'s batch of one."""
        return self.generate_batch([prompt], [config], images=[image], latents=[latents], videos=[video],
                                   output_type=output_type, progress=progress)[0]

    def generate_batch(self, prompts: Sequence[str], configs: Sequence[RunConfig], *, images=None, latents=None,
                       videos=None, output_type: str = "np",
                       progress: Callable[[int], None] | None = None) -> list[Generation]:
        """The stages of a generation of B videos at once, with RunConfigs resolved and validated: the prompts
        and negative prompts encoded in one batch, one denoise loop over the videos' latents (with guidance
        2B rows: every video's conditional row, then every video's unconditional one), then each video
        decoded alone (the decode executable and its memory are those of one video). Each video equals its
        own generation (the same seed) up to float rounding. The ``configs`` share one
        ``RunConfig.batch_key`` (every setting but the seed and the negative prompt; no step caching), unless
        B = 1. ``images``, ``latents``, ``videos`` (``VideoInputs``): one per video (or None), as ``generate``
        takes them (VACE: each video its own control, as many reference images each). The Generations share
        the batch's Timings; ``progress(i)`` is called after step i."""
        prompts, configs = list(prompts), list(configs)
        images, inits, videos = _check_batch(prompts, configs, images, latents, videos, self.family.vace)
        config, n = configs[0], len(configs)
        refs = len(videos[0].references) if videos[0] is not None else 0
        noise = jnp.concatenate([self.prepare_latents(c, x, refs) for c, x in zip(configs, inits)])
        timings = Timings(load=self.load_seconds)
        do_cfg = config.do_cfg(len(self.experts))
        with _Stage(timings, "conditioning") as stage:
            text = self.encode_prompt(prompts, [c.negative_prompt for c in configs], do_cfg,
                                      config.max_sequence_length, timings)
            img = self._input_conditions(images, videos, configs, noise.shape, timings)
            x0 = self._start_latents(noise, videos, configs, timings)
            stage.wait((text.embeddings, img.cond, img.clip_tokens, x0))
            self._release(*residency.ENCODERS)
        with _Stage(timings, "denoise") as stage:
            den = self.denoise(x0, text.embeddings, img, config, do_cfg, timings, progress)
            stage.wait(den.latents)
        with _Stage(timings, "decode"):
            latents = _split(den.latents[:, :, img.trim:] if img.trim else den.latents, n)
            frames = [self.decode(x, output_type, timings) for x in latents]
        return [Generation(f, x, c, timings, den.block_runs, den.mag_ratios, den.warnings, *text.video(i, n))
                for i, (f, x, c) in enumerate(zip(frames, latents, configs))]

    def prepare_latents(self, config: RunConfig, latents=None, references: int = 0) -> jax.Array:
        """Gaussian noise from the seed, or the given initial latents (shape checked); VACE's ``references``
        add a latent frame each."""
        shape = config.latent_shape(self.ckpt, references)
        if latents is None:
            return jax.random.normal(jax.random.key(config.seed), shape, jnp.float32)
        latents = np.asarray(latents, np.float32)
        config.check_latents(self.ckpt, latents.shape, references)
        return jnp.asarray(latents.reshape(shape))

    def _start_latents(self, noise, videos: list, configs: list, timings: "Timings"):
        """The latents the loop starts from: the noise, or (video-to-video) each video's ``prepare_video_latents``."""
        if self.family.vace or videos[0] is None:
            return noise
        return jnp.concatenate([self.prepare_video_latents(v.video, c, noise[i:i + 1], timings)
                                for i, (v, c) in enumerate(zip(videos, configs))])

    def prepare_video_latents(self, frames, config: RunConfig, noise, timings: "Timings") -> jax.Array:
        """Video-to-video, as diffusers' WanVideoToVideoPipeline: the frames resized to the generation's size,
        VAE-encoded ("argmax": the mean) and normalised, then noised by the scheduler at the first step that
        runs (``RunConfig.first_step``): (1 - sigma) x + sigma noise (UniPC's add_noise, Euler's scale_noise)."""
        start = config.first_step()
        video = jnp.asarray(video_lib.video_preprocess(frames, config.height, config.width))
        z = self._vae_encode(video, timings)
        sigma = np.float32(schedulers.make_schedule(config.scheduler, config.steps, config.flow_shift,
                                                    start=start).sigmas[start])
        return (np.float32(1) - sigma) * z + sigma * noise

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str], do_cfg: bool,
                      max_sequence_length: int, timings: "Timings") -> TextCondition:
        """UMT5 embeddings of the prompts (and, with guidance, of the negative prompts, in the same batch:
        rows [p1..pB, n1..nB])."""
        rows = [prompt] if isinstance(prompt, str) else list(prompt)
        if do_cfg:
            rows += [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        ids, tmask, truncated = tokenize_prompts(self.tokenizer, rows, max_sequence_length)
        ids, counts, tmask = jnp.asarray(ids), tmask.sum(axis=1), jnp.asarray(tmask)
        ucfg, tdt = self.ucfg, jnp.dtype(self.dtypes.text_encoder)
        fn = self._compile(timings, ("text", ids.shape, tdt.name), lambda p, i, m: embed_tokens(p, ucfg, i, m, tdt),
                           self.params["text_encoder"], ids, tmask)
        return TextCondition(fn(self.params["text_encoder"], ids, tmask), counts, tuple(truncated))

    def cross_attention(self, k: int, text_emb, clip_tokens, timings: "Timings", control=None):
        """Expert ``k``'s cross-attention K/V of every block (with kv_cache off: the context they come from);
        VACE (``control``: the control latents): (that, the expert's control tokens and VACE blocks' K/V)."""
        expert = self.params[self.experts[k]]
        dt = jnp.dtype(self.dtypes.transformer)
        shape = lambda x: None if x is None else x.shape  # noqa: E731
        key = ("conditions", self.tcfgs[k], text_emb.shape, shape(clip_tokens), shape(control), self.kv_cache, dt.name)
        fn = self._compile(timings, key, functools.partial(_conditions, c=self.tcfgs[k], dtype=dt,
                                                           kv_cache=self.kv_cache), expert, text_emb, clip_tokens,
                           control)
        return fn(expert, text_emb, clip_tokens, control)

    def _release(self, *components: str) -> None:
        """Free the device copies of those of ``components`` this pipeline's offload mode moves."""
        self.params.release(*(c for c in components if c in self.moved))

    def _input_conditions(self, images: list, videos: list, configs: list, shape, timings: "Timings") -> Condition:
        """Each video's image condition (``prepare_image_condition``) or VACE control (``prepare_vace_condition``),
        along the batch axis."""
        if self.family.vace:
            conds = [self.prepare_vace_condition(v or VideoInputs(), c, timings) for v, c in zip(videos, configs)]
        elif images[0] is None:
            return Condition()
        else:
            conds = [self.prepare_image_condition(im, c, shape, timings) for im, c in zip(images, configs)]
        cat = lambda xs: xs[0] if len(xs) == 1 or xs[0] is None else jnp.concatenate(xs)  # noqa: E731
        return Condition(conds[0].mode, cat([c.cond for c in conds]), conds[0].mask,
                         cat([c.clip_tokens for c in conds]), conds[0].trim)

    def prepare_image_condition(self, image, config: RunConfig, shape, timings: "Timings") -> Condition:
        """Image -> how it enters the loop, as diffusers' WanImageToVideoPipeline: I2V ("concat"): VAE
        latents of the image then zero frames, plus 4 mask channels; TI2V ("expand"): latent frame 0 is
        the image's. Wan 2.1 I2V adds CLIP ViT-H penultimate tokens."""
        from . import image as image_lib

        img = image_lib.load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
        first = jnp.asarray(image_lib.video_preprocess(img, config.height, config.width))  # (1, 3, 1, H, W)
        _, _, f_lat, h_lat, w_lat = shape
        if self.family.image_mode == "concat":
            video = jnp.concatenate([first, jnp.zeros(first.shape[:2] + (config.frames - 1,) + first.shape[3:],
                                                      first.dtype)], 2)
            known = jnp.zeros((1, self.vae_scale_temporal, f_lat, h_lat, w_lat), jnp.float32).at[:, :, 0].set(1.0)
            cond, mask = jnp.concatenate([known, self._vae_encode(video, timings)], axis=1), None
        else:
            cond = self._vae_encode(first, timings)
            mask = jnp.ones((1, 1, f_lat, h_lat, w_lat), jnp.float32).at[:, :, 0].set(0.0)
        return Condition(self.family.image_mode, cond, mask, self._clip_tokens(img, timings))

    def prepare_vace_condition(self, inputs: VideoInputs, config: RunConfig, timings: "Timings") -> Condition:
        """VACE's control latents, once per generation, as diffusers' WanVACEPipeline (preprocess_conditions,
        prepare_video_latents, prepare_masks): the control video at the generation's size (none: zeros) and
        its mask (none: ones); the inactive (video x (1 - mask > 0.5)) and reactive (video x mask > 0.5)
        videos VAE-encoded and normalised, channels concatenated; each reference image fitted on a white
        canvas, VAE-encoded (with zero "reactive" channels) and put in front as a latent frame (the last
        given first); then the mask folded onto the latent grid (``vace_mask_latents``) as more channels."""
        from . import image as image_lib

        h, w, f = config.height, config.width, config.frames
        if inputs.video is None:
            video = np.zeros((1, 3, f, h, w), np.float32)
        else:
            video = video_lib.video_preprocess(inputs.video, h, w)
        mask = np.ones_like(video) if inputs.mask is None else video_lib.mask_preprocess(inputs.mask, h, w)
        binary = (mask > 0.5).astype(np.float32)
        latents = jnp.concatenate([self._vae_encode(jnp.asarray(video * (1 - binary)), timings),
                                   self._vae_encode(jnp.asarray(video * binary), timings)], axis=1)
        for ref in inputs.references:
            img = image_lib.load_image(ref) if not hasattr(ref, "convert") else ref
            z = self._vae_encode(jnp.asarray(image_lib.reference_preprocess(img, h, w)[None, :, None]), timings)
            latents = jnp.concatenate([jnp.concatenate([z, jnp.zeros_like(z)], axis=1), latents], axis=2)
        folded = vace_mask_latents(mask, self.vae_scale_temporal, self.vae_scale_spatial,
                                   self.tcfgs[0].patch_size[1], len(inputs.references))
        control = jnp.concatenate([latents, jnp.asarray(folded)], axis=1)
        scale = jnp.asarray(config.control_scale(len(self.tcfgs[0].vace_layers)), jnp.float32)
        return Condition("vace", control, scale, None, trim=len(inputs.references))

    def _vae_encode(self, video, timings: "Timings"):
        mean, inv_std = self._latent_stats()
        enc = functools.partial(_encode_condition, vcfg=self.vcfg, dtype=jnp.dtype(self.dtypes.vae),
                                precision=self.vae_precision)
        fn = self._compile(timings, ("encode", video.shape, self.vae_precision), enc, self.params["vae"], video, mean,
                           inv_std)
        # small; assembled on the host, so the conditioning works across processes too
        return jnp.asarray(dist.to_host(fn(self.params["vae"], video, mean, inv_std)))

    def _clip_tokens(self, img, timings: "Timings"):
        if not self.family.clip or not self.tcfgs[0].image_dim:
            return None
        from . import image as image_lib
        from .models import clip

        ccfg = clip.CLIPVisionConfig.from_config(self.ckpt.config("image_encoder"))
        proc = ckpt_lib.read_json(self.ckpt.root / "image_processor" / "preprocessor_config.json")
        pixels = jnp.asarray(image_lib.clip_preprocess(img, proc))
        cdt = jnp.dtype(self.dtypes.transformer)
        fn = self._compile(timings, ("clip", pixels.shape, cdt.name),
                           lambda p, x: clip.encode_image(p, ccfg, x, dtype=cdt), self.params["image_encoder"], pixels)
        return fn(self.params["image_encoder"], pixels)

    def denoise(self, latents, text_emb, img: Condition, config: RunConfig, do_cfg: bool, timings: "Timings",
                progress: Callable[[int], None] | None = None) -> Denoised:
        """The sampling loop (denoise.py), per expert phase (Wan 2.2 A14B: the high-noise expert's steps
        before the boundary, then the low-noise expert's): see ``_phase``. Video-to-video runs the steps from
        ``RunConfig.first_step``."""
        steps, tcfg, start = config.steps, self.tcfgs[0], config.first_step()
        sched = schedulers.make_schedule(config.scheduler, steps, config.flow_shift, start=start)
        arrays, timesteps = loop.pad_schedule(sched.arrays, sched.timesteps)
        two = len(self.experts) > 1 and config.boundary is not None
        boundary = schedulers.expert_boundary_index(sched.timesteps, config.boundary) if two else steps
        grid = tuple(n // p for n, p in zip(latents.shape[2:], tcfg.patch_size))
        plan = config.cache.plan(steps, boundary_index=boundary if two else None, do_cfg=do_cfg)
        n_image = int(img.clip_tokens.shape[1]) if img.clip_tokens is not None and tcfg.image_dim else 0
        st = loop.LoopSpec(tcfg, do_cfg, jnp.dtype(self.dtypes.transformer), jnp.dtype(self.dtypes.scheduler),
                           img.mode, self.kv_cache, n_image, None if plan is None else config.cache.traced(),
                           self.layout)
        state = None if plan is None else loop.cache_state(
            config.cache, 2 if do_cfg else 1, grid[0] * grid[1] * grid[2], tcfg.dim, latents.shape, st.dtype,
            per_token=img.mode == "expand")
        carry = (latents, schedulers.init_state(sched.arrays, latents, st.sched_dtype), state)
        rest = (img.cond, img.mask, arrays, jnp.asarray(timesteps), tr.rope_tables(tcfg, grid),
                None if plan is None else loop.pad_plan(plan, steps))
        for k, (lo, hi) in enumerate(((start, boundary), (max(start, boundary), steps))):
            if lo < hi:
                guidance = config.guidance if k == 0 else config.guidance_low
                carry = self._phase(k, range(lo, hi), carry, rest, text_emb, img, guidance,
                                    dataclasses.replace(st, tcfg=self.tcfgs[k]), grid, config.scheduler, timings,
                                    progress)
        fin = self._compile(timings, ("finish", st, latents.shape), functools.partial(loop.finish, st=st),
                            carry[0], img.cond, img.mask)
        warn = config.cache.warning(steps, config.flow_shift, config.boundary if two else None)
        if plan is None:
            return Denoised(fin(carry[0], img.cond, img.mask), None, None, ())
        return Denoised(fin(carry[0], img.cond, img.mask), dist.to_host(carry[2]["ran"]),
                        dist.to_host(carry[2]["ratios"])[:steps], (warn,) if warn else ())

    def _phase(self, k: int, steps: range, carry, rest, text_emb, img: Condition, guidance: float,
               st: loop.LoopSpec, grid: tuple, scheduler: str, timings: "Timings", progress) -> tuple:
        """Steps ``steps`` with expert ``k``: the other expert leaves the device first (if offloaded), this
        one's cross-attention K/V is computed once, then the steps run in one executable call (or one per
        step); the K/V is freed at the end. Both experts' phases share one executable."""
        self._release(*(c for i, c in enumerate(self.experts) if i != k))
        vace = img.mode == "vace"
        params = self.params[self.experts[k]]
        kv = self.cross_attention(k, text_emb, img.clip_tokens, timings, img.cond if vace else None)
        if vace:  # the loop's condition: this expert's control tokens and VACE K/V (computed once per phase)
            kv, rest = kv[0], (kv[1],) + rest[1:]
        kv_shapes = tuple(a.shape for a in jax.tree.leaves(kv))  # the text length (max_sequence_length) among them
        g = jnp.float32(guidance)
        run = self._compile(timings, ("denoise", st, grid, carry[0].shape, scheduler, kv_shapes),
                            functools.partial(loop.denoise, st=st, grid=grid), params, kv, *carry, *rest, g,
                            jnp.int32(0), jnp.int32(1))
        per_call = 1 if (progress is not None or self.steps_per_call == 1) else (self.steps_per_call or len(steps))
        for start in steps[::per_call]:
            carry = run(params, kv, *carry, *rest, g, jnp.int32(start), jnp.int32(min(per_call, steps.stop - start)))
            if progress is not None:
                jax.block_until_ready(carry)
                progress(min(start + per_call, steps.stop) - 1)
        return carry

    def decode(self, latents, output_type: str, timings: "Timings") -> np.ndarray:
        """VAE decode on the device (frames clamped, and cast to uint8 there for "uint8"), then to the host."""
        if output_type not in ("np", "uint8"):
            raise InputError(f"output_type: 'np' or 'uint8', not {output_type!r}")
        as_uint8, (mean, inv_std) = output_type == "uint8", self._latent_stats()
        dec = functools.partial(_decode, vcfg=self.vcfg, dtype=jnp.dtype(self.dtypes.vae), as_uint8=as_uint8,
                                chunk=self.vae_chunk, layout=self.layout, precision=self.vae_precision)
        key = ("decode", latents.shape, self.dtypes.vae, as_uint8, self.vae_chunk, self.vae_precision)
        fn = self._compile(timings, key, dec,
                           self.params["vae"], latents, mean, inv_std)
        return dist.to_host(fn(self.params["vae"], latents, mean, inv_std))[0]

    def _latent_stats(self):
        z = self.vcfg.z_dim
        mean = jnp.asarray(self.vae_config.get("latents_mean", [0.0] * z), jnp.float32).reshape(1, -1, 1, 1, 1)
        std = jnp.asarray(self.vae_config.get("latents_std", [1.0] * z), jnp.float32).reshape(1, -1, 1, 1, 1)
        return mean, 1.0 / std

    def record(self, gen: Generation, prompt: str, **inputs) -> dict:
        """A generation's sidecar record (wan-run's and wan-serve's): prompt, model, every resolved setting
        with this pipeline's own, the devices, timings; ``inputs`` (e.g. image=PATH) join the settings."""
        ck = self.ckpt
        devices = jax.devices()
        return {
            "prompt": prompt, "negative_prompt": gen.config.negative_prompt, "seed": gen.config.seed,
            "model": {"checkpoint": str(ck.root.resolve()), "family": ck.family,
                      "source": ck.manifest.get("source", {}).get("id")},
            "preset": gen.config.preset,
            "settings": gen.config.record() | {
                "dtypes": dataclasses.asdict(self.dtypes), "offload": self.offload,
                "weights": ck.manifest["dtype_policy"]["weights"], "fp8_matmul": self.fp8_matmul,
                "loras": {c: [lo.record() for lo in los] for c, los in self.loras.items() if los},
                "kv_cache": self.kv_cache, "vae_chunk": self.vae_chunk, "vae_precision": self.vae_precision,
                "block_runs": None if gen.block_runs is None else gen.block_runs.tolist()} | inputs,
            "devices": {"backend": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
                        "processes": jax.process_count(), "jax": jax.__version__},
            "timings": gen.timings.as_dict(),
        }

    def warmup(self, height: int, width: int, num_frames: int, *, image=None, output_type: str = "uint8",
               max_sequence_length: int = 512) -> float:
        """Compile every executable a generation of this size needs, with a 2-step run (guidance > 1; both
        Wan 2.2 experts run the same executable). Later runs of any step count and guidance compile
        nothing. Returns the seconds spent."""
        t0 = time.perf_counter()
        self("warmup", "", height=height, width=width, num_frames=num_frames, num_inference_steps=2,
             guidance_scale=2.0, guidance_scale_2=2.0, image=image, output_type=output_type,
             max_sequence_length=max_sequence_length)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ compilation
    def _compile(self, timings: "Timings", key, fn, *args):
        """AOT-compile once per key (or load the executable a previous process compiled); the time is
        booked as compile time, apart from run time. Several processes: host inputs enter replicated."""
        multi = dist.multi_process()
        if multi:
            args = self._global(args)
        fp8 = self.fp8_matmul and key[0] in FP8_MATMUL_STAGES
        key = key + ("fp8-matmul",) if fp8 else key
        if key not in self._compiled:
            from .models.layers import fp8_matmul

            t0 = time.perf_counter()
            context = repr((self.ucfg, self.tcfgs, self.vcfg, self.ckpt.manifest.get("dtype_policy")))
            with fp8_matmul(fp8):
                self._compiled[key] = self.executables.get_or_compile(key, context, fn, *args)
            timings.compile += time.perf_counter() - t0
        compiled = self._compiled[key]
        if self.planner is not None:
            self.planner.record(key, compiled, args, self.params)
            return self.planner.zeros(compiled)
        return (lambda *a: compiled(*self._global(a))) if multi else compiled

    def _global(self, tree):
        return jax.tree.map(lambda x: dist.to_global(x, self.mesh), tree)


def _per_prompt(value, n: int, name: str) -> list:
    """One value for every prompt, or a list (tuple) with one per prompt."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise InputError(f"{name}: {len(value)} values for {n} prompts")
    return list(value)


def _rows(latents, n: int) -> list:
    """Initial latents for n videos: None each, or the rows of an (n, C, F', H', W') array."""
    if latents is None:
        return [None] * n
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 5 or latents.shape[0] != n:
        raise InputError(f"--latents: {n} videos need one row each, (N={n}, C, F', H', W'); got shape "
                         f"{list(latents.shape)}")
    return list(latents)


def vace_mask_latents(mask: np.ndarray, temporal: int, spatial: int, patch: int, references: int = 0) -> np.ndarray:
    """A VACE mask (1, C, F, H, W) in [0, 1] on the latent grid, as diffusers' ``WanVACEPipeline.prepare_masks``:
    its first channel's spatial x spatial pixel blocks folded into channels (1, spatial**2, F, H', W'), the
    frames subsampled to (F + temporal - 1) // temporal ("nearest-exact": frame floor((j + 0.5) F / F'),
    as torch computes it in float32), a zero frame in front per reference image."""
    m = np.asarray(mask, np.float32)[0, 0]
    f, h, w = m.shape
    nf, nh, nw = (f + temporal - 1) // temporal, h // (spatial * patch) * patch, w // (spatial * patch) * patch
    m = m.reshape(f, nh, spatial, nw, spatial).transpose(2, 4, 0, 1, 3).reshape(spatial * spatial, f, nh, nw)
    src = np.floor((np.arange(nf, dtype=np.float32) + np.float32(0.5)) * np.float32(f / nf)).astype(np.int64)
    m = m[:, np.minimum(src, f - 1)]
    return np.concatenate([np.zeros((spatial * spatial, references, nh, nw), np.float32), m], axis=1)[None]


def _check_batch(prompts: list, configs: list, images, latents, videos=None, vace: bool = False):
    """``generate_batch``'s inputs checked: a non-empty prompt and a config per video, one batch key (a
    batch of one: any config), an image for every video or for none, likewise an input video (video-to-video)
    and (VACE) as many reference images. Returns (images, latents, videos) per video."""
    n = len(prompts)
    images, latents, videos = ([None] * n if x is None else list(x) for x in (images, latents, videos))
    if n == 0 or len(configs) != n or len(images) != n or len(latents) != n or len(videos) != n:
        raise InputError(f"generate_batch: {n} prompts, {len(configs)} configs, {len(images)} images, "
                         f"{len(videos)} videos and {len(latents)} latents; give one of each per video")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError("--prompt: empty prompt")
    keys = [c.batch_key() for c in configs] if n > 1 else []
    for i, key in enumerate(keys):
        if key is None:
            raise InputError(f"generate_batch: video {i} uses step caching ({configs[i].cache.name}), which runs "
                             "one video at a time")
        if key != keys[0]:
            diff = ", ".join(k for (k, a), (_, b) in zip(keys[0], key) if a != b)
            raise InputError(f"generate_batch: videos 0 and {i} differ in {diff}; the videos of a batch share "
                             "every setting but the seed and the negative prompt")
    if n > 1 and len({im is None for im in images}) > 1:
        raise InputError("--image: the videos of a batch have an image each, or none has one")
    if n > 1 and not vace and len({v is None or v.video is None for v in videos}) > 1:
        raise InputError("--video: the videos of a batch have an input video each, or none has one")
    if n > 1 and len({0 if v is None else len(v.references) for v in videos}) > 1:
        raise InputError("--reference: the videos of a batch have as many reference images each")
    return images, latents, videos


def _split(latents, n: int) -> list:
    """Each of n videos' final latents, (1, C, F', H', W'); taken apart on the host for n > 1 (they are
    small, and a slice of a multi-process array is not addressable on every process)."""
    if n == 1:
        return [latents]
    host = dist.to_host(latents)
    return [jnp.asarray(host[i:i + 1]) for i in range(n)]


class _Stage:
    """Times one stage of a generation, less the compile time booked inside it."""

    def __init__(self, timings: "Timings", name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), self.timings.compile
        return self

    def wait(self, tree):
        jax.block_until_ready(tree)

    def __exit__(self, *exc):
        spent = time.perf_counter() - self.t0 - (self.timings.compile - self.c0)
        setattr(self.timings, self.name, spent)
        return False
