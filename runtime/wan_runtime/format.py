"""The converted-checkpoint format: the one contract between wan-convert and wan-run.

A converted checkpoint is a folder::

    manifest.json                      format version, family, source, dtype policy, mesh, components
    model_index.json                   copied from the source
    tokenizer/ scheduler/ ...          copied from the source
    <component>/config.json            the source's config, copied
    <component>/  (Orbax PyTree)       one zarr3 array per leaf of the component's param tree

Param trees are nested dicts of arrays. Names follow diffusers / transformers module names, with
three systematic changes: the blocks of the transformer, the text encoder and the image encoder are
stacked along a leading layer axis (``blocks.{i}.x`` -> ``blocks.x`` of shape (L, ...)); linear
weights keep the torch (out, in) layout (the runtime contracts over the last axis, so no transposes
are needed); a few awkward names are shortened (``ffn.net.0.proj`` -> ``ffn.fc_in``). Size-one axes
of norm scales are dropped (VAE ``gamma`` (C, 1, 1, 1) -> (C,)).

Everything here is derived from a component's ``config.json`` alone, so the converter's output can be
checked against it and the runtime can build restore targets without reading any weights.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np

FORMAT_NAME = "wan-jax-converted"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: Components a checkpoint may hold, in restore order, with their param-tree builders (below).
COMPONENTS = ("text_encoder", "image_encoder", "transformer", "transformer_2", "vae")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter of a param tree: its shape, stored dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "bfloat16", "float32", ...
    axes: tuple[str | None, ...]

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"axes {self.axes} do not match shape {self.shape}")


Tree = dict[str, Any]  # nested dict, leaves are Leaf (abstract) or arrays (concrete)


# --------------------------------------------------------------------------------------------
# Dtype policy: one rule, in one place.
# --------------------------------------------------------------------------------------------
#: Module names that diffusers keeps in float32 when a Wan transformer is loaded in low precision
#: (``WanTransformer3DModel._keep_in_fp32_modules``); matched against every part of a leaf path.
KEEP_FP32_MODULES = frozenset({"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"})
#: transformers' ``UMT5EncoderModel._keep_in_fp32_modules``: float32 when the weights are float16.
KEEP_FP32_IF_FLOAT16 = frozenset({"wo"})


def stored_dtype(path: str, weights_dtype: str) -> str:
    """The dtype a parameter is stored in: ``weights_dtype``, except norms and diffusers' fp32 modules.

    Every normalisation parameter (any path part containing "norm": LayerNorm / RMSNorm scales and
    biases, q/k norms, the VAE's RMS gammas) stays float32, as do the modules diffusers keeps in float32.
    """
    parts = path.split(".")
    if any(p in KEEP_FP32_MODULES or "norm" in p for p in parts):
        return "float32"
    if weights_dtype == "float16" and any(p in KEEP_FP32_IF_FLOAT16 for p in parts):
        return "float32"
    return weights_dtype


# --------------------------------------------------------------------------------------------
# Tree helpers
# --------------------------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf} (sorted by path)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return dict(sorted(out.items()))


def unflatten(flat: Mapping[str, Any]) -> Tree:
    out: Tree = {}
    for path, v in flat.items():
        node = out
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


class _Builder:
    """Collects the leaves of a param tree; ``weights_dtype`` goes through :func:`stored_dtype`."""

    def __init__(self, weights_dtype: str):
        self.weights_dtype = weights_dtype
        self.flat: dict[str, Leaf] = {}

    def add(self, path: str, shape, axes=None) -> None:
        shape = tuple(int(s) for s in shape)
        axes = tuple(axes) if axes is not None else (None,) * len(shape)
        self.flat[path] = Leaf(shape, stored_dtype(path, self.weights_dtype), axes)

    def linear(self, path: str, out_dim: int, in_dim: int, axes=(None, None), bias=True, stack: int = 0):
        lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
        self.add(f"{path}.weight", lead + (out_dim, in_dim), lead_axes + tuple(axes))
        if bias:
            self.add(f"{path}.bias", lead + (out_dim,), lead_axes + (axes[0],))

    def norm(self, path: str, dim: int, bias=False, stack: int = 0, name="weight"):
        lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
        self.add(f"{path}.{name}", lead + (dim,), lead_axes + (None,))
        if bias:
            self.add(f"{path}.bias", lead + (dim,), lead_axes + (None,))

    def tree(self) -> Tree:
        return unflatten(self.flat)


# --------------------------------------------------------------------------------------------
# Param trees, one builder per component kind. Logical axes: "layers" (stacked blocks),
# "embed" (model width), "heads" (attention heads x head_dim), "mlp" (FFN hidden), "vocab".
# --------------------------------------------------------------------------------------------
def transformer_tree(cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """``WanTransformer3DModel`` (diffusers config.json)."""
    b = _Builder(weights_dtype)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    D, L, F = heads * head_dim, cfg["num_layers"], cfg["ffn_dim"]
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    cin, cout = cfg["in_channels"], cfg.get("out_channels") or cfg["in_channels"]
    T, freq = cfg["text_dim"], cfg["freq_dim"]
    b.add("patch_embedding.weight", (D, cin, pt, ph, pw), ("embed", None, None, None, None))
    b.add("patch_embedding.bias", (D,), ("embed",))
    ce = "condition_embedder"
    b.linear(f"{ce}.time_embedder.linear_1", D, freq)
    b.linear(f"{ce}.time_embedder.linear_2", D, D)
    b.linear(f"{ce}.time_proj", 6 * D, D)
    b.linear(f"{ce}.text_embedder.linear_1", D, T, ("embed", None))
    b.linear(f"{ce}.text_embedder.linear_2", D, D)
    image_dim = cfg.get("image_dim")
    if image_dim:
        b.norm(f"{ce}.image_embedder.norm1", image_dim, bias=True)
        b.linear(f"{ce}.image_embedder.ff.fc_in", image_dim, image_dim)
        b.linear(f"{ce}.image_embedder.ff.fc_out", D, image_dim)
        b.norm(f"{ce}.image_embedder.norm2", D, bias=True)
        if cfg.get("pos_embed_seq_len"):
            b.add(f"{ce}.image_embedder.pos_embed", (1, cfg["pos_embed_seq_len"], image_dim))
    b.add("blocks.scale_shift_table", (L, 6, D), ("layers", None, None))
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            b.linear(f"blocks.{attn}.{proj}", D, D, ("heads", "embed"), stack=L)
        b.linear(f"blocks.{attn}.to_out", D, D, ("embed", "heads"), stack=L)
        if cfg.get("qk_norm"):
            b.norm(f"blocks.{attn}.norm_q", D, stack=L)
            b.norm(f"blocks.{attn}.norm_k", D, stack=L)
    added = cfg.get("added_kv_proj_dim")
    if added:
        b.linear("blocks.attn2.add_k_proj", D, added, ("heads", None), stack=L)
        b.linear("blocks.attn2.add_v_proj", D, added, ("heads", None), stack=L)
        b.norm("blocks.attn2.norm_added_k", D, stack=L)
    if cfg.get("cross_attn_norm", True):
        b.norm("blocks.norm2", D, bias=True, stack=L)
    b.linear("blocks.ffn.fc_in", F, D, ("mlp", "embed"), stack=L)
    b.linear("blocks.ffn.fc_out", D, F, ("embed", "mlp"), stack=L)
    b.add("scale_shift_table", (2, D))
    b.linear("proj_out", cout * pt * ph * pw, D, (None, "embed"))
    return b.tree()


def text_encoder_tree(cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """transformers ``UMT5EncoderModel`` (every layer has its own relative-position bias)."""
    b = _Builder(weights_dtype)
    d, L, F = cfg["d_model"], cfg["num_layers"], cfg["d_ff"]
    inner = cfg["num_heads"] * cfg["d_kv"]
    b.add("shared.weight", (cfg["vocab_size"], d), ("vocab", "embed"))
    for proj in ("q", "k", "v"):
        b.linear(f"blocks.attn.{proj}", inner, d, ("heads", "embed"), bias=False, stack=L)
    b.linear("blocks.attn.o", d, inner, ("embed", "heads"), bias=False, stack=L)
    b.add("blocks.attn.relative_attention_bias.weight",
          (L, cfg["relative_attention_num_buckets"], cfg["num_heads"]), ("layers", None, None))
    b.norm("blocks.attn_norm", d, stack=L)
    b.linear("blocks.ffn.wi_0", F, d, ("mlp", "embed"), bias=False, stack=L)
    b.linear("blocks.ffn.wi_1", F, d, ("mlp", "embed"), bias=False, stack=L)
    b.linear("blocks.ffn.wo", d, F, ("embed", "mlp"), bias=False, stack=L)
    b.norm("blocks.ffn_norm", d, stack=L)
    b.norm("final_norm", d)
    return b.tree()


def image_encoder_tree(cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """transformers ``CLIPVisionModel(WithProjection)``; Wan uses the penultimate hidden states, so
    ``post_layernorm`` and ``visual_projection`` are not part of the tree."""
    b = _Builder(weights_dtype)
    H, L, F = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    p, C = cfg["patch_size"], cfg.get("num_channels", 3)
    n_pos = (cfg["image_size"] // p) ** 2 + 1
    b.add("embeddings.class_embedding", (H,))
    b.add("embeddings.patch_embedding.weight", (H, C, p, p))
    b.add("embeddings.position_embedding.weight", (n_pos, H))
    b.norm("pre_layrnorm", H, bias=True)
    b.norm("layers.layer_norm1", H, bias=True, stack=L)
    for proj in ("q_proj", "k_proj", "v_proj"):
        b.linear(f"layers.self_attn.{proj}", H, H, ("heads", "embed"), stack=L)
    b.linear("layers.self_attn.out_proj", H, H, ("embed", "heads"), stack=L)
    b.norm("layers.layer_norm2", H, bias=True, stack=L)
    b.linear("layers.mlp.fc1", F, H, ("mlp", "embed"), stack=L)
    b.linear("layers.mlp.fc2", H, F, ("embed", "mlp"), stack=L)
    return b.tree()


def vae_tree(cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """diffusers ``AutoencoderKLWan`` (Wan 2.1, and Wan 2.2 with ``is_residual``); names as in diffusers."""
    b = _Builder(weights_dtype)
    z = cfg.get("z_dim", 16)
    base = cfg.get("base_dim", 96)
    dec_base = cfg.get("decoder_base_dim") or base
    mult = list(cfg.get("dim_mult", [1, 2, 4, 4]))
    nres = cfg.get("num_res_blocks", 2)
    attn_scales = list(cfg.get("attn_scales", []))
    tdown = list(cfg.get("temperal_downsample", [False, True, True]))
    residual = bool(cfg.get("is_residual", False))
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)

    def conv(path, o, i, k):  # k: kernel dims
        b.add(f"{path}.weight", (o, i, *k))
        b.add(f"{path}.bias", (o,))

    def resblock(path, i, o):
        b.add(f"{path}.norm1.gamma", (i,))
        conv(f"{path}.conv1", o, i, (3, 3, 3))
        b.add(f"{path}.norm2.gamma", (o,))
        conv(f"{path}.conv2", o, o, (3, 3, 3))
        if i != o:
            conv(f"{path}.conv_shortcut", o, i, (1, 1, 1))

    def attention(path, c):
        b.add(f"{path}.norm.gamma", (c,))
        conv(f"{path}.to_qkv", 3 * c, c, (1, 1))
        conv(f"{path}.proj", c, c, (1, 1))

    def mid(path, c):
        resblock(f"{path}.resnets.0", c, c)
        attention(f"{path}.attentions.0", c)
        resblock(f"{path}.resnets.1", c, c)

    def resample(path, c, mode, out=None):
        if mode.startswith("up"):
            conv(f"{path}.resample.1", out if out is not None else c // 2, c, (3, 3))
            if mode == "upsample3d":
                conv(f"{path}.time_conv", 2 * c, c, (3, 1, 1))
        else:
            conv(f"{path}.resample.1", c, c, (3, 3))
            if mode == "downsample3d":
                conv(f"{path}.time_conv", c, c, (3, 1, 1))

    # encoder
    dims = [base * u for u in [1] + mult]
    conv("encoder.conv_in", dims[0], cin, (3, 3, 3))
    k, scale = 0, 1.0
    for s, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        last = s == len(mult) - 1
        if residual:
            for r in range(nres):
                resblock(f"encoder.down_blocks.{s}.resnets.{r}", i if r == 0 else o, o)
            if not last:
                resample(f"encoder.down_blocks.{s}.downsampler", o, "downsample3d" if tdown[s] else "downsample2d")
        else:
            for _ in range(nres):
                resblock(f"encoder.down_blocks.{k}", i, o)
                k += 1
                if scale in attn_scales:
                    attention(f"encoder.down_blocks.{k}", o)
                    k += 1
                i = o
            if not last:
                resample(f"encoder.down_blocks.{k}", o, "downsample3d" if tdown[s] else "downsample2d")
                k += 1
                scale /= 2.0
    mid("encoder.mid_block", dims[-1])
    b.add("encoder.norm_out.gamma", (dims[-1],))
    conv("encoder.conv_out", 2 * z, dims[-1], (3, 3, 3))
    conv("quant_conv", 2 * z, 2 * z, (1, 1, 1))
    conv("post_quant_conv", z, z, (1, 1, 1))

    # decoder
    tup = tdown[::-1]
    dims = [dec_base * u for u in [mult[-1]] + mult[::-1]]
    conv("decoder.conv_in", dims[0], z, (3, 3, 3))
    mid("decoder.mid_block", dims[0])
    for s, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        if s > 0 and not residual:
            i = i // 2
        up = s != len(mult) - 1
        mode = ("upsample3d" if tup[s] else "upsample2d") if up else None
        cur = i
        for r in range(nres + 1):
            resblock(f"decoder.up_blocks.{s}.resnets.{r}", cur, o)
            cur = o
        if mode and residual:
            resample(f"decoder.up_blocks.{s}.upsampler", o, mode, out=o)
        elif mode:
            resample(f"decoder.up_blocks.{s}.upsamplers.0", o, mode)
    b.add("decoder.norm_out.gamma", (dims[-1],))
    conv("decoder.conv_out", cout, dims[-1], (3, 3, 3))
    return b.tree()


#: component kind -> tree builder. transformer_2 is a second transformer.
TREE_BUILDERS: dict[str, Callable[[Mapping[str, Any], str], Tree]] = {
    "transformer": transformer_tree,
    "transformer_2": transformer_tree,
    "text_encoder": text_encoder_tree,
    "image_encoder": image_encoder_tree,
    "vae": vae_tree,
}


def component_tree(component: str, cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """The abstract param tree of a component from its config.json dict. A config that does not describe
    one (a missing key, a value of the wrong type) is a FormatError naming the key or value."""
    if component not in TREE_BUILDERS:
        raise ValueError(f"unknown component {component!r}")
    if not isinstance(cfg, Mapping):
        raise FormatError(f"{component} config is not a JSON object")
    if component == "image_encoder" and "vision_config" in cfg:
        cfg = cfg["vision_config"]
    try:
        return TREE_BUILDERS[component](cfg, weights_dtype)
    except KeyError as e:
        raise FormatError(f"{component} config has no {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise FormatError(f"{component} config does not describe a Wan {component} ({e})") from None


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------
FAMILIES = ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")


def family_components(family: str) -> tuple[str, ...]:
    """The components a complete checkpoint of ``family`` holds (what generation needs)."""
    extra = {"wan2.1-i2v": ("image_encoder",), "wan2.2-t2v-a14b": ("transformer_2",),
             "wan2.2-i2v-a14b": ("transformer_2",)}.get(family, ())
    return tuple(c for c in COMPONENTS if c in ("text_encoder", "transformer", "vae") + extra)


def detect_family(model_index: Mapping[str, Any], transformer_cfg: Mapping[str, Any],
                  vae_cfg: Mapping[str, Any] | None = None) -> str:
    """Name the Wan family of a diffusers repository from its model_index.json and configs."""
    def present(name):
        v = model_index.get(name)
        return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None

    two = present("transformer_2")
    cin = transformer_cfg.get("in_channels")
    z = (vae_cfg or {}).get("z_dim", 16)
    if model_index.get("expand_timesteps") or z == 48:
        return "wan2.2-ti2v-5b"
    if two:
        return "wan2.2-i2v-a14b" if cin == 36 else "wan2.2-t2v-a14b"
    if cin == 36 or transformer_cfg.get("image_dim"):
        return "wan2.1-i2v"
    if cin == 16:
        return "wan2.1-t2v"
    raise ValueError(f"unsupported Wan variant (transformer in_channels={cin}, vae z_dim={z})")


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
class FormatError(ValueError):
    """A converted checkpoint that this runtime cannot read."""


def read_manifest(root: str | pathlib.Path) -> dict:
    path = pathlib.Path(root) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: not found; is {root} a checkpoint written by wan-convert?") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {m.get('format_version')} but this runtime reads version {FORMAT_VERSION}; "
            "re-convert the source with a matching wan-convert")
    if m.get("family") not in FAMILIES:
        raise FormatError(f"{path}: family {m.get('family')!r} is not one this runtime knows "
                          f"({', '.join(FAMILIES)}); a newer wan-jax may read it")
    comps = m.get("components")
    if not isinstance(comps, dict) or not comps or any(c not in COMPONENTS for c in comps):
        raise FormatError(f"{path}: 'components' must name some of {', '.join(COMPONENTS)}")
    policy = m.get("dtype_policy")
    if not isinstance(policy, dict) or policy.get("weights") not in ("bfloat16", "float16", "float32"):
        raise FormatError(f"{path}: 'dtype_policy.weights' must be bfloat16, float16 or float32")
    return m


def iter_leaves(tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    yield from flatten(tree).items()


def np_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 etc. with numpy)

    return np.dtype(getattr(ml_dtypes, name)) if name in ("bfloat16", "float8_e4m3fn") else np.dtype(name)


# --------------------------------------------------------------------------------------------
# On-disk layout of one component: a plain Orbax PyTree checkpoint (no OCDBT), one zarr3 array
# per leaf in a folder named by its dotted path, each chunk stored raw with a crc32c checksum.
# --------------------------------------------------------------------------------------------
ORBAX_METADATA = "_METADATA"
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
ZARR_CODECS = ({"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"})


def array_dir(component_dir: str | pathlib.Path, path: str) -> pathlib.Path:
    return pathlib.Path(component_dir) / path


def zarr_spec(component_dir: str | pathlib.Path, path: str, leaf: Leaf | None = None,
              chunks: tuple[int, ...] | None = None) -> dict:
    """TensorStore spec of one leaf. With ``leaf`` and ``chunks`` it creates the array."""
    spec: dict = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(array_dir(component_dir, path))},
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
        # every chunk is stored, zeros included (as Orbax does), so a missing chunk file is damage, not zeros
        "store_data_equal_to_fill_value": True,
        "fill_missing_data_reads": False,
    }
    if leaf is not None:
        spec["metadata"] = {
            "shape": list(leaf.shape),
            "data_type": leaf.dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks or leaf.shape)}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [dict(c) for c in ZARR_CODECS],
            "fill_value": 0,
        }
    return spec


def chunk_key(index: tuple[int, ...]) -> str:
    """Relative path of a chunk file under an array's folder (zarr3 "default" chunk-key encoding)."""
    return "/".join(("c", *(str(i) for i in index)))


def orbax_metadata(paths: list[str]) -> dict:
    """The ``_METADATA`` document Orbax's PyTreeCheckpointHandler writes for a tree of numpy arrays."""
    tree = {}
    for path in paths:
        parts = path.split(".")
        tree[str(tuple(parts))] = {
            "key_metadata": [{"key": p, "key_type": 2} for p in parts],
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
        }
    return {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
