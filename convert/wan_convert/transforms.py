"""Per-target transforms: the steps that turn a target's source tensor(s) into its stored leaf.

Every target (:class:`wan_convert.mapping.Target`) carries a list of transforms, applied in one place
(``Target.value`` and ``Target.store``): the converter runs them on its units of work, ``verify`` and
``tree_from_state_dict`` replay them. All steps but the last map one layer's value to the next
(numpy arrays; :class:`Squeeze` is a free reshape of the source's mmap view). The last step stores:
it writes a region of the leaf into a buffer of the leaf's dtype, so the cast is fused into the one
copy from the source's pages into each chunk buffer (:class:`Cast`).

A new transform is one class:

- a LoRA merge (``W + s * B @ A`` in float32) returns the names of its A and B from :meth:`Transform.inputs`
  (``plan`` checks they exist and counts them consumed; the converter reads and releases them with the
  layer's source) and computes in :meth:`Transform.apply`, with ``view = False`` (the converter then
  gives each layer of the target one unit of work instead of splitting it into row ranges);
- a quantizer is a last step: :meth:`Transform.store` writes the quantized values, and with
  ``outputs = ("scale",)`` the per-channel scales into the sibling leaf ``<path>_scale`` (a target of
  its own with the same sources and transforms and ``output="scale"``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


class Transform:
    """One step of a target's chain. Subclasses override what they need (see the module doc)."""

    #: :meth:`apply` copies nothing (a reshape or a view): a unit of work may cover part of a layer
    view: bool = True
    #: extra leaves a last step fills besides its own (leaf ``<path>_<output>``)
    outputs: tuple[str, ...] = ()

    def inputs(self, name: str) -> tuple[str, ...]:
        """Names of the extra source tensors this step reads, for the layer whose source tensor is ``name``."""
        return ()

    def apply(self, x: np.ndarray, extra: Mapping[str, np.ndarray]) -> np.ndarray:
        """One layer's value after this step; ``extra`` holds the tensors :meth:`inputs` named."""
        return x

    def store(self, out: np.ndarray, x: np.ndarray, region, output: str = "") -> None:
        """Last step only: fill ``out`` with ``region`` (an index into one layer of the leaf) of the leaf,
        from the whole layer's value ``x``; ``output`` is one of :attr:`outputs`, or "" for the leaf itself."""
        raise TypeError(f"{self!r} cannot be the last transform of a target")


@dataclasses.dataclass(frozen=True)
class Squeeze(Transform):
    """Drop (or add) size-one axes: a norm's gamma (C, 1, 1, 1) -> (C,), ``scale_shift_table`` (1, 6, D) -> (6, D)."""

    shape: tuple[int, ...]

    def apply(self, x: np.ndarray, extra: Mapping[str, np.ndarray]) -> np.ndarray:
        return x.reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Cast(Transform):
    """The final cast to the leaf's dtype, fused into the copy into ``out`` (numpy's casting: round to
    nearest even for bfloat16, the same bits as torch's ``.to(torch.bfloat16)``)."""

    dtype: str

    def store(self, out: np.ndarray, x: np.ndarray, region, output: str = "") -> None:
        np.copyto(out, x[region], casting="unsafe")
