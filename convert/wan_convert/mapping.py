"""Source names -> runtime param-tree paths, one small table per component, and the plan of targets.

A rule is ``(source_prefix, target_prefix)``; ``{L}`` in a source prefix matches a block index and
marks a stacked parameter (the target has a leading layer axis). A source key takes the first rule
whose prefix matches, and keeps the rest of its name after the target prefix. A target of ``None``
drops the key (only for weights Wan never uses). Several source keys may name one target only when
they are tied copies of one weight (UMT5's ``shared`` / ``encoder.embed_tokens``): the first wins.
A rule that an earlier rule of its table shadows (it could never match) is an error when the table is
built (:func:`rules`).

Sources in another naming (original Wan-AI checkpoints, ComfyUI single files) reach these tables under
diffusers' names: :mod:`wan_convert.original` renames their tensors with the ``ORIGINAL_*`` tables of
``wan_runtime.names`` (the original spelling of each target's source), and messages name both spellings.

Each target carries its transforms (:mod:`wan_convert.transforms`): today a :class:`Squeeze` where the
source has size-one axes the leaf drops (``gamma`` (C,1,1,1) -> (C,), ``scale_shift_table`` (1,6,D) ->
(6,D)) and the final :class:`Cast` (a :class:`Quantize` for a leaf the tree declares quantized, which
also fills its ``<path>_scale`` sibling); linear weights keep torch's (out, in) layout, so conversion is a
pure stacking copy with a fused cast. :func:`plan` fails on any source key not consumed, target leaf
not produced, missing layer, or shape that does not match the runtime's tree.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from wan_runtime import names
from wan_runtime.format import QUANT_DTYPES, WEIGHT_DTYPES, Leaf, flatten, np_dtype

from .source import SourceError, TensorInfo, label
from .transforms import Cast, Quantize, Squeeze, Transform

#: source dtypes a weight may have (integer or bool tensors are never Wan weights: casting them would be silent garbage)
FLOAT_DTYPES = frozenset({"float64", *WEIGHT_DTYPES})
#: a hook that edits a target's default transforms: (component, target) -> its transforms (e.g. a LoRA
#: merge inserted before the cast); :func:`plan`, ``convert`` and ``verify`` take one
Transforms = Callable[[str, "Target"], Sequence[Transform]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """``source`` prefix (``{L}``: a block index) -> ``target`` prefix (None: the key is dropped)."""

    source: str
    target: str | None

    @property
    def stacked(self) -> bool:
        return "{L}" in self.source

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.source).replace(re.escape("{L}"), r"(?P<L>\d+)"))

    def shadows(self, later: Rule) -> bool:
        """Whether this rule matches every name ``later`` matches (so, tried first, ``later`` never matches).
        ``later``'s prefix is matched with its ``{L}`` as a placeholder that only this rule's ``{L}`` matches."""
        symbolic = re.escape(self.source).replace(re.escape("{L}"), r"[\d\0]+")
        return re.match(symbolic, later.source.replace("{L}", "\0")) is not None


def rules(*pairs: tuple[str, str | None]) -> tuple[Rule, ...]:
    """A component's table, tried in order (first match wins); ValueError for a rule an earlier one shadows."""
    table: list[Rule] = []
    for src, dst in pairs:
        rule = Rule(src, dst)
        for earlier in table:
            if earlier.shadows(rule):
                raise ValueError(f"mapping rule {src!r} -> {dst!r} can never match: the earlier rule "
                                 f"{earlier.source!r} matches every name it would")
        table.append(rule)
    return tuple(table)


TRANSFORMER = rules(*names.TRANSFORMER)  # diffusers' WanTransformer3DModel (the runtime's own table)

TEXT_ENCODER = rules(  # transformers UMT5EncoderModel
    ("encoder.block.{L}.layer.0.SelfAttention.", "blocks.attn."),
    ("encoder.block.{L}.layer.0.layer_norm.", "blocks.attn_norm."),
    ("encoder.block.{L}.layer.1.DenseReluDense.", "blocks.ffn."),
    ("encoder.block.{L}.layer.1.layer_norm.", "blocks.ffn_norm."),
    ("encoder.final_layer_norm.", "final_norm."),
    ("shared.", "shared."),
    ("encoder.embed_tokens.", "shared."),  # tied copy of shared
)

IMAGE_ENCODER = rules(  # transformers CLIPVisionModel(WithProjection)
    ("vision_model.embeddings.", "embeddings."),
    ("vision_model.pre_layrnorm.", "pre_layrnorm."),
    ("vision_model.encoder.layers.{L}.", "layers."),
    ("vision_model.post_layernorm.", None),  # Wan reads the penultimate hidden states
    ("visual_projection.", None),
)

VAE = rules(("", ""))

TABLES: dict[str, tuple[Rule, ...]] = {
    "transformer": TRANSFORMER,
    "transformer_2": TRANSFORMER,
    "text_encoder": TEXT_ENCODER,
    "image_encoder": IMAGE_ENCODER,
    "vae": VAE,
}


@dataclasses.dataclass
class Target:
    """One leaf of the output tree: where its data comes from and the transforms that make it."""

    path: str
    leaf: Leaf
    sources: list[TensorInfo | None]  # one per layer for stacked leaves, else one
    transforms: list[Transform] = dataclasses.field(default_factory=list)  # set by plan(); the last one stores
    output: str = ""  # a sibling leaf of the last transform's ``outputs`` ("" = the value itself)

    @property
    def stacked(self) -> bool:
        return bool(self.leaf.axes) and self.leaf.axes[0] == "layers"

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one layer of the leaf (the whole leaf's shape if it is not stacked)."""
        return self.leaf.shape[1:] if self.stacked else self.leaf.shape

    @property
    def in_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources if s is not None)

    @property
    def splittable(self) -> bool:
        """Whether a layer may be converted in row ranges (every step before the store is a view)."""
        return all(t.view for t in self.transforms[:-1])

    @property
    def sibling_paths(self) -> list[str]:
        """The leaves the last transform fills besides this one (``<path>_<output>``; none for a sibling)."""
        return [] if self.output else [f"{self.path}_{o}" for o in self.transforms[-1].outputs]

    def names(self, layer: int) -> list[str]:
        """The source tensors one layer reads: its own and the transforms' inputs."""
        name = self.sources[layer].name
        return [name, *(n for t in self.transforms for n in t.inputs(name))]

    def value(self, layer: int, fetch: Callable[[str], np.ndarray]) -> np.ndarray:
        """One layer (the whole leaf if unstacked) after every transform but the last, storing one."""
        name = self.sources[layer].name
        x = fetch(name)
        for t in self.transforms[:-1]:
            x = t.apply(x, {n: fetch(n) for n in t.inputs(name)}, layer if self.stacked else None)
        return x

    def store(self, out: np.ndarray, x: np.ndarray, region=...) -> None:
        """Fill ``out`` with ``region`` of one layer of the leaf, from that layer's :meth:`value` ``x``."""
        self.transforms[-1].store(out, x, region, self.output)

    def layer(self, layer: int, fetch: Callable[[str], np.ndarray]) -> np.ndarray:
        """One layer of the leaf (the whole leaf if unstacked) as stored: every transform applied."""
        out = np.empty(self.layer_shape, np_dtype(self.leaf.dtype))
        self.store(out, self.value(layer, fetch))
        return out


def plan(component: str, tensors: Mapping[str, TensorInfo], tree: Mapping,
         transforms: Transforms | None = None) -> list[Target]:
    """Match every source tensor of a component to a leaf of its runtime tree and give each target its
    transforms (see module doc; ``transforms`` may edit them). A tensor that matches no leaf is an error
    unless a transform reads it as an input."""
    leaves: dict[str, Leaf] = flatten(tree)
    targets = {p: Target(p, leaf, [None] * (leaf.shape[0] if leaf.axes[:1] == ("layers",) else 1))
               for p, leaf in leaves.items()}
    unplaced: dict[str, SourceError] = {}
    claimed: set[tuple[str, int]] = set()
    for name in sorted(tensors):
        error = _place(component, tensors[name], targets, claimed)
        if error is not None:
            unplaced[name] = error
    for tgt in targets.values():
        _chain(component, tgt, transforms)
    consumed = _link(component, targets, tensors)
    for name in sorted(set(unplaced) - consumed):
        raise unplaced[name]
    files = {t.file for t in tensors.values()}
    where = (files.pop() if len(files) == 1 else next(iter(files)).parent) if files else component
    for tgt in targets.values():
        missing = [i for i, s in enumerate(tgt.sources) if s is None]
        if missing:
            what = f"block {missing[0]} (of {len(tgt.sources)} in config.json) of " if tgt.stacked else ""
            raise SourceError(f"{where}: no source tensor for {what}{tgt.path} (the weights do not match "
                              "config.json, or a shard is incomplete)")
    return [targets[p] for p in sorted(targets)]


def _place(component: str, info: TensorInfo, targets: dict[str, Target], claimed: set) -> SourceError | None:
    """Make ``info`` the source of its target's layer. A tensor with no place is returned as an error
    (plan raises it unless a transform reads the tensor); one that contradicts the tree raises here."""
    name, shown = info.name, label(info)
    for rule in TABLES[component]:
        m = rule.pattern.match(name)
        if m:
            break
    else:
        return SourceError(f"{info.file}: tensor {shown} is not part of a Wan {component}")
    if rule.target is None:
        return None
    if info.dtype not in FLOAT_DTYPES:
        raise SourceError(f"{info.file}: tensor {shown} has dtype {info.dtype}; Wan weights are floating point")
    path = rule.target + name[m.end():]
    tgt = targets.get(path)
    if tgt is None:
        return SourceError(f"{info.file}: tensor {shown} has no place in the {component} "
                           f"(runtime path {path}); is config.json right for these weights?")
    layer = int(m.group("L")) if rule.stacked else 0
    if rule.stacked != tgt.stacked:
        raise SourceError(f"{info.file}: tensor {shown}: stacking mismatch with {path}")
    if layer >= len(tgt.sources):
        raise SourceError(f"{info.file}: tensor {shown}: block {layer} but config.json says "
                          f"{len(tgt.sources)} layers")
    if _squeeze(info.shape) != _squeeze(tgt.layer_shape):
        raise SourceError(f"{info.file}: tensor {shown} has shape {list(info.shape)}, expected "
                          f"{list(tgt.layer_shape)} from config.json")
    if (path, layer) not in claimed:  # else a tied copy (see module doc): the first source by name order wins
        claimed.add((path, layer))
        tgt.sources[layer] = info
    return None


def _squeeze(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _chain(component: str, tgt: Target, edit: Transforms | None) -> None:
    """A target's transforms: Squeeze where a source's shape differs from the leaf's, then the Cast, or
    the Quantize of a leaf the tree declares quantized (its ``_scale`` sibling gets the chain in :func:`_link`)."""
    want = tgt.layer_shape
    steps: list[Transform] = [Squeeze(want)] if any(s is not None and s.shape != want for s in tgt.sources) else []
    last = Quantize(tgt.leaf.dtype) if tgt.leaf.dtype in QUANT_DTYPES else Cast(tgt.leaf.dtype)
    tgt.transforms = [*steps, last]
    if edit is not None:
        tgt.transforms = list(edit(component, tgt))
        if not tgt.transforms:
            raise ValueError(f"{component}/{tgt.path}: no transforms (the last one stores the leaf)")


def _link(component: str, targets: dict[str, Target], tensors: Mapping[str, TensorInfo]) -> set[str]:
    """Check the transforms' inputs exist (returned: they count as consumed) and hand each extra output
    of a last transform to its sibling leaf ``<path>_<output>``."""
    consumed: set[str] = set()
    for tgt in list(targets.values()):
        for layer, info in enumerate(tgt.sources):
            for name in tgt.names(layer)[1:] if info is not None else ():
                if name not in tensors:
                    raise SourceError(f"{info.file.parent}: no tensor {name} (an input of {tgt.path})")
                consumed.add(name)
        for output in tgt.transforms[-1].outputs if not tgt.output else ():
            sibling = targets.get(f"{tgt.path}_{output}")
            if sibling is None:
                raise SourceError(f"{component}: the runtime's tree has no {tgt.path}_{output} for the "
                                  f"{output} of {tgt.path}")
            sibling.sources, sibling.transforms, sibling.output = tgt.sources, tgt.transforms, output
    return consumed


def tree_from_state_dict(component: str, state_dict: Mapping[str, np.ndarray], config: Mapping,
                         weights_dtype: str = "float32", transforms: Transforms | None = None) -> dict:
    """In-memory conversion of a {name: numpy array} state dict into the runtime's nested param tree
    (tests and tools; the converter streams instead), every target's transforms applied."""
    import pathlib

    from wan_runtime.format import component_tree, unflatten

    mem = pathlib.Path("<memory>")
    infos = {k: TensorInfo(k, mem, str(v.dtype), tuple(v.shape), 0, v.nbytes) for k, v in state_dict.items()}
    out = {}
    for tgt in plan(component, infos, component_tree(component, config, weights_dtype), transforms):
        layers = [tgt.layer(i, state_dict.__getitem__) for i in range(len(tgt.sources))]
        out[tgt.path] = np.stack(layers) if tgt.stacked else layers[0]
    return unflatten(out)
