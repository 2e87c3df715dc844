"""Typed, static configs of the Wan model components, each parsed once from its config.json dict.

JAX-free: ``wan_runtime.format`` builds the param trees from these (so does the converter, through it)
and the models run from them. ``from_config`` reads a diffusers / transformers config.json: a key that
is absent takes the library's default, a required key that is absent or a value of the wrong type is a
``format.FormatError`` naming the key. The configs are frozen and hashable (static jit arguments).

The VAE's architecture is described here once, as a walk of :class:`VAEOp` (:func:`vae_encoder_ops`,
:func:`vae_decoder_ops`): the param tree takes each op's parameter shapes (:func:`vae_params`), the
VAE forward interprets the same ops.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

_REQUIRED = object()

#: transformers ACT2FN names the CLIP tower supports (``models/clip.py`` implements each).
CLIP_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh")


def _error(message: str) -> Exception:
    # format imports this module to build its trees; its error class is reached at raise time only
    from .format import FormatError

    return FormatError(message)


class _Reader:
    """One component's config.json dict; every error names the component and the key."""

    def __init__(self, cfg: Any, name: str, prefix: str = ""):
        if not isinstance(cfg, Mapping):
            raise _error(f"{name} config{' ' + prefix[:-1] if prefix else ''} is not a JSON object")
        self.cfg, self.name, self.prefix = cfg, name, prefix

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.cfg:
            return self.cfg[key]
        if default is _REQUIRED:
            raise _error(f"{self.name} config has no {self.prefix + key!r}")
        return default

    def bad(self, key: str, what: str) -> Exception:
        return _error(f"{self.name} config does not describe a Wan {self.name}: "
                      f"{self.prefix}{key}={self.cfg.get(key)!r} is not {what}")

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> Any:
        """An int >= minimum; absent or null: ``default`` (a null required key is a bad value)."""
        v = self.value(key, default)
        if v is None and default is not _REQUIRED:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.bad(key, f"an integer >= {minimum}")
        return v

    def optional(self, key: str) -> int | None:
        """A positive int, or None where absent, null or 0 (diffusers tests these keys for truth)."""
        return self.integer(key, None, minimum=0) or None

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        v = self.value(key, default)
        if v is None and default is not _REQUIRED:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.bad(key, "a number")
        return float(v)

    def sequence(self, key: str, default: tuple, item, what: str) -> tuple:
        """A list mapped through ``item`` (absent or null: ``default``)."""
        v = self.value(key, default)
        if v is None:
            return default
        if isinstance(v, (str, Mapping)) or not hasattr(v, "__iter__"):
            raise self.bad(key, f"a list of {what}")
        try:
            return tuple(item(x) for x in v)
        except (TypeError, ValueError):
            raise self.bad(key, f"a list of {what}") from None

    def choice(self, key: str, default: Any, allowed) -> Any:
        v = self.value(key, default)
        if v not in allowed:
            raise self.bad(key, f"one of {', '.join(map(repr, allowed))}")
        return v


def _int_item(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(x)
    return x


def _index_item(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(x)
    return x


def _float_item(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(x)
    return float(x)


# --------------------------------------------------------------------------------------------
# Transformer, text encoder, image encoder
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WanTransformerConfig:
    """diffusers ``WanTransformer3DModel`` (defaults: diffusers' ``__init__`` defaults)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_heads: int = 40
    head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    #: VACE (``WanVACETransformer3DModel``): the main blocks that take a control hint, hint k after block
    #: ``vace_layers[k]`` (strictly increasing, from 0), and the control latents' channels; () / 0 otherwise
    vace_layers: tuple[int, ...] = ()
    vace_in_channels: int = 0

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def vace(self) -> bool:
        return bool(self.vace_layers)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "transformer") -> "WanTransformerConfig":
        """From transformer/config.json. The widths and depths are required (a diffusers config always
        has them); ``cross_attn_norm`` and ``qk_norm`` are taken for truth as diffusers does (null: off)."""
        r, d = _Reader(cfg, name), cls()
        patch = r.sequence("patch_size", d.patch_size, _int_item, "3 positive integers")
        if len(patch) != 3:
            raise r.bad("patch_size", "3 positive integers")
        qk_norm = r.value("qk_norm", d.qk_norm)
        if qk_norm is not None and not isinstance(qk_norm, str):
            raise r.bad("qk_norm", "a norm name or null")
        cin = r.integer("in_channels")
        return cls(
            patch_size=patch, num_heads=r.integer("num_attention_heads"), head_dim=r.integer("attention_head_dim"),
            in_channels=cin, out_channels=r.integer("out_channels", 0, minimum=0) or cin,  # diffusers: `or`
            text_dim=r.integer("text_dim"), freq_dim=r.integer("freq_dim"), ffn_dim=r.integer("ffn_dim"),
            num_layers=r.integer("num_layers"), cross_attn_norm=bool(r.value("cross_attn_norm", True)),
            qk_norm=qk_norm or None, eps=r.number("eps", d.eps), image_dim=r.optional("image_dim"),
            added_kv_proj_dim=r.optional("added_kv_proj_dim"), pos_embed_seq_len=r.optional("pos_embed_seq_len"),
            rope_max_seq_len=r.integer("rope_max_seq_len", d.rope_max_seq_len), **_vace(r))


#: ``WanVACETransformer3DModel.__init__`` defaults (a VACE config.json that lacks the keys takes them)
VACE_DEFAULTS = {"vace_layers": (0, 5, 10, 15, 20, 25, 30, 35), "vace_in_channels": 96}


def _vace(r: _Reader) -> dict:
    """vace_layers / vace_in_channels of a transformer config.json: present (or the VACE class's defaults)
    in a VACE transformer's, absent in a plain one's. The layers must be strictly increasing from 0 and
    below num_layers (diffusers requires 0 and adds hint k after block ``vace_layers[k]``)."""
    vace_class = r.cfg.get("_class_name") == "WanVACETransformer3DModel"
    if not vace_class and r.cfg.get("vace_layers") is None:
        return {}
    layers = r.sequence("vace_layers", VACE_DEFAULTS["vace_layers"], _index_item, "block indices")
    if not layers or layers[0] != 0 or any(b <= a for a, b in zip(layers, layers[1:])) or \
            layers[-1] >= r.integer("num_layers"):
        raise r.bad("vace_layers", "strictly increasing block indices from 0, below num_layers")
    return {"vace_layers": layers, "vace_in_channels": r.integer("vace_in_channels", VACE_DEFAULTS["vace_in_channels"])}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """transformers ``UMT5EncoderModel`` (Wan's text encoder)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "text_encoder") -> "UMT5Config":
        """From text_encoder/config.json (a transformers ``UMT5Config`` dict)."""
        r = _Reader(cfg, name)
        r.choice("feed_forward_proj", "gated-gelu", ("gated-gelu",))  # Wan's UMT5 is gated-GELU
        return cls(
            vocab_size=r.integer("vocab_size"), d_model=r.integer("d_model"), d_kv=r.integer("d_kv"),
            d_ff=r.integer("d_ff"), num_layers=r.integer("num_layers"), num_heads=r.integer("num_heads"),
            num_buckets=r.integer("relative_attention_num_buckets", 32),
            max_distance=r.integer("relative_attention_max_distance", 128),
            eps=r.number("layer_norm_epsilon", 1e-6))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionModel`` (Wan 2.1 I2V's image encoder)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    hidden_act: str
    eps: float

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "image_encoder") -> "CLIPVisionConfig":
        """From image_encoder/config.json: a ``CLIPVisionConfig`` dict or a full ``CLIPConfig`` dict."""
        r = _Reader(cfg, name)
        if "vision_config" in r.cfg:
            r = _Reader(r.cfg["vision_config"], name, "vision_config.")
        hidden, heads = r.integer("hidden_size"), r.integer("num_attention_heads")
        if hidden % heads:
            raise r.bad("hidden_size", f"a multiple of num_attention_heads ({heads})")
        return cls(
            hidden_size=hidden, intermediate_size=r.integer("intermediate_size"),
            num_layers=r.integer("num_hidden_layers"), num_heads=heads, patch_size=r.integer("patch_size"),
            image_size=r.integer("image_size"), num_channels=r.integer("num_channels", 3),
            hidden_act=r.choice("hidden_act", "quick_gelu", CLIP_ACTIVATIONS), eps=r.number("layer_norm_eps", 1e-5))


# --------------------------------------------------------------------------------------------
# VAE: config and architecture
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKLWan`` (Wan 2.1; Wan 2.2 with ``is_residual``), diffusers' names and defaults."""

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
    def from_config(cls, cfg: Mapping[str, Any], name: str = "vae") -> "VAEConfig":
        """From vae/config.json (every key optional)."""
        r, d = _Reader(cfg, name), cls()
        base = r.integer("base_dim", d.base_dim)
        mult = r.sequence("dim_mult", d.dim_mult, _int_item, "positive integers")
        tdown = r.sequence("temperal_downsample", d.temperal_downsample, bool, "booleans")
        if not mult or len(tdown) < len(mult) - 1:
            raise r.bad("temperal_downsample", f"{len(mult) - 1} booleans (one per downsampling of dim_mult)")
        return cls(
            z_dim=r.integer("z_dim", d.z_dim), base_dim=base,
            decoder_base_dim=r.integer("decoder_base_dim", 0, minimum=0) or base, dim_mult=mult,
            num_res_blocks=r.integer("num_res_blocks", d.num_res_blocks),
            attn_scales=r.sequence("attn_scales", (), _float_item, "numbers"), temperal_downsample=tdown,
            is_residual=bool(r.value("is_residual", False)), in_channels=r.integer("in_channels", d.in_channels),
            out_channels=r.integer("out_channels", d.out_channels), patch_size=r.optional("patch_size"),
            scale_factor_temporal=r.integer("scale_factor_temporal", 0, minimum=0) or d.scale_factor_temporal,
            scale_factor_spatial=r.integer("scale_factor_spatial", 0, minimum=0) or d.scale_factor_spatial,
            latents_mean=r.sequence("latents_mean", (), _float_item, "numbers"),
            latents_std=r.sequence("latents_std", (), _float_item, "numbers"))


@dataclasses.dataclass(frozen=True)
class VAEOp:
    """One step of the VAE's module walk, ``cin`` -> ``cout`` channels. ``kind``:

    conv   WanCausalConv3d 3x3x3 (cached)     proj   1x1x1 conv (quant_conv, post_quant_conv)
    res    WanResidualBlock (two cached convs) attn   WanAttentionBlock (per frame)
    head   RMS norm + SiLU                     down / up   WanResample (``mode`` "2d" | "3d")
    block  ``body`` ops plus a parameter-free shortcut (``mode`` "avgdown" | "dupup" | "": Wan 2.2),
           ``ft`` / ``fs`` its temporal / spatial factors
    """

    kind: str
    path: str
    cin: int
    cout: int
    mode: str = ""
    body: tuple["VAEOp", ...] = ()
    ft: int = 1
    fs: int = 1


def _mid(prefix: str, c: int) -> list[VAEOp]:
    return [VAEOp("res", f"{prefix}.resnets.0", c, c), VAEOp("attn", f"{prefix}.attentions.0", c, c),
            VAEOp("res", f"{prefix}.resnets.1", c, c)]


def _flat_down_stage(cfg: VAEConfig, s: int, c: int, cout: int, k: int, scale: float) -> tuple[list, int]:
    """Wan 2.1 encoder stage s: resnets (+ attention at attn_scales) and a downsampler, numbered on in
    one flat ``down_blocks`` list from index k. Returns (ops, next k)."""
    ops = []
    for _ in range(cfg.num_res_blocks):
        ops.append(VAEOp("res", f"encoder.down_blocks.{k}", c, cout))
        c, k = cout, k + 1
        if scale in cfg.attn_scales:
            ops.append(VAEOp("attn", f"encoder.down_blocks.{k}", c, c))
            k += 1
    if s != len(cfg.dim_mult) - 1:
        ops.append(VAEOp("down", f"encoder.down_blocks.{k}", c, c, "3d" if cfg.temperal_downsample[s] else "2d"))
        k += 1
    return ops, k


def vae_encoder_ops(cfg: VAEConfig) -> tuple[VAEOp, ...]:
    """``WanEncoder3d`` then ``quant_conv``: conv_in, down stages (a flat list of modules for Wan 2.1,
    residual blocks with an AvgDown3D shortcut for 2.2), mid block, head, conv_out."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    ops, c, k = [VAEOp("conv", "encoder.conv_in", cfg.in_channels, dims[0])], dims[0], 0
    for s, cout in enumerate(dims[1:]):
        down = s != len(cfg.dim_mult) - 1
        tdown = down and cfg.temperal_downsample[s]
        if not cfg.is_residual:
            stage, k = _flat_down_stage(cfg, s, c, cout, k, 0.5 ** s)
            ops, c = ops + stage, cout
            continue
        p = f"encoder.down_blocks.{s}"
        body = [VAEOp("res", f"{p}.resnets.{r}", c if r == 0 else cout, cout) for r in range(cfg.num_res_blocks)]
        body += [VAEOp("down", f"{p}.downsampler", cout, cout, "3d" if tdown else "2d")] if down else []
        ops.append(VAEOp("block", p, c, cout, "avgdown", tuple(body), 2 if tdown else 1, 2 if down else 1))
        c = cout
    z2 = 2 * cfg.z_dim
    return tuple(ops + _mid("encoder.mid_block", c) + [
        VAEOp("head", "encoder.norm_out", c, c), VAEOp("conv", "encoder.conv_out", c, z2),
        VAEOp("proj", "quant_conv", z2, z2)])


def vae_decoder_ops(cfg: VAEConfig) -> tuple[VAEOp, ...]:
    """``post_quant_conv`` then ``WanDecoder3d``: conv_in, mid block, up blocks (resnets + upsampler;
    Wan 2.1's upsampler halves the channels, 2.2's keeps them and adds a DupUp3D shortcut), head, conv_out."""
    dims = [cfg.decoder_base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    tup, z, c = cfg.temperal_downsample[::-1], cfg.z_dim, dims[0]
    ops = [VAEOp("proj", "post_quant_conv", z, z), VAEOp("conv", "decoder.conv_in", z, c)]
    ops += _mid("decoder.mid_block", c)
    for s, cout in enumerate(dims[1:]):
        p, up = f"decoder.up_blocks.{s}", s != len(cfg.dim_mult) - 1
        mode = "3d" if up and tup[s] else "2d"
        body = [VAEOp("res", f"{p}.resnets.{r}", c if r == 0 else cout, cout) for r in range(cfg.num_res_blocks + 1)]
        c = cout
        if up:
            path = f"{p}.upsampler" if cfg.is_residual else f"{p}.upsamplers.0"
            body.append(VAEOp("up", path, cout, cout if cfg.is_residual else cout // 2, mode))
            c = body[-1].cout
        short = "dupup" if cfg.is_residual and up else ""
        ops.append(VAEOp("block", p, body[0].cin, cout, short, tuple(body), 2 if mode == "3d" else 1, 2))
    return tuple(ops + [VAEOp("head", "decoder.norm_out", c, c),
                        VAEOp("conv", "decoder.conv_out", c, cfg.out_channels)])


def _conv(path: str, cout: int, cin: int, *kernel: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{path}.weight", (cout, cin, *kernel)), (f"{path}.bias", (cout,))]


def _op_params(op: VAEOp) -> list[tuple[str, tuple[int, ...]]]:
    """(path, torch shape) of the parameters of one op, as diffusers names them."""
    p, i, o = op.path, op.cin, op.cout
    if op.kind == "conv":
        return _conv(p, o, i, 3, 3, 3)
    if op.kind == "proj":
        return _conv(p, o, i, 1, 1, 1)
    if op.kind == "head":
        return [(f"{p}.gamma", (i,))]
    if op.kind == "attn":
        return [(f"{p}.norm.gamma", (i,)), *_conv(f"{p}.to_qkv", 3 * i, i, 1, 1), *_conv(f"{p}.proj", i, i, 1, 1)]
    if op.kind == "res":
        out = [(f"{p}.norm1.gamma", (i,)), *_conv(f"{p}.conv1", o, i, 3, 3, 3),
               (f"{p}.norm2.gamma", (o,)), *_conv(f"{p}.conv2", o, o, 3, 3, 3)]
        return out + (_conv(f"{p}.conv_shortcut", o, i, 1, 1, 1) if i != o else [])
    if op.kind in ("down", "up"):
        time = _conv(f"{p}.time_conv", 2 * i if op.kind == "up" else i, i, 3, 1, 1) if op.mode == "3d" else []
        return _conv(f"{p}.resample.1", o, i, 3, 3) + time
    if op.kind == "block":
        return [leaf for sub in op.body for leaf in _op_params(sub)]
    raise ValueError(f"unknown VAE op {op.kind!r}")


def vae_params(cfg: VAEConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(path, torch shape) of every VAE parameter: the encoder's ops, then the decoder's."""
    for op in vae_encoder_ops(cfg) + vae_decoder_ops(cfg):
        yield from _op_params(op)


#: component -> its config type (``transformer_2`` is a second transformer).
BY_COMPONENT = {"transformer": WanTransformerConfig, "transformer_2": WanTransformerConfig,
                "text_encoder": UMT5Config, "image_encoder": CLIPVisionConfig, "vae": VAEConfig}


def parse(component: str, cfg: Any):
    """The typed config of ``component`` from its config.json dict (a typed config passes through)."""
    cls = BY_COMPONENT[component]
    return cfg if isinstance(cfg, cls) else cls.from_config(cfg, component)
