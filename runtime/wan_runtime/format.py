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
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from . import configs, families

FORMAT_NAME = "wan-jax-converted"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: Components a checkpoint may hold, in restore order, with their param-tree builders (below).
COMPONENTS = families.COMPONENTS


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
    biases, q/k norms, the VAE's RMS gammas) stays float32, as do the modules diffusers keeps in float32
    and the scales of quantized weights (``weight_scale``).
    """
    parts = path.split(".")
    if any(p in KEEP_FP32_MODULES or "norm" in p for p in parts) or parts[-1] == "weight_scale":
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
    """Collects the leaves of a param tree; ``weights_dtype`` goes through :func:`stored_dtype`. A
    quantized ``weights_dtype`` (``QUANT_DTYPES``) applies to the linears declared ``quantize=True`` (the
    2-D weights of the transformer's and the text encoder's blocks), each with its per-output-channel
    scale leaf ``<weight>_scale``; every other leaf takes ``QUANT_BASE`` by the usual rule."""

    def __init__(self, weights_dtype: str):
        self.quant = weights_dtype if weights_dtype in QUANT_DTYPES else None
        self.weights_dtype = QUANT_BASE if self.quant else weights_dtype
        self.flat: dict[str, Leaf] = {}

    def add(self, path: str, shape, axes=None) -> None:
        shape = tuple(int(s) for s in shape)
        axes = tuple(axes) if axes is not None else (None,) * len(shape)
        self.flat[path] = Leaf(shape, stored_dtype(path, self.weights_dtype), axes)

    def linear(self, path: str, out_dim: int, in_dim: int, axes=(None, None), bias=True, stack: int = 0,
               quantize: bool = False):
        lead, lead_axes = ((stack,), ("layers",)) if stack else ((), ())
        self.add(f"{path}.weight", lead + (out_dim, in_dim), lead_axes + tuple(axes))
        if quantize and self.quant:
            self.flat[f"{path}.weight"] = Leaf(lead + (out_dim, in_dim), self.quant, lead_axes + tuple(axes))
            self.flat[f"{path}.weight_scale"] = Leaf(lead + (out_dim,), "float32", lead_axes + (axes[0],))
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
# Param trees, one builder per component kind, each from the component's typed config
# (``wan_runtime.configs``; a config.json dict is parsed first). Logical axes: "layers" (stacked
# blocks), "embed" (model width), "heads" (attention heads x head_dim), "mlp" (FFN hidden), "vocab".
# --------------------------------------------------------------------------------------------
def transformer_tree(cfg: configs.WanTransformerConfig, weights_dtype: str = "bfloat16") -> Tree:
    """``WanTransformer3DModel``, and ``WanVACETransformer3DModel`` (a config with ``vace_layers``): the
    VACE blocks are Wan blocks stacked on their own layer axis (``vace_blocks.*``, V = len(vace_layers)),
    each with ``proj_out`` (its hint), block 0's ``proj_in`` unstacked as ``vace_proj_in``, and the
    control latents' ``vace_patch_embedding``."""
    c, b = configs.parse("transformer", cfg), _Builder(weights_dtype)
    D, (pt, ph, pw) = c.dim, c.patch_size
    b.add("patch_embedding.weight", (D, c.in_channels, pt, ph, pw), ("embed", None, None, None, None))
    b.add("patch_embedding.bias", (D,), ("embed",))
    ce = "condition_embedder"
    b.linear(f"{ce}.time_embedder.linear_1", D, c.freq_dim)
    b.linear(f"{ce}.time_embedder.linear_2", D, D)
    b.linear(f"{ce}.time_proj", 6 * D, D)
    b.linear(f"{ce}.text_embedder.linear_1", D, c.text_dim, ("embed", None))
    b.linear(f"{ce}.text_embedder.linear_2", D, D)
    if c.image_dim:
        b.norm(f"{ce}.image_embedder.norm1", c.image_dim, bias=True)
        b.linear(f"{ce}.image_embedder.ff.fc_in", c.image_dim, c.image_dim)
        b.linear(f"{ce}.image_embedder.ff.fc_out", D, c.image_dim)
        b.norm(f"{ce}.image_embedder.norm2", D, bias=True)
        if c.pos_embed_seq_len:
            b.add(f"{ce}.image_embedder.pos_embed", (1, c.pos_embed_seq_len, c.image_dim))
    _wan_blocks(b, "blocks", c, c.num_layers)
    if c.vace:
        V = len(c.vace_layers)
        b.add("vace_patch_embedding.weight", (D, c.vace_in_channels, pt, ph, pw), ("embed", None, None, None, None))
        b.add("vace_patch_embedding.bias", (D,), ("embed",))
        b.linear("vace_proj_in", D, D, ("embed", None))
        _wan_blocks(b, "vace_blocks", c, V)
        b.linear("vace_blocks.proj_out", D, D, ("embed", None), stack=V, quantize=True)
    b.add("scale_shift_table", (2, D))
    b.linear("proj_out", c.out_channels * pt * ph * pw, D, (None, "embed"))
    return b.tree()


def _wan_blocks(b: _Builder, prefix: str, c: configs.WanTransformerConfig, L: int) -> None:
    """The leaves of L ``WanTransformerBlock``s stacked under ``prefix`` (the main blocks, the VACE blocks)."""
    D, F = c.dim, c.ffn_dim
    b.add(f"{prefix}.scale_shift_table", (L, 6, D), ("layers", None, None))
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            b.linear(f"{prefix}.{attn}.{proj}", D, D, ("heads", "embed"), stack=L, quantize=True)
        b.linear(f"{prefix}.{attn}.to_out", D, D, ("embed", "heads"), stack=L, quantize=True)
        if c.qk_norm:
            b.norm(f"{prefix}.{attn}.norm_q", D, stack=L)
            b.norm(f"{prefix}.{attn}.norm_k", D, stack=L)
    if c.added_kv_proj_dim:
        b.linear(f"{prefix}.attn2.add_k_proj", D, c.added_kv_proj_dim, ("heads", None), stack=L, quantize=True)
        b.linear(f"{prefix}.attn2.add_v_proj", D, c.added_kv_proj_dim, ("heads", None), stack=L, quantize=True)
        b.norm(f"{prefix}.attn2.norm_added_k", D, stack=L)
    if c.cross_attn_norm:
        b.norm(f"{prefix}.norm2", D, bias=True, stack=L)
    b.linear(f"{prefix}.ffn.fc_in", F, D, ("mlp", "embed"), stack=L, quantize=True)
    b.linear(f"{prefix}.ffn.fc_out", D, F, ("embed", "mlp"), stack=L, quantize=True)


def text_encoder_tree(cfg: configs.UMT5Config, weights_dtype: str = "bfloat16") -> Tree:
    """transformers ``UMT5EncoderModel`` (every layer has its own relative-position bias). A quantized
    ``weights_dtype`` quantizes the blocks' attention and FFN weights; the embedding ``shared`` (a
    gather, not a matmul), the relative-position biases and the norms keep the usual rule."""
    c, b = configs.parse("text_encoder", cfg), _Builder(weights_dtype)
    d, L, F, inner = c.d_model, c.num_layers, c.d_ff, c.num_heads * c.d_kv
    b.add("shared.weight", (c.vocab_size, d), ("vocab", "embed"))
    for proj in ("q", "k", "v"):
        b.linear(f"blocks.attn.{proj}", inner, d, ("heads", "embed"), bias=False, stack=L, quantize=True)
    b.linear("blocks.attn.o", d, inner, ("embed", "heads"), bias=False, stack=L, quantize=True)
    b.add("blocks.attn.relative_attention_bias.weight", (L, c.num_buckets, c.num_heads), ("layers", None, None))
    b.norm("blocks.attn_norm", d, stack=L)
    b.linear("blocks.ffn.wi_0", F, d, ("mlp", "embed"), bias=False, stack=L, quantize=True)
    b.linear("blocks.ffn.wi_1", F, d, ("mlp", "embed"), bias=False, stack=L, quantize=True)
    b.linear("blocks.ffn.wo", d, F, ("embed", "mlp"), bias=False, stack=L, quantize=True)
    b.norm("blocks.ffn_norm", d, stack=L)
    b.norm("final_norm", d)
    return b.tree()


def image_encoder_tree(cfg: configs.CLIPVisionConfig, weights_dtype: str = "bfloat16") -> Tree:
    """transformers ``CLIPVisionModel(WithProjection)``; Wan uses the penultimate hidden states, so
    ``post_layernorm`` and ``visual_projection`` are not part of the tree."""
    c, b = configs.parse("image_encoder", cfg), _Builder(weights_dtype)
    H, L, F, p = c.hidden_size, c.num_layers, c.intermediate_size, c.patch_size
    b.add("embeddings.class_embedding", (H,))
    b.add("embeddings.patch_embedding.weight", (H, c.num_channels, p, p))
    b.add("embeddings.position_embedding.weight", (c.num_patches + 1, H))
    b.norm("pre_layrnorm", H, bias=True)
    b.norm("layers.layer_norm1", H, bias=True, stack=L)
    for proj in ("q_proj", "k_proj", "v_proj"):
        b.linear(f"layers.self_attn.{proj}", H, H, ("heads", "embed"), stack=L)
    b.linear("layers.self_attn.out_proj", H, H, ("embed", "heads"), stack=L)
    b.norm("layers.layer_norm2", H, bias=True, stack=L)
    b.linear("layers.mlp.fc1", F, H, ("mlp", "embed"), stack=L)
    b.linear("layers.mlp.fc2", H, F, ("embed", "mlp"), stack=L)
    return b.tree()


def vae_tree(cfg: configs.VAEConfig, weights_dtype: str = "bfloat16") -> Tree:
    """diffusers ``AutoencoderKLWan`` (Wan 2.1, and Wan 2.2 with ``is_residual``); names as in diffusers,
    one leaf per parameter of the architecture walk in ``configs.vae_params``."""
    b = _Builder(weights_dtype)
    for path, shape in configs.vae_params(configs.parse("vae", cfg)):
        b.add(path, shape)
    return b.tree()


#: component kind -> tree builder (typed config or config.json dict). transformer_2 is a second transformer.
TREE_BUILDERS: dict[str, Callable[[Any, str], Tree]] = {
    "transformer": transformer_tree,
    "transformer_2": transformer_tree,
    "text_encoder": text_encoder_tree,
    "image_encoder": image_encoder_tree,
    "vae": vae_tree,
}


def component_tree(component: str, cfg: Mapping[str, Any], weights_dtype: str = "bfloat16") -> Tree:
    """The abstract param tree of a component from its config.json dict, parsed once
    (``configs.parse``): a config that does not describe one (a missing key, a value of the wrong
    type) is a FormatError naming the key or value."""
    if component not in TREE_BUILDERS:
        raise ValueError(f"unknown component {component!r}")
    return TREE_BUILDERS[component](configs.parse(component, cfg), weights_dtype)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------
class FormatError(ValueError):
    """A converted checkpoint that this runtime cannot read."""


#: the dtypes a checkpoint's weights may be stored in (``dtype_policy.weights``; norms stay float32)
WEIGHT_DTYPES = ("bfloat16", "float16", "float32")
#: quantized storage of the transformer's and text encoder's block 2-D weights, symmetric absmax per output
#: channel: the largest magnitude each maps to (scale = max|row| / this); every other leaf is stored in
#: ``QUANT_BASE``
QUANT_DTYPES = {"float8_e4m3fn": 448.0, "int8": 127.0}
QUANT_BASE = "bfloat16"
#: everything ``dtype_policy.weights`` may say
STORAGE_DTYPES = WEIGHT_DTYPES + tuple(QUANT_DTYPES)


def read_json(path: str | pathlib.Path, error: type[Exception] = FormatError, what: str = "JSON object") -> dict:
    """A JSON object from ``path``; anything else raises ``error`` (each side's own type) naming the file."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a {what}")
    return data


def read_manifest(root: str | pathlib.Path) -> dict:
    """The validated manifest of the checkpoint at ``root``; FormatError naming the file otherwise."""
    path = pathlib.Path(root) / MANIFEST
    if not path.exists():
        raise FormatError(f"{path}: not found; is {root} a checkpoint written by wan-convert?")
    return check_manifest(read_json(path, FormatError, f"{FORMAT_NAME} manifest"), path)


def check_manifest(m: Mapping[str, Any], path: str | pathlib.Path = MANIFEST) -> dict:
    """``m`` if it is a manifest this runtime reads; FormatError naming ``path`` and the field otherwise."""
    if m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {m.get('format_version')} but this runtime reads version {FORMAT_VERSION}; "
            "re-convert the source with a matching wan-convert")
    if m.get("family") not in families.BY_NAME:
        raise FormatError(f"{path}: family {m.get('family')!r} is not one this runtime knows "
                          f"({', '.join(families.NAMES)}); a newer wan-jax may read it")
    comps = m.get("components")
    if not isinstance(comps, dict) or not comps or any(c not in COMPONENTS for c in comps):
        raise FormatError(f"{path}: 'components' must name some of {', '.join(COMPONENTS)}")
    policy = m.get("dtype_policy")
    if not isinstance(policy, dict) or policy.get("weights") not in STORAGE_DTYPES:
        raise FormatError(f"{path}: 'dtype_policy.weights' must be {', '.join(STORAGE_DTYPES[:-1])} or "
                          f"{STORAGE_DTYPES[-1]}")
    if any(c not in COMPONENTS or d not in STORAGE_DTYPES for c, d in policy.get("components", {}).items()):
        raise FormatError(f"{path}: 'dtype_policy.components' maps components to {', '.join(STORAGE_DTYPES)}")
    return dict(m)


def build_manifest(*, family: str, converter: str, source: Mapping[str, Any], weights_dtype: str,
                   mesh: str, sharding_rules: Mapping[str, Any], trees: Mapping[str, Tree], partial: bool,
                   model_index: Mapping[str, Any]) -> dict:
    """The manifest of a checkpoint holding ``trees`` (component -> abstract param tree), checked as
    :func:`read_manifest` checks it. ``source``: {"id", "revision", "files" (sha256 by path, or None)};
    ``model_index``: the source's model_index.json (its Wan 2.2 ``boundary_ratio`` is kept)."""
    def size(tree: Tree) -> dict:
        leaves = flatten(tree).values()
        return {"arrays": len(leaves),
                "bytes": sum(math.prod(leaf.shape) * np_dtype(leaf.dtype).itemsize for leaf in leaves)}

    m = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family,
        "converter": converter,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": dict(source),
        "dtype_policy": {"weights": weights_dtype, "float32": "norms and diffusers' _keep_in_fp32_modules "
                         "(wan_runtime.format.stored_dtype)"},
        "mesh": mesh,
        "sharding_rules": dict(sharding_rules),
        "partial": partial,
        "components": {c: size(tree) for c, tree in trees.items()},
    }
    if "boundary_ratio" in model_index:
        m["boundary_ratio"] = model_index["boundary_ratio"]
    return check_manifest(m)


def iter_leaves(tree: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    yield from flatten(tree).items()


def recast_dtype(path: str, current: str, weights_dtype: str | None) -> str:
    """A restored leaf's dtype after the runtime recasts its weights to ``weights_dtype`` (None: no recast)
    by the :func:`stored_dtype` rule; quantized leaves stay quantized (``dense`` scales their output)."""
    if not weights_dtype or str(current) in QUANT_DTYPES:
        return str(current)
    return stored_dtype(path, weights_dtype)


def component_dtype(policy: Mapping[str, Any], component: str) -> str:
    """The weights dtype a manifest's ``dtype_policy`` gives ``component`` (``components`` overrides
    ``weights``, e.g. a bf16 text encoder beside an fp8 transformer, or an int8 one beside a bf16 one)."""
    return policy.get("components", {}).get(component, policy["weights"])


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


def ts_context(concurrency: int):
    """The TensorStore context for reading or writing a checkpoint's arrays: no cache (every byte is
    read once), ``concurrency`` copy threads and twice as many file operations in flight (at least 4)."""
    import tensorstore as ts

    return ts.Context({
        "cache_pool": {"total_bytes_limit": 0},
        "data_copy_concurrency": {"limit": concurrency},
        "file_io_concurrency": {"limit": max(4, 2 * concurrency)},
    })


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
