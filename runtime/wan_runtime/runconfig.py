"""One run configuration, resolved once and validated once, for the CLI, the Python API and the sidecar.

Every setting is resolved in one order: built-in defaults <- the checkpoint's own configs (the scheduler's
``flow_shift``, model_index's ``boundary_ratio``) <- the preset <- explicit values (flags, or the Python
API's arguments). A preset value that differs from the checkpoint's own is a deliberate override of a
published model's preset (e.g. flow shift 12 for Wan2.2-T2V-A14B): it applies, and the difference is kept
in ``overrides`` (wan-run says so in one line; the sidecar records both values). The ``tiny`` preset sets
no sampler values, so test checkpoints run with their own.

Validation needs only the checkpoint's configs, so a bad flag fails before any weights load; errors are
``InputError`` (a ValueError) naming the flag.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from . import caching, families
from . import presets as presets_lib

DEFAULT_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
SCHEDULERS = ("unipc", "euler", "euler-linear")
#: sampler settings a checkpoint carries itself (the preset overrides them only with a note)
FROM_CHECKPOINT = ("flow_shift", "boundary")
#: diffusers' WanVideoToVideoPipeline default: the fraction of the schedule a video-to-video run denoises
DEFAULT_STRENGTH = 0.8
#: what the videos of one batch may have each their own (their noise, their unconditional text rows), and
#: ``overrides``, a record of how the other settings were resolved
PER_VIDEO = ("seed", "negative_prompt", "overrides")


class InputError(ValueError):
    """A generation request that cannot run (names the argument / flag)."""


@dataclasses.dataclass(frozen=True, eq=False)
class VideoInputs:
    """A generation's video inputs, loaded (``video.load_frames``, ``image.load_image``): the input video
    (video-to-video) or VACE control video and the VACE mask as uint8 frames (F, H, W, 3), the VACE reference
    images as PIL images. Settings resolution and validation read their shapes only."""

    video: Any = None
    mask: Any = None
    references: tuple = ()

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The video's (frames, height, width), or None."""
        return None if self.video is None else tuple(int(n) for n in self.video.shape[:3])

    def __bool__(self) -> bool:
        return self.video is not None or self.mask is not None or bool(self.references)


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """Compute dtypes per component, and optional weight dtypes: by default weights keep the dtype they
    were converted to; ``weights`` / ``vae_weights`` recast them once after restore (norms and the
    other float32 modules stay float32: the converter's rule, format.stored_dtype).

    The fields' own defaults are the accelerators' (bf16 transformer and text encoder, float32 VAE);
    :meth:`default` is the platform's: on CPU everything float32, weights upcast once at load, because
    XLA:CPU's bf16 dots run ~3.5x slower than its float32 ones (it has no bf16 dot kernel)."""

    transformer: str = "bfloat16"
    text_encoder: str = "bfloat16"
    vae: str = "float32"
    scheduler: str = "float32"
    weights: str | None = None  # transformer(s), text and image encoders
    vae_weights: str | None = None

    @classmethod
    def all(cls, name: str) -> "Dtypes":
        return cls(name, name, name, "float32", name, name)

    @classmethod
    def default(cls, backend: str | None = None) -> "Dtypes":
        """The platform's defaults: ``all("float32")`` on the "cpu" backend (bf16 weights are upcast once,
        by the pipeline's cast_weights), the fields' own bf16 defaults on "gpu" / "tpu".
        ``backend``: None = ``jax.default_backend()``."""
        if backend is None:
            import jax  # only here: this module is read before JAX is needed (flag validation)

            backend = jax.default_backend()
        return cls.all("float32") if backend == "cpu" else cls()

    @classmethod
    def of(cls, dtype: "str | Dtypes | None", *, backend: str | None = None, **per) -> "Dtypes":
        """The Python API's ``dtype``: a Dtypes as is; None: the platform's :meth:`default` (of ``backend``);
        "float32": everything float32; anything else ("bfloat16"): the bf16 defaults (bf16 transformer and
        text encoder, float32 VAE, weights as converted). Then the per-component ``per`` values."""
        if isinstance(dtype, Dtypes):
            base = dtype
        elif dtype is None:
            base = cls.default(backend)
        else:
            base = cls.all(dtype) if dtype == "float32" else cls()
        return dataclasses.replace(base, **{k: v for k, v in per.items() if v})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a generation (named as wan-run's flags), resolved and validated."""

    height: int = 480
    width: int = 832
    frames: int = 81
    steps: int = 50
    guidance: float = 5.0
    guidance_2: float | None = None  # the low-noise expert's (None: ``guidance``)
    flow_shift: float = 3.0
    boundary: float | None = None  # Wan 2.2 A14B expert switch, a fraction of the 1000 train timesteps
    scheduler: str = "unipc"
    seed: int = 0
    negative_prompt: str = ""
    max_sequence_length: int = 512
    fps: int = 16
    #: video-to-video: the fraction of the schedule that runs from the noised input video (diffusers'
    #: ``strength``); None: no input video
    strength: float | None = None
    #: VACE: the control's scale, one for every VACE layer or one per layer (None: 1)
    conditioning_scale: float | tuple[float, ...] | None = None
    cache: caching.Policy = caching.Dense()
    mesh: str | None = None
    preset: str | None = None
    #: field -> (the checkpoint's value, the preset's value) where the preset overrode the checkpoint
    overrides: tuple = ()

    # -------------------------------------------------------------------- resolution
    @classmethod
    def resolve(cls, ckpt, preset: str | Mapping[str, Any] | None = None, image: bool = False,
                defaults: Mapping[str, Any] | None = None, inputs: VideoInputs | None = None,
                **explicit) -> "RunConfig":
        """defaults (the fields' own, updated by ``defaults``) <- checkpoint <- preset <- the input video's
        geometry (``inputs``: its frame count and size; video-to-video's default strength) <- ``explicit``
        (None values ignored), then validated.
        ``preset``: a name or .toml path, a loaded preset, "auto" (the checkpoint's published preset, or
        "tiny" for test-sized models), or None. ``explicit`` may also hold the step-caching settings
        (``cache``, ``cache_thresh``, ...: caching.SETTINGS) or a ready ``caching.Policy`` as ``cache``."""
        fam = families.get(ckpt.family)
        p = cls._preset(ckpt, preset)
        own = cls._from_checkpoint(ckpt, fam)
        values = {**(defaults or {}), **own}
        overrides = []
        for k, v in (p or {}).items():
            if k not in presets_lib.SETTINGS:
                continue
            if k in own and own[k] != v:
                overrides.append((k, own[k], v))
            values[k] = v
        values.update(_from_video(fam, ckpt, inputs))
        values.update({k: v for k, v in explicit.items() if v is not None})
        cache = values.pop("cache", None)
        cache_settings = {k: values.pop(k) for k in list(values) if k in caching.SETTINGS or k in (
            "cache_model", "cache_calibration")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"RunConfig: unknown setting {unknown[0]!r}")
        variant = fam.variant(preset=p["name"]) if p else None
        try:
            policy = cache.validate() if isinstance(cache, caching.Policy) else \
                caching.from_settings({"cache": cache, **cache_settings}, fam, variant, image)
        except ValueError as e:
            raise InputError(str(e)) from None
        if isinstance(values.get("conditioning_scale"), (list, tuple)):
            values["conditioning_scale"] = tuple(values["conditioning_scale"])
        config = cls(**values, cache=policy, preset=p["name"] if p else None,
                     overrides=tuple(o for o in overrides if o[0] not in explicit or explicit[o[0]] is None))
        return config.validate(ckpt, image, inputs)

    @staticmethod
    def _preset(ckpt, preset) -> dict | None:
        if preset is None or isinstance(preset, Mapping):
            p = dict(preset) if preset is not None else None
        elif preset == "auto":
            p = presets_lib.for_checkpoint(ckpt.family, ckpt.config("transformer"))
        else:
            p = presets_lib.load(preset)
        if p is not None:
            presets_lib.check_family(p, ckpt.family)
        return p

    @staticmethod
    def _from_checkpoint(ckpt, fam: families.Family) -> dict:
        out = {}
        shift = ckpt.scheduler_config.get("flow_shift")
        if shift is not None:
            out["flow_shift"] = float(shift)
        if fam.experts > 1 and ckpt.model_index.get("boundary_ratio") is not None:
            out["boundary"] = float(ckpt.model_index["boundary_ratio"])
        return out

    # -------------------------------------------------------------------- validation
    def validate(self, ckpt, image: bool = False, inputs: VideoInputs | None = None) -> "RunConfig":
        """Checks that need only the checkpoint's configs and the inputs' shapes (so a bad flag fails before
        any weights load)."""
        fam = families.get(ckpt.family)
        missing = [c for c in fam.components if c not in ckpt.components]
        if missing:
            raise InputError(f"--checkpoint: {ckpt.root} has no {missing[0]} (a partial checkpoint, converted "
                             f"with --only?); a {ckpt.family} generation needs {', '.join(fam.components)}")
        tokenizer = ckpt.root / "tokenizer" / "tokenizer.json"
        if not tokenizer.is_file():
            raise InputError(f"--checkpoint: {tokenizer} is missing; re-convert the source")
        check_video_inputs(fam, ckpt, self, image, inputs or VideoInputs())  # first: it explains the sizes
        self._check_size(ckpt)
        if self.steps < 1:
            raise InputError(f"--steps: must be >= 1, got {self.steps}")
        for flag, g in (("--guidance", self.guidance), ("--guidance-2", self.guidance_2)):
            if g is not None and not (np.isfinite(g) and g >= 0):
                raise InputError(f"{flag}: must be a finite number >= 0, got {g}")
        if not (np.isfinite(self.flow_shift) and self.flow_shift > 0):
            raise InputError(f"--flow-shift: must be a finite number > 0, got {self.flow_shift}")
        if self.boundary is not None and not 0 <= self.boundary <= 1:
            raise InputError(f"--preset: boundary must be in [0, 1], got {self.boundary}")
        if not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**32):
            # the PRNG key takes 32 bits: a larger seed would silently repeat a smaller one's video
            raise InputError(f"--seed: must be an integer in [0, 2**32), got {self.seed!r}")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"--scheduler: must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}")
        if self.fps < 1:
            raise InputError(f"--fps: must be >= 1, got {self.fps}")
        if self.max_sequence_length < 1:
            raise InputError(f"--preset: max_sequence_length must be >= 1, got {self.max_sequence_length}")
        check_image_input(fam, image)
        return self

    def _check_size(self, ckpt) -> None:
        vae_cfg, t_cfg = ckpt.config("vae"), ckpt.config("transformer")
        mult = int(vae_cfg.get("scale_factor_spatial", 8)) * int(t_cfg.get("patch_size", (1, 2, 2))[1])
        for flag, v in (("--height", self.height), ("--width", self.width)):
            if v <= 0 or v % mult:
                raise InputError(f"{flag}: {v} is not a positive multiple of {mult} (VAE x patch factor)")
        t = int(vae_cfg.get("scale_factor_temporal", 4))
        if self.frames < 1 or (self.frames - 1) % t:
            raise InputError(f"--frames: {self.frames} is not of the form {t}k+1 "
                             f"(e.g. {max(0, (self.frames - 1) // t) * t + 1})")

    def latent_shape(self, ckpt, references: int = 0) -> tuple[int, ...]:
        """(1, C, F', H', W') of the initial latents; VACE's reference images add a latent frame each, in
        front (diffusers: num_frames + references * the VAE's temporal factor)."""
        vae_cfg, t_cfg = ckpt.config("vae"), ckpt.config("transformer")
        s, t = int(vae_cfg.get("scale_factor_spatial", 8)), int(vae_cfg.get("scale_factor_temporal", 4))
        c = int(t_cfg.get("out_channels") or t_cfg["in_channels"])
        return (1, c, (self.frames - 1) // t + 1 + references, self.height // s, self.width // s)

    def check_latents(self, ckpt, shape, references: int = 0) -> None:
        want = self.latent_shape(ckpt, references)
        if tuple(shape) not in (want, want[1:]):
            raise InputError(f"--latents: shape {list(shape)} but this request needs {list(want[1:])} "
                             f"(or {list(want)})")

    # -------------------------------------------------------------------- derived
    @property
    def guidance_low(self) -> float:
        return self.guidance if self.guidance_2 is None else self.guidance_2

    def batch_key(self, image: bool = False, video: "VideoInputs | None" = None) -> tuple | None:
        """The settings class of this generation: configs with equal keys may run as one batch (one denoise
        loop over their videos, CFG as 2B rows). Every field but ``PER_VIDEO``'s, as (name, value) pairs, and
        the inputs the videos of a batch must share: an image each or none, an input video each or none, as
        many reference images (``image``, ``video``: this generation's). None: the config runs alone: a
        step-caching policy's skip decisions would be shared by the batch. wan-run, wan-serve and
        ``WanPipeline.__call__`` group by it."""
        if type(self.cache) is not caching.Dense:
            return None
        has_video = video is not None and video.video is not None
        refs = len(video.references) if video is not None else 0
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in PER_VIDEO) + \
            (("image", bool(image)), ("video", has_video), ("references", refs))

    def first_step(self) -> int:
        """The first step that runs: video-to-video keeps the last int(steps * strength) steps of the
        schedule (diffusers' ``get_timesteps``); 0 otherwise."""
        if self.strength is None:
            return 0
        return self.steps - min(int(self.steps * self.strength), self.steps)

    def control_scale(self, layers: int) -> tuple[float, ...]:
        """VACE: the conditioning scale of each of the ``layers`` VACE layers."""
        s = 1.0 if self.conditioning_scale is None else self.conditioning_scale
        return tuple(float(x) for x in s) if isinstance(s, tuple) else (float(s),) * layers

    def do_cfg(self, experts: int) -> bool:
        return self.guidance > 1.0 or (experts > 1 and self.guidance_low > 1.0)

    def notes(self) -> list[str]:
        """One line per preset value that overrides the checkpoint's own."""
        return [f"preset {self.preset} sets {k} {p:g}; the checkpoint's own is {c:g}" for k, c, p in self.overrides]

    def record(self) -> dict:
        """The settings as the sidecar JSON records them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("cache", "overrides")}
        out["cache"] = self.cache.settings()
        out["overridden"] = {k: {"checkpoint": c, "preset": p} for k, c, p in self.overrides}
        return out


def group_batches(keys: Sequence[Hashable | None], max_batch: int | None = None) -> list[list[int]]:
    """Indices of jobs grouped into batches by their keys (``RunConfig.batch_key``, or a key made from it):
    equal keys together, the batches in the order their key first appears, at most ``max_batch`` jobs each
    (None: no limit); a job whose key is None is a batch of its own, at its place in that order."""
    groups: dict[Hashable, list[int]] = {}
    order: list[list[int]] = []
    for i, key in enumerate(keys):
        if key is None:
            order.append([i])
        elif key in groups:
            groups[key].append(i)
        else:
            order.append(groups.setdefault(key, [i]))
    size = max_batch or max(1, len(keys))
    return [group[j:j + size] for group in order for j in range(0, len(group), size)]


def check_image_input(fam: families.Family, has_image: bool) -> None:
    if fam.image_input == "required" and not has_image:
        raise InputError(f"--image: {fam.name} is an image-to-video model; pass --image")
    if fam.image_input == "none" and has_image:
        raise InputError(f"--image: {fam.name} is a text-to-video model and takes no image")


def _from_video(fam: families.Family, ckpt, inputs: VideoInputs | None) -> dict:
    """The settings an input video gives unless a flag sets them: its frame count and its size, floored to
    the model's size multiple (as diffusers' WanVACEPipeline does; the frames are resized to the size, as
    both diffusers pipelines do), and video-to-video's default strength."""
    if inputs is None or inputs.video is None:
        return {}
    frames, height, width = inputs.shape
    height, width = vace_video_size(height, width, height, width, _size_multiple(ckpt))
    out = {"frames": frames, "height": height, "width": width}
    if not fam.vace and fam.image_mode != "concat":
        out["strength"] = DEFAULT_STRENGTH
    return out


def check_video_inputs(fam: families.Family, ckpt, config: RunConfig, image: bool, inputs: VideoInputs) -> None:
    """The video inputs against the family and the settings: video-to-video (an input video and
    --strength) on the text-to-video families, control video / mask / reference images / conditioning scale
    on the VACE ones, frame counts and sizes that fit together."""
    if inputs.mask is not None and inputs.video is None:
        raise InputError("--mask: needs --video (the mask marks the control video's pixels to generate)")
    if fam.vace:
        return _check_vace(ckpt, config, image, inputs)
    for flag, given in (("--mask", inputs.mask is not None), ("--reference", bool(inputs.references)),
                        ("--conditioning-scale", config.conditioning_scale is not None)):
        if given:
            raise InputError(f"{flag}: {fam.name} is not a VACE model (a VACE checkpoint takes masks, reference "
                             "images and a conditioning scale)")
    if inputs.video is None:
        if config.strength is not None:
            raise InputError("--strength: needs --video (video-to-video)")
        return
    if fam.image_mode == "concat":
        raise InputError(f"--video: {fam.name} is an image-to-video model; video-to-video runs on text-to-video "
                         "checkpoints (and control videos on VACE ones)")
    if image:
        raise InputError("--image: not with --video (video-to-video starts from the video alone)")
    s = config.strength
    if s is None or not (np.isfinite(s) and 0 < s <= 1):
        raise InputError(f"--strength: must be a number in (0, 1], got {s}")
    if int(config.steps * s) < 1:
        raise InputError(f"--strength: {s} of {config.steps} steps runs no step; raise --strength or --steps")
    if type(config.cache) is not caching.Dense:
        raise InputError(f"--cache: {config.cache.name} is not for video-to-video (its plans assume the whole "
                         "schedule; --strength starts partway)")
    _check_frames(ckpt, config, inputs)


def _size_multiple(ckpt) -> int:
    """Heights and widths are multiples of this: the VAE's spatial factor times the patch's."""
    patch = ckpt.config("transformer").get("patch_size", (1, 2, 2))
    return int(ckpt.config("vae").get("scale_factor_spatial", 8)) * int(patch[1])


def _check_frames(ckpt, config: RunConfig, inputs: VideoInputs) -> None:
    """The input video's frames: at least one, 4k+1 of them, as many as --frames asks for."""
    frames, t = inputs.shape[0], int(ckpt.config("vae").get("scale_factor_temporal", 4))
    if frames < 1:
        raise InputError("--video: no frames")
    if (frames - 1) % t:
        raise InputError(f"--video: {frames} frames; it needs {t}k+1 (e.g. its first {(frames - 1) // t * t + 1})")
    if config.frames != frames:
        raise InputError(f"--frames: {config.frames}, but --video has {frames} frames")


def _check_vace(ckpt, config: RunConfig, image: bool, inputs: VideoInputs) -> None:
    """VACE: no --strength or --image; the control video at the generation's size (diffusers' rule: a larger
    video is scaled down, aspect kept, to multiples of 16), a mask of the video's frames and size, one
    conditioning scale or one per VACE layer."""
    from .configs import WanTransformerConfig

    if config.strength is not None:
        raise InputError("--strength: a VACE model takes --video as a control, not as a start (no --strength)")
    if image:
        raise InputError("--image: a VACE model takes --reference images (and a control --video), not --image")
    layers = len(WanTransformerConfig.from_config(ckpt.config("transformer")).vace_layers)
    s = config.conditioning_scale
    scales = s if isinstance(s, tuple) else (() if s is None else (s,))
    if isinstance(s, tuple) and len(s) != layers:
        raise InputError(f"--conditioning-scale: {len(s)} values for {layers} VACE layers (give one, or one per "
                         "layer)")
    if not all(isinstance(x, (int, float, np.floating, np.integer)) and np.isfinite(x) for x in scales):
        raise InputError(f"--conditioning-scale: finite numbers, got {s!r}")
    for img in inputs.references:
        if min(img.size) < 8:
            raise InputError(f"--reference: a {img.size[0]}x{img.size[1]} image; at least 8x8 pixels")
    if inputs.video is None:
        return
    _check_frames(ckpt, config, inputs)
    frames, height, width = inputs.shape
    if inputs.mask is not None and tuple(inputs.mask.shape[:3]) != (frames, height, width):
        f, h, w = inputs.mask.shape[:3]
        raise InputError(f"--mask: {f} frames of {w}x{h}, but --video has {frames} frames of {width}x{height}")
    size = vace_video_size(height, width, config.height, config.width, _size_multiple(ckpt))
    if size != (config.height, config.width):
        raise InputError(f"--video: its {width}x{height} frames condition at {size[1]}x{size[0]} (diffusers "
                         f"scales a larger video down, aspect kept, to multiples of 16), not --width {config.width} "
                         f"--height {config.height}")


def vace_video_size(video_height: int, video_width: int, height: int, width: int, base: int = 16) -> tuple[int, int]:
    """The size a VACE control video conditions at (diffusers' ``WanVACEPipeline.preprocess_conditions``):
    floored to multiples of 8, scaled down (aspect kept) if its area exceeds height x width, floored to
    multiples of ``base`` (the VAE's times the patch's spatial factor)."""
    h, w = video_height - video_height % 8, video_width - video_width % 8
    if h * w > height * width:
        scale = min(width / w, height / h)
        h, w = int(h * scale), int(w * scale)
    return h // base * base, w // base * base
