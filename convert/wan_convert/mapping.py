"""Source names -> runtime param-tree paths, one small table per component.

A rule is ``(source_prefix, target_prefix)``; ``{L}`` in a source prefix matches a block index and
marks a stacked parameter (the target has a leading layer axis). A source key takes the first rule
whose prefix matches, and keeps the rest of its name after the target prefix. A target of ``None``
drops the key (only for weights Wan never uses). Several source keys may name one target only when
they are tied copies of one weight (UMT5's ``shared`` / ``encoder.embed_tokens``): the first wins.

The only transform is dropping size-one axes (``gamma`` (C,1,1,1) -> (C,), ``scale_shift_table``
(1,6,D) -> (6,D)); linear weights keep torch's (out, in) layout, so conversion is a pure stacking
copy with a fused cast. :func:`plan` fails on any source key not consumed, target leaf not produced,
missing layer, or shape that does not match the runtime's tree.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from wan_runtime.format import Leaf, flatten

from .source import SourceError, TensorInfo

Rule = tuple[str, "str | None"]
#: source dtypes a weight may have (integer or bool tensors are never Wan weights: casting them would be silent garbage)
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})

TRANSFORMER: Sequence[Rule] = (
    ("blocks.{L}.attn1.to_out.0.", "blocks.attn1.to_out."),
    ("blocks.{L}.attn2.to_out.0.", "blocks.attn2.to_out."),
    ("blocks.{L}.ffn.net.0.proj.", "blocks.ffn.fc_in."),
    ("blocks.{L}.ffn.net.2.", "blocks.ffn.fc_out."),
    ("blocks.{L}.", "blocks."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "condition_embedder.image_embedder.ff.fc_in."),
    ("condition_embedder.image_embedder.ff.net.2.", "condition_embedder.image_embedder.ff.fc_out."),
    ("", ""),
)

TEXT_ENCODER: Sequence[Rule] = (  # transformers UMT5EncoderModel
    ("encoder.block.{L}.layer.0.SelfAttention.", "blocks.attn."),
    ("encoder.block.{L}.layer.0.layer_norm.", "blocks.attn_norm."),
    ("encoder.block.{L}.layer.1.DenseReluDense.", "blocks.ffn."),
    ("encoder.block.{L}.layer.1.layer_norm.", "blocks.ffn_norm."),
    ("encoder.final_layer_norm.", "final_norm."),
    ("shared.", "shared."),
    ("encoder.embed_tokens.", "shared."),  # tied copy of shared
)

IMAGE_ENCODER: Sequence[Rule] = (  # transformers CLIPVisionModel(WithProjection)
    ("vision_model.embeddings.", "embeddings."),
    ("vision_model.pre_layrnorm.", "pre_layrnorm."),
    ("vision_model.encoder.layers.{L}.", "layers."),
    ("vision_model.post_layernorm.", None),  # Wan reads the penultimate hidden states
    ("visual_projection.", None),
)

VAE: Sequence[Rule] = (("", ""),)

TABLES: dict[str, Sequence[Rule]] = {
    "transformer": TRANSFORMER,
    "transformer_2": TRANSFORMER,
    "text_encoder": TEXT_ENCODER,
    "image_encoder": IMAGE_ENCODER,
    "vae": VAE,
}


@dataclasses.dataclass
class Target:
    """One leaf of the output tree and where its data comes from."""

    path: str
    leaf: Leaf
    sources: list[TensorInfo | None]  # one per layer for stacked leaves, else one

    @property
    def stacked(self) -> bool:
        return bool(self.leaf.axes) and self.leaf.axes[0] == "layers"

    @property
    def in_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources if s is not None)


def _compile(rules: Sequence[Rule]):
    out = []
    for src, dst in rules:
        pat = re.escape(src).replace(re.escape("{L}"), r"(?P<L>\d+)")
        out.append((re.compile(pat), dst, "{L}" in src))
    return out


def _squeeze(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def plan(component: str, tensors: Mapping[str, TensorInfo], tree: Mapping) -> list[Target]:
    """Match every source tensor of a component to a leaf of its runtime tree (see module doc)."""
    leaves: dict[str, Leaf] = flatten(tree)
    targets = {p: Target(p, leaf, [None] * (leaf.shape[0] if leaf.axes[:1] == ("layers",) else 1))
               for p, leaf in leaves.items()}
    rules = _compile(TABLES[component])
    claimed: dict[tuple[str, int], str] = {}
    for name in sorted(tensors):
        info = tensors[name]
        for pat, dst, stacked in rules:
            m = pat.match(name)
            if m:
                break
        else:
            raise SourceError(f"{info.file}: tensor {name} is not part of a Wan {component}")
        if dst is None:
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise SourceError(f"{info.file}: tensor {name} has dtype {info.dtype}; Wan weights are floating point")
        path = dst + name[m.end():]
        tgt = targets.get(path)
        if tgt is None:
            raise SourceError(f"{info.file}: tensor {name} has no place in the {component} "
                              f"(runtime path {path}); is config.json right for these weights?")
        layer = int(m.group("L")) if stacked else 0
        if stacked != tgt.stacked:
            raise SourceError(f"{info.file}: tensor {name}: stacking mismatch with {path}")
        if layer >= len(tgt.sources):
            raise SourceError(f"{info.file}: tensor {name}: block {layer} but config.json says "
                              f"{len(tgt.sources)} layers")
        want = tgt.leaf.shape[1:] if stacked else tgt.leaf.shape
        if _squeeze(info.shape) != _squeeze(want):
            raise SourceError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                              f"{list(want)} from config.json")
        key = (path, layer)
        if key in claimed:
            continue  # a tied copy (see module doc); the first source by name order wins
        claimed[key] = name
        tgt.sources[layer] = info
    where = next(iter(tensors.values())).file.parent if tensors else component
    for tgt in targets.values():
        missing = [i for i, s in enumerate(tgt.sources) if s is None]
        if missing:
            what = f"block {missing[0]} (of {len(tgt.sources)} in config.json) of " if tgt.stacked else ""
            raise SourceError(f"{where}: no source tensor for {what}{tgt.path} (the weights do not match "
                              "config.json, or a shard is incomplete)")
    return [targets[p] for p in sorted(targets)]


def leaf_source_array(target: Target, layer: int, get_array) -> "np.ndarray":
    """Source data for one layer (or the whole leaf) of a target, in the leaf's per-layer shape."""
    info = target.sources[layer]
    want = target.leaf.shape[1:] if target.stacked else target.leaf.shape
    return get_array(info.name).reshape(want)


def tree_from_state_dict(component: str, state_dict: Mapping[str, "np.ndarray"], config: Mapping,
                         weights_dtype: str = "float32") -> dict:
    """In-memory conversion of a {name: numpy array} state dict into the runtime's nested param tree
    (tests and tools; the converter streams instead). Values are cast with numpy's round-to-nearest-even."""
    import pathlib

    import numpy as np

    from wan_runtime.format import component_tree, np_dtype, unflatten

    mem = pathlib.Path("<memory>")
    infos = {k: TensorInfo(k, mem, str(v.dtype), tuple(v.shape), 0, v.nbytes) for k, v in state_dict.items()}
    out = {}
    for tgt in plan(component, infos, component_tree(component, config, weights_dtype)):
        layers = [leaf_source_array(tgt, i, state_dict.__getitem__) for i in range(len(tgt.sources))]
        arr = np.stack(layers) if tgt.stacked else layers[0]
        out[tgt.path] = arr.astype(np_dtype(tgt.leaf.dtype))
    return unflatten(out)
