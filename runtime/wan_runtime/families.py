"""The one registry of Wan families: what each is, how it is recognised, what it needs.

Everything that asks "which family is this" or "what does this family need" asks this module: the
converter (which diffusers pipelines it reads, which components), the format (manifest families, what a
complete checkpoint holds), the pipeline (experts, how an image conditions the model), presets (the
preset of each published variant) and step caching (published calibration curves). JAX-free and
import-free, so every layer may use it.

A family is a frozen dataclass; adding one is one entry in ``FAMILIES`` (plus its param tree and hooks
where it differs: see the README's "Adding a family").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

#: components in restore order (the text encoder first: the first generation stage needs it)
COMPONENTS = ("text_encoder", "image_encoder", "transformer", "transformer_2", "vae")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One published model of a family: its preset (configs/<preset>.toml) and step-cache curves."""

    preset: str
    heads: int  # transformer num_attention_heads: tells the published sizes of a family apart
    magcache: str | tuple[str, str] | None = None  # calibration key; a pair = (text-only, with image)
    teacache: str | None = None  # TeaCache4Wan2.1 coefficients key
    auto: bool = True  # picked for a checkpoint of this size (False: another variant of the same size is)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    #: diffusers pipeline classes (model_index.json ``_class_name``) whose repositories are this family
    pipelines: tuple[str, ...]
    #: recognises the family from model_index.json, the transformer's and the VAE's config.json
    detect: Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], bool]
    experts: int = 1  # Wan 2.2 A14B: a high-noise and a low-noise transformer
    #: how a first-frame image enters the model: "none" (text-to-video), "concat" (I2V: mask + image
    #: latents concatenated to the input channels; image required), "expand" (TI2V: latent frame 0 is the
    #: image's, with per-token timesteps; image optional)
    image_mode: str = "none"
    clip: bool = False  # CLIP image tokens in the cross-attention context (Wan 2.1 I2V)
    variants: tuple[Variant, ...] = ()
    #: MagCache4Wan2.2 "i2v" mode: the high-noise expert is never cached (its script's rule)
    magcache_high_noise: bool = True
    #: VACE (``WanVACEPipeline``): the transformer(s) take control latents (video, mask, reference images)
    #: through their VACE blocks (``models/transformer.vace_hints``) and a conditioning scale per VACE layer
    vace: bool = False

    @property
    def components(self) -> tuple[str, ...]:
        """What a complete checkpoint of this family holds (what a generation needs)."""
        need = {"text_encoder", "transformer", "vae"} | ({"transformer_2"} if self.experts == 2 else set()) | \
            ({"image_encoder"} if self.clip else set())
        return tuple(c for c in COMPONENTS if c in need)

    @property
    def image_input(self) -> str:
        """"required", "optional" or "none": whether a generation takes a first-frame image."""
        return {"none": "none", "concat": "required", "expand": "optional"}[self.image_mode]

    @property
    def expert_names(self) -> tuple[str, ...]:
        return ("transformer", "transformer_2")[:self.experts]

    def variant(self, heads: int | None = None, preset: str | None = None) -> Variant | None:
        """The published variant with this preset name, else the auto one with this many heads."""
        for v in self.variants:
            if v.preset == preset or (preset is None and v.heads == heads and v.auto):
                return v
        return None


def _z(vae: Mapping[str, Any]) -> int:
    return int(vae.get("z_dim", 16))


def _two(index: Mapping[str, Any]) -> bool:
    v = index.get("transformer_2")
    return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None


def _vace(index: Mapping[str, Any], t: Mapping[str, Any]) -> bool:
    """A VACE transformer: a config with VACE layers, or diffusers' VACE class (whose default has them). The
    pipeline class alone does not make one (the converter refuses a repo whose class and transformer disagree)."""
    return bool(t.get("vace_layers")) or t.get("_class_name") == "WanVACETransformer3DModel"


def _image_channels(t: Mapping[str, Any], vae: Mapping[str, Any]) -> bool:
    """I2V input: latents + 4 mask channels + image latents (36 for the Wan 2.1 VAE)."""
    return t.get("in_channels") == 2 * _z(vae) + 4


FAMILIES: tuple[Family, ...] = (
    # VACE first: its transformers are text-to-video ones with VACE blocks, which the T2V rules would take.
    # Presets: Wan-AI/Wan2.1-VACE-{1.3B,14B}-diffusers; MagCache4Wan2.1 publishes VACE curves, TeaCache none.
    # Wan 2.2 VACE (alibaba-pai's Wan2.2-VACE-Fun-A14B, two experts, boundary 0.875 in diffusers' conversion
    # script) has no Wan-AI diffusers repository nor published cache curves: no variant.
    Family("wan2.2-vace-a14b", ("WanVACEPipeline",), lambda i, t, v: _vace(i, t) and _two(i), experts=2,
           vace=True),
    Family("wan2.1-vace", ("WanVACEPipeline",), lambda i, t, v: _vace(i, t) and not _two(i), vace=True,
           variants=(Variant("wan2.1-vace-1.3b", 12, "wan2.1_vace_1.3B"),
                     Variant("wan2.1-vace-14b", 40, "wan2.1_vace_14B"))),
    Family("wan2.2-ti2v-5b", ("WanPipeline", "WanImageToVideoPipeline"),
           lambda i, t, v: bool(i.get("expand_timesteps")) or _z(v) == 48, image_mode="expand",
           variants=(Variant("wan2.2-ti2v-5b", 24, ("wan2.2_ti2v_5B_t2v", "wan2.2_ti2v_5B_i2v")),)),
    Family("wan2.2-i2v-a14b", ("WanImageToVideoPipeline",), lambda i, t, v: _two(i) and _image_channels(t, v),
           experts=2, image_mode="concat", magcache_high_noise=False,
           variants=(Variant("wan2.2-i2v-a14b", 40, "wan2.2_i2v_A14B"),)),
    Family("wan2.2-t2v-a14b", ("WanPipeline",), lambda i, t, v: _two(i) and t.get("in_channels") == _z(v),
           experts=2, variants=(Variant("wan2.2-t2v-a14b", 40, "wan2.2_t2v_A14B"),)),
    Family("wan2.1-i2v", ("WanImageToVideoPipeline",),
           lambda i, t, v: not _two(i) and (_image_channels(t, v) or bool(t.get("image_dim"))),
           image_mode="concat", clip=True,
           variants=(Variant("wan2.1-i2v-14b-480p", 40, "wan2.1_i2v_14B_480P", "ret_steps_i2v_480P"),
                     Variant("wan2.1-i2v-14b-720p", 40, "wan2.1_i2v_14B_720P", "ret_steps_i2v_720P", auto=False))),
    Family("wan2.1-t2v", ("WanPipeline",), lambda i, t, v: not _two(i) and t.get("in_channels") == _z(v),
           variants=(Variant("wan2.1-t2v-1.3b", 12, "wan2.1_t2v_1.3B", "ret_steps_1.3B"),
                     Variant("wan2.1-t2v-14b", 40, "wan2.1_t2v_14B", "ret_steps_14B"))),
)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
NAMES: tuple[str, ...] = tuple(sorted(BY_NAME))
#: every diffusers pipeline class some family reads
PIPELINES: tuple[str, ...] = tuple(sorted({p for f in FAMILIES for p in f.pipelines}))


def get(name: str) -> Family:
    if name not in BY_NAME:
        raise ValueError(f"unknown Wan family {name!r}; known: {', '.join(NAMES)}")
    return BY_NAME[name]


def detect(model_index: Mapping[str, Any], transformer_cfg: Mapping[str, Any],
           vae_cfg: Mapping[str, Any] | None = None) -> Family:
    """The family of a diffusers repository (or converted checkpoint) from its configs; the first
    family whose rule matches, in ``FAMILIES`` order."""
    vae_cfg = vae_cfg or {}
    for fam in FAMILIES:
        if fam.detect(model_index, transformer_cfg, vae_cfg):
            return fam
    raise ValueError(f"unsupported Wan variant (transformer in_channels={transformer_cfg.get('in_channels')}, "
                     f"vae z_dim={_z(vae_cfg)})")


def preset_family(preset: str) -> Family | None:
    """The family a published preset belongs to (None: not a published model's preset, e.g. "tiny")."""
    return next((f for f in FAMILIES for v in f.variants if v.preset == preset), None)
