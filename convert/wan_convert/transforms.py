"""Per-target transforms: the steps that turn a target's source tensor(s) into its stored leaf.

Every target (:class:`wan_convert.mapping.Target`) carries a list of transforms, applied in one place
(``Target.value`` and ``Target.store``): the converter runs them on its units of work, ``verify`` and
``tree_from_state_dict`` replay them. All steps but the last map one layer's value to the next
(numpy arrays; :class:`Squeeze` is a free reshape of the source's mmap view). The last step stores:
it writes a region of the leaf into a buffer of the leaf's dtype, so the cast is fused into the one
copy from the source's pages into each chunk buffer (:class:`Cast`).

A new transform is one class:

- a step that reads other source tensors returns their names from :meth:`Transform.inputs` (``plan``
  checks they exist and counts them consumed; the converter reads and releases them with the layer's
  source) and computes in :meth:`Transform.apply`, with ``view = False`` (the converter then gives each
  layer of the target one unit of work instead of splitting it into row ranges);
- :class:`LoraMerge` (``wan-convert --lora``) adds LoRA deltas from files outside the source: it knows
  each layer by its source tensor's name (the ``name`` argument of :meth:`Transform.apply`), computes
  ``W + strength * delta`` in float32 when that layer is converted, and the :class:`Cast` after it
  rounds the sum. :func:`with_loras` is the hook (``mapping.Transforms``) that inserts it, only in the
  targets a LoRA of nonzero strength touches: every other target keeps its plain chain, bit for bit;
- a quantizer is a last step: :meth:`Transform.store` writes the quantized values, and with
  ``outputs = ("scale",)`` the per-channel scales into the sibling leaf ``<path>_scale`` (a target of
  its own with the same sources and transforms and ``output="scale"``). :class:`Quantize` is the one
  ``wan-convert --dtype float8_e4m3fn|int8`` (and ``--text-encoder-dtype``) puts last in the chain of
  every leaf the runtime's tree declares quantized (after a :class:`LoraMerge`: the float32 sum is
  quantized). Its rule is ``wan_runtime.quant.quantize_np``, which needs whole rows (the absmax of a
  row over its input axis): ``store`` is handed the whole layer ``x`` whatever its region, so a region
  that splits the columns (a chunk of a leaf sharded along its input axis) quantizes the region's whole
  rows and keeps its columns.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from wan_runtime import format as fmt
from wan_runtime import lora as lora_lib
from wan_runtime import quant

if TYPE_CHECKING:  # mapping imports this module
    from .mapping import Target, Transforms


class Transform:
    """One step of a target's chain. Subclasses override what they need (see the module doc)."""

    #: :meth:`apply` copies nothing (a reshape or a view): a unit of work may cover part of a layer
    view: bool = True
    #: extra leaves a last step fills besides its own (leaf ``<path>_<output>``)
    outputs: tuple[str, ...] = ()

    def inputs(self, name: str) -> tuple[str, ...]:
        """Names of the extra source tensors this step reads, for the layer whose source tensor is ``name``."""
        return ()

    def apply(self, x: np.ndarray, extra: Mapping[str, np.ndarray], layer: int | None = None) -> np.ndarray:
        """One layer's value after this step; ``extra`` holds the tensors :meth:`inputs` named; ``layer`` is
        which layer of a stacked leaf it is (None for an unstacked leaf)."""
        return x

    def store(self, out: np.ndarray, x: np.ndarray, region, output: str = "") -> None:
        """Last step only: fill ``out`` with ``region`` (an index into one layer of the leaf) of the leaf,
        from the whole layer's value ``x``; ``output`` is one of :attr:`outputs`, or "" for the leaf itself."""
        raise TypeError(f"{self!r} cannot be the last transform of a target")


@dataclasses.dataclass(frozen=True)
class Squeeze(Transform):
    """Drop (or add) size-one axes: a norm's gamma (C, 1, 1, 1) -> (C,), ``scale_shift_table`` (1, 6, D) -> (6, D)."""

    shape: tuple[int, ...]

    def apply(self, x: np.ndarray, extra: Mapping[str, np.ndarray], layer: int | None = None) -> np.ndarray:
        return x.reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Cast(Transform):
    """The final cast to the leaf's dtype, fused into the copy into ``out`` (numpy's casting: round to
    nearest even for bfloat16, the same bits as torch's ``.to(torch.bfloat16)``)."""

    dtype: str

    def store(self, out: np.ndarray, x: np.ndarray, region, output: str = "") -> None:
        np.copyto(out, x[region], casting="unsafe")


@dataclasses.dataclass(frozen=True, eq=False)
class LoraMerge(Transform):
    """``W + sum(strength * delta)`` in float32 for the layers of one leaf that ``loras`` touch
    (``wan_runtime.lora.merge``, in the LoRAs' order); a layer they do not touch passes unchanged."""

    path: str  # the runtime tree's leaf (a Delta's ``path``)
    loras: tuple[lora_lib.Lora, ...]  # only their deltas for ``path``
    view = False  # the whole layer is needed (a matmul): one unit of work per layer

    def apply(self, x: np.ndarray, extra: Mapping[str, np.ndarray], layer: int | None = None) -> np.ndarray:
        if not lora_lib.touches(self.path, layer, self.loras):
            return x
        return lora_lib.merge(self.path, layer, x, self.loras)


@dataclasses.dataclass(frozen=True)
class Quantize(Transform):
    """The last step of a quantized leaf (``format.QUANT_DTYPES``): ``wan_runtime.quant.quantize_np`` of the
    layer (symmetric absmax per output row, round to nearest even, saturating), the values into the leaf
    and, for ``output="scale"``, the float32 scales into ``<path>_scale`` (see the module doc)."""

    dtype: str
    outputs = ("scale",)  # a class attribute, not a field

    #: the most float32 bytes of the layer one ``quantize_np`` call sees: its temporaries stay in cache
    #: (measured on 8960 x 1536: 1 MiB blocks quantize 2x faster than 32 MiB ones, e4m3 ~1 GB/s per thread)
    BLOCK_BYTES = 1 << 20

    def store(self, out: np.ndarray, x: np.ndarray, region, output: str = "") -> None:
        if output not in ("", "scale"):
            raise ValueError(f"Quantize has no output {output!r}")
        if x.ndim < 2:
            raise ValueError(f"Quantize needs a weight of at least 2 axes (rows, in), got shape {x.shape}")
        region = region if isinstance(region, tuple) else ()  # ... : the whole layer
        rows = region[0] if region else slice(None)
        q, scale = _quantized_rows(x, rows, self.dtype, self.BLOCK_BYTES, values=not output)
        np.copyto(out, (scale if output else q)[(slice(None), *region[1:])])

    @staticmethod
    def record(dtypes: Mapping[str, str]) -> dict:
        """The manifest's ``dtype_policy.quantization`` for a checkpoint whose components ``dtypes`` (component
        -> quantized dtype, e.g. {"transformer": "float8_e4m3fn", "text_encoder": "int8"}) hold quantized leaves."""
        return {"components": dict(sorted(dtypes.items())), "scheme": "symmetric absmax per output channel",
                "max": {d: fmt.QUANT_DTYPES[d] for d in sorted(set(dtypes.values()))},
                "rounding": "nearest even, saturating", "scale": "<weight>_scale float32",
                "rule": "wan_runtime.quant.quantize_np"}


#: per thread, the rows of one layer already quantized: the chunks of a unit that split the columns share
#: their rows, and the scales' chunks (written by the same unit) the weight's rows
_MEMO = threading.local()


def _quantized_rows(x: np.ndarray, rows: slice, dtype: str, block_bytes: int,
                    values: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """(q, scale) of the whole rows ``rows`` of ``x`` (q None if not ``values`` and not known), remembered
    while this thread sees the same array (held weakly: forgotten when ``x`` dies, so at most one layer)."""
    memo = _MEMO.__dict__
    ref = memo.get("ref")
    if ref is None or ref() is not x or memo["how"] != (dtype, block_bytes):
        memo.clear()
        memo.update(ref=weakref.ref(x, lambda _, m=memo: m.clear()), how=(dtype, block_bytes), rows={})
    key = rows.indices(x.shape[0])[:2]
    hit = memo["rows"].get(key)
    if hit is None or (values and hit[0] is None):
        hit = memo["rows"][key] = _quantize_blocks(x[rows], dtype, block_bytes, values)
    return hit


def _quantize_blocks(w: np.ndarray, dtype: str, block_bytes: int,
                     values: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """``quant.quantize_np(w)`` computed a block of whole rows at a time (the rule is per row: same bits);
    without ``values`` only the scales are kept."""
    step = max(1, block_bytes // (4 * max(1, math.prod(w.shape[1:]))))
    q = np.empty(w.shape, fmt.np_dtype(dtype)) if values else None
    scale = np.empty(w.shape[:-1], np.float32)
    for r in range(0, w.shape[0], step):
        block_q, scale[r:r + step] = quant.quantize_np(w[r:r + step], dtype)
        if q is not None:
            q[r:r + step] = block_q
    return q, scale


def with_loras(loras: Mapping[str, Sequence[lora_lib.Lora]], edit: "Transforms | None" = None) -> "Transforms":
    """A ``transforms`` hook for ``plan`` / ``convert`` / ``verify``: ``edit``'s chain (default: the plan's),
    with a :class:`LoraMerge` before the last step of each target of component ``c`` that a LoRA of
    ``loras[c]`` with a nonzero strength touches. Other targets keep their chain unchanged, so a LoRA at
    strength 0 converts bitwise-identically to none."""
    active = {c: tuple(lo for lo in los if lo.strength != 0) for c, los in loras.items()}
    touched = {c: {d.path for lo in los for d in lo.deltas} for c, los in active.items()}

    def hook(component: str, target: "Target") -> Sequence[Transform]:
        steps = list(edit(component, target) if edit is not None else target.transforms)
        if target.path not in touched.get(component, ()):
            return steps
        own = tuple(dataclasses.replace(lo, deltas=tuple(d for d in lo.deltas if d.path == target.path))
                    for lo in active[component])
        return [*steps[:-1], LoraMerge(target.path, tuple(lo for lo in own if lo.deltas)), steps[-1]]

    return hook
