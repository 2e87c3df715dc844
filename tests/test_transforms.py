"""Per-target transforms (wan_convert.transforms): applied in one place, replayed by verify; mapping tables
that shadow a rule are refused when built."""
import json
import pathlib
import struct

import numpy as np
import pytest

from wan_convert.convert import convert
from wan_convert.mapping import TABLES, Target, plan, rules
from wan_convert.source import Component, SourceError, TensorInfo
from wan_convert.transforms import Cast, Squeeze, Transform
from wan_convert.verify import VerifyError, verify
from wan_runtime import format as fmt

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "assets" / "tiny-wan2.1-t2v"


def test_shadowed_rule_is_an_error():
    with pytest.raises(ValueError, match=r"'blocks.\{L\}.attn1.' -> 'x.' can never match: the earlier rule 'blocks.\{L\}.'"):
        rules(("blocks.{L}.", "blocks."), ("blocks.{L}.attn1.", "x."))
    with pytest.raises(ValueError, match="can never match"):
        rules(("blocks.{L}.", "blocks."), ("blocks.3.attn1.", "x."))  # a literal block index is a block index
    with pytest.raises(ValueError, match="can never match"):
        rules(("", ""), ("shared.", "shared."))  # after a catch-all
    with pytest.raises(ValueError, match="can never match"):
        rules(("shared.", "shared."), ("shared.", None))  # the same prefix twice
    # specific before general, and a literal index before {L}, are fine
    assert len(rules(("blocks.{L}.attn1.", "x."), ("blocks.{L}.", "blocks."), ("", ""))) == 3
    assert len(rules(("blocks.1.", "one."), ("blocks.{L}.", "blocks."))) == 2
    assert all(TABLES.values())  # the real tables were built (and checked) at import


def test_targets_carry_their_transforms():
    comp = Component(TINY / "transformer")
    try:
        targets = {t.path: t for t in plan("transformer", comp.tensors, fmt.component_tree("transformer", comp.config))}
    finally:
        comp.close()
    sst = targets["blocks.scale_shift_table"]  # (1, 6, D) per layer -> (6, D)
    assert sst.transforms == [Squeeze(sst.layer_shape), Cast("float32")]
    assert targets["blocks.attn1.to_q.weight"].transforms == [Cast("bfloat16")]


class _PlusInput(Transform):
    """Adds another source tensor of the same layer (a stand-in for a LoRA merge: a transform with inputs)."""

    view = False

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def inputs(self, name):
        return (name.replace(self.old, self.new),)

    def apply(self, x, extra, layer=None):
        (other,) = extra.values()
        return x.astype(np.float32) + other


class _Double(Transform):
    view = False

    def apply(self, x, extra, layer=None):
        return x.astype(np.float32) * 2


def _edit(component, target: Target):
    steps = target.transforms
    if target.path == "blocks.attn1.to_q.weight":
        return [*steps[:-1], _PlusInput("to_q", "to_k"), steps[-1]]
    if target.path == "condition_embedder.text_embedder.linear_1.weight":  # unstacked, two chunk rows on fsdp=2
        return [*steps[:-1], _Double(), steps[-1]]
    return steps


def _alter_chunk(path: pathlib.Path, offset: int = 0) -> None:
    """Flip a byte of a chunk and write a valid crc32c: only the comparison with the source can tell."""
    from crc32c import crc32c

    data = bytearray(path.read_bytes()[:-4])
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data) + struct.pack("<I", crc32c(bytes(data))))


def test_verify_replays_the_transforms(tmp_path):
    import ml_dtypes
    import tensorstore as ts

    out = convert(str(TINY), tmp_path / "ck", mesh="fsdp=2", only=["transformer"], transforms=_edit,
                  hash_source=False).output
    assert verify(out, str(TINY), transforms=_edit) > 0
    comp = Component(TINY / "transformer")
    try:
        q, k = comp.array("blocks.1.attn1.to_q.weight"), comp.array("blocks.1.attn1.to_k.weight")
        lin = comp.array("condition_embedder.text_embedder.linear_1.weight")

        def stored(path):
            return ts.open(fmt.zarr_spec(out / "transformer", path), open=True).result().read().result()

        assert np.array_equal(stored("blocks.attn1.to_q.weight")[1], (q + k).astype(ml_dtypes.bfloat16))
        assert np.array_equal(stored("condition_embedder.text_embedder.linear_1.weight"),
                              (lin * 2).astype(ml_dtypes.bfloat16))
    finally:
        comp.close()
    with pytest.raises(VerifyError, match=r"transformer/blocks.attn1.to_q.weight layer 0: differs from source tensor "
                                          r"blocks.0.attn1.to_q.weight"):
        verify(out, str(TINY))  # without the edit, verify expects the plain cast
    # a chunk of a squeezed leaf altered after conversion (its checksum still valid)
    table = out / "transformer" / "blocks.scale_shift_table"
    layers, *layer = json.loads((table / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
    assert layers == 2  # a small leaf (sharding.SMALL_LAYER_CHUNK): both layers in one chunk, float32
    _alter_chunk(table / fmt.chunk_key((0, 0, 0)), offset=4 * int(np.prod(layer)))  # layer 1's first byte
    assert verify(out) == 0  # every chunk reads back: the damage is invisible without the source
    with pytest.raises(VerifyError, match=r"transformer/blocks.scale_shift_table layer 1: differs from source "
                                          r"tensor blocks.1.scale_shift_table"):
        verify(out, str(TINY), transforms=_edit)


class _ToyLora(Transform):
    view = False

    def inputs(self, name):
        return (f"{name}.lora_B", f"{name}.lora_A")

    def apply(self, x, extra, layer=None):
        b, a = extra.values()
        return x.astype(np.float32) + b @ a


class _ToyQuantize(Transform):
    """A last transform with a second output: int8 values and their per-row scales (leaf ``<path>_scale``)."""

    outputs = ("scale",)

    def store(self, out, x, region, output=""):
        scale = np.abs(x).max(axis=-1) / 127
        np.copyto(out, (scale if output else np.round(x / scale[:, None]))[region], casting="unsafe")


def test_transform_inputs_and_outputs_in_memory():
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3), np.float32), "w.lora_B": rng.standard_normal((4, 2), np.float32),
              "w.lora_A": rng.standard_normal((2, 3), np.float32)}
    mem = pathlib.Path("<memory>")
    infos = {k: TensorInfo(k, mem, "float32", v.shape, 0, v.nbytes) for k, v in arrays.items()}
    tree = {"w": fmt.Leaf((4, 3), "int8", (None, None)), "w_scale": fmt.Leaf((4,), "float32", (None,))}

    def edit(component, target):
        return [_ToyLora(), _ToyQuantize()] if target.path == "w" else target.transforms

    targets = {t.path: t for t in plan("vae", infos, tree, edit)}
    assert targets["w_scale"].output == "scale" and targets["w_scale"].sources == targets["w"].sources
    assert targets["w"].names(0) == ["w", "w.lora_B", "w.lora_A"]
    merged = arrays["w"] + arrays["w.lora_B"] @ arrays["w.lora_A"]
    scale = np.abs(merged).max(axis=-1) / 127
    assert np.array_equal(targets["w_scale"].layer(0, arrays.__getitem__), scale)
    assert np.array_equal(targets["w"].layer(0, arrays.__getitem__), np.round(merged / scale[:, None]).astype(np.int8))
    with pytest.raises(SourceError, match="tensor w.lora_A has no place"):
        plan("vae", infos, tree)  # without the LoRA transform nothing reads its tensors
    del infos["w.lora_A"]
    with pytest.raises(SourceError, match="no tensor w.lora_A"):
        plan("vae", infos, tree, edit)
